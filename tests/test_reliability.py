"""Bad input, table-driven: each case gets a specific message (or a correct edit), and the editor keeps working."""

import io
import struct
import zlib

import numpy as np
import torch
import pytest
from PIL import Image

from blended import InputError
from conftest import box_mask, scene

W, H = 40, 32
MASK = box_mask(W, H, (10, 8, 30, 24))


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that declares a huge image (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    img = scene(H, W)  # stored 32 wide, 40 high; displayed rotated to 40 x 32
    exif = img.getexif()
    exif[0x0112] = 6
    return _bytes(img, "JPEG", exif=exif, quality=95)


def _animated() -> bytes:
    frames = [scene(W, H, seed=i) for i in range(3)]
    return _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit() -> Image.Image:
    return Image.fromarray((np.asarray(scene(W, H).convert("L"), np.uint16) * 257).astype(np.uint16))


GOOD = scene(W, H)
TRUNCATED = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)))[:200]

CASES = [  # (id, image, mask, prompt, settings, expected error message or None for a correct edit)
    ("zero-byte file", b"", MASK, "a cat", {}, "not a readable image"),
    ("truncated file", TRUNCATED, MASK, "a cat", {}, "truncated|not a readable"),
    ("text file", b"hello, I am not an image\n" * 10, MASK, "a cat", {}, "not a readable image"),
    ("1x1 image", Image.new("RGB", (1, 1)), Image.new("L", (1, 1), 255), "a cat", {}, "at least 8 pixels"),
    ("thin 4x200 image", Image.new("RGB", (200, 4)), Image.new("L", (200, 4), 255), "a cat", {}, "at least 8"),
    ("thin 8x200 image", Image.new("RGB", (200, 8)), Image.new("L", (200, 8), 255), "a cat", {}, "aspect ratio"),
    ("decompression bomb", _png_header_only(30000, 30000), MASK, "a cat", {}, "too many pixels|over the limit"),
    ("over the pixel limit", _png_header_only(8000, 8000), MASK, "a cat", {}, "over the limit"),
    ("16-bit grey", _sixteen_bit(), MASK, "a cat", {}, None),
    ("CMYK", GOOD.convert("CMYK"), MASK, "a cat", {}, None),
    ("palette", GOOD.convert("P"), MASK, "a cat", {}, None),
    ("RGBA", GOOD.convert("RGBA"), MASK, "a cat", {}, None),
    ("grayscale", GOOD.convert("L"), MASK, "a cat", {}, None),
    ("EXIF-rotated JPEG", _exif_rotated(), MASK, "a cat", {}, None),
    ("animated GIF", _animated(), MASK, "a cat", {}, None),
    ("empty mask", GOOD, Image.new("L", (W, H), 0), "a cat", {}, "mask is empty"),
    ("full mask", GOOD, Image.new("L", (W, H), 255), "a cat", {}, None),
    ("mask of another size", GOOD, Image.new("L", (W + 1, H), 255), "a cat", {}, "same size"),
    ("soft grey mask", GOOD, Image.new("L", (W, H), 100), "a cat", {"mask_threshold": 0.3}, None),
    ("soft grey mask under threshold", GOOD, Image.new("L", (W, H), 100), "a cat", {}, "mask is empty"),
    ("empty prompt", GOOD, MASK, "", {}, "prompt is empty"),
    ("blank prompt", GOOD, MASK, " \n\t ", {}, "prompt is empty"),
    ("prompt not text", GOOD, MASK, None, {}, "prompt is empty"),
    ("overlong prompt", GOOD, MASK, "a very red cat " * 40, {}, None),
    ("odd Unicode prompt", GOOD, MASK, "a 🐱 in 東京, ‮rtl‬, zero\u200bwidth, cafe\u0301", {}, None),
    ("steps 0", GOOD, MASK, "a cat", {"num_inference_steps": 0}, "num_inference_steps"),
    ("steps huge", GOOD, MASK, "a cat", {"num_inference_steps": 10**6}, "num_inference_steps"),
    ("steps = training timesteps", GOOD, MASK, "a cat", {"num_inference_steps": 1000, "blend_start": 0.0},
     "training timesteps"),
    ("guidance negative", GOOD, MASK, "a cat", {"guidance_scale": -2.0}, "guidance_scale"),
    ("guidance NaN", GOOD, MASK, "a cat", {"guidance_scale": float("nan")}, "guidance_scale"),
    ("blend_start negative", GOOD, MASK, "a cat", {"blend_start": -0.1}, "blend_start"),
    ("blend_start 1", GOOD, MASK, "a cat", {"blend_start": 1.0}, "blend_start"),
    ("candidates 0", GOOD, MASK, "a cat", {"num_candidates": 0}, "num_candidates"),
    ("candidates 1000", GOOD, MASK, "a cat", {"num_candidates": 1000}, "num_candidates"),
    ("seed negative", GOOD, MASK, "a cat", {"seed": -1}, "seed"),
    ("batch 0", GOOD, MASK, "a cat", {"batch_size": 0}, "batch_size"),
    ("threshold 1.5", GOOD, MASK, "a cat", {"mask_threshold": 1.5}, "mask_threshold"),
    ("crop margin negative", GOOD, MASK, "a cat", {"crop_margin": -1}, "crop_margin"),
    ("feather negative", GOOD, MASK, "a cat", {"feather": -1}, "feather"),
    ("unknown background", GOOD, MASK, "a cat", {"background": "magic"}, "background"),
    ("decoder steps 0", GOOD, MASK, "a cat", {"decoder_steps": 0}, "decoder_steps"),
]


