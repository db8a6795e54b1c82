"""Load on the real server: many gradio_client users at once, the server's memory across rushes.

    python bench/load.py                 # 16 users x 3 edits, 5 rushes, demo model
    python bench/load.py --quick         # 4 users x 2 edits, 2 rushes

Starts `python app.py --model demo` in its own process (so the memory measured is the server's alone),
sends rushes of concurrent edits, and prints a table: seconds per rush, edits per second, the server's
resident memory after each rush. tests/test_load.py uses the same pieces.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a green circle", "a white square",
           "a black triangle"]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(env: dict[str, str], model: str = "demo", timeout: float = 120.0):
    """`python app.py --model MODEL` on a free port with extra environment `env`; yields (url, pid)."""
    port = free_port()
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **env)
    # the app's log goes to a file, not a pipe: nobody reads a pipe while the app serves, and a full one
    # (64 KiB) would block the app's next write; BLENDED_APP_LOG keeps it for a look after a failure
    log_path = os.environ.get("BLENDED_APP_LOG")
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", model, "--port", str(port)],
                            cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError("the app exited: " + log.read().decode(errors="replace")[-2000:])
            try:
                with urllib.request.urlopen(url + "config", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the app did not start in {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def settings(user: int, k: int) -> dict:
    """The settings of user `user`'s k-th edit: a seed of its own, a quick edit."""
    return {"num_inference_steps": 8, "num_candidates": 2, "seed": 1000 * user + k}


def rush(url: str, image: Path, mask: Path, users: int, edits: int) -> tuple[dict, float]:
    """`users` clients at once, each running `edits` edits one after the other.

    Returns ({(user, k): (prompt, gallery, result)}, seconds); raises if any request failed.
    """
    from gradio_client import Client, handle_file

    out: dict = {}
    errors: list[str] = []

    def run_user(user: int) -> None:
        try:
            client = Client(url, verbose=False)
            for k in range(edits):
                prompt = PROMPTS[(user + k) % len(PROMPTS)]
                gallery, result = client.predict(handle_file(str(image)), handle_file(str(mask)), prompt,
                                                 settings(user, k), api_name="/edit")
                out[(user, k)] = (prompt, gallery, result)
        except Exception as e:  # collected: an exception in a thread would otherwise vanish
            errors.append(f"user {user}: {e!r}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run_user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    if errors or len(out) != users * edits:
        raise RuntimeError(f"{len(out)} of {users * edits} edits done; errors: {errors[:3]}")
    return out, time.perf_counter() - t0


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from common import scene, table, write_doc
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
    import tempfile

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
        cmd = "python bench/load.py " + " ".join(sys.argv[1:])
        write_doc("load", f"```\n{cmd.strip()}\n```\n\nDemo model, 2 candidates x 8 steps per edit, "
                          f"concurrency {args.concurrency}, 384x256 source.\n\n{text}\n")


if __name__ == "__main__":
    main()
