"""What made a result, inside its PNG: written by `EditResult.save`, read back by `read_recipe` (CLI `--from`, the app).

Two text chunks per candidate:

- `parameters`: AUTOMATIC1111's infotext, which A1111, Forge, ComfyUI nodes and image sites read: the prompt (it may
  span lines), a line `Negative prompt: ...` (left out when empty, as A1111 does), then one last line of
  `key: value` pairs joined by ", " (`Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 123, Size: 512x512, Model: x`),
  a value holding `,` `:` `"` or a line break JSON-quoted (A1111's `quote`; its parser needs three pairs or more).
- `blended`: this candidate's record from result.json as JSON (prompt, negative prompt, model, VAE, LoRAs, the
  settings with this candidate's seed, its rank, scores and mask label, the region).

A PNG is untrusted input: `read_recipe` reads at most `max_bytes`, walks the chunks without decoding a pixel,
refuses a text chunk over `MAX_CHUNK`, never unpickles, and checks the settings with `EditConfig.from_json`; any
problem is one `InputError` line. A PNG with only A1111's `parameters` gives what maps onto an edit.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .config import EditConfig
from .errors import InputError

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

    from .result import EditResult

PARAMETERS = "parameters"  # A1111's chunk
RECORD = "blended"  # ours
FORMAT = 1  # the version of the `blended` record
MAX_FILE_BYTES = 16 * 2**20  # larger files are refused before anything is read
MAX_CHUNK = 64 * 2**10  # a text chunk we read (after decompression) may hold this many bytes
MAX_CHUNKS = 100_000  # chunks walked per file
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOT_FROM_FILES = ("safety_checker", "batch_size")  # settings a file never sets: safety and memory are the reader's

# our scheduler -> A1111's sampler name (A1111 >= 1.9 writes the schedule type apart: "Schedule type: Karras")
SAMPLERS = {"ddim": "DDIM", "dpm++": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a", "lcm": "LCM", "tcd": "TCD"}
# A1111's infotext pairs: a key starts with a word character and goes on with word characters, spaces, '-' or
# '/'; a value is a JSON string or runs to the next comma
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")

Source = Union[str, Path, bytes]


@dataclass(frozen=True)
class Recipe:
    """An edit as a result PNG records it, ready to repeat (CLI `--from`, the app's "Settings from a result")."""

    prompt: str
    negative_prompt: str
    settings: dict[str, Any]  # EditConfig field -> value, checked; without negative_prompt (its own field above)
    model: Optional[str]  # the model the edit used; None when the file does not name one blended can load
    source: str  # "blended" (our chunk: everything) or "a1111" (A1111's infotext: what maps)
    notes: list[str] = field(default_factory=list)  # what the reader should know (what was not carried over, ...)


# -- writing -----------------------------------------------------------------------------------------------------

def quote(value: Any) -> str:
    """A value for the infotext's last line, JSON-quoted when it holds `,` `:` `"` or a line break (A1111's rule)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n\r') else text


def infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """A1111's infotext: the prompt, `Negative prompt: ...` when there is one, and one line of `key: value` pairs
    (None values left out)."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _model_label(model: str) -> str:
    """A model as A1111's `Model:` names it: a preset or hub id as it is, a local file or folder by its stem (no
    folders of this machine in a shared picture)."""
    from .models.loaded import PRESET_SOURCES

    p = Path(model)
    local = p.suffix.lower() == ".safetensors" or p.is_absolute() or model.startswith((".", "~")) or p.exists()
    return p.stem if local and model not in PRESET_SOURCES else model


def a1111_params(result: "EditResult", index: int) -> dict[str, Any]:
    """The `key: value` pairs of candidate `index`'s infotext."""
    cand, cfg = result.candidates[index], result.config
    w, h = cand.image.size
    vae = result.model_info.get("vae")
    return {"Steps": cfg.num_inference_steps, "Sampler": SAMPLERS.get(cfg.scheduler, cfg.scheduler),
            "CFG scale": cfg.guidance_scale, "Seed": cand.seed, "Size": f"{w}x{h}", "Model": _model_label(result.model),
            "VAE": _model_label(vae) if vae else None,
            "Denoising strength": round(cfg.remove_strength if getattr(cfg, "remove", False) else 1.0 - cfg.blend_start, 4)}


def record(result: "EditResult", index: int) -> dict[str, Any]:
    """Candidate `index`'s record: result.json's, with this candidate alone and its seed in the settings."""
    info = result.to_json()
    cand = info["candidates"][index]
    return {"format": FORMAT, "prompt": result.prompt, "negative_prompt": result.config.negative_prompt,
            "model": info["model"], "vae": info["vae"], "loras": info["loras"],
            "prediction_type": result.model_info.get("prediction_type"), "recommended": info["recommended"],
            "candidate": cand, "num_candidates": len(result.candidates),
            "settings": {**info["settings"], "seed": cand["seed"]}, "region": info["region"]}


def png_info(result: "EditResult", index: int) -> "PngInfo":
    """The two text chunks of candidate `index`'s PNG (`parameters`, `blended`), for `Image.save(..., pnginfo=)`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS, infotext(result.prompt, result.config.negative_prompt, a1111_params(result, index)))
    info.add_text(RECORD, json.dumps(record(result, index), default=list))
    return info


# -- reading -----------------------------------------------------------------------------------------------------

def _inflate(data: bytes, what: str) -> bytes:
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, MAX_CHUNK + 1)
    except zlib.error:
        raise InputError(f"the '{what}' text of the PNG is damaged (it does not decompress)") from None
    if len(out) > MAX_CHUNK:
        raise InputError(f"the '{what}' text of the PNG is over {MAX_CHUNK // 1024} KiB; refused")
    return out


def _text(kind: bytes, body: bytes) -> tuple[str, str]:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk's body."""
    key, sep, rest = body.partition(b"\0")
    if not sep:
        raise InputError("the PNG has a broken text chunk (no keyword)")
    name = key.decode("latin-1")
    try:
        if kind == b"tEXt":
            return name, rest.decode("latin-1")
        if kind == b"zTXt":
            return name, _inflate(rest[1:], name).decode("latin-1")
        compressed, rest = rest[:1] == b"\1", rest[2:]  # iTXt: flag, method, language\0, translated keyword\0, text
        _, _, rest = rest.partition(b"\0")
        _, _, rest = rest.partition(b"\0")
        return name, (_inflate(rest, name) if compressed else rest).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"the '{name}' text of the PNG is not valid text") from None