@pytest.mark.parametrize("name, image, mask, prompt, settings, error", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(sd1_editor, name, image, mask, prompt, settings, error):
    kw = dict(num_inference_steps=2, num_candidates=1, rank=False)
    kw.update(settings)
    if name == "over the pixel limit":
        sd1_editor = type(sd1_editor)(sd1_editor.model, max_pixels=1_000_000)
    if error is not None:
        with pytest.raises(InputError, match=error):
            sd1_editor.edit(image, mask, prompt, **kw)
    else:
        r = sd1_editor.edit(image, mask, prompt, **kw)
        size = (W, H)
        assert r.images[0].size == size and r.images[0].mode == "RGB"
        if name == "overlong prompt":
            assert any("cut" in n for n in r.notes)
    # the editor still works after every case
    ok = sd1_editor.edit(GOOD, MASK, "a cat", num_inference_steps=1, num_candidates=1, rank=False)
    assert ok.images[0].size == (W, H)


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_becomes_a_message_and_the_next_edit_succeeds(sd1_editor, monkeypatch, error):
    from blended import OutOfMemory

    unet = sd1_editor.model.pipe.unet
    real = unet.forward
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*a, **k)

    monkeypatch.setattr(unet, "forward", failing)
    with pytest.raises(OutOfMemory, match="fewer candidates"):
        sd1_editor.edit(GOOD, MASK, "a cat", num_inference_steps=4, num_candidates=2, rank=False)
    r = sd1_editor.edit(GOOD, MASK, "a cat", num_inference_steps=4, num_candidates=2, rank=False)
    assert len(r.images) == 2 and len(calls) > 3


