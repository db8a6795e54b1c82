"""Load on the real server: many gradio_client users at once, the server's memory across rushes.

    python -m bench.load                 # 16 users x 3 edits, 5 rushes, demo model
    python -m bench.load --quick         # 4 users x 2 edits, 2 rushes

Starts `python app.py --model demo` in its own process (so the memory measured is the server's alone),
sends rushes of concurrent edits, and prints a table: seconds per rush, edits per second, the server's
resident memory after each rush. tests/test_load.py uses the same pieces (blended_dev/server.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from blended_dev.bench import scene, table, write_doc
from blended_dev.server import app_server, rss_mb, rush


def main() -> None:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--rushes", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.users, args.edits, args.rushes = 4, 2, 2
    tmp = Path(tempfile.mkdtemp(prefix="blended-load-"))
    image, mask = tmp / "source.png", tmp / "mask.png"
    scene(384, 256, seed=3).save(image)
    m = Image.new("L", (384, 256), 0)
    m.paste(255, (8, 8, 40, 40))
    m.save(mask)
    env = {"BLENDED_CONCURRENCY": str(args.concurrency), "BLENDED_MAX_QUEUE": str(args.users * 2),
           "BLENDED_MAX_CANDIDATES": "4"}
    with app_server(env) as (url, pid):
        rush(url, image, mask, 1, 1)  # warm-up
        rows = [["after start-up + 1 edit", "", "", f"{rss_mb(pid):.0f}"]]
        for r in range(args.rushes):
            _, seconds = rush(url, image, mask, args.users, args.edits)
            n = args.users * args.edits
            rows.append([f"rush {r + 1}: {args.users} users x {args.edits} edits", f"{seconds:.1f}",
                         f"{n / seconds:.2f}", f"{rss_mb(pid):.0f}"])
    text = table(["", "seconds", "edits/s", "server RSS (MiB)"], rows)
    print(text)
    if not args.quick:
        cmd = "python -m bench.load " + " ".join(sys.argv[1:])
        write_doc("load", f"```\n{cmd.strip()}\n```\n\nDemo model, 2 candidates x 8 steps per edit, "
                          f"concurrency {args.concurrency}, 384x256 source.\n\n{text}\n")


if __name__ == "__main__":
    main()