def text_chunks(data: bytes, keys: tuple[str, ...] = (PARAMETERS, RECORD)) -> dict[str, str]:
    """The text chunks named `keys` in PNG `data` (the first of each), by walking the chunks (no pixel is decoded);
    InputError when it is not a whole PNG, a chunk is damaged or a text is over MAX_CHUNK."""
    if not data.startswith(PNG_SIGNATURE):
        raise InputError("not a PNG file: settings are read from the PNGs blended (or A1111) saves")
    found: dict[str, str] = {}
    pos, count = len(PNG_SIGNATURE), 0
    while pos + 8 <= len(data) and count < MAX_CHUNKS:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise InputError("the PNG is cut off (a chunk runs past its end)")
        keyword = data[pos + 8: pos + 8 + min(length, 80)].split(b"\0")[0].decode("latin-1")
        if kind in (b"tEXt", b"zTXt", b"iTXt") and keyword in keys:
            body = data[pos + 8: pos + 8 + length]
            if zlib.crc32(kind + body) != struct.unpack_from(">I", data, end - 4)[0]:
                raise InputError("the PNG is damaged (a text chunk fails its checksum)")
            if length > MAX_CHUNK:
                raise InputError(f"the PNG's '{keyword}' text is {length} bytes, over {MAX_CHUNK}; refused")
            name, text = _text(kind, body)
            found.setdefault(name, text)
        if kind == b"IEND":
            break
        pos, count = end, count + 1
    if count >= MAX_CHUNKS:
        raise InputError(f"the PNG has over {MAX_CHUNKS} chunks; refused")
    return found


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) by A1111's rules: the last line holds the pairs when it has three or
    more, lines before `Negative prompt:` are the prompt and the rest the negative prompt; quoted values unquoted."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt: list[str] = []
    negative: list[str] = []
    done = False  # past the `Negative prompt:` line: every later line is the negative prompt's
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            done, line = True, line[len("Negative prompt:"):].strip()
        (negative if done else prompt).append(line)
    params = {}
    for key, value in _PAIR.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key] = str(value)
    return "\n".join(prompt).lstrip("\n"), "\n".join(negative).lstrip("\n"), params


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _checked(settings: Any) -> tuple[dict[str, Any], str]:
    """(settings coerced and checked by EditConfig.from_json, without NOT_FROM_FILES and negative_prompt; the
    negative prompt they held); one-line InputError naming what is wrong."""
    if not isinstance(settings, dict):
        raise InputError("the PNG's settings are not a JSON object")
    unknown = sorted(set(settings) - set(EditConfig.__dataclass_fields__))
    if unknown:
        raise InputError(f"the PNG's settings name unknown setting(s) {_one_line(', '.join(unknown), 120)} (from a "
                         "newer blended?)")
    try:
        config = EditConfig.from_json(settings)
    except InputError as e:
        raise InputError(f"the PNG's settings are refused: {_one_line(str(e))}") from None
    keep = [k for k, v in settings.items() if v is not None and k not in NOT_FROM_FILES and k != "negative_prompt"]
    return {k: getattr(config, k) for k in keep}, config.negative_prompt


