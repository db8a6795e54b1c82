"""The photo stays the photo: beyond the seam band of the mask, every pixel of the output is the upload's,
bit for bit, at full resolution, through `Editor.edit` and the CLI, for every method and by default."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from blended import EditConfig
from blended.images import Region, composite, seam_weights
from test_cli import run_cli

PHOTOS = Path(__file__).resolve().parent.parent / "assets" / "photos"
FAST = dict(num_inference_steps=3, num_candidates=2, decoder_steps=3, latent_steps=3, rank=False)


def large_photo(w: int = 1600, h: int = 1200) -> Image.Image:
    """A detailed picture: a real photo scaled up, fine noise texture, a checkerboard and lines of text."""
    base = Image.open(PHOTOS / "chelsea.png").convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(base, np.int16) + np.random.default_rng(0).integers(-12, 13, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    a[(yy // 6 + xx // 6) % 2 == 0] //= 2  # a fine checkerboard over the top band
    a[h // 3:] = (np.asarray(base, np.int16) + np.random.default_rng(1).integers(-12, 13, (h, w, 3)))[h // 3:]
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        draw.text((40, 420 + 60 * i), f"line {i}: the photo must stay the photo 0123456789", fill=(255, 255, 255))
    return img


def irregular_mask(w: int = 1600, h: int = 1200) -> Image.Image:
    """A blob: an ellipse, a rotated polygon and a thin brush stroke, joined."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    d.ellipse((700, 420, 980, 640), fill=255)
    d.polygon([(900, 600), (1120, 560), (1060, 800), (940, 760)], fill=255)
    d.line([(980, 430), (1180, 380), (1260, 470)], fill=255, width=9)
    return m


def distance_outside(mask: Image.Image) -> np.ndarray:
    """Euclidean distance in pixels from each pixel to the mask (0 inside)."""
    outside = (np.asarray(mask) < 128).astype(np.uint8)
    return cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=-1)


@pytest.fixture(scope="module")
def big():
    return large_photo(), irregular_mask()


@pytest.mark.parametrize("method", ["default", "stitch", "poisson", "latent", "decoder"])
def test_large_photo_unchanged_beyond_the_band(sd1_editor, big, method):
    image, mask = big
    kw = {} if method == "default" else {"background": method}
    r = sd1_editor.edit(image, mask, "a red circle", **FAST, **kw)
    assert not r.region.whole and r.region.work_size[0] < r.region.size[0]  # a crop, scaled down to work at
    far = distance_outside(mask) > r.config.feather
    for im in r.images:
        assert im.size == image.size
        diff = changed(im, image)
        assert not diff[far].any(), f"{diff[far].sum()} pixels changed beyond the band"
        assert diff[np.asarray(mask) > 127].mean() > 0.5, "the edit is there"


def test_none_is_the_papers_raw_output_over_the_whole_crop(sd1_editor, big):
    image, mask = big
    r = sd1_editor.edit(image, mask, "a red circle", background="none", **FAST)
    far = distance_outside(mask) > r.config.feather
    assert changed(r.images[0], image)[far].sum() > 1000  # the decode of the whole crop: a box around the edit
    l, t, rr, b = r.region.box
    outside_box = np.ones(far.shape, bool)
    outside_box[t:b, l:rr] = False
    assert not changed(r.images[0], image)[outside_box].any()


def test_default_is_exact():
    assert EditConfig().background != "none" and EditConfig().exact_outside


def test_whole_image_unchanged_beyond_the_band(sd1_editor):
    image = large_photo(40, 36)
    mask = Image.new("L", (40, 36), 0)
    ImageDraw.Draw(mask).polygon([(10, 8), (28, 10), (24, 26), (12, 22)], fill=255)
    for method in ("default", "stitch", "decoder"):
        kw = {} if method == "default" else {"background": method}
        r = sd1_editor.edit(image, mask, "a red circle", feather=3, **FAST, **kw)
        assert r.region.whole
        far = distance_outside(mask) > 3
        for im in r.images:
            assert not changed(im, image)[far].any(), method


