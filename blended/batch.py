"""Batch editing from a JSONL manifest: one model load, many jobs, one process or many (accelerate).

    python -m blended batch JOBS.jsonl --out DIR [edit options]
    accelerate launch --multi_gpu --num_processes N -m blended batch JOBS.jsonl --out DIR [edit options]

A job is one JSON object per line: `image`, `mask`, `prompt`, an optional `id` (default: its line number
as 4 digits), optional `loras` (the job's own LoRAs instead of the command's: ["FILE[:WEIGHT]", ...], [] = none;
docs/models.md) and any `EditConfig` setting under its own name. Relative paths are read from the manifest's
folder. Each job writes `DIR/<id>/01.png ...` and `result.json` (as `edit` does, plus the job and a hash of
everything that made its images); `DIR/summary.jsonl` lists every job. A job whose `result.json` holds the
same hash is skipped on a rerun.

Several processes split the pending jobs, which the main process decides and broadcasts, with accelerate's
`PartialState.split_between_processes` (contiguous, the same split in every process), each on its own
device; the main process gathers the rows and writes the one summary. A job's images do not depend on the
process that made them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .config import EditConfig
from .errors import EditCancelled, InputError, ModelLoadError, OutOfMemory

JOB_KEYS = ("id", "image", "mask", "prompt", "loras", "select_text")
SETTINGS = {f.name: f for f in dataclasses.fields(EditConfig)}
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one folder name, never a path
HASH_VERSION = 2  # 2: the model key holds the VAE and the LoRAs' digests and weights; bump when what the hash covers changes, so old results are redone
SUMMARY = "summary.jsonl"
EXIT_OK, EXIT_FAILED, EXIT_MANIFEST = 0, 1, 2


class ManifestError(InputError):
    """The manifest itself is unusable (the message names the file and line); no job runs."""


@dataclass(frozen=True)
class Job:
    """One line of the manifest."""

    line: int  # 1-based line number in the manifest
    id: str  # output folder name under DIR
    image: Path  # resolved against the manifest's folder
    mask: Optional[Path]  # None when `select_text` names the object instead
    prompt: str
    settings: dict[str, Any]  # EditConfig fields as written on the line (checked when the job runs)
    loras: Optional[tuple] = None  # the job's own LoRAs (LoraSpec, paths resolved); None = the command's --lora
    select_text: str = ""  # words naming the object to edit, instead of a mask (the text segmenter selects it)


# -- the manifest ------------------------------------------------------------------------------------


def read_manifest(path: str | Path, remove: bool = False) -> list[Job]:
    """Parse a JSONL manifest; raise ManifestError naming the line of the first problem. A removal (the line's
    `remove`, else `remove`: the command's --remove) needs no prompt."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"the manifest {path} does not exist" if not path.exists()
                            else f"the manifest {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not UTF-8 text (one JSON object per line)") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue  # blank lines are allowed and keep the numbering
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: a job is a JSON object {{\"image\": ..., \"mask\": ..., \"prompt\": ...}}, "
                                f"got {type(obj).__name__}")
        removal = obj.get("remove", remove) is True  # blended/remove.py: the prompt may be left out or empty
        if removal and not isinstance(obj.get("prompt", ""), str):
            raise ManifestError(f"{where}: 'prompt' must be a string")
        for key in ("image",) + (() if "select_text" in obj else ("mask",)) + (() if removal else ("prompt",)):
            if key not in obj:
                raise ManifestError(f"{where}: '{key}' is missing (a job needs image, mask or select_text, and prompt)")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise ManifestError(f"{where}: '{key}' must be a non-empty string")
        if "select_text" in obj and ("mask" in obj or not isinstance(obj["select_text"], str)
                                     or not obj["select_text"].strip()):
            raise ManifestError(f"{where}: 'select_text' is a non-empty string naming the object, given instead of 'mask'")
        unknown = [k for k in obj if k not in JOB_KEYS and k not in SETTINGS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(JOB_KEYS) + list(SETTINGS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (allowed: id, image, mask, prompt and EditConfig names)"
            raise ManifestError(f"{where}: unknown key '{unknown[0]}'{hint}")
        job_id = obj.get("id", f"{n:04d}")
        if isinstance(job_id, int) and not isinstance(job_id, bool):
            job_id = str(job_id)
        if not isinstance(job_id, str) or not ID_PATTERN.match(job_id):
            raise ManifestError(f"{where}: id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                                "(it names the job's output folder)")
        if job_id in seen:
            raise ManifestError(f"{where}: id '{job_id}' is already used on line {seen[job_id]}")
        seen[job_id] = n
        jobs.append(Job(line=n, id=job_id, image=base / obj["image"],
                        mask=base / obj["mask"] if "mask" in obj else None,
                        select_text=obj.get("select_text", "").strip(),
                        prompt=obj.get("prompt", ""),
                        settings={k: v for k, v in obj.items() if k in SETTINGS},
                        loras=_job_loras(obj["loras"], base, where) if "loras" in obj else None))
    if not jobs:
        raise ManifestError(f"{path} has no jobs (one JSON object per line)")
    return jobs


def _job_loras(value: Any, base: Path, where: str) -> tuple:
    """A job's `loras`: a list of "FILE[:WEIGHT]" strings or {"file": ..., "weight": ...} objects, paths read
    from the manifest's folder; [] = no LoRA for this job."""
    from .models.lora import LoraSpec, parse_lora

    if not isinstance(value, list):
        raise ManifestError(f"{where}: 'loras' must be a list of \"FILE[:WEIGHT]\" strings or "
                            "{\"file\": ..., \"weight\": ...} objects")
    specs = []
    for item in value:
        if isinstance(item, str):
            spec = parse_lora(item)
        elif isinstance(item, dict) and isinstance(item.get("file"), str) and \
                isinstance(item.get("weight", 1.0), (int, float)) and not isinstance(item.get("weight"), bool):
            spec = LoraSpec(item["file"], float(item.get("weight", 1.0)))
        else:
            raise ManifestError(f"{where}: a LoRA is \"FILE[:WEIGHT]\" or {{\"file\": ..., \"weight\": ...}}, "
                                f"got {json.dumps(item)}")
        specs.append(LoraSpec(str(base / spec.path), spec.weight))
    return tuple(specs)


# -- one job ------------------------------------------------------------------------------------------


def _file_digest(path: Path, what: str, cache: Optional[dict] = None) -> str:
    if cache is not None and path in cache:
        return cache[path]
    if not path.exists():
        raise InputError(f"the {what} file does not exist: {path}")
    if not path.is_file():
        raise InputError(f"the {what} path is not a file: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if cache is not None:
        cache[path] = digest
    return digest


def settings_hash(job: Job, config: EditConfig, model: str, cache: Optional[dict] = None) -> str:
    """What made a job's images: model, prompt, every setting and the bytes of image and mask (not their paths).
    `cache` keeps file digests across jobs that share a file (one mask for a whole folder)."""
    payload = {"version": HASH_VERSION, "model": model, "prompt": job.prompt, "settings": hashed_settings(config),
               "image": _file_digest(job.image, "image", cache),
               "mask": _file_digest(job.mask, "mask", cache) if job.mask is not None
               else {"select_text": job.select_text}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def hashed_settings(config: EditConfig) -> dict[str, Any]:
    """The settings the hash covers: every field, except one added after HASH_VERSION 2 (its metadata names the
    issue that added it, `metadata={"added": N}`) while it holds its default, so a new setting does not redo
    every finished job."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if "added" not in f.metadata or getattr(config, f.name) != f.default}


def model_key(model: Any) -> str:
    """What of the loaded model goes into the hash: its name, VAE, prediction type, and each LoRA's weight and
    sha256 (a LoRA file rewritten in place changes the key)."""
    describe = getattr(model, "describe", None)
    return json.dumps(describe(), sort_keys=True) if describe else model.name


def _done(folder: Path, digest: str) -> Optional[dict]:
    """The job's result.json when it was made with `digest` and all its images are there, else None."""
    try:
        info = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("settings_hash") != digest:
        return None
    if not all((folder / f).is_file() for f in info.get("files", [])):
        return None
    return info


def _best_score(info: dict) -> Optional[float]:
    cands = info.get("candidates") or []
    return cands[0].get("scores", {}).get("score") if cands else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _row(job: Job, status: str, message: str, score: Optional[float], seconds: float) -> dict:
    return {"id": job.id, "line": job.line, "status": status, "message": message,
            "score": None if score is None else round(float(score), 6), "seconds": round(seconds, 3)}


def run_job(editor: Any, job: Job, config: EditConfig, digest: str, out: Path) -> dict:
    """Edit one job and write DIR/<id>/; return its summary row (status ok or error, never raises InputError)."""
    t0 = time.perf_counter()
    folder = out / job.id
    how = None  # how a selected mask was made
    try:
        if job.mask is None:
            from .select import select_by_text

            mask, how = select_by_text(str(job.image), job.select_text, model=getattr(editor.model, "name", None))
        result = editor.edit(str(job.image), str(job.mask) if job.mask is not None else mask, job.prompt, config)
    except (InputError, OutOfMemory) as e:
        return _row(job, "error", str(e), None, time.perf_counter() - t0)
    except (EditCancelled, KeyboardInterrupt):
        raise
    except Exception as e:  # one odd job must not end a batch of hundreds: record it, go on
        return _row(job, "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                    None, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    result.save(folder, extra={"job": {"id": job.id, "line": job.line, "image": str(job.image),
                                       "mask": str(job.mask) if job.mask is not None else None,
                                       **({"select_text": job.select_text} if job.select_text else {}),
                                       "prompt": job.prompt, "settings": job.settings, "seconds": round(seconds, 3)},
                               "settings_hash": digest, **({"mask_source": how} if how else {})})
    message = "; ".join(result.notes)
    return _row(job, "ok", message, result.candidates[0].score if result.candidates else None, seconds)


# -- the batch ----------------------------------------------------------------------------------------


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


def _job_model_key(model: Any, job: Job, cache: dict) -> str:
    """`model_key` of the model the job runs on: the loaded one, or the same with the job's own LoRAs."""
    if job.loras is None:
        return model_key(model)
    described = {**model.describe(), "loras": [{"file": l.path, "weight": l.weight,
                                                 "sha256": _file_digest(Path(l.path), "LoRA", cache)}
                                                for l in job.loras]}
    return json.dumps(described, sort_keys=True)


def plan(jobs: list[Job], base: EditConfig, model: Any, out: Path, force: bool) -> tuple[list[tuple], dict[str, dict]]:
    """Check every job's settings and files and hash them: (pending (job, config, digest), rows of jobs that need
    no run: errors and, without `force`, those already done). `model`: the LoadedModel (or its key string)."""
    pending, rows, digests = [], {}, {}
    for job in jobs:
        try:
            config = EditConfig.from_json(job.settings, base)
            key = model if isinstance(model, str) else _job_model_key(model, job, digests)
            digest = settings_hash(job, config, key, digests)
        except InputError as e:
            rows[job.id] = _row(job, "error", str(e), None, 0.0)
            continue
        info = None if force else _done(out / job.id, digest)
        if info is not None:
            seconds = float((info.get("job") or {}).get("seconds", 0.0))
            rows[job.id] = _row(job, "skipped", "done before with the same job and settings (--force redoes it)",
                                _best_score(info), seconds)
        else:
            pending.append((job, config, digest))
    # jobs with their own LoRAs run grouped by LoRA set (stable), so each set is loaded once per process
    pending.sort(key=lambda p: "" if p[0].loras is None else json.dumps([(l.path, l.weight) for l in p[0].loras]))
    return pending, rows


def run_batch(manifest: str | Path, out: str | Path, *, overrides: dict[str, Any],
              load_editor: Callable[[Optional[str]], Any], device: Optional[str] = None, force: bool = False,
              quiet: bool = False, threads: Optional[int] = None) -> int:
    """Run every job of `manifest` into `out`; return the exit status (0 all ok or skipped, 1 some failed).

    Args:
        manifest: JSONL file, one job per line (see the module docstring).
        out: the output folder; DIR/<id>/ per job and DIR/summary.jsonl.
        overrides: EditConfig fields for every job (the command's edit options), under the model's
            recommendations and over them, and under each job's own settings.
        load_editor: called once per process with the device to use (None: the best available), and again
            with (device, loras) for each LoRA set that jobs name (`loras` in the manifest).
        device: the device of a single process; several processes each take their own (accelerate's).
        force: redo jobs whose results already exist with the same settings.
        threads: torch CPU threads per process (None: torch's default, or accelerate's OMP_NUM_THREADS).

    Raises:
        ManifestError / InputError: a bad manifest, option or output folder (before any model is loaded).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    out = Path(out)
    try:
        jobs = read_manifest(manifest, remove=overrides.get("remove") is True)
        EditConfig().replace(**overrides).checked()
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if threads is not None and threads < 1:
            raise InputError("--threads must be at least 1")
    except InputError:
        if int(os.environ.get("RANK", "0")) != 0:  # under a launcher, every process finds it; the first says it
            return EXIT_MANIFEST
        raise
    if threads is not None:
        torch.set_num_threads(threads)

    # Under a launcher (accelerate launch / torchrun) on a machine without accelerators, or with --device cpu,
    # the processes join a gloo group on the CPU; alone, PartialState is a single process and changes nothing.
    state = PartialState(cpu=device == "cpu" or not _has_accelerator())
    if state.num_processes > 1:
        if device not in (None, "cpu"):
            raise InputError("--device is for one process; under accelerate each process takes its own device")
        device = str(state.device)
    say = sys.stderr.write if state.is_main_process and not quiet else (lambda s: None)
    t0 = time.perf_counter()
    editor = load_editor(device)
    base = editor.defaults.replace(**overrides)
    say(f"loaded {editor.model.name} on {editor.model.device} in {time.perf_counter() - t0:.1f} s"
        + (f" ({state.num_processes} processes)\n" if state.num_processes > 1 else "\n"))

    # the main process decides what is pending and tells the others, so all split the same list even where
    # their views of the disk differ (several machines); it plans before any process writes a result
    planned = None
    if state.is_main_process:
        planned = plan(jobs, base, editor.model, out, force)
        out.mkdir(parents=True, exist_ok=True)
    if state.num_processes > 1:
        planned = broadcast_object_list([planned])[0]
    pending, rows = planned

    mine = _run_share(state, pending, editor, load_editor, device, out, quiet)
    done = gather_object(mine) if state.num_processes > 1 else mine
    for row in done:
        rows[row["id"]] = row
    ordered = [rows[job.id] for job in jobs]
    failed = sum(r["status"] == "error" for r in ordered)
    if state.is_main_process:
        _summarise(ordered, mine, out, say, t0)
    state.wait_for_everyone()
    return EXIT_FAILED if failed else EXIT_OK


def _run_share(state: Any, pending: list[tuple], editor: Any, load_editor: Callable, device: Optional[str], out: Path,
               quiet: bool) -> list[dict]:
    """This process's share of the pending jobs, with a progress bar on the main process; its summary rows."""
    from tqdm.auto import tqdm

    mine: list[dict] = []
    with state.split_between_processes(pending) as share:
        desc = "jobs" if state.num_processes == 1 else f"jobs (process 0 of {state.num_processes})"
        bar = tqdm(share, desc=desc, unit="job", disable=quiet or not state.is_main_process, file=sys.stderr,
                   dynamic_ncols=True)
        loaded = {None: editor}  # LoRA set -> editor; a set's editor is dropped when the next set is loaded
        for job, config, digest in bar:
            bar.set_postfix_str(job.id, refresh=False)
            if job.loras not in loaded:
                loaded = {None: editor}
                try:
                    loaded[job.loras] = load_editor(device, job.loras)
                except (InputError, ModelLoadError) as e:  # this set's jobs fail with its one line; others go on
                    loaded[job.loras] = e
            current = loaded[job.loras]
            row = _row(job, "error", str(current), None, 0.0) if isinstance(current, Exception) else \
                run_job(current, job, config, digest, out)
            if row["status"] == "error" and state.is_main_process and not quiet:
                bar.write(f"job {job.id} (line {job.line}): {row['message']}", file=sys.stderr)
            mine.append(row)
        bar.close()
    return mine


def _summarise(ordered: list[dict], mine: list[dict], out: Path, say: Callable[[str], Any], t0: float) -> None:
    """Write DIR/summary.jsonl and say what happened (with the other processes' errors, which their bars did not
    print)."""
    failed = sum(r["status"] == "error" for r in ordered)
    _write_atomic(out / SUMMARY, "".join(json.dumps(r) + "\n" for r in ordered))
    if failed:
        for r in ordered:
            if r["status"] == "error" and r["id"] not in {m["id"] for m in mine}:
                say(f"job {r['id']} (line {r['line']}): {r['message']}\n")
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "skipped", "error")}
    say(f"{len(ordered)} jobs: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} failed "
        f"in {time.perf_counter() - t0:.1f} s; summary in {out / SUMMARY}\n")
    if failed:
        sys.stderr.write(f"error: {failed} of {len(ordered)} jobs failed (see {out / SUMMARY})\n")
