"""The app in its own process under load: `python app.py` on a free port, rushes of concurrent gradio_client users,
edits from fresh sessions, the server's resident memory (bench/load.py's tables, tests/test_load.py's checks)."""

from __future__ import annotations

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
from typing import Optional

from . import ROOT

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
    """`python app.py --model MODEL` on a free port with extra environment `env`; yields (url, pid).

    The app gets a gradio cache of its own (GRADIO_TEMP_DIR, removed afterwards): gradio files an upload by its
    content, and another app closing on this machine deletes the files it made, which may be this one's too."""
    port = free_port()
    cache = tempfile.TemporaryDirectory(prefix="blended-gradio-")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                "GRADIO_TEMP_DIR": cache.name, **env}
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
        cache.cleanup()


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


def fresh_sessions(url: str, image: Path, mask: Path, edits: int, threads: int = 2, first: int = 0,
                   options: Optional[dict] = None) -> tuple[int, list[str], float]:
    """`edits` edits, each from a new gradio_client session (a visitor who comes once, edits and leaves), from
    `threads` threads at once; `first` numbers the first edit (its seed). Failures are counted, not raised.

    Returns (edits done, one line per failure, seconds)."""
    from gradio_client import Client, handle_file

    lock = threading.Lock()
    todo = iter(range(first, first + edits))
    done: list[int] = []
    errors: list[str] = []

    def run_thread() -> None:
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            client = None
            try:
                client = Client(url, verbose=False, download_files=False)
                client.predict(handle_file(str(image)), handle_file(str(mask)), PROMPTS[k % len(PROMPTS)],
                               {**settings(k, 0), **(options or {})}, api_name="/edit")
                with lock:
                    done.append(k)
            except Exception as e:  # counted: the run goes on
                with lock:
                    errors.append(f"edit {k}: {e!r}"[:300])
            finally:
                if client is not None:
                    client.close()  # the visitor leaves: its heartbeat ends (gradio marks the session closed)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=run_thread) for _ in range(max(1, threads))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return len(done), errors, time.perf_counter() - t0