@pytest.mark.parametrize("feather", [4, 20])
def test_band_width_follows_feather_at_full_resolution(sd1_editor, big, feather):
    image, mask = big
    r = sd1_editor.edit(image, mask, "a red circle", feather=feather, **FAST)
    dist = distance_outside(mask)
    diff = changed(r.images[0], image)
    assert not diff[dist > feather].any()
    outer = (dist > feather * 0.6) & (dist <= feather)  # the band's outer part, in the upload's own pixels
    assert diff[outer].mean() > 0.3, "the band reaches `feather` pixels of the upload, not of the work size"


def test_cli_large_photo_default_and_decoder(tiny_dirs, big, tmp_path):
    image, mask = big
    image.save(tmp_path / "photo.png")
    mask.save(tmp_path / "mask.png")
    for extra, feather in (([], 8), (["--background", "decoder"], 8), (["--resolution", "64", "--feather", "3"], 3)):
        out = tmp_path / ("out" + "".join(extra))
        p = run_cli("edit", "--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "--prompt", "a cat",
                    "--model", tiny_dirs["sd1"], "--candidates", 1, "--steps", 3, "--no-rank", "--out", out, *extra)
        assert p.returncode == 0, p.stderr
        result = Image.open(out / "01.png")
        assert result.size == image.size
        assert not changed(result, image)[distance_outside(mask) > feather].any(), extra
        work = json.loads((out / "result.json").read_text())["region"]["work_size"]
        assert min(work) == (64 if "--resolution" in extra else 32)  # the tiny model's native size is 32


def test_composite_is_bit_exact_where_the_weight_is_zero():
    rng = np.random.default_rng(3)
    src = Image.fromarray(rng.integers(0, 256, (90, 120, 3), np.uint8))
    mask = np.zeros((90, 120), bool)
    mask[40:50, 50:70] = True
    region = Region(box=(30, 20, 100, 80), work_size=(35, 30), whole=False)
    w = seam_weights(mask[20:80, 30:100], 5)
    assert w.max() == 1 and w[0].max() == 0 and w[:, 0].max() == 0
    out = np.asarray(composite(src, Image.new("RGB", (35, 30), (255, 0, 0)), region, w))
    full_w = np.zeros((90, 120), np.float32)
    full_w[20:80, 30:100] = w
    assert np.array_equal(out[full_w == 0], np.asarray(src)[full_w == 0])
    assert (out[mask] == [255, 0, 0]).all()
    with pytest.raises(ValueError, match="cover"):
        composite(src, Image.new("RGB", (35, 30)), region, w[:-1])


def test_crop_keeps_room_for_the_band(sd1_editor, big):
    """The crop holds the mask and its whole seam band even with no crop margin, so the band is never cut."""
    image, mask = big
    r = sd1_editor.edit(image, mask, "a red circle", crop_margin=0, feather=12, **FAST)
    ml, mt, mr, mb = Image.fromarray(np.asarray(mask)).getbbox()
    l, t, rr, b = r.region.box
    assert l <= ml - 12 and t <= mt - 12 and rr >= mr + 12 and b >= mb + 12
    assert not changed(r.images[0], image)[distance_outside(mask) > 12].any()


def test_app_and_api_defaults_are_exact():
    """The app's settings and the /edit endpoint start from the editor's defaults: an exact method."""
    from ui.editing import settings_to_config
    from ui.limits import Limits

    cfg = settings_to_config(EditConfig(), {"preserve_background": False}, Limits())
    assert cfg.background == "stitch" and cfg.exact_outside
    assert settings_to_config(EditConfig(), {"preserve_background": True}, Limits()).background == "decoder"


def test_server_caps_the_resolution_setting():
    from blended import InputError
    from ui.editing import settings_to_config
    from ui.limits import Limits

    limits = Limits.from_env({"BLENDED_MAX_RESOLUTION": "768"})
    assert settings_to_config(EditConfig(), {"resolution": 768}, limits).resolution == 768
    with pytest.raises(InputError, match="at most 768"):
        settings_to_config(EditConfig(), {"resolution": 1024}, limits)
    with pytest.raises(InputError, match="resolution must be 0"):
        settings_to_config(EditConfig(), {"resolution": 32}, limits)
