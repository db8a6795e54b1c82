"""The results column: the candidates (best first), the selected one before / after and as a full-resolution
PNG, a link that opens the page as it is now (gradio's deep links), the session's edit history and the result's
JSON. What one visitor got lives in their session (gr.State)."""

from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Any, Optional

import gradio as gr
from PIL import Image

from blended import EditResult
from blended.pnginfo import png_info

from .editing import OutputDir, caption
from .share_panel import build_link


@dataclass
class Results:
    """The column's components and the session's state: `state` is {"source": path, "paths": [...], "selected": i}
    of the last edit, `versions` the history [{"path", "label", "digest"}], oldest first."""

    gallery: gr.Gallery
    keep_editing: gr.Button
    download: gr.DownloadButton
    before_after: gr.ImageSlider
    history: gr.Gallery
    details: gr.JSON
    link: gr.DeepLinkButton
    state: gr.State
    versions: gr.State


def saved_outputs(files: OutputDir, result: EditResult, source: Image.Image) -> tuple[list, tuple[str, str], str, dict]:
    """The result's PNGs written, each with the parameters that made it (`blended.pnginfo.png_info`: A1111's
    `parameters` and our `blended` record): gallery items, the before/after pair of the best candidate, its PNG and
    the session's result state."""
    infos = [png_info(result, i) for i in range(len(result.candidates))]
    source_path, paths = files.save(source, result.candidates, infos)
    items = [(p, caption(i + 1, c)) for i, (p, c) in enumerate(zip(paths, result.candidates))]
    return items, (source_path, paths[0]), paths[0], {"source": source_path, "paths": paths}


def shown_state(state: Optional[dict], gallery: Optional[list], pair: Any) -> Optional[dict]:
    """The session's result state, or one read off what the page shows (a page opened on a deep link has the
    gallery and the before / after pair but not the session's state)."""
    if state or not gallery or not pair or not pair[0]:
        return state
    return {"source": pair[0], "paths": [item[0] if isinstance(item, (tuple, list)) else item for item in gallery]}


def build_results(link: gr.DeepLinkButton, link_days: int = 7) -> Results:
    """The column (call inside the Blocks' row) and the selection of a candidate. On a Space the gallery keeps
    gradio's button that shares a result to the Space's discussions. `link` is `share_panel.link_button()`."""
    buttons = (["share"] if os.environ.get("SPACE_ID") else []) + ["download", "fullscreen"]
    gallery = gr.Gallery(label="Candidates, best first", format="png", columns=2, height="auto",
                         object_fit="contain", buttons=buttons, elem_id="gallery")
    with gr.Row():
        keep_editing = gr.Button("Continue editing the selected candidate", size="sm",
                                 interactive=False, elem_id="continue-editing")
        download = gr.DownloadButton("Download the selected candidate (full-resolution PNG)",
                                     interactive=False, size="sm", elem_id="download")
    before_after = gr.ImageSlider(label="Before / after (select a candidate)", type="filepath",
                                  format="png", elem_id="before-after")
    build_link(link, link_days)
    history = gr.Gallery(label="Edit history (select a version to edit it again)",
                         format="png", columns=6, height="auto", object_fit="contain",
                         allow_preview=False, elem_id="history")
    with gr.Accordion("Details (JSON)", open=False):
        details = gr.JSON(label="Result", elem_id="details")
    panel = Results(gallery, keep_editing, download, before_after, history, details, link, state=gr.State(None),
                    versions=gr.State([]))

    def on_select(state: Optional[dict], shown: Optional[list], pair: Any, evt: gr.SelectData) -> Any:
        state = shown_state(state, shown, pair)
        if not state or evt.index is None or not 0 <= evt.index < len(state["paths"]):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        path = state["paths"][evt.index]
        return ((state["source"], path), gr.DownloadButton(value=path, interactive=True),
                {**state, "selected": evt.index}, gr.Button(interactive=True))

    gallery.select(on_select, inputs=[panel.state, gallery, before_after],
                   outputs=[before_after, download, panel.state, keep_editing], queue=False, api_visibility="private")
    return panel
