"""Edits off the request's thread: a worker runs `Editor.edit` while the handler streams its progress and live
previews, and Stop (or gradio's cancel) ends it at its next denoising step. The UI's Generate and the `/edit` API
both go through `EditRunner`; errors meant for the user become `gr.Error` here, in one place."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from blended import EditCancelled, EditConfig, Editor, EditResult, InputError, OutOfMemory

from .editing import StopSwitch, progress_label
from .zerogpu import gpu

PREVIEW_INTERVAL = 0.25  # seconds between two live previews sent to the page (the engine makes them more often)
PREVIEWS_PER_CHUNK = 10  # the engine makes a preview every steps / PREVIEWS_PER_CHUNK steps
GPU_SECONDS = 180  # longest edit a ZeroGPU Space grants a device for
EDIT_CONCURRENCY = "edit"  # UI and API edits share one concurrency group (one accelerator)
OUT_OF_MEMORY = "Out of memory: try fewer candidates or a smaller image."


def session_of(request: Optional[gr.Request]) -> str:
    """The visitor's session id (their Stop stops only their edits); "anonymous" without a request."""
    return getattr(request, "session_hash", None) or "anonymous"


def show_progress(progress: Callable, stage: str, done: int, total: int) -> None:
    """A named stage of the edit on gradio's progress bar ('denoising 3/20', 'decoding', ...)."""
    if stage != "done":
        progress((done, max(total, 1)), desc=progress_label(stage, done, total), unit="steps")


@gpu(duration=GPU_SECONDS)
def run_edit(editor: Editor, source: Any, mask: Any, prompt: str, config: EditConfig, report: Callable,
             should_stop: Callable[[], bool], preview: Optional[Callable] = None) -> EditResult:
    """One edit on `editor` (a device is held for it on ZeroGPU); a list of (label, mask) tries each mask with a
    share of the candidates and ranks them together (`blended.multimask.edit_masks`)."""
    if isinstance(mask, list):
        from blended.multimask import edit_masks

        return edit_masks(editor, source, mask, prompt, config, progress=report, should_stop=should_stop)
    every = max(1, config.num_inference_steps // PREVIEWS_PER_CHUNK)
    return editor.edit(source, mask, prompt, config, progress=report, should_stop=should_stop,
                       preview=preview, preview_every=every)


def guarded_edit(editor: Editor, source: Any, mask: Any, prompt: str, config: EditConfig, stop: threading.Event,
                 report: Callable, preview: Optional[Callable] = None) -> EditResult:
    """`run_edit` polling `stop`; what the user caused or can fix becomes a `gr.Error`: bad input, a stopped
    edit and `OutOfMemory` (known by its type: the engine converts every device's out-of-memory to it)."""
    try:
        return run_edit(editor, source, mask, prompt, config, report, stop.is_set, preview)
    except InputError as e:
        raise gr.Error(str(e), title="Cannot edit") from None
    except EditCancelled:
        raise gr.Error("The edit was stopped before it finished.", title="Stopped") from None
    except OutOfMemory:
        raise gr.Error(OUT_OF_MEMORY, title="Cannot edit") from None


class EditRunner:
    """Runs the edits of every visitor: one stop flag per edit, registered under its session (`StopSwitch`)."""

    def __init__(self) -> None:
        self.switch = StopSwitch()

    def stop(self, request: Optional[gr.Request]) -> int:
        """Stop the edits the caller's session is running (they end within one denoising step)."""
        return self.switch.stop(session_of(request))

    def run(self, editor: Editor, source: Any, mask: Any, prompt: str, config: EditConfig,
            request: Optional[gr.Request], progress: Callable) -> EditResult:
        """One edit in the request's thread (the API's), with named progress; Stop ends it."""
        session = session_of(request)
        stop = self.switch.start(session)
        try:
            return guarded_edit(editor, source, mask, prompt, config, stop, lambda *a: show_progress(progress, *a))
        finally:
            self.switch.finish(session, stop)

    def stream(self, editor: Editor, source: Any, mask: Any, prompt: str, config: EditConfig,
               request: Optional[gr.Request], progress: Callable, live: bool, lease: Any = None) -> Iterator[tuple]:
        """Run the edit in a worker thread; yield ("preview", done, total, images) at most every
        PREVIEW_INTERVAL seconds while it denoises (when `live`), then ("result", EditResult).

        Closing the generator (gradio's cancel) stops the edit at its next denoising step. `lease` (the model's,
        from `blended.models.cache`) is released by the worker once the edit has ended, not before."""
        session = session_of(request)
        stop = self.switch.start(session)
        messages: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                messages.put(("result", guarded_edit(
                    editor, source, mask, prompt, config, stop, lambda *a: messages.put(("progress", *a)),
                    (lambda *a: messages.put(("preview", *a))) if live else None)))
            except BaseException as e:  # noqa: BLE001  (re-raised in the handler's thread)
                messages.put(("error", e))
            finally:
                if lease is not None:
                    lease.release()

        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True).start()
        finished, last = False, 0.0
        try:
            while True:
                kind, *rest = messages.get()
                if kind == "progress":
                    show_progress(progress, *rest)
                elif kind == "preview" and time.monotonic() - last >= PREVIEW_INTERVAL:
                    last = time.monotonic()
                    yield ("preview", *rest)
                elif kind in ("error", "result"):
                    finished = True
                    if kind == "error":
                        raise rest[0]
                    yield ("result", rest[0])
                    return
        finally:
            if not finished:
                stop.set()
            self.switch.finish(session, stop)
