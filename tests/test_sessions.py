"""Each browser session has its own model (issue 28): the server's bounded model cache (least recently used
dropped first, never a model an edit holds, one load at a time), what a shared server lets a visitor load, and
two real browser sessions editing at once with different models."""

import threading
import time

import pytest

from blended.errors import InputError, ModelLoadError
from blended.models.cache import ModelCache, ModelKey
from test_browser import browser  # noqa: F401 (the shared chromium fixture)


class Loads:
    """A stand-in loader: records each load, can be slow, fails for names starting with 'bad'."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.done, self.running, self.most = seconds, [], 0, 0
        self.lock = threading.Lock()

    def __call__(self, key: ModelKey) -> object:
        if key.model.startswith("bad"):
            raise ModelLoadError(f"model '{key.model}' does not exist")
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.done.append(key.model)
        return object()


K = {name: ModelKey(name) for name in ("a", "b", "c", "d")}


def test_the_least_recently_used_model_is_dropped_first():
    loads = Loads()
    cache = ModelCache(loads, max_models=2)
    a = cache.get(K["a"])
    cache.get(K["b"])
    assert cache.get(K["a"]) is a  # a hit: no load, and `a` is now the most recent
    cache.get(K["c"])  # drops b, the least recently used
    assert cache.keys() == [K["a"], K["c"]] and loads.done == ["a", "b", "c"]
    cache.get(K["b"])  # loaded again; drops a
    assert cache.keys() == [K["c"], K["b"]] and loads.done == ["a", "b", "c", "b"]
    with pytest.raises(ModelLoadError, match="does not exist"):
        cache.get(ModelKey("bad"))
    assert cache.keys() == [K["b"]]  # room was made before the failed load: c (least recent) went first


def test_a_leased_model_is_never_dropped_and_goes_when_released():
    cache = ModelCache(Loads(), max_models=1)
    lease = cache.acquire(K["a"])
    with cache.acquire(K["b"]) as b:  # both in use: the cache holds one more than its bound meanwhile
        assert K["a"] in cache and cache.get(K["b"]) is b and len(cache) == 2
        assert cache.leases(K["a"]) == 1 and cache.leases(K["b"]) == 1
    assert cache.keys() == [K["a"]]  # b released and dropped at once: a is still leased
    lease.release()
    lease.release()  # a second release does nothing
    assert cache.leases(K["a"]) == 0 and cache.keys() == [K["a"]]  # within the bound: kept
    cache.get(K["c"])
    assert cache.keys() == [K["c"]]


def test_one_load_at_a_time_and_one_load_per_model():
    loads = Loads(seconds=0.2)
    cache = ModelCache(loads, max_models=3)
    got = {}
    threads = [threading.Thread(target=lambda n=n, k=k: got.__setitem__(n, cache.get(K[k])))
               for n, k in enumerate("aabba")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads.most == 1  # never two loads at once
    assert sorted(loads.done) == ["a", "b"]  # each model loaded once, the waiting threads got the loaded one
    assert got[0] is got[1] is got[4] and got[2] is got[3]


def test_max_models_comes_from_the_environment_and_app_takes_shared():
    import app
    from ui import Limits

    assert Limits.from_env({}).max_models == 2
    assert Limits.from_env({"BLENDED_MAX_MODELS": " 3 "}).max_models == 3
    with pytest.raises(ValueError, match="BLENDED_MAX_MODELS must be at least 1"):
        Limits.from_env({"BLENDED_MAX_MODELS": "0"})
    with pytest.raises(ValueError, match="BLENDED_MAX_MODELS must be a whole number"):
        Limits.from_env({"BLENDED_MAX_MODELS": "two"})
    with pytest.raises(ValueError, match="at least 1"):
        ModelCache(Loads(), max_models=0)
    assert app.parse_args(["--shared"]).shared and not app.parse_args([]).shared


# -- what a visitor may load --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_editor():
    from blended import Editor

    return Editor.load("demo", ranker=None)


def test_a_shared_server_loads_only_what_it_lists(demo_editor, tmp_path):
    from ui.models_panel import ServerModels, load_for_session

    (tmp_path / "loras").mkdir()
    server = ServerModels(demo_editor, models_dir=str(tmp_path), shared=True)
    assert [v for _, v in server.choices] == ["demo", "demo-fast"]
    for typed in ("stabilityai/sdxl-turbo", "/etc", str(tmp_path / "x.safetensors")):
        key, line = load_for_session(server, typed)
        assert key is None and line == f"**Not loaded:** '{typed}' is not offered here: this shared server loads " \
                                       "only the models in its list."
    with pytest.raises(InputError, match="LoRA '/tmp/l.safetensors' is not offered here"):
        server.key_for("demo", ["/tmp/l.safetensors"])
    assert server.cache.keys() == [server.default_key]  # nothing was loaded
    key, line = load_for_session(server, "demo-fast")
    assert key == ModelKey("demo-fast") and "session: `demo-fast`" in line

    local = ServerModels(demo_editor, shared=False)  # the owner's own machine: typed ids and paths are tried
    key, line = load_for_session(local, str(tmp_path / "missing"))
    assert key is None and line.startswith("**Could not load it:**")


def test_the_key_keeps_the_server_model_load_options_and_names_loras(demo_editor):
    from ui.models_panel import ServerModels

    server = ServerModels(demo_editor, key=ModelKey("demo", (), "/vae", "v_prediction"))
    assert server.key_for("demo") == server.default_key  # the owner's --vae / --prediction-type stay with it
    assert server.key_for("demo-fast", ["/l.safetensors"], 0.5) == ModelKey("demo-fast", (("/l.safetensors", 0.5),))
    assert server.key_for("demo", ["/l.safetensors"]) != server.default_key  # a LoRA makes another model


def test_the_page_on_a_space_shares_and_offers_no_typing(demo_editor, monkeypatch):
    from ui import create_demo

    def props(**kw):
        config = create_demo(demo_editor, speed=None, **kw).get_config_file()["components"]
        return {c["props"].get("elem_id"): c["props"] for c in config}

    monkeypatch.delenv("SPACE_ID", raising=False)
    here = props()
    assert here["model-picker"]["allow_custom_value"] is True and "share" not in here["gallery"]["buttons"]
    assert here["deep-link"]["value"].startswith("Copy a link") and "7 days" in here["deep-link-note"]["value"]
    assert props(shared=True)["model-picker"]["allow_custom_value"] is False
    from ui import Limits

    assert "keeps 3 models" in props(limits=Limits(max_models=3))["model-status"]["value"]  # BLENDED_MAX_MODELS
    monkeypatch.setenv("SPACE_ID", "someone/blended")
    space = props()
    assert space["model-picker"]["allow_custom_value"] is False and "share" in space["gallery"]["buttons"]


def test_a_dropped_model_is_freed_the_servers_own_too():
    """Nothing but the cache keeps a model: the server's own goes when dropped, and so does one a session edited
    with (the edit's lease, runner and results keep no reference). BLENDED_MAX_MODELS=1 here."""
    import gc
    import weakref

    from blended import Editor
    from test_app_client import generate_handler, painted
    from ui import Limits, create_demo

    def build():
        editor = Editor.load("demo", ranker=None)
        return create_demo(editor, speed=None, limits=Limits(max_models=1)), weakref.ref(editor)

    demo, first = build()
    on_load = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_load")
    key = on_load("demo-fast", [], 1.0, None, None)[0]
    gc.collect()
    assert key == ModelKey("demo-fast") and first() is None  # the server's own model is gone

    handler, inputs = generate_handler(demo)
    by_id = {c.elem_id: c for c in inputs if getattr(c, "elem_id", None)}
    data = {c: c.value for c in inputs}
    data.update({by_id["editor"]: painted(64), by_id["prompt"]: "a red circle", by_id["live-preview"]: True,
                 by_id["num-candidates"]: 1, by_id["num-inference-steps"]: 4,
                 next(c for c in inputs if isinstance(c.value, ModelKey)): key})
    last = list(handler(data, None))[-1]
    assert next(v for k, v in last.items() if getattr(k, "elem_id", None) == "details")["model"] == "demo-fast"
    used = weakref.ref(_cached(demo, key))
    assert on_load("demo", [], 1.0, key, None)[0] == ModelKey("demo")
    time.sleep(0.5)  # the worker thread that held the lease has ended
    gc.collect()
    assert used() is None


def _cached(demo, key):
    """The model the app's cache holds for `key` (found through the Load handler's closure)."""
    on_load = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_load")
    server = next(c.cell_contents for c in on_load.__closure__ if type(c.cell_contents).__name__ == "ServerModels")
    return server.cache.get(key)


# -- two browser sessions, two models ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_url(demo_editor):
    from test_app_client import launch
    from ui import Limits

    demo, url = launch(demo_editor, Limits(max_candidates=2))
    yield url
    demo.close()


def model_status(page) -> str:
    """The Model accordion's status line (the accordion opened)."""
    if not page.locator("#model-picker").is_visible():
        page.locator("#models").get_by_text("Model").first.click()
    return page.inner_text("#model-status")


def pick_model(page, label: str, name: str) -> None:
    """Choose `label` in the Model accordion's picker and Load it; wait until the status names `name`."""
    model_status(page)
    page.click("#model-picker input")
    page.get_by_role("option", name=label).click()
    page.click("#load-model")
    page.wait_for_function(f"() => document.querySelector('#model-status').innerText.includes('session: {name}.')",
                           timeout=120_000)


def open_in(context, url: str):
    """A page of the app in its own browser context (its own gradio session)."""
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#editor canvas", state="attached", timeout=30_000)
    return page


def details(page) -> str:
    """The text of the Details (JSON) accordion, opened."""
    if not page.locator("#details").is_visible():
        page.get_by_text("Details (JSON)").click()
    page.wait_for_selector("#details", state="visible")
    return page.inner_text("#details")


def test_two_sessions_edit_with_their_own_models(browser, app_url):
    from test_browser import OUT, click_example, set_settings, wait_result

    a, b = browser.new_context(viewport={"width": 1400, "height": 1000}), browser.new_context(
        viewport={"width": 1400, "height": 1000})
    try:
        page_a, page_b = open_in(a, app_url), open_in(b, app_url)
        pick_model(page_a, "demo-fast (bundled, fast: 4 steps)", "demo-fast")
        set_settings(page_a, num_candidates=1)
        assert page_a.input_value("#num-inference-steps input[type=number]") == "4"  # demo-fast's defaults
        set_settings(page_b, num_candidates=1)
        assert page_b.input_value("#num-inference-steps input[type=number]") == "20"  # B never noticed
        assert "session: demo." in model_status(page_b)
        for page in (page_a, page_b):
            click_example(page, "a red circle (shapes)")
        page_a.click("#generate")
        page_b.click("#generate")
        wait_result(page_a, 1, timeout=300_000)
        wait_result(page_b, 1, timeout=300_000)
        text_a, text_b = details(page_a), details(page_b)
        assert '"demo-fast"' in text_a and '"lcm"' in text_a
        assert '"demo"' in text_b and '"demo-fast"' not in text_b and '"ddim"' in text_b
        OUT.mkdir(exist_ok=True)
        page_a.locator("#models").screenshot(path=str(OUT / "browser-session-model.png"))
        # B edits again after A's load: still on its own model
        page_b.click("#generate")
        page_b.wait_for_function("() => (document.querySelector('#details')?.innerText || '').includes('ddim')",
                                 timeout=300_000)
        assert "session: demo." in model_status(page_b)
    finally:
        a.close()
        b.close()
