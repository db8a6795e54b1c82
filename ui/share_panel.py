"""A link to the page as it is: gradio's deep links (`gr.DeepLinkButton`), made to keep what this app shows.

The button saves the session's component values on the server (`deep_links/<hash>/state.json` in gradio's
cache) and copies the page's address with `?deep_link=<hash>`; opening it shows the prompt, the Settings, the
picture with its mask, the model picked and the results as they were (the model is loaded for the new session by
`ui.models_panel.follow_models`). It works at any address gradio serves, 127.0.0.1 included
(tests/test_browser_share.py). The files a link shows are kept `BLENDED_LINK_DAYS` days (gradio's
`delete_cache`), or until the server restarts.

Gradio 6.31 files a component's later values under another id once an event has updated its properties (a
`gr.ImageEditor(brush=...)` after an upload, or the `gr.skip()` that every live preview sends to the outputs it
leaves alone; see gradio PR 11202's discussion), so its own link would restore those components empty. The button
here first sends what the page shows and writes it back under the components' own ids (`keep_shown`), then
makes the link as gradio does. That reaches into gradio 6.31's session state (`demo.state_holder`,
`SessionState.blocks_config` / `config_values`); tests/test_browser_share.py fails if a gradio upgrade changes it.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import gradio as gr


def link_button() -> gr.DeepLinkButton:
    """The button, made outside any Blocks so that gradio does not wire its own click (`follow_link` does, saving
    what the page shows first); `build_link` puts it on the page."""
    button = gr.DeepLinkButton("Copy a link to this page as it is", copied_value="Link copied", size="sm",
                               render=False)
    button.elem_id = "deep-link"  # gradio names its own; the tests and the docs use this one
    return button


def build_link(button: gr.DeepLinkButton, link_days: int) -> gr.DeepLinkButton:
    """The button and a line saying what a link keeps and for how long (call inside the Blocks' column)."""
    with gr.Row():
        button.render()
        gr.Markdown(f"The link opens the prompt, the Settings, the picture, its mask, the model and the results as "
                    f"they are now. Its files are kept {link_days} day{'s' if link_days != 1 else ''} (or until the "
                    "server restarts).", elem_id="deep-link-note")
    return button


def keep_shown(session: Any, components: Sequence[gr.components.Component],
               reset: Sequence[gr.components.Component] = ()) -> int:
    """Write the values (and properties) last sent for `components` under their own ids in the gradio session's
    saved config, where a replaced copy of a component took them, and put `reset` back as the page was built;
    returns how many were moved."""
    moved = 0
    for component in components:
        k = component._id
        current = session.blocks_config.blocks.get(k)
        saved = session.config_values.get(getattr(current, "_id", k))
        if current is None or current._id == k or not saved or k not in session.config_values:
            continue
        built = session.blocks_config.config_for_block(k, [], component)["props"]  # e.g. an elem_id set after
        session.config_values[k] = {**session.config_values[k], "props": {**built, **saved["props"]}}  # construction
        moved += 1
    for component in reset:
        session.config_values[component._id] = session.blocks_config.config_for_block(component._id, [], component)
    return moved


def follow_link(demo: gr.Blocks, button: gr.DeepLinkButton, components: Sequence[gr.components.Component],
                reset: Sequence[gr.components.Component] = ()) -> None:
    """The button's click: send `components` (what a link should keep), move them back under their own ids, put
    `reset` back as built (buttons armed for this session's files), then copy the link (gradio's script) and put
    the label back after a second."""
    components, reset = list(components), list(reset)

    def save(shown: dict, request: gr.Request) -> None:
        state = getattr(demo, "state_holder", None)
        if state is not None and request is not None and request.session_hash in state:
            keep_shown(state[request.session_hash], components, reset)

    label = button.value
    button.click(save, inputs=set(components), outputs=None, queue=False, api_visibility="private").then(
        None, None, [button], js=button.get_share_link(label, button.copied_value), api_visibility="private").then(
        lambda: time.sleep(1) or label, None, [button], queue=False, api_visibility="private")
