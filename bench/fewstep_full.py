"""Full-size SD 1.5 graph (random weights, 512 px, fp32, this CPU): a 4-step LCM edit of 1 and 4 candidates, timed
end to end by stage, and the default schedule's UNet cost from one timed guided call at batch 8 (37 calls after
blend_start 0.25). The default edit itself (about half an hour) is not run: its time is that extrapolation.

    python -m bench.fewstep_full
"""
import time

import torch
from diffusers import StableDiffusionPipeline

from blended.editor import Editor
from blended.models import LoadedModel
from blended_dev.bench import centre_mask, scene
from blended_dev.tiny import sd_components

torch.set_num_threads(2)
comps = sd_components(1.0, 512)
pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
ed = Editor(LoadedModel(pipe=pipe, name="sd15-graph", source="bench", device=torch.device("cpu"), dtype=torch.float32), ranker=None)
image, mask = scene(512, 512), centre_mask(512, 512)
for n in (1, 4):
    r = ed.edit(image, mask, "a red circle", num_candidates=n, scheduler="lcm", num_inference_steps=4, guidance_scale=1.0, rank=False)
    print(f"lcm 4 steps, guidance 1, {n} candidate(s):", {k: round(v, 1) for k, v in r.timings.items()}, flush=True)
# the default schedule's UNet cost: one guided call at batch 8 (4 candidates x 2), timed
x = torch.randn(8, 4, 64, 64); emb = torch.randn(8, 77, comps["unet"].config.cross_attention_dim)
with torch.no_grad():
    t0 = time.perf_counter(); comps["unet"](x, torch.tensor(500), encoder_hidden_states=emb); dt = time.perf_counter() - t0
print(f"one UNet call at batch 8: {dt:.1f} s; default ddim 50 steps after blend_start 0.25 = 37 calls: {37*dt:.0f} s of UNet", flush=True)
