"""python -m blended batch: manifests, bad jobs, resume, and two processes under accelerate (gloo on the CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import box_mask, scene

from blended.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--no-rank", "--steps", "3", "--candidates", "2"]  # subprocesses add --threads 1 (the suite keeps its own)


def start(*args, launcher=(sys.executable, "-m", "blended")) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([*launcher, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(*args, **kw) -> subprocess.CompletedProcess:
    return finish(start(*args, **kw))


def write_manifest(path: Path, jobs: list) -> Path:
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return path


def summary(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    for i in range(3):
        scene(48, 32, seed=i).save(d / f"image{i}.png")
    box_mask(48, 32, (16, 8, 36, 24)).save(d / "mask.png")
    box_mask(48, 32, (0, 0, 0, 0)).save(d / "empty.png")
    return d


def good_jobs():
    return [{"image": "image0.png", "mask": "mask.png", "prompt": "a red circle"},
            {"id": "blue", "image": "image1.png", "mask": "mask.png", "prompt": "a blue square", "seed": 7},
            {"image": "image2.png", "mask": "mask.png", "prompt": "a green circle", "guidance_scale": 3}]


@pytest.mark.parametrize("lines, message", [
    (['{"image": "image0.png", "mask": "mask.png", "prompt": "a"}', '{"image": "image0.png", "mask": '],
     "line 2: not valid JSON"),
    (['{"image": "image0.png", "mask": "mask.png", "prompt": "a"}', "", '["image0.png", "mask.png", "a"]'],
     "line 3: a job is a JSON object"),
    (['{"image": "image0.png", "prompt": "a"}'], "line 1: 'mask' is missing"),
    (['{"image": "image0.png", "mask": "mask.png", "prompt": "  "}'], "line 1: 'prompt' must be a non-empty string"),
    (['{"image": "image0.png", "mask": "mask.png", "prompt": "a", "guidance": 5}'],
     "line 1: unknown key 'guidance' (did you mean 'guidance_scale'?)"),
    (['{"id": "x", "image": "image0.png", "mask": "mask.png", "prompt": "a"}',
      '{"id": "x", "image": "image1.png", "mask": "mask.png", "prompt": "b"}'], "line 2: id 'x' is already used on line 1"),
    (['{"id": "../up", "image": "image0.png", "mask": "mask.png", "prompt": "a"}'], "line 1: id '../up' must be"),
    ([""], "has no jobs"),
])
def test_bad_manifest_exits_2_naming_the_line(data, tmp_path, capsys, lines, message):
    manifest = write_manifest(data / "jobs-bad.jsonl", lines)
    # the manifest is checked before the model: this one would fail to load
    code = main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "/nonexistent-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_manifest_and_bad_option_exit_2(data, tmp_path, capsys):
    assert main(["batch", str(data / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    manifest = write_manifest(data / "jobs-ok.jsonl", good_jobs())
    assert main(["batch", str(manifest), "--out", str(tmp_path), "--steps", "0", "--model", "/nonexistent"]) == 2
    assert "num_inference_steps" in capsys.readouterr().err


def test_bad_jobs_are_recorded_and_the_batch_goes_on(tiny_dirs, data, tmp_path):
    manifest = write_manifest(data / "jobs-mixed.jsonl", [
        good_jobs()[0],
        {"id": "missing", "image": "nope.png", "mask": "mask.png", "prompt": "a cat"},
        {"id": "empty", "image": "image1.png", "mask": "empty.png", "prompt": "a cat"},
        {"id": "badvalue", "image": "image1.png", "mask": "mask.png", "prompt": "a cat", "blend_start": 1.5},
        {"id": "badtype", "image": "image1.png", "mask": "mask.png", "prompt": "a cat", "num_candidates": "two"},
        good_jobs()[1],
    ])
    out = tmp_path / "out"
    p = run("batch", manifest, "--out", out, "--model", tiny_dirs["sd1"], *FAST, "--threads", 1)
    assert p.returncode == 1, p.stderr
    assert "error: 4 of 6 jobs failed" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr
    rows = summary(out)
    assert [(r["id"], r["line"], r["status"]) for r in rows] == [
        ("0001", 1, "ok"), ("missing", 2, "error"), ("empty", 3, "error"), ("badvalue", 4, "error"),
        ("badtype", 5, "error"), ("blue", 6, "ok")]
    messages = {r["id"]: r["message"] for r in rows}
    assert "does not exist" in messages["missing"] and "mask is empty" in messages["empty"]
    assert "blend_start" in messages["badvalue"] and "num_candidates must be an integer" in messages["badtype"]
    assert all(set(r) == {"id", "line", "status", "message", "score", "seconds"} for r in rows)
    assert sorted(x.name for x in (out / "blue").iterdir()) == ["01.png", "02.png", "result.json"]
    info = json.loads((out / "blue" / "result.json").read_text())
    assert [c["seed"] for c in info["candidates"]] == [7, 8] and info["settings"]["num_inference_steps"] == 3
    assert info["job"]["id"] == "blue" and info["job"]["settings"] == {"seed": 7} and len(info["settings_hash"]) == 64
    assert not (out / "missing").exists()


def test_resume_skips_done_jobs_and_force_redoes_them(tiny_dirs, data, tmp_path):
    manifest = write_manifest(data / "jobs-resume.jsonl", good_jobs())
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out", str(out), "--model", str(tiny_dirs["sd1"]), *FAST, "--quiet"]
    assert main(args) == 0
    assert [r["status"] for r in summary(out)] == ["ok"] * 3
    first = {p: p.read_bytes() for p in out.glob("*/*.png")}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}

    assert main(args) == 0  # nothing changed: every job is skipped, nothing is rewritten
    rows = summary(out)
    assert [r["status"] for r in rows] == ["skipped"] * 3 and all(r["seconds"] > 0 for r in rows)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*")} == stamps

    jobs = good_jobs()  # one job's setting changes, and a half-written job lost its result.json: both rerun
    jobs[2]["guidance_scale"] = 4
    write_manifest(manifest, jobs)
    (out / "0001" / "result.json").unlink()
    assert main(args) == 0
    assert [r["status"] for r in summary(out)] == ["ok", "skipped", "ok"]
    assert (out / "0001" / "01.png").read_bytes() == first[out / "0001" / "01.png"], "same job, same images"
    assert (out / "0003" / "01.png").read_bytes() != first[out / "0003" / "01.png"]

    assert main([*args, "--steps", "2"]) == 0  # an edit option is part of every job's settings
    assert [r["status"] for r in summary(out)] == ["ok"] * 3
    assert main([*args, "--steps", "2", "--force"]) == 0  # done, but redone
    assert [r["status"] for r in summary(out)] == ["ok"] * 3
    assert main([*args, "--steps", "2", "--candidates", "1"]) == 0
    assert [r["status"] for r in summary(out)] == ["ok"] * 3
    assert sorted(x.name for x in (out / "blue").iterdir()) == ["01.png", "result.json"], "stale images removed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_write_the_same_files_as_one(tiny_dirs, data, tmp_path):
    jobs = good_jobs() + [{"id": "missing", "image": "nope.png", "mask": "mask.png", "prompt": "a cat"},
                          {"image": "image0.png", "mask": "mask.png", "prompt": "a yellow triangle", "seed": 3}]
    manifest = write_manifest(data / "jobs-two.jsonl", jobs)
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = start("batch", manifest, "--out", one, "--model", tiny_dirs["sd1"], *FAST, "--threads", 1)
    # accelerate's --cpu runs one process unless an MPI launcher is set up; --multi_gpu starts torchrun's
    # processes, which join a gloo group on the CPU when the machine has no accelerator (docs/batch.md)
    p2 = start("batch", manifest, "--out", two, "--model", tiny_dirs["sd1"], *FAST, "--threads", 1, launcher=(
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "blended"))
    p1, p2 = finish(p1), finish(p2)  # both at once: the single process and the pair
    assert p1.returncode == 1 and p2.returncode != 0, (p1.stderr, p2.stderr)  # one job fails in both
    assert "error: 1 of 5 jobs failed" in p1.stderr and "error: 1 of 5 jobs failed" in p2.stderr
    assert "(2 processes)" in p2.stderr, p2.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(summary(one)) == strip(summary(two))
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(files) == 8 and files == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f"{f} differs between 1 and 2 processes"
    for d in ("0001", "blue", "0003", "0005"):
        a, b = (json.loads((o / d / "result.json").read_text()) for o in (one, two))
        assert a["settings_hash"] == b["settings_hash"] and a["candidates"] == b["candidates"]
