"""The benchmarks' --quick modes run end to end and print sane numbers (issue 7's smoke test; no timings asserted)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"bench.{script.removesuffix('.py')}", "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def numbers(row: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", row)]


def test_speed_quick():
    out = run("speed.py")
    ratio = float(re.search(r"Ratio blended / diffusers: ([\d.]+)", out).group(1))
    assert 0.2 < ratio < 5  # same work on both sides: a wildly different time means a different computation
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| blended") or
            line.startswith("| diffusers")}
    calls = {name: int(row.split("|")[4]) for name, row in rows.items()}  # the "UNet calls" column
    assert len(set(calls.values())) == 1 and calls["blended (shrinking on)"] == 3  # 4 steps, blend_start 0.25
    assert re.search(r"\| rank \| 0 \| [\d.e-]+ \|", out) and re.search(r"\| background \| 0 \| [\d.e-]+ \|", out)


def test_quality_quick():
    out = run("quality.py", "--n", "2")
    section = out.split("## Adherence")[1].split("##")[0]
    ranked = next(line for line in section.splitlines() if line.startswith("| ranked"))
    top, rand, psnr, seam, seconds = numbers(ranked)
    assert 0 <= top <= 1 and 0 <= rand <= 1 and 15 < psnr < 60 and seconds > 0
    methods = out.split("## Background methods")[1]
    psnr_of = {line.split("|")[1].strip(): numbers(line)[0] for line in methods.splitlines()
               if line.startswith("| ") and not line.startswith("| method")}
    assert set(psnr_of) == {"none", "stitch", "poisson", "latent", "decoder"}
    assert psnr_of["decoder"] > psnr_of["none"] and psnr_of["stitch"] > psnr_of["none"]


def test_background_quick():
    out = run("background.py")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    none, decoder = numbers(rows["none"])[0], numbers(rows["decoder"])[0]
    assert decoder > none + 3  # the decoder keeps the outside better than the plain decode
    assert "exact" in rows["poisson"].split("|")[2]


def test_load_quick():
    out = run("load.py")
    rows = [line for line in out.splitlines() if line.startswith("| rush")]
    assert len(rows) == 2
    for row in rows:
        seconds, rate, rss = numbers(row.split("edits |")[1])
        assert seconds > 0 and rate > 0 and 100 < rss < 8000


def test_fidelity_quick():
    out = run("fidelity.py", "--threads", "1")
    rows = {line.split("|")[2].strip(): line for line in out.split("## B.")[0].splitlines() if line.startswith("| 1600")}
    assert numbers(rows["`stitch`"].split("|")[3])[0] == 0 and rows["`stitch`"].split("|")[4].strip() == "exact"
    assert numbers(rows["`none`"].split("|")[3].replace(",", ""))[0] > 1000  # the paper's raw output: a box changes
    detail = [line for line in out.split("## B.")[1].splitlines() if line.startswith("| native") or
              line.startswith("| 128")]
    assert len(detail) == 2 and all(0 < numbers(line.split("|")[3])[0] <= 1.5 for line in detail)


def test_decoder_memory_quick():
    from blended_dev.bench import have_before

    out = run("decoder_memory.py", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| tiny VAE")]
    variants = {"after", "after, no checkpointing"} | ({"before"} if have_before() else set())
    assert {line.split("|")[4].strip().split(" (")[0] for line in rows} == variants and len(rows) == len(variants)
    for line in rows:
        stats, step, peak, rise = numbers("|".join(line.split("|")[5:]))
        assert stats > 0 and step > 0 and 0.1 < peak < 8 and rise >= 0


def test_ablation_quick():
    """The loop section's official and default rows, a soft row of each kind, two seam-band profiles on the
    same candidates, and the adopted tune row."""
    out = run("ablation.py", "--rows", r"official,new default$,mask_blur 4: the composite,mask_blur 4 \+ soft_mask,"
              r"linear feather 8,half Gaussian sigma 2,adopted")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    plain = ["official script's loop (bench/official.py)", "fresh noise + own timestep = the new default",
             "guidance 7.5, core_steps 0.7 (adopted)"]  # top-1, random candidate, PSNR
    strict = ["mask_blur 4: the composite (default use)", "mask_blur 4 + soft_mask: the loop too",
              "linear feather 8 px (a hard mask's default seam band)", "half Gaussian sigma 2 (1 on the edge)"]
    assert set(plain + strict) <= set(rows)
    for label in plain + strict:
        cells = [float(c) for c in rows[label].split("|")[2:-1] if " to " not in c]  # not the paired differences
        top, mean, psnr = (cells[0], cells[2], cells[3]) if label in strict else cells[:3]
        assert 0 <= top <= 1 and 0 <= mean <= 1 and 10 < psnr <= 150
        if label in strict:  # top-1 judged on the asked pixels alone
            assert 0 <= cells[1] <= 1
