"""The Settings accordion: one widget per setting a visitor commonly changes, keyed by its EditConfig name, that
follows the session's model (a model loaded with the picker brings its own defaults: `ui.models_panel`). Every other
field of an edit comes from the session's model when the edit starts (`ui.editing.edit_config`), never from what was
captured here."""

from __future__ import annotations

from typing import Any, Sequence

import gradio as gr

from blended import EditConfig
from blended.background import METHODS, PRESERVE_METHOD
from blended.config import SCHEDULERS

from .editing import server_defaults
from .limits import Limits

MODEL_SETTINGS = ("num_inference_steps", "guidance_scale", "scheduler", "blend_start", "shrink", "mask_blur",
                  "background", "preserve_background", "inpainting_mask_weight",
                  "negative_prompt", "fast_decode")  # reset to a newly loaded model's defaults


def settings_widgets(defaults: EditConfig, limits: Limits) -> dict[str, gr.components.Component]:
    """The Settings accordion's widgets, keyed by EditConfig field (plus `randomize_seed`, `preserve_background`,
    `fast_decode`)."""
    w: dict[str, gr.components.Component] = {}
    w["num_candidates"] = gr.Slider(1, limits.max_candidates, step=1, label="Candidates",
                                    value=defaults.num_candidates)
    w["num_inference_steps"] = gr.Slider(1, limits.max_steps, step=1, label="Denoising steps",
                                         value=defaults.num_inference_steps)
    w["guidance_scale"] = gr.Slider(min(1.0, defaults.guidance_scale), max(20.0, defaults.guidance_scale), step=0.5,
                                    label="Guidance scale",
                                    value=defaults.guidance_scale)
    with gr.Row():
        w["seed"] = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
        w["randomize_seed"] = gr.Checkbox(value=True, label="Randomize seed (the seed used is written back)")
    w["blend_start"] = gr.Slider(0.0, 0.95, step=0.05, value=defaults.blend_start,
                                 label="Blend start (fraction of the schedule skipped)")
    w["shrink"] = gr.Checkbox(value=defaults.shrink, label="Progressive mask shrinking")
    w["mask_blur"] = gr.Slider(0, 32, step=1, value=defaults.mask_blur, label="Mask blur (px)",
                               info="Fades the edit into the photo over a blur of this many pixels outside the "
                                    "mask's edge. 0 = the usual 8 px seam band.")
    w["background"] = gr.Dropdown(list(METHODS), value=defaults.background,
                                  label="Background reconstruction")
    w["preserve_background"] = gr.Checkbox(
        value=setting_of(defaults, "preserve_background"),
        label="Preserve faces and text next to the mask (decoder fine-tuning)",
        info=f"Off, the photo is kept bit for bit beyond a {defaults.feather} px seam band, where the edit cross-fades "
             "into it. On, a copy of the decoder is fine-tuned for the edit, so the band comes out seamless and faces "
             "or text right next to the mask stay sharp; it adds about a third to a half of the edit's time on a GPU "
             "(much more on a CPU with Stable Diffusion).")
    w["fast_decode"] = gr.Checkbox(
        value=setting_of(defaults, "fast_decode"), label="Fast decode (tiny decoder)",
        info="Decodes the candidates (and the live previews) with a tiny decoder, TAESD: about a tenth of the "
             "full decoder's time on a CPU, slightly softer detail inside the mask. The photo outside the mask is "
             "kept exactly either way. Preserve faces and text always decodes with the full decoder, which it "
             "fine-tunes.")
    w["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
    w["inpainting_mask_weight"] = gr.Slider(0.0, 1.0, step=0.05, value=defaults.inpainting_mask_weight,
                                            label="Inpainting mask weight (9-channel inpainting models only)",
                                            info="What an inpainting model sees of the photo under the mask: 1 = "
                                                 "a hole, 0 = the photo as it is. Other models ignore it.")
    for name, widget in w.items():
        widget.elem_id = name.replace("_", "-")
    return w


def setting_of(defaults: EditConfig, name: str) -> Any:
    """The value a widget named `name` shows for `defaults` (`preserve_background`: the method it stands for)."""
    if name == "preserve_background":
        return defaults.background == PRESERVE_METHOD
    if name == "fast_decode":
        return defaults.decode != "full"
    return getattr(defaults, name)


def build_settings(defaults: EditConfig, limits: Limits) -> tuple[gr.Checkbox, dict[str, gr.components.Component]]:
    """The Settings accordion (call inside the Blocks' column): (live-preview checkbox, widgets by name), with the
    "Preserve faces and text" checkbox and the background dropdown kept in step."""
    with gr.Accordion("Settings", open=False):
        live_preview = gr.Checkbox(value=True, label="Live preview while denoising (a rough look "
                                   "at the candidates forming)", elem_id="live-preview")
        w = settings_widgets(defaults, limits)

    def on_preserve(on: bool, method: str) -> str:
        if on:
            return PRESERVE_METHOD
        return EditConfig().background if method == PRESERVE_METHOD else method

    w["preserve_background"].input(on_preserve, inputs=[w["preserve_background"], w["background"]],
                                   outputs=w["background"], queue=False, api_visibility="private")
    w["background"].input(lambda method: method == PRESERVE_METHOD, inputs=w["background"],
                          outputs=w["preserve_background"], queue=False, api_visibility="private")
    return live_preview, w


def model_settings(editor: Any, names: Sequence[str], limits: Limits) -> list:
    """The values of the `names` settings for a session that took `editor`: its defaults (a few-step model's steps,
    scheduler and guidance, a model's blended.json) within the server's limits."""
    defaults = server_defaults(editor.defaults, limits)
    return [setting_of(defaults, n) for n in names]
