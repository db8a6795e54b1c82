"""Image and mask input: EXIF, modes, sizes, thresholds; the crop plan and paste-back."""

import io

import numpy as np
import pytest
from PIL import Image

from blended.errors import InputError
from blended.images import Region, load_image, load_mask, paste_back, plan_region


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    out = load_image(_png(img, format="JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    assert np.asarray(out)[:18, :, 0].mean() > 200 and np.asarray(out)[22:, :, 0].mean() < 50


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "1", "F"])
def test_modes_become_rgb(mode):
    base = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1)))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base, np.uint16) * 257).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(np.asarray(base, np.float32) / 255.0)
    else:
        img = base.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (32, 16)
    a = np.asarray(out, np.int16)
    if mode != "1":
        assert abs(int(a[0, -1, 0]) - 255) <= 2 and a[0, 0, 0] <= 2, "full range kept"


def test_transparent_pixels_become_white():
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 3] = 255
    a[:8, :, 3] = 0
    out = np.asarray(load_image(Image.fromarray(a, "RGBA")))
    assert out[:8].min() == 255 and out[8:].max() == 0


def test_mask_from_alpha_or_brightness_with_threshold_and_invert():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:4, 2:4, 3] = 255  # a painted stroke on a transparent layer
    m = load_mask(Image.fromarray(rgba, "RGBA"), (8, 8))
    assert m.sum() == 4 and m[2:4, 2:4].all()
    grey = np.full((8, 8), 100, np.uint8)
    grey[0, 0] = 200
    assert load_mask(Image.fromarray(grey), (8, 8), threshold=0.5).sum() == 1
    assert load_mask(Image.fromarray(grey), (8, 8), threshold=0.3).sum() == 64
    assert load_mask(Image.fromarray(grey), (8, 8), threshold=0.5, invert=True).sum() == 63


@pytest.mark.parametrize("data, message", [
    (b"", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not a readable image"),
    (b"GIF89a nonsense", "not a readable image"),
])
def test_unreadable_images(data, message):
    with pytest.raises(InputError, match=message):
        load_image(data)


def test_truncated_file():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    with pytest.raises(InputError, match="truncated|not a readable"):
        load_image(data[: len(data) // 2])


def test_too_small_and_too_many_pixels():
    with pytest.raises(InputError, match="at least"):
        load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(InputError, match="over the limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=5000)


def test_plan_region_whole_and_crop():
    mask = np.zeros((3000, 4000), bool)
    mask[1000:1100, 2000:2050] = True
    r = plan_region((4000, 3000), mask, native=512, multiple=64, margin=32)
    assert not r.whole and r.size == (512, 512) and r.work_size == (512, 512)
    l, t, rr, b = r.box
    assert l <= 2000 - 32 and rr >= 2050 + 32 and t <= 1000 - 32 and b >= 1100 + 32
    small = plan_region((600, 400), mask[:400, :600] | True, native=512, multiple=64, margin=32)
    assert small.whole and small.work_size == (768, 512)  # never below native: the shorter side is scaled up to it
    big = np.zeros((3024, 4032), bool)
    big[1000:2000, 1000:2500] = True  # a 1500x1000 mask on a phone photo
    r = plan_region((4032, 3024), big, native=512, multiple=64, margin=32)
    assert r.size == (1564, 1064) and r.work_size == (768, 512)  # shorter side at native, aspect kept
    more = plan_region((4032, 3024), big, native=512, multiple=64, margin=32, resolution=1024)
    assert more.box == r.box and more.work_size == (1536, 1024)
    own = plan_region((4032, 3024), big, native=512, multiple=64, margin=32, resolution=4096)
    assert own.work_size == (1536, 1088)  # never past the region's own pixels (1564x1064, rounded to 64)
    with pytest.raises(InputError, match="aspect"):
        plan_region((900, 20), np.ones((20, 900), bool), native=512, multiple=64, margin=0)


def test_paste_back_keeps_everything_outside_the_region():
    src = Image.fromarray(np.random.default_rng(1).integers(0, 255, (100, 120, 3), np.uint8))
    region = Region(box=(40, 30, 80, 70), work_size=(32, 32), whole=False)
    out = np.asarray(paste_back(src, Image.new("RGB", (32, 32), (255, 0, 0)), region, feather=4))
    s = np.asarray(src)
    keep = np.ones((100, 120), bool)
    keep[30:70, 40:80] = False
    assert np.array_equal(out[keep], s[keep])
    assert (out[40:60, 50:70] == [255, 0, 0]).all(), "inside the ramp the edit is pasted as is"