def _from_record(text: str) -> Recipe:
    """A Recipe from our `blended` chunk."""
    try:
        rec = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError("the PNG's 'blended' record is not JSON") from None
    if not isinstance(rec, dict):
        raise InputError("the PNG's 'blended' record is not a JSON object")
    prompt, negative, model = rec.get("prompt"), rec.get("negative_prompt"), rec.get("model")
    if not isinstance(prompt, str) or not isinstance(model, (str, type(None))) \
            or not isinstance(negative, (str, type(None))):
        raise InputError("the PNG's 'blended' record has a prompt, model or negative prompt that is not text")
    raw = rec.get("settings", {})
    settings, from_settings = _checked(raw)
    if not prompt.strip() and not settings.get("remove"):  # a removal (blended.remove) needs no prompt
        raise InputError("the PNG's 'blended' record has no prompt")
    notes = ["its edit ran without the safety checker; a file never turns it off"] \
        if raw.get("safety_checker") is False else []
    if settings.get("decode", "full") not in ("full", "tiny"):  # a path in a stranger's file names no file of ours
        notes.append(f"decoded with the tiny decoder {_one_line(settings['decode'], 80)!r}: repeated with 'tiny'")
        settings["decode"] = "tiny"
    cand = rec.get("candidate") if isinstance(rec.get("candidate"), dict) else {}
    if isinstance(cand.get("mask"), str) and cand["mask"]:
        notes.append(f"made with the mask '{_one_line(cand['mask'], 80)}' of a multi-mask edit: give that mask")
    total = rec.get("num_candidates")
    if settings.get("background") == "decoder" and settings.get("decoder_shared", True) and \
            isinstance(total, int) and total > 1:
        notes.append(f"its decoder was fine-tuned on all {total} candidates in turn: one alone comes out a little "
                     "different")
    extras = [f"VAE {_one_line(str(rec['vae']), 120)}"] if rec.get("vae") else []
    if isinstance(rec.get("loras"), list) and rec["loras"]:
        extras.append(f"{len(rec['loras'])} LoRA(s)")
    if extras:
        notes.append(f"made with {' and '.join(extras)}: add them (--vae, --lora) to repeat it exactly")
    return Recipe(prompt=prompt, negative_prompt=negative if negative is not None else from_settings,
                  settings=settings, model=model or None, source="blended", notes=notes)


def _number(key: str, value: str, kind: type) -> Any:
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"the PNG's '{key}' is not a number: {_one_line(value, 40)!r}") from None
    if kind is int and not number.is_integer():
        raise InputError(f"the PNG's '{key}' is not a whole number: {_one_line(value, 40)!r}")
    return kind(number)


def _from_a1111(text: str) -> Recipe:
    """A Recipe from A1111's `parameters` alone: the prompts and what maps (steps, CFG scale, seed, sampler)."""
    prompt, negative, params = parse_infotext(text)
    if not prompt.strip():
        raise InputError("the PNG's 'parameters' hold no prompt")
    settings: dict[str, Any] = {}
    for key, name, kind in (("Steps", "num_inference_steps", int), ("CFG scale", "guidance_scale", float),
                            ("Seed", "seed", int)):
        if key in params:
            settings[name] = _number(key, params[key], kind)
    notes = []
    sampler = params.get("Sampler")
    if sampler is not None:
        ours = {v.lower(): k for k, v in SAMPLERS.items()}.get(sampler.strip().lower())
        if ours is None and sampler.strip().lower() == "dpm++ 2m karras":
            ours = "dpm++"
            notes.append("the sampler's Karras schedule is not carried over (dpm++ with the model's schedule)")
        if ours is None:
            notes.append(f"the sampler {_one_line(sampler, 40)!r} has no match here: the scheduler is left as it is")
        else:
            settings["scheduler"] = ours
    settings, _ = _checked(settings)
    unused = [k for k in params if k not in ("Steps", "CFG scale", "Seed", "Sampler")]
    if params.get("Model"):
        notes.append(f"made with the model {_one_line(params['Model'], 80)!r} (an A1111 checkpoint name): pick it yourself")
    if unused:
        notes.append(f"not used: {_one_line(', '.join(unused), 200)}")
    return Recipe(prompt=prompt, negative_prompt=negative, settings=settings, model=None, source="a1111", notes=notes)


def _read(src: Source, max_bytes: int) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise InputError(f"{_one_line(str(path), 200)}: no such file")
        if path.stat().st_size > max_bytes:
            raise InputError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MiB; settings are read from PNGs of "
                             f"at most {max_bytes / 2**20:.0f} MiB")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"the file is over {max_bytes / 2**20:.0f} MiB; settings are read from smaller PNGs")
    return data


def read_recipe(src: Source, *, max_bytes: int = MAX_FILE_BYTES) -> Recipe:
    """The edit a result PNG records (its `blended` chunk), or what A1111's `parameters` give where it has only those.

    Args:
        src: a PNG's path or its bytes (untrusted: a stranger's upload).
        max_bytes: larger files are refused before they are read.

    Raises:
        InputError: one line: not a PNG, too large, damaged, no parameters, or settings of a wrong type or out of
            range (checked by `EditConfig.from_json`).
    """
    chunks = text_chunks(_read(src, max_bytes))
    if RECORD in chunks:
        return _from_record(chunks[RECORD])
    if PARAMETERS in chunks:
        return _from_a1111(chunks[PARAMETERS])
    raise InputError("the PNG holds no parameters (no 'blended' or A1111 'parameters' text): it was not saved by "
                     "blended or A1111, or a site stripped them")