def test_other_runtime_errors_are_not_disguised(sd1_editor, monkeypatch):
    monkeypatch.setattr(sd1_editor.model.pipe.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sd1_editor.edit(GOOD, MASK, "a cat", num_inference_steps=2, num_candidates=1, rank=False)


# -- issue 27, bug 4: the app knows out-of-memory by its type (the engine converts device OOMs to it) ------

class Failing:
    """An editor whose next edit raises `error` (set it), then edits again as `editor`."""

    def __init__(self, editor):
        self.editor, self.error = editor, None

    def __getattr__(self, name):
        return getattr(self.__dict__["editor"], name)

    def edit(self, *args, **kwargs):
        error, self.error = self.error, None
        if error is not None:
            raise error
        return self.editor.edit(*args, **kwargs)


def test_the_app_tells_out_of_memory_by_its_type_and_keeps_serving(tmp_path):
    """OutOfMemory from the editor gives the friendly message (through /edit and Generate); a RuntimeError that
    merely says "out of memory" is a plain error; the next edit succeeds."""
    import gradio as gr
    from gradio_client import Client, handle_file

    from blended import Editor, OutOfMemory
    from test_app_client import generate_handler, launch, make_case, painted
    from ui import Limits

    editor = Failing(Editor.load("demo", ranker=None))
    demo, url = launch(editor, Limits(max_candidates=2))
    try:
        client = Client(url, verbose=False)
        image, mask, _ = make_case(editor, tmp_path)
        args = (handle_file(str(image)), handle_file(str(mask)), "a red circle",
                {"num_candidates": 1, "num_inference_steps": 2})
        editor.error = OutOfMemory("out of memory during the edit")
        with pytest.raises(Exception, match="Out of memory: try fewer candidates"):
            client.predict(*args, api_name="/edit")
        editor.error = RuntimeError("a bug whose message says CUDA out of memory")
        with pytest.raises(Exception) as plain:
            client.predict(*args, api_name="/edit")
        assert "fewer candidates" not in str(plain.value)
        gallery, _ = client.predict(*args, api_name="/edit")
        assert len(gallery) == 1

        handler, inputs = generate_handler(demo)
        by_id = {c.elem_id: c for c in inputs if getattr(c, "elem_id", None)}
        data = {c: c.value for c in inputs}
        data.update({by_id["editor"]: painted(editor.model.native_size), by_id["prompt"]: "a red circle",
                     by_id["live-preview"]: False, by_id["num-candidates"]: 1, by_id["num-inference-steps"]: 2})
        editor.error = OutOfMemory("out of memory during the edit")
        with pytest.raises(gr.Error, match="Out of memory: try fewer candidates"):
            list(handler(data, None))
        editor.error = RuntimeError("a bug whose message says CUDA out of memory")
        with pytest.raises(RuntimeError, match="a bug whose message"):
            list(handler(data, None))
        assert len(list(handler(data, None))[-1]) > 1  # the result: gallery, details, ...
    finally:
        demo.close()


def test_every_use_of_the_models_tokenizer_holds_the_tokenizer_lock(sd1_editor, monkeypatch):
    """A fast tokenizer is not thread-safe (each call sets padding and truncation on the shared backend first): two
    edits at once once encoded a negative prompt padded to another call's length (bench/load.py, 1 edit in 800).
    Every call the editor makes to the model's tokenizer, the prompt's encoding and the long-prompt note alike, holds
    TOKENIZER_LOCK; and edits from two threads at once all succeed."""
    import threading

    from blended.unet_call import TOKENIZER_LOCK

    pipe = sd1_editor.model.pipe
    real, calls = pipe.tokenizer, []

    def held_elsewhere() -> bool:  # whether another thread would have to wait for the lock now
        got = []
        t = threading.Thread(target=lambda: got.append(TOKENIZER_LOCK.acquire(blocking=False)))
        t.start()
        t.join()
        if got[0]:
            TOKENIZER_LOCK.release()
        return not got[0]

    class Watched:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args, **kwargs):
            calls.append(held_elsewhere())
            return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "tokenizer", Watched())
    sd1_editor.edit(scene(W, H), MASK, "a red circle " * 30, num_candidates=1, num_inference_steps=2, rank=False)
    assert len(calls) >= 3 and all(calls), calls  # the note's call and encode_prompt's (max length, then longest)
    monkeypatch.setattr(pipe, "tokenizer", real)

    errors = []

    def edits(prompt: str) -> None:
        for seed in range(6):
            try:
                sd1_editor.edit(scene(W, H), MASK, prompt, num_candidates=1, num_inference_steps=1, rank=False,
                                seed=seed)
            except Exception as e:  # noqa: BLE001  (any failure of a concurrent edit is the finding)
                errors.append(repr(e)[:160])

    threads = [threading.Thread(target=edits, args=(p,)) for p in ("a red circle", "a blue square " * 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
