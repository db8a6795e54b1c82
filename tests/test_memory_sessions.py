"""Memory that stays flat on a long-running server (issue 31): gradio keeps what it holds for a session (its copy
of the page's configuration, about 0.2 MiB here, and the session's `gr.State` values) until `state_session_capacity`
newer sessions exist; the app launches with `BLENDED_MAX_SESSIONS` as that bound, and a dropped session is freed.
The memory over 1,200 visitors: bench/load.py --fresh-sessions (docs/bench/load_sessions.md)."""

import copy
import gc
import weakref

import pytest

from blended.models.cache import ModelKey
from blended_dev.server import free_port
from test_app_client import app_editor, make_case  # noqa: F401  (fixture)


def test_app_launches_with_the_session_bound_from_the_environment(monkeypatch):
    import gradio as gr

    import app
    from ui import Limits

    assert Limits.from_env({}).max_sessions == Limits().max_sessions >= 100
    assert Limits.from_env({"BLENDED_MAX_SESSIONS": "50"}).max_sessions == 50
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setenv("BLENDED_MAX_SESSIONS", "3")
    app.main(["--model", "demo", "--segmenter", "grabcut"])
    assert seen["state_session_capacity"] == 3


def test_a_session_beyond_the_bound_is_dropped_and_freed(app_editor, tmp_path):  # noqa: F811
    """Six visitors, one /edit each, on a server that keeps three sessions: the three oldest sessions are gone and
    nothing else holds them (their configuration and states are freed); the newest three are kept."""
    from gradio_client import Client, handle_file

    from ui import Limits, create_demo

    limits = Limits(max_candidates=2, max_sessions=3)
    demo = create_demo(app_editor, limits=limits, speed=None)
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=limits.concurrency)
    demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True,
                state_session_capacity=limits.max_sessions)
    try:
        image, mask, _ = make_case(app_editor, tmp_path)
        sessions = []
        for k in range(6):
            client = Client(demo.local_url, verbose=False, download_files=False)
            gallery, _ = client.predict(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                                        {"num_candidates": 1, "num_inference_steps": 2, "seed": k}, api_name="/edit")
            assert len(gallery) == 1
            sessions.append(weakref.ref(demo.state_holder.session_data[client.session_hash]))
            client.close()
        gc.collect()
        assert len(demo.state_holder.session_data) <= limits.max_sessions
        assert [s() is None for s in sessions] == [True] * 3 + [False] * 3
    finally:
        demo.close()


def test_a_session_shares_the_servers_model_key():
    """gradio copies a `gr.State`'s first value for every session: the model picker's key is immutable, so every
    session shares the server's."""
    key = ModelKey("demo", (("style.safetensors", 0.5),))
    assert copy.deepcopy(key) is key and copy.deepcopy({"key": key})["key"] is key
    with pytest.raises(AttributeError):
        key.model = "other"


def test_bench_load_fresh_sessions_quick():
    """bench/load.py's fresh-session mode end to end: every edit from a new session, none failed, the server's
    memory in every row."""
    import re
    import subprocess
    import sys

    from blended_dev import ROOT

    proc = subprocess.run([sys.executable, "-m", "bench.load", "--quick", "--fresh-sessions", "4", "--every", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("|  | edits"):]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if "fresh sessions" in line]
    assert len(rows) == 3  # the warm-up, then two rows of two
    for label, edits, failed, seconds, rss, added in rows:
        assert int(failed) == 0 and 100 < float(rss) < 8000, label
    assert [int(r[1]) for r in rows] == [2, 4, 6] and re.fullmatch(r" [+-]\d+ ", rows[-1][5])


def test_an_idle_selection_expires_and_the_other_states_stay(app_editor):  # noqa: F811
    """The click selection's masks (two bytes a pixel: up to 32 MB a session for the largest picture) go once the
    selection sits idle for SELECTION_TTL_S (gr.State's time_to_live, gradio's own expiry sweep); the session's
    other states (model, results, history) are not touched, and the next access starts a new selection."""
    import datetime

    import gradio as gr
    import numpy as np
    from gradio.state_holder import StateHolder

    from ui import Limits, create_demo
    from ui.mask_panel import SELECTION_TTL_S, PanelState

    demo = create_demo(app_editor, limits=Limits(), speed=None)
    holder = StateHolder()
    holder.set_blocks(demo)
    states = {k: b for k, b in demo.blocks.items() if isinstance(b, gr.State)}
    [selection] = [k for k, b in states.items() if isinstance(b.value, PanelState)]
    assert states[selection].time_to_live == SELECTION_TTL_S
    session = holder["visitor"]
    session[selection] = PanelState(key="picture", base=np.ones((8, 8), bool), shown=np.ones((8, 8), bool))
    others = [k for k in states if k != selection]
    for k in others:
        session[k] = f"kept {k}"
    holder.delete_all_expired_state()  # not idle long enough: kept
    assert session[selection].key == "picture"
    ttl, when = session._state_ttl[selection]
    session._state_ttl[selection] = (ttl, when - datetime.timedelta(seconds=SELECTION_TTL_S + 1))
    holder.delete_all_expired_state()
    assert session[selection].key == "" and session[selection].base is None
    assert [session[k] for k in others] == [f"kept {k}" for k in others]
