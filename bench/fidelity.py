"""Full-resolution fidelity: what an edit of a large photo changes outside the mask, under each background
method, and how much of the photo's detail survives inside a big mask at each working resolution.

    python -m bench.fidelity            # the bundled demo model (about 5 minutes on 2 CPU cores)
    python -m bench.fidelity --quick    # fewer rows, to check that the script runs

The photo is 1600x1200: the coffee photo scaled up with film grain, with the astronaut's face and the text
sample pasted in at their own resolution (assets/photos), so it has texture, a face and text. Part A edits
it with a blob mask (and the 512x512 astronaut with a 90x80 mask, the case of issue 12) under each method and
counts the pixels that changed beyond the seam band (`feather`, default 8 px of the upload). Part B edits a
big mask (about 800x600) at several `resolution`s and reports the high-frequency energy inside the mask
(mean squared Laplacian of the grey image) against the photo's own, with `blend_start` 0.9 so that the
content stays the photo's and only the working resolution's loss shows, and with a full-strength edit.

Writes docs/bench/fidelity.md and docs/bench/fidelity_large_photo.png (before, after, and the pixels that
changed under `none` and under the default; `--picture-only` remakes just the picture).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from blended import Editor
from blended_dev import ROOT

PHOTOS = ROOT / "assets" / "photos"
METHODS = ("none", "stitch", "poisson", "latent", "decoder")


def large_photo() -> Image.Image:
    """1600x1200: coffee scaled up with grain; the astronaut (512 px) and the text sample at their own size."""
    rng = np.random.default_rng(0)
    base = Image.open(PHOTOS / "coffee.png").convert("RGB").resize((1600, 1200), Image.Resampling.LANCZOS)
    a = np.asarray(base, np.int16) + rng.integers(-6, 7, (1200, 1600, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    img.paste(Image.open(PHOTOS / "astronaut.png").convert("RGB"), (1060, 40))
    img.paste(Image.open(PHOTOS / "text.png").convert("RGB"), (80, 990))
    return img


def blob(size: tuple[int, int], box: tuple[int, int, int, int], seed: int = 0) -> Image.Image:
    """An irregular mask inside `box`: an ellipse with a lobe and a brush stroke."""
    l, t, r, b = box
    w, h = r - l, b - t
    m = Image.new("L", size, 0)
    d = ImageDraw.Draw(m)
    d.ellipse((l, t + h * 0.1, l + w * 0.75, b), fill=255)
    d.ellipse((l + w * 0.45, t, r, t + h * 0.6), fill=255)
    d.line([(l + w * 0.1, t + h * 0.2), (l + w * 0.5, t - h * 0.05)], fill=255, width=max(3, w // 30))
    return m


def distance(mask: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64))[where]
    mse = float((d ** 2).mean()) if d.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def excess_gradient(result: np.ndarray, source: np.ndarray, where: np.ndarray) -> float:
    """Mean |gradient| of the result minus the source's over `where` (the mask's border and the band): a seam."""
    def grad(x):
        x = x.astype(np.float64).mean(-1)
        gx, gy = np.zeros_like(x), np.zeros_like(x)
        gx[:, :-1] = np.abs(np.diff(x, axis=1))
        gy[:-1] = np.abs(np.diff(x, axis=0))
        return gx + gy

    return float(grad(result)[where].mean() - grad(source)[where].mean())


def hf_energy(img: np.ndarray, where: np.ndarray) -> float:
    """Mean squared Laplacian of the grey image over `where`."""
    import cv2

    grey = img.astype(np.float32).mean(-1)
    return float((cv2.Laplacian(grey, cv2.CV_32F) ** 2)[where].mean())


def fmt(x: float) -> str:
    return "exact" if x == float("inf") else f"{x:.1f}"


def part_a(editor: Editor, cases: list, methods: tuple, n: int) -> list[str]:
    rows = ["| photo, mask | method | pixels changed beyond the band | PSNR beyond the band dB | PSNR in the band dB "
            "| seam (excess gradient, levels) | s / edit |", "|---|---|---|---|---|---|---|"]
    for name, image, mask in cases:
        src = np.asarray(image)
        m = np.asarray(mask) > 127
        dist = distance(m)
        feather = editor.defaults.feather
        far, band = dist > feather, (dist > 0) & (dist <= feather)
        border = (dist > 0) & (dist <= 2)
        inner = distance(~m)
        border |= (inner > 0) & (inner <= 2)
        for method in methods:
            t = time.perf_counter()
            r = editor.edit(image, mask, "a red circle", num_candidates=n, seed=0, background=method, rank=False)
            secs = time.perf_counter() - t
            outs = [np.asarray(im) for im in r.images]
            changed = np.mean([np.any(o != src, -1)[far].sum() for o in outs])
            rows.append(f"| {name} | `{method}` | {changed:,.0f} | {fmt(np.mean([psnr(o, src, far) for o in outs]))} | "
                        f"{fmt(np.mean([psnr(o, src, band) for o in outs]))} | "
                        f"{np.mean([excess_gradient(o, src, border | band) for o in outs]):+.1f} | {secs:.1f} |")
            print(rows[-1], flush=True)
    return rows


def part_b(editor: Editor, image: Image.Image, mask: Image.Image, resolutions: tuple, n: int) -> list[str]:
    src = np.asarray(image)
    m = np.asarray(mask) > 127
    inside = distance(~m) > 12  # away from the seam
    ref = hf_energy(src, inside)
    rows = ["| `resolution` | work size | resize alone (down to work size and back) | content kept (`blend_start` 0.9) "
            "| full edit | s / edit (full edit) |", "|---|---|---|---|---|---|"]
    for res in resolutions:
        kept = editor.edit(image, mask, "a red circle", num_candidates=1, seed=0, blend_start=0.9, resolution=res,
                           rank=False)
        t = time.perf_counter()
        full = editor.edit(image, mask, "a red circle", num_candidates=n, seed=0, resolution=res, rank=False)
        secs = time.perf_counter() - t
        ratio_kept = hf_energy(np.asarray(kept.images[0]), inside) / ref
        ratio_full = np.mean([hf_energy(np.asarray(im), inside) / ref for im in full.images])
        region = full.region
        resized = image.crop(region.box).resize(region.work_size, Image.Resampling.LANCZOS).resize(
            region.size, Image.Resampling.LANCZOS)
        round_trip = image.copy()
        round_trip.paste(resized, region.box[:2])
        ratio_resize = hf_energy(np.asarray(round_trip), inside) / ref
        ws = "x".join(map(str, region.work_size))
        rows.append(f"| {res or 'native (0)'} | {ws} | {ratio_resize:.3f} | {ratio_kept:.3f} | {ratio_full:.3f} | "
                    f"{secs:.1f} |")
        print(rows[-1], flush=True)
    return rows


def picture(editor: Editor, image: Image.Image, mask: Image.Image, out: Path) -> None:
    """Four panels: before (mask outlined), after (default), and the pixels that changed (white) under the
    paper's raw output (`none`) and under the default."""
    default = editor.edit(image, mask, "a red circle", num_candidates=4, seed=0).images[0]
    raw = editor.edit(image, mask, "a red circle", num_candidates=4, seed=0, background="none").images[0]
    m = np.asarray(mask) > 127
    outline = Image.fromarray(((distance(m) > 0) & (distance(m) <= 4)).astype(np.uint8) * 255)
    before = image.copy()
    before.paste((255, 0, 255), mask=outline)

    def changed(result: Image.Image) -> Image.Image:
        diff = np.any(np.asarray(result) != np.asarray(image), axis=-1)
        return Image.fromarray(np.where(diff, 255, 40).astype(np.uint8)).convert("RGB")

    panels = [("before (mask outlined)", before), ("after (default)", default),
              ("changed pixels: paper's raw output (none)", changed(raw)), ("changed pixels: default", changed(default))]
    w, h, pad, top = 480, 360, 8, 22
    canvas = Image.new("RGB", (4 * w + 3 * pad, h + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, im) in enumerate(panels):
        x = i * (w + pad)
        canvas.paste(im.resize((w, h), Image.Resampling.BOX), (x, top))
        draw.text((x + 4, 5), title, fill=(0, 0, 0))
    canvas.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "fidelity.md"))
    ap.add_argument("--picture-only", action="store_true", help="only remake the picture")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    editor = Editor.load(args.model, ranker=None)
    photo = large_photo()
    small_mask = blob(photo.size, (430, 330, 780, 640))
    astronaut = Image.open(PHOTOS / "astronaut.png").convert("RGB")
    astro_mask = blob(astronaut.size, (150, 300, 240, 380))
    big_mask = blob(photo.size, (300, 250, 1100, 850))
    n = 2 if args.quick else 4
    if args.picture_only:
        picture(editor, photo, small_mask, Path(args.out).with_name("fidelity_large_photo.png"))
        return
    cases = [("1600x1200, 350x310 blob", photo, small_mask), ("astronaut 512x512, 90x80 blob", astronaut, astro_mask)]
    rows_a = part_a(editor, cases[:1] if args.quick else cases, ("none", "stitch") if args.quick else METHODS, n)
    resolutions = (0, 128) if args.quick else (0, 128, 256, 512)
    rows_b = part_b(editor, photo, big_mask, resolutions, n)
    text = "\n".join([
        "# Full-resolution fidelity", "",
        f"`python -m bench.fidelity{' --quick' if args.quick else ''}`, model `{args.model}` "
        f"(native {editor.model.native_size} px), {n} candidates, {time.strftime('%Y-%m-%d')}, 2 CPU cores.", "",
        "## A. Outside the mask: pixels beyond the seam band that changed (of the upload, bit for bit)", "",
        *rows_a, "",
        "## B. Inside a big mask (800x600 blob on the 1600x1200 photo): detail at each working resolution", "",
        "High-frequency energy inside the mask (mean squared Laplacian, 12 px away from its edge) as a fraction "
        "of the photo's own there.", "",
        *rows_b, ""])
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)
        picture(editor, photo, small_mask, Path(args.out).with_name("fidelity_large_photo.png"))


if __name__ == "__main__":
    main()
