"""Continue editing and the edit history: a candidate becomes the picture to edit next, and every version the
session went through can be picked up again (the history lives in the visitor's session)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import gradio as gr

from .canvas import brush_for, editor_value
from .editing import checked_image, continue_history
from .limits import Limits
from .results_panel import Results, shown_state


def follow_history(results: Results, image_editor: gr.ImageEditor, prompt: gr.Textbox, limits: Limits,
                   follow: Callable[[Any], Any]) -> None:
    """The handlers of the Continue button and the history gallery; `follow` refreshes what shows the editor's
    picture elsewhere once it changed."""
    def on_continue(state: Optional[dict], shown: Optional[list], pair: Any, versions: list, text: str) -> Any:
        """The selected candidate (the best when none was selected) becomes the image to edit; mask cleared."""
        state = shown_state(state, shown, pair)
        if not state:
            raise gr.Error("Generate first, then continue from one of the candidates.", title="Nothing to continue")
        path = state["paths"][state.get("selected", 0)]
        versions = continue_history(versions, state["source"], path, text or "")
        size = checked_image(path, limits).size
        return brush_for(size, value=editor_value(path)), versions, [(v["path"], v["label"]) for v in versions]

    follow(results.keep_editing.click(on_continue, inputs=[results.state, results.gallery, results.before_after,
                                                           results.versions, prompt],
                                      outputs=[image_editor, results.versions, results.history], queue=False,
                                      api_visibility="private"))

    def on_history(versions: list, shown: Optional[list], evt: gr.SelectData) -> Any:
        paths = [v["path"] for v in versions or []] or [item[0] for item in shown or []]  # a linked page: as shown
        if evt.index is None or not 0 <= evt.index < len(paths):
            return gr.skip()
        path = paths[evt.index]
        return brush_for(checked_image(path, limits).size, value=editor_value(path))

    follow(results.history.select(on_history, inputs=[results.versions, results.history], outputs=image_editor,
                                  queue=False, api_visibility="private"))
