"""What tests/, bench/ and tools/ share: one importable package (an editable install, `pip install -e .`),
so scripts and tests import it by name from anywhere. Not part of the engine: nothing in blended/ imports it.

    scenes.py       the demo world: seeded 64x64 scenes of coloured shapes, edit cases, seed ranges
    analyse.py      its analyser, the judge of demo edits: the colour and shape inside a mask
    edits.py        how the benches score demo edits: PSNR outside the mask, seam errors, hit rates, thin masks
    official.py     the loop of the paper's official SD2 script, ported as a named baseline
    tiny.py         Stable-Diffusion-shaped models built in-process with fixed seeds (tiny ones for tests,
                    the SD graph at reduced widths for benchmarks)
    tiny_sam.py     a tiny random Segment Anything
    ldm_layout.py   diffusers state dicts -> the original single-file layout
    bench.py        what the benchmarks share: timing, memory, Markdown tables, docs/bench/, plots
    server.py       the app in its own process and rushes of gradio_client users (bench/load.py, tests)
    training.py     what the demo model's training scripts share: log lines, the LR schedule
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository (the package is installed editable from it)
