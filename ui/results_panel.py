"""The results column: the candidates (best first), the selected one before / after and as a full-resolution
PNG, the session's edit history and the result's JSON. What one visitor got lives in their session (gr.State)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr
from PIL import Image

from blended import EditResult

from .editing import OutputDir, caption


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
    state: gr.State
    versions: gr.State


def saved_outputs(files: OutputDir, result: EditResult, source: Image.Image) -> tuple[list, tuple[str, str], str, dict]:
    """The result's PNGs written: gallery items, the before/after pair of the best candidate, its PNG and the
    session's result state."""
    source_path, paths = files.save(source, result.candidates)
    items = [(p, caption(i + 1, c)) for i, (p, c) in enumerate(zip(paths, result.candidates))]
    return items, (source_path, paths[0]), paths[0], {"source": source_path, "paths": paths}


def build_results() -> Results:
    """The column (call inside the Blocks' row) and the selection of a candidate."""
    gallery = gr.Gallery(label="Candidates, best first", format="png", columns=2, height="auto",
                         object_fit="contain", elem_id="gallery")
    with gr.Row():
        keep_editing = gr.Button("Continue editing the selected candidate", size="sm",
                                 interactive=False, elem_id="continue-editing")
        download = gr.DownloadButton("Download the selected candidate (full-resolution PNG)",
                                     interactive=False, size="sm", elem_id="download")
    before_after = gr.ImageSlider(label="Before / after (select a candidate)", type="filepath",
                                  format="png", elem_id="before-after")
    history = gr.Gallery(label="Edit history (select a version to edit it again)",
                         format="png", columns=6, height="auto", object_fit="contain",
                         allow_preview=False, elem_id="history")
    with gr.Accordion("Details (JSON)", open=False):
        details = gr.JSON(label="Result", elem_id="details")
    panel = Results(gallery, keep_editing, download, before_after, history, details, state=gr.State(None),
                    versions=gr.State([]))

    def on_select(state: Optional[dict], evt: gr.SelectData) -> Any:
        if not state or evt.index is None or not 0 <= evt.index < len(state["paths"]):
            return gr.skip(), gr.skip(), gr.skip()
        path = state["paths"][evt.index]
        return (state["source"], path), gr.DownloadButton(value=path, interactive=True), {**state, "selected": evt.index}

    gallery.select(on_select, inputs=panel.state, outputs=[before_after, download, panel.state], queue=False,
                   api_visibility="private")
    return panel
