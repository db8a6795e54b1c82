"""The browser app: parse flags and environment, load an Editor, build the UI, launch.

    python app.py                       # the default model (falls back to the bundled demo model)
    python app.py --model demo          # the bundled demo model, offline on a CPU
    python app.py --model path/to/sd-folder --device cuda --dtype fp16 --port 7860

Limits come from the environment: BLENDED_MAX_UPLOAD_MB, BLENDED_MAX_PIXELS, BLENDED_MAX_CANDIDATES,
BLENDED_MAX_STEPS, BLENDED_MAX_RESOLUTION, BLENDED_CONCURRENCY, BLENDED_MAX_QUEUE, BLENDED_MAX_MODELS,
BLENDED_LINK_DAYS, BLENDED_MAX_SESSIONS, BLENDED_DECODE, BLENDED_CPU_SPACE (see docs/app.md); the model picker lists BLENDED_MODELS_DIR (diffusers folders, .safetensors
checkpoints and LoRAs; docs/models.md), and each browser session's pick is loaded into the server's model cache.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

ASSETS = Path(__file__).resolve().parent / "assets"


def parse_args(argv=None) -> argparse.Namespace:
    from blended.models import DEFAULT_MODEL, PRESETS

    ap = argparse.ArgumentParser(description="blended: text-driven local image editing in the browser")
    ap.add_argument("--model", default=os.environ.get("BLENDED_MODEL", DEFAULT_MODEL),
                    help=f"a preset ({', '.join(PRESETS)}), a hub id, a folder or a .safetensors checkpoint (default: $BLENDED_MODEL or "
                         f"{DEFAULT_MODEL}); falls back to the demo model when it cannot be loaded")
    ap.add_argument("--vae", default=None, help="a VAE folder or .safetensors file replacing the model's")
    ap.add_argument("--lora", dest="loras", action="append", default=[], metavar="FILE[:WEIGHT]",
                    help="a LoRA (diffusers or kohya format) with its weight (default 1); repeatable")
    ap.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                    help="override the scheduler's prediction type (a single file cannot tell)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    ap.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on accelerators, fp32 on CPU)")
    ap.add_argument("--host", default=None, help="address to listen on (default: gradio's, 127.0.0.1 or "
                                                 "$GRADIO_SERVER_NAME)")
    ap.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or $GRADIO_SERVER_PORT)")
    ap.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link "
                    "(implies --shared)")
    ap.add_argument("--shared", action="store_true", help="visitors may load only the listed models and LoRAs "
                    "(presets, this server's model, BLENDED_MODELS_DIR): on by itself on a Hugging Face Space")
    ap.add_argument("--segmenter", default=None, help="what selects objects from clicks: grabcut, none, or a Segment "
                    "Anything hub id or folder (default: $BLENDED_SEGMENTER, else facebook/sam-vit-base, falling back "
                    "to grabcut)")
    return ap.parse_args(argv)


def load_editor(model: str, device, dtype, fallback: str = "demo", **options):
    """(Editor, notice): the requested model (`options`: vae, loras, prediction_type), or the `fallback` bundled model
    with a one-line notice when it cannot be loaded."""
    from blended import Editor, InputError, ModelLoadError

    try:
        return Editor.load(model, device=device, dtype=dtype, **options), None
    except (ModelLoadError, InputError) as e:  # InputError: a malformed --lora FILE:WEIGHT
        if model == fallback:
            raise SystemExit(f"blended: {e}") from None
        notice = f"The requested model '{model}' could not be loaded, so the bundled {fallback} model is in use ({e})."
        print(f"blended: {e}; falling back to the bundled {fallback} model", file=sys.stderr)
    try:
        return Editor.load(fallback, device=device, dtype=dtype), notice
    except ModelLoadError as e:
        raise SystemExit(f"blended: {e}") from None


def build(args: argparse.Namespace, limits, cpu_line: Optional[str] = None):
    """The Blocks around the server's model. The model is held by the app's model cache alone (nothing here keeps
    it once this returns), so the cache can drop it like any other and load it again (`BLENDED_MAX_MODELS`).
    `cpu_line`: what a CPU Space's start-up chose (`ui.cpu_space`), shown above the editor."""
    from blended.models.cache import ModelKey
    from ui import create_demo, is_demo_model
    from ui.cpu_space import FALLBACK

    editor, notice = load_editor(args.model, args.device, args.dtype, fallback=FALLBACK if cpu_line else "demo",
                                 vae=args.vae, loras=args.loras, prediction_type=args.prediction_type)
    speed = None
    if not is_demo_model(editor):  # Stable Diffusion on a CPU: say so, with a time per edit from one UNet call
        from ui.editing import server_defaults
        from ui.speed import cpu_notice

        speed = cpu_notice(editor, server_defaults(editor.defaults, limits))
        if speed:
            print("blended: " + speed.replace("**", "").replace("`", ""), file=sys.stderr)
    if cpu_line:
        speed = cpu_line + (f"\n\n{speed}" if speed else "")
    from blended.select import load_segmenter

    segmenter, segmenter_note = load_segmenter(args.segmenter)
    print(f"blended: {segmenter_note}", file=sys.stderr)
    key = ModelKey.of(editor.model, None if notice else args.prediction_type)  # how to load it again if dropped
    return create_demo(editor, limits=limits, notice=notice, speed=speed, segmenter=segmenter,
                       segmenter_note=segmenter_note, shared=args.shared or args.share or None, model_key=key)


def main(argv=None) -> None:
    args = parse_args(argv)
    from ui import Limits
    from ui.cpu_space import cpu_space_plan, on_cpu_space
    from ui.zerogpu import on_zerogpu

    try:
        limits = Limits.from_env()
    except ValueError as e:
        raise SystemExit(f"blended: {e}") from None
    on_zerogpu()  # imports `spaces` on ZeroGPU before any CUDA work, as it requires
    cpu_line = None
    if on_cpu_space():  # a Space without a GPU: few-step, tiny decode, bf16 where native (docs/hosting.md)
        args, limits, cpu_line = cpu_space_plan(args, limits)
        if cpu_line:
            print(f"blended: {cpu_line}", file=sys.stderr)
    demo = build(args, limits, cpu_line)
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=limits.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=f"{limits.max_upload_mb}mb",
                state_session_capacity=limits.max_sessions,  # sessions kept, least recently used dropped
                allowed_paths=[str(ASSETS / "examples"), str(ASSETS / "photos")])


if __name__ == "__main__":
    main()
