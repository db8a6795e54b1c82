"""Command line: python -m blended edit --image IMG --mask MASK --prompt TEXT [options] (or --from RESULT.png), and
python -m blended batch JOBS.jsonl --out DIR [options] (many edits from a manifest: blended/batch.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import BACKGROUND_METHODS, SCHEDULERS, EditConfig
from .errors import EditCancelled, InputError, ModelLoadError
from .models import DEFAULT_MODEL, PREDICTION_TYPES, PRESETS, parse_lora

EXIT_INPUT = 2  # bad input: unreadable file, empty mask, size mismatch, option out of range
EXIT_MODEL = 1  # the model could not be loaded

# flag -> EditConfig field; flags left out take the model's defaults (EditConfig + its blended.json)
FLAGS = {
    "negative_prompt": ("--negative-prompt", str, "what to steer away from"),
    "num_candidates": ("--candidates", int, "images to generate"),
    "num_inference_steps": ("--steps", int, "scheduler steps of the full schedule"),
    "guidance_scale": ("--guidance", float, "classifier-free guidance scale"),
    "seed": ("--seed", int, "base seed; candidate i uses seed + i"),
    "blend_start": ("--blend-start", float, "fraction of the schedule skipped, in [0, 1)"),
    "core_steps": ("--core-steps", float, "fraction of the steps that blend with the mask's core, in [0, 1)"),
    "scheduler": ("--scheduler", str, f"one of {', '.join(SCHEDULERS)}"),
    "tcd_gamma": ("--tcd-gamma", float, "--scheduler tcd: stochasticity of each step in [0, 1], 0 = deterministic"),
    "background": ("--background", str, f"background reconstruction: {', '.join(BACKGROUND_METHODS)}"),
    "batch_size": ("--batch-size", int, "candidates denoised at once (memory bound)"),
    "crop_margin": ("--crop-margin", int, "context pixels around the mask when a large image is cropped"),
    "resolution": ("--resolution", int, "shorter side in pixels the edited region is worked at; 0 = the model's "
                   "native size; more gives large masks more detail (GPU time and memory grow with its square)"),
    "feather": ("--feather", int, "seam band in pixels outside the mask; beyond it the output is the input, bit for bit"),
    "mask_threshold": ("--mask-threshold", float, "mask values above this fraction are edited"),
    "mask_grow": ("--mask-grow", int, "grow the mask by this many pixels before the edit (negative: shrink)"),
    "inpainting_mask_weight": ("--inpainting-mask-weight", float, "9-channel inpainting models: the source the "
                               "UNet sees, 1 = with the mask's pixels blanked (the hole), 0 = the whole source"),
    "mask_blur": ("--mask-blur", float, "fade the edit into the image over a Gaussian blur of the mask's edge of this "
                  "many pixels, outwards (0 = the --feather band)"),
    "remove_strength": ("--remove-strength", float, "--remove: the fraction of the schedule run from the pre-fill, "
                        "in [0, 1]; 0 = the pre-fill alone, no diffusion"),
    "remove_fill": ("--remove-fill", str, "--remove: how the hole is pre-filled from its surroundings, telea or ns"),
    "decode": ("--decode", str, "what decodes the candidates: full (the VAE's decoder), tiny (TAESD: about 1/10 of "
               "the time on a CPU; the model folder's vae_tiny/ or the family's from the hub) or the path of an "
               "AutoencoderTiny folder or .safetensors file"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m blended", description="Text-driven local image editing (Blended Latent Diffusion).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("edit", help="edit an image inside a mask", description="Edit an image inside a mask.")
    p.add_argument("--image", required=True, help="source image (any size, PNG/JPEG/WebP/...)")
    p.add_argument("--mask", default=None, help="mask of the same size: white (or opaque) = edit; or select instead:")
    p.add_argument("--select", default=None, metavar="X,Y[,X,Y...]",
                   help="select the object under these pixels (clicks) instead of --mask")
    p.add_argument("--unselect", default=None, metavar="X,Y[,X,Y...]",
                   help="negative clicks: pixels that are not part of the object")
    p.add_argument("--select-box", default=None, metavar="L,T,R,B", help="select the object inside this box")
    p.add_argument("--select-text", default=None, metavar="TEXT", help="select the object these words name (\"the red "
                   "circle\") instead of --mask; --select / --unselect clicks refine it, --select-box restricts it")
    p.add_argument("--text-segmenter", default=None, help="demo, none, or a CLIPSeg hub id or folder (default: "
                   "$BLENDED_TEXT_SEGMENTER, else demo for the demo models, else CIDAS/clipseg-rd64-refined)")
    p.add_argument("--segmenter", default=None, help="grabcut, none, or a Segment Anything hub id or folder "
                   "(default: $BLENDED_SEGMENTER, else facebook/sam-vit-base, else grabcut)")
    p.add_argument("--multi-mask", action="store_true", help="edit with several masks (SAM's three for one click, "
                   "else the mask grown by 0, 10 and 20 %% of its size), the candidates split over them and ranked together")
    p.add_argument("--prompt", default=None, help="what should appear inside the mask (required unless --from or "
                   "--remove; with --remove, what the region looks like without the object)")
    p.add_argument("--from", dest="from_png", default=None, metavar="RESULT.png",
                   help="repeat the edit a result PNG records (blended's, or A1111's parameters): its prompt, negative "
                   "prompt, settings and seed, 1 candidate, its model unless --model; any other flag wins")
    _add_edit_options(p)
    p.add_argument("--out", default="outputs", help="folder for 01.png, 02.png, ... and result.json")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    b = sub.add_parser("batch", help="edit every job of a JSONL manifest",
                       description="Edit every job of a JSONL manifest (one JSON object per line: image, mask, prompt, "
                       "optional id and EditConfig settings); the edit options are every job's defaults. Runs in several "
                       "processes under `accelerate launch`. See docs/batch.md.")
    b.add_argument("manifest", help="JOBS.jsonl; relative paths in it are read from its folder")
    b.add_argument("--out", required=True, help="folder for <id>/01.png ..., <id>/result.json and summary.jsonl")
    _add_edit_options(b)
    b.add_argument("--force", action="store_true", help="redo jobs whose results exist with the same settings")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    b.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def _add_edit_options(p: argparse.ArgumentParser) -> None:
    """The options shared by `edit` and `batch`: EditConfig fields, on/off switches, model and device."""
    for field, (flag, typ, text) in FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"{text} (default: {getattr(EditConfig(), field)!r} "
                       "or the model's recommendation)")
    p.add_argument("--no-shrink", dest="shrink", action="store_const", const=False, default=None,
                   help="turn progressive mask shrinking off")
    p.add_argument("--invert-mask", dest="invert_mask", action="store_const", const=True, default=None,
                   help="edit where the mask is black")
    p.add_argument("--soft-mask", dest="soft_mask", action="store_const", const=True, default=None,
                   help="read the mask's grey levels (or alpha), and --mask-blur's soft edge, as edit strengths in "
                   "the denoising loop: weak pixels change only in the last steps and are mixed with the image "
                   "(instead of thresholding the mask)")
    p.add_argument("--remove", dest="remove", action="store_const", const=True, default=None,
                   help="remove what the mask covers, no prompt needed: the hole is pre-filled from its surroundings "
                   "and harmonised by a short diffusion (docs/remove.md)")
    p.add_argument("--no-rank", dest="rank", action="store_const", const=False, default=None,
                   help="skip CLIP ranking (candidates stay in seed order)")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_const", const=False, default=None,
                   help="turn the checkpoint's safety checker off (local use)")
    p.add_argument("--no-inpainting-conditioning", dest="inpainting_conditioning", action="store_const", const=False,
                   default=None, help="9-channel inpainting models: give the UNet zeros instead of the mask and "
                   "masked source (the latent blend alone keeps the background)")
    p.add_argument("--model", default=None, help=f"preset ({', '.join(PRESETS)}), hub id, diffusers folder or a "
                   f".safetensors checkpoint (SD 1.x/2.x/SDXL, 4- or 9-channel; default: {DEFAULT_MODEL}, falling "
                   "back to demo when it cannot be loaded)")
    p.add_argument("--model-config", default=None, help="a diffusers folder of configs for a .safetensors checkpoint "
                   "whose family's bundled configs do not fit (default: the bundled ones)")
    p.add_argument("--vae", default=None, help="a VAE folder (diffusers) or .safetensors file replacing the model's")
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA .safetensors (diffusers or kohya format) with its weight (default 1); repeatable")
    p.add_argument("--prediction-type", default=None, choices=list(PREDICTION_TYPES),
                   help="override the scheduler's prediction type (a single file cannot tell; SD 2.x 768 files "
                   "are v_prediction, the default for SD 2.x files)")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")


def _overrides(args: argparse.Namespace) -> dict:
    names = list(FLAGS) + ["shrink", "invert_mask", "soft_mask", "rank", "safety_checker", "inpainting_conditioning",
                           "remove"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _load_editor(args: argparse.Namespace):
    from .editor import Editor

    kw = {"device": args.device, "dtype": args.dtype, "ranker": None if args.rank is False else "auto",
          "vae": args.vae, "loras": [parse_lora(l) for l in args.loras], "prediction_type": args.prediction_type,
          "model_config": args.model_config}
    if args.model is not None:
        return Editor.load(args.model, **kw)
    try:
        return Editor.load(DEFAULT_MODEL, **kw)
    except ModelLoadError as e:
        sys.stderr.write(f"note: {e}; using the bundled demo model instead\n")
        return Editor.load("demo", **kw)


def _progress(quiet: bool):
    def report(stage: str, done: int, total: int) -> None:
        if not quiet and stage != "done":
            end = "\r" if sys.stderr.isatty() else "\n"
            sys.stderr.write(f"{stage} {done}/{total}{end}")
    return report


def run_edit(args: argparse.Namespace) -> int:
    from .images import load_image
    from .masks import EditMasks

    args, overrides = _with_recipe(args)
    # check what the user gave before spending time on the model: the image and the mask are read here, once
    EditConfig().replace(**overrides).checked()
    source = load_image(args.image)
    values, how = _masks(args, source)  # [(label, (H, W) mask values)]: one, or several with --multi-mask
    for _, v in values:
        EditMasks.from_values(v, EditConfig().replace(**overrides))  # an empty mask is refused before the load
    prompt = args.prompt or ""
    if not prompt.strip() and not overrides.get("remove"):
        raise InputError("the prompt is empty: describe what should appear inside the mask")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")

    editor = _load_editor(args)
    config = editor.defaults.replace(**overrides)
    masks = [(label, EditMasks.from_values(v, config)) for label, v in values]  # the model's settings, no new read
    if len(masks) > 1:
        from .multimask import edit_masks

        result = edit_masks(editor, source, masks, prompt, config, progress=_progress(args.quiet))
    else:
        result = editor.edit(source, masks[0][1], prompt, config, progress=_progress(args.quiet))
    result.save(out, extra={"mask_source": how} if how else None)  # how a selected mask was made
    if args.mask is None:  # the selected mask(s), to reuse with --mask
        from PIL import Image

        for i, (_, v) in enumerate(values):
            name = "mask.png" if len(values) == 1 else f"mask{i + 1}.png"
            Image.fromarray((v > 0).astype("uint8") * 255, "L").save(out / name)
    for note in result.notes:
        sys.stderr.write(f"note: {note}\n")
    if not args.quiet:
        sys.stderr.write(f"wrote {len(result.candidates)} candidates to {out}/ in {result.timings['total']:.1f} s\n")
    return 0


def _with_recipe(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """(args, EditConfig overrides): the flags given, over what `--from RESULT.png` records (`blended.pnginfo`): its
    prompt, negative prompt, settings and seed, one candidate, its model where --model is not given."""
    overrides = _overrides(args)
    if args.from_png is None:
        if args.prompt is None and not overrides.get("remove"):  # a removal needs no prompt
            raise InputError("give --prompt TEXT (what should appear inside the mask), or --from RESULT.png")
        return args, overrides
    from .pnginfo import read_recipe

    recipe = read_recipe(args.from_png)
    changes = {"prompt": recipe.prompt if args.prompt is None else args.prompt}
    if args.model is None and recipe.model:
        changes["model"] = recipe.model
        if not args.quiet:
            sys.stderr.write(f"note: the model {recipe.model!r} recorded in {Path(args.from_png).name}\n")
    for note in recipe.notes:
        sys.stderr.write(f"note: {note}\n")
    merged = {**recipe.settings, "negative_prompt": recipe.negative_prompt, "num_candidates": 1, **overrides}
    return argparse.Namespace(**{**vars(args), **changes}), merged


def _masks(args: argparse.Namespace, source) -> tuple[list, Optional[dict]]:
    """[(label, (H, W) float32 mask values in [0, 1])] from --mask (read once) or from --select / --unselect /
    --select-box / --select-text (a segmenter), several with --multi-mask; and how a selection made them (None
    for --mask)."""
    import numpy as np

    from .images import load_mask_values
    from .multimask import mask_variants

    selecting = args.select is not None or args.select_box is not None or args.unselect is not None or \
        args.select_text is not None
    if args.mask is not None and selecting:
        raise InputError("give either --mask or a selection (--select, --unselect, --select-box, --select-text), "
                         "not both")
    how = None
    if args.mask is not None:
        values = load_mask_values(args.mask, source.size)
        if not args.multi_mask:
            return [("", values)], None
        if not (values > EditConfig.mask_threshold).any():
            raise InputError("the mask is empty: paint the region to edit (white or opaque = edit)")
        found = mask_variants(values > EditConfig.mask_threshold)
    elif not selecting:
        raise InputError("give the region to edit: --mask MASK, or --select X,Y (clicks), --select-box L,T,R,B or "
                         "--select-text WORDS")
    else:
        found, how = _selected(args, source)
    return [(label, np.asarray(m, bool).astype(np.float32)) for label, m in found], how


def _selected(args: argparse.Namespace, source) -> tuple[list, dict]:
    """([(label, bool mask)], how) from --select / --unselect / --select-box / --select-text and the segmenter(s)."""
    from .multimask import selection_variants
    from .select import Selection, describe, load_segmenter, load_text_segmenter, parse_box, parse_points, select_mask

    if args.select_text is not None and not args.select_text.strip():
        raise InputError("--select-text is empty: give the words that name the object, e.g. \"the red circle\"")
    selection = Selection(box=parse_box(args.select_box) if args.select_box is not None else None,
                          text=(args.select_text or "").strip())
    for flag, positive in ((args.select, True), (args.unselect, False)):
        for x, y in parse_points(flag, "--select" if positive else "--unselect") if flag is not None else []:
            selection = selection.add(x, y, positive)
    selection.check(source.size, words=True)
    segmenter, note = load_segmenter(args.segmenter)
    if selection.text:  # words: the text segmenter, refined by the click/box one
        segmenter, note = load_text_segmenter(args.text_segmenter, refiner=segmenter, model=args.model)
    if not args.quiet:
        sys.stderr.write(f"note: {note}\n")
    if args.multi_mask:
        return selection_variants(segmenter, source, selection), describe(selection, segmenter)
    return [("", select_mask(segmenter, source, selection)[0])], describe(selection, segmenter)


def run_batch_command(args: argparse.Namespace) -> int:
    from .batch import run_batch

    def load(device: Optional[str], loras=None):  # loras: a job's own LoRAs (LoraSpec) instead of --lora
        own = {} if loras is None else {"loras": [f"{l.path}:{l.weight}" for l in loras]}
        return _load_editor(argparse.Namespace(**{**vars(args), "device": device, **own}))

    return run_batch(args.manifest, args.out, overrides=_overrides(args), load_editor=load, device=args.device,
                     force=args.force, quiet=args.quiet, threads=args.threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_batch_command(args) if args.command == "batch" else run_edit(args)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_INPUT
    except ModelLoadError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_MODEL
    except EditCancelled:
        sys.stderr.write("error: cancelled\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
