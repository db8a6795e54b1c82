"""Load on the real server: many gradio_client users at once, the server's memory across rushes; or edits from
fresh sessions, the server's memory as visitors come and go.

    python -m bench.load                 # 16 users x 3 edits, 5 rushes, demo model
    python -m bench.load --quick         # 4 users x 2 edits, 2 rushes
    python -m bench.load --fresh-sessions 1000 --warmup 200 --label after   # 1,200 visitors, one edit each

Starts `python app.py --model demo` in its own process (so the memory measured is the server's alone), sends the
edits and prints a table: seconds, edits per second, the server's resident memory. Rushes: 16 clients at once,
each edits 3 times. Fresh sessions: every edit comes from a new gradio_client session that closes after its edit
(a visitor who comes once), `--threads` at a time; the memory after the warm-up and every `--every` edits, the
failures counted. Its table goes to docs/bench/load_sessions.md, one section per `--label` (before, after, ...).
tests/test_load.py and tests/test_memory_sessions.py use the same pieces (blended_dev/server.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from blended_dev.bench import scene, table, write_doc, write_doc_sections
from blended_dev.server import app_server, fresh_sessions, rss_mb, rush


def case() -> tuple[Path, Path]:
    """A 384x256 source and a small square mask, as files."""
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="blended-load-"))
    image, mask = tmp / "source.png", tmp / "mask.png"
    scene(384, 256, seed=3).save(image)
    m = Image.new("L", (384, 256), 0)
    m.paste(255, (8, 8, 40, 40))
    m.save(mask)
    return image, mask


def rushes(args: argparse.Namespace, image: Path, mask: Path) -> str:
    """Rushes of `args.users` clients x `args.edits` edits; the table."""
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
    return table(["", "seconds", "edits/s", "server RSS (MiB)"], rows)


def fresh(args: argparse.Namespace, image: Path, mask: Path) -> str:
    """`args.warmup` then `args.fresh_sessions` edits, each from a new session; the table (memory and failures
    after the warm-up and every `args.every` edits)."""
    env = {"BLENDED_CONCURRENCY": str(args.concurrency), "BLENDED_MAX_QUEUE": str(max(20, args.threads * 2)),
           "BLENDED_MAX_CANDIDATES": "4"}
    headers = ["", "edits", "failed", "seconds", "server RSS (MiB)", "added since warm-up (MiB)"]
    rest = range(0, args.fresh_sessions, args.every)
    chunks = [args.warmup] + [min(args.every, args.fresh_sessions - k) for k in rest]
    with app_server(env) as (url, pid):
        rows = [["start-up", 0, 0, "", f"{rss_mb(pid):.0f}", ""]]
        total = failed = 0
        for i, n in enumerate(chunks):
            done, errors, seconds = fresh_sessions(url, image, mask, n, args.threads, first=total)
            total, failed = total + n, failed + len(errors)
            for e in errors[:3]:
                print(e, file=sys.stderr)
            rss = rss_mb(pid)
            if i == 0:
                warm = rss
            rows.append([f"warm-up: {n} fresh sessions" if i == 0 else f"+{n} fresh sessions", total, failed,
                         f"{seconds:.0f}", f"{rss:.0f}", "" if i == 0 else f"{rss - warm:+.0f}"])
            print(table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--rushes", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=2, help="the server's BLENDED_CONCURRENCY")
    ap.add_argument("--fresh-sessions", type=int, default=0, help="edits, each from a new session (0: rushes)")
    ap.add_argument("--warmup", type=int, default=200, help="fresh-session edits before the memory is taken")
    ap.add_argument("--every", type=int, default=100, help="a row every this many fresh-session edits")
    ap.add_argument("--threads", type=int, default=2, help="fresh-session edits sent at once")
    ap.add_argument("--label", default="", help="the section of docs/bench/load_sessions.md (e.g. before, after)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.users, args.edits, args.rushes = 4, 2, 2
        args.warmup, args.every = min(args.warmup, 2), min(args.every, max(1, args.fresh_sessions))
    image, mask = case()
    text = fresh(args, image, mask) if args.fresh_sessions else rushes(args, image, mask)
    print(text)
    if args.quick:
        return
    cmd = "python -m bench.load " + " ".join(sys.argv[1:])
    what = f"Demo model, 2 candidates x 8 steps per edit, concurrency {args.concurrency}, 384x256 source."
    if not args.fresh_sessions:
        write_doc("load", f"```\n{cmd.strip()}\n```\n\n{what}\n\n{text}\n")
        return
    label = args.label or "latest"
    write_doc_sections("load_sessions", SESSIONS_TITLE, {label: f"### {label}\n\n```\n{cmd.strip()}\n```\n\n{what} "
                                                                f"{args.threads} clients at a time.\n\n{text}"})


SESSIONS_TITLE = """# Server memory as visitors come and go (bench/load.py --fresh-sessions)

Every edit comes from a new gradio_client session that closes after it, as a visitor who comes once; the server's
resident memory after the warm-up and every 200 edits. gradio keeps what it holds for a session (its own copy of the
page's configuration, about 0.2 MiB here, and the session's `gr.State` values) until `state_session_capacity`
newer sessions exist. *before*: the app launched with gradio's default bound, 10,000 sessions; *after*: launched
with `BLENDED_MAX_SESSIONS` (default 200) as that bound. docs/hosting.md
("Memory on a long-running Space") says what is kept and why."""


if __name__ == "__main__":
    main()
