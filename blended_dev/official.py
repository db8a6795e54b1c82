"""The loop of the paper's official SD2 script, ported as a named baseline for the benchmarks (not the engine).

Source: github.com/omriav/blended-latent-diffusion, scripts/text_editing_SD2.py (`edit_image`). What that
script does, and this port does too:

* resizes the image to the model's square native size (bilinear) and encodes it with the VAE's mean;
* reads the mask as grey levels, resizes it to the latent size with nearest-neighbour, thresholds at 0.5;
* starts from pure Gaussian noise at the first timestep after `blending_percentage` of the DDIM schedule
  (`timesteps[int(len(timesteps) * blending_percentage):]`);
* each step: classifier-free guidance with the empty prompt, one DDIM step (eta 0), then the background is
  the source noised to the step's *own* timestep t with *fresh* noise, blended with the hard latent mask;
* no mask shrinking, no background reconstruction, no ranking: the raw decode is the result.

Adaptations: the model's own scheduler config (the script hard-codes SD2's DDIM betas, which only fit SD2),
the VAE's own scaling factor (the script writes 0.18215), any device and dtype, and a generator per
candidate (`seed + i`, the start noise then one fresh draw per step) instead of one global generator, so the
engine configured like the script (`OFFICIAL_SETTINGS`) draws the same numbers. The benches rank its
candidates with the project's ranker to report a top-1.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# EditConfig settings under which the engine's loop does what the script's loop does (tests/test_loop.py checks it)
OFFICIAL_SETTINGS = dict(start_from="noise", background_noise="fresh", background_timestep="own",
                         latent_mask_mode="nearest", shrink=False, core_steps=0.0, scheduler="ddim",
                         background="none", mask_blur=0.0, soft_mask=False)


@torch.no_grad()
def official_latents(editor, image: Image.Image, mask: np.ndarray, prompt: str, *, num_candidates: int = 4,
                     num_inference_steps: int = 50, guidance_scale: float = 7.5, blend_start: float = 0.25,
                     seed: int = 0) -> torch.Tensor:
    """The script's `edit_image` up to the final latents, (num_candidates, C, h, w)."""
    from diffusers import DDIMScheduler
    from blended.unet_call import encode_prompt

    m, pipe = editor.model, editor.model.pipe
    size = m.native_size
    f = m.vae_scale_factor
    # the image, square at native size; its latents (the distribution's mean, scaled)
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    source_latents = m.encode(x)
    # the mask: nearest-neighbour to the latent size, then thresholded
    small = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, "L").resize((size // f, size // f),
                                                                                   Image.Resampling.NEAREST)
    latent_mask = torch.from_numpy((np.asarray(small, dtype=np.float32) / 255 >= 0.5).astype(np.float32))
    latent_mask = latent_mask[None, None].to(m.device, m.dtype)
    # text: the prompt and the empty prompt for guidance, (2B, 77, D)
    cond = encode_prompt(m, prompt, "", True, (size, size)).encoder_hidden_states
    text_embeddings = cond.repeat_interleave(num_candidates, 0)
    # the start: pure noise
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_candidates)]

    def randn() -> torch.Tensor:
        return torch.cat([torch.randn(source_latents.shape[1:], generator=g)[None] for g in generators]).to(m.device, m.dtype)

    latents = randn()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps[int(len(scheduler.timesteps) * blend_start):]:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep=t)
        noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        # blending: the source noised to this step's timestep with fresh noise
        noise_source_latents = scheduler.add_noise(source_latents, randn(), t)
        latents = latents * latent_mask + noise_source_latents * (1 - latent_mask)
    return latents


@torch.no_grad()
def official_edit(editor, image: Image.Image, mask: np.ndarray, prompt: str, *, rank: bool = True,
                  **settings) -> list[Image.Image]:
    """The script's candidates as PIL images at the image's size, ranked best first by the editor's ranker."""
    latents = official_latents(editor, image, mask, prompt, **settings)
    decoded = editor.model.decode(latents)
    arr = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(a).resize(image.size, Image.Resampling.BILINEAR) if a.shape[:2] != image.size[::-1]
              else Image.fromarray(a) for a in arr]
    if rank and editor.ranker is not None and len(images) > 1:
        scores = editor.ranker.score(images, np.asarray(mask, bool), prompt)
        images = [images[j] for j in np.argsort([-s["score"] for s in scores], kind="stable")]
    return images
