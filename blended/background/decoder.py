"""The VAE's decoder as `latent` and `decoder` run it: an fp32 copy in stages (`LatentDecoder`) whose GroupNorm
statistics are pinned to the whole image's (`PinnedGroupNorm`), so that a window of the latents decodes as the
whole image would; those statistics recorded during the edit's own decode (`DecodeStats`); and when backprop
through it should recompute activations to save memory (`needs_checkpointing`)."""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..models.loaded import latent_scaling
from .window import Window

CPU_ACTIVATION_BYTES = 2 * 2**30  # on the CPU, `latent`/`decoder` recompute activations in backward above this estimate
CUDA_FREE_SHARE = 0.5  # on CUDA, above this share of the free device memory


class PinnedGroupNorm(nn.Module):
    """GroupNorm that normalises with statistics recorded once on the whole image (like BatchNorm in eval mode).

    Decoding only a window of the latents would otherwise change every GroupNorm's statistics, so even
    the inside of the mask would come out different from the candidate. Same `weight` / `bias` names as
    the `nn.GroupNorm` it replaces; `mean` / `var` buffers are (B, groups), one row per candidate.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("mean", None)
        self.register_buffer("var", None)
        self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        groups = x.reshape(b, self.num_groups, -1)
        if self.recording or self.mean is None:  # nothing pinned: a plain GroupNorm
            mean, var = groups.mean(-1), groups.var(-1, unbiased=False)
            if self.recording:
                self.mean, self.var = mean.detach(), var.detach()
        else:
            mean, var = self.mean, self.var
        # one multiply-add per element: (x - mean) * rsqrt(var + eps) * weight + bias, folded into a per-channel
        # scale and shift, so that backprop keeps one image-sized tensor per norm instead of four
        per_channel = c // self.num_groups
        scale = torch.rsqrt(var + self.eps).repeat_interleave(per_channel, 1) * self.weight  # (B, C)
        shift = self.bias - mean.repeat_interleave(per_channel, 1) * scale
        shape = (b, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


class LatentDecoder(nn.Module):
    """Scaled latents -> images in [-1, 1]: an fp32 copy of the VAE's `post_quant_conv` and `decoder`, run as
    `vae.decode` runs them, in stages, so that a window of the image can be decoded alone.

    Stages: 0 = unscale + post_quant_conv + conv_in + mid block (at latent resolution, cheap; it holds
    the decoder's attention, so it always runs on the whole latents); 1..n = the n up blocks; n + 1 =
    the output norm and conv. The copy is frozen; callers train it through `torch.func.functional_call`.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.post_quant_conv = copy.deepcopy(post_quant_conv).float() if post_quant_conv is not None else None
        self.decoder = copy.deepcopy(vae.decoder).float()
        self.scaling_factor, self.shift_factor = latent_scaling(vae)
        self.eval().requires_grad_(False)
        # after the front, GroupNorm statistics are pinned to the whole image's (see `record`)
        for module in self.stage_modules(1):
            for name, child in list(module.named_modules()):
                if isinstance(child, nn.GroupNorm):
                    parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                    setattr(parent, name.rsplit(".", 1)[-1], PinnedGroupNorm(child))
        d = self.decoder
        if isinstance(d.conv_norm_out, nn.GroupNorm):
            d.conv_norm_out = PinnedGroupNorm(d.conv_norm_out)
        self.pinned = {n: m for n, m in self.named_modules() if isinstance(m, PinnedGroupNorm)}
        self.checkpointing = False  # recompute the up blocks' activations in backward (memory for time)

    @property
    def num_stages(self) -> int:
        return len(self.decoder.up_blocks) + 2

    def stage_modules(self, start: int) -> list[nn.Module]:
        """The modules with weights in stages `start` and later."""
        d = self.decoder
        front = [m for m in (self.post_quant_conv, d.conv_in, d.mid_block) if m is not None]
        stages = [front] + [[b] for b in d.up_blocks] + [[d.conv_norm_out, d.conv_out]]
        return [m for mods in stages[start:] for m in mods]

    @torch.no_grad()
    def record(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decode the whole latents (B, C, h, w), recording every pinned norm's statistics.

        Returns the images and the statistics as {buffer name: (B, groups)}, for `functional_call`.
        """
        for m in self.pinned.values():
            m.recording = True
        try:
            images = self(latents)
        finally:
            for m in self.pinned.values():
                m.recording = False
        stats = {f"{n}.{k}": getattr(m, k) for n, m in self.pinned.items() for k in ("mean", "var")}
        for m in self.pinned.values():
            m.mean = m.var = None
        return images, stats

    def statistics(self, latents: torch.Tensor, given: Optional[dict[str, torch.Tensor]] = None,
                   idx: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
        """The pinned statistics of `latents`: rows `idx` of `given` (`DecodeStats.stats`, recorded while the edit
        decoded them) when they cover every pinned norm, else `record`'s (one more whole-image decode)."""
        names = {f"{n}.{k}" for n in self.pinned for k in ("mean", "var")}
        if given is not None and set(given) == names:
            dev = next(iter(self.decoder.parameters())).device
            return {k: (v if idx is None else v[idx]).to(dev, torch.float32) for k, v in given.items()}
        return self.record(latents)[1]

    def forward(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None,
                window: Optional[Window] = None) -> torch.Tensor:
        """Run stages start..stop-1 on x (whole scaled latents when start == 0); with `window`, the front's
        output is cut to the window and the rest runs on that crop only."""
        d, stop = self.decoder, self.num_stages if stop is None else stop
        for i in range(start, stop):
            if i == 0:
                x = x / self.scaling_factor + self.shift_factor
                if self.post_quant_conv is not None:
                    x = self.post_quant_conv(x)
                x = d.conv_in(x)
                x = self._checkpointed(d.mid_block, x, None) if self._checkpoint() else d.mid_block(x, None)  # (B, C', h, w)
                if window is not None:
                    x = window.latents(x)
            elif i <= len(d.up_blocks):
                x = self._run(d.up_blocks[i - 1], x)
            elif self._checkpoint():
                x = self._checkpointed(nn.Sequential(d.conv_norm_out, d.conv_act, d.conv_out), x)
            else:
                x = d.conv_out(d.conv_act(d.conv_norm_out(x)))
        return x

    def _checkpoint(self) -> bool:
        return self.checkpointing and torch.is_grad_enabled()

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One up block; with `checkpointing` under autograd, each resnet and upsampler of it is recomputed in
        the backward pass instead of keeping its activations (the whole block when it has attention)."""
        if not self._checkpoint():
            return block(x, None)
        if getattr(block, "attentions", None) is not None or not hasattr(block, "resnets"):
            return self._checkpointed(block, x, None)
        for resnet in block.resnets:
            x = self._checkpointed(resnet, x, None)
        for up in block.upsamplers or []:
            x = self._checkpointed(up, x)
        return x

    @staticmethod
    def _checkpointed(module: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """`module(x, *args)` under activation checkpointing. The weights and pinned statistics in use now (those
        `functional_call` swapped in) are handed to the recomputation explicitly: by the time the backward
        pass reruns the module, it holds its own tensors again."""
        from torch.func import functional_call
        from torch.utils.checkpoint import checkpoint

        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        return checkpoint(lambda x: functional_call(module, tensors, (x, *args)), x, use_reentrant=False)


class DecodeStats:
    """Records, while the edit decodes its candidates with the shared VAE, the GroupNorm statistics that
    `LatentDecoder.record` would otherwise compute with one more whole-image decode per candidate (on the SD
    graph at 256 px that pass was half the time of a 4-step edit). Forward hooks on the norms of the VAE
    decoder's up blocks and output layer keep each norm input's per-group mean and variance (fp32).

    The VAE is shared by every edit in the process, so a hook only records calls from the thread that
    opened it; `stats` checks that every norm saw each candidate once and that all values are finite,
    and otherwise returns None (the caller then records them itself, as before). Tiled decoding
    normalises each tile on its own: nothing is recorded then.

        with DecodeStats(vae) as rec:
            decoded = vae.decode(...)
        stats = rec.stats(batch)  # {LatentDecoder buffer name: (batch, groups)} or None
    """

    def __init__(self, vae: nn.Module):
        self.vae, self.handles, self.values = vae, [], {}
        self.thread = threading.get_ident()

    def __enter__(self) -> "DecodeStats":
        if getattr(self.vae, "use_tiling", False) or not hasattr(self.vae, "decoder"):
            return self
        d = self.vae.decoder
        for prefix, module in [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(d.up_blocks)] + \
                [("decoder.conv_norm_out", d.conv_norm_out)]:
            for name, child in module.named_modules():
                if isinstance(child, nn.GroupNorm):
                    full = f"{prefix}.{name}" if name else prefix
                    self.handles.append(child.register_forward_hook(self._hook(full, child.num_groups)))
        return self

    def _hook(self, name: str, groups: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() != self.thread:
                return  # another edit decoding with the same VAE
            x = args[0].detach()
            n, c = x.shape[:2]
            # GroupNorm's own kernel without the affine part: the statistics exactly as the decode computed them,
            # in half the time of var_mean (the decode's norm itself does not hand them out)
            try:
                _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), groups, module.eps)
                mean, var = mean.float().reshape(n, groups), rstd.float().reshape(n, groups) ** -2 - module.eps
            except RuntimeError:  # a dtype or backend without that kernel: the same statistics, in fp32
                var, mean = torch.var_mean(x.float().reshape(n, groups, -1), dim=-1, correction=0)
            self.values.setdefault(name, []).append((mean, var))
        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def stats(self, batch: int) -> Optional[dict[str, torch.Tensor]]:
        """{buffer name: (batch, groups)} in the form `LatentDecoder.record` returns, or None when anything is
        missing or not finite."""
        if not self.values:
            return None
        out = {}
        for name, calls in self.values.items():
            mean, var = torch.cat([m for m, _ in calls]), torch.cat([v for _, v in calls])
            if mean.shape[0] != batch or not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                return None
            out[f"{name}.mean"], out[f"{name}.var"] = mean, var
        return out


def activation_bytes(base: LatentDecoder, window: Window, rows: int = 1) -> int:
    """Rough bytes that autograd keeps for one candidate's decode of `window` without checkpointing: about
    eight fp32 maps per resnet of each up block at its resolution (docs/fewstep.md checks it against
    bench/decoder_memory.py's measurements)."""
    blocks = base.decoder.up_blocks
    pixels = (window.bottom - window.top) * (window.right - window.left) * window.factor ** 2  # output pixels
    maps = 0
    for k, block in enumerate(blocks):
        shrink = 4 ** max(len(blocks) - 1 - k, 0)  # up block k runs at 1 / 2^(n-1-k) of the output's side
        maps += len(block.resnets) * 8 * block.resnets[0].out_channels * pixels // shrink
    return 4 * maps * rows


def needs_checkpointing(base: LatentDecoder, window: Window, device: torch.device, rows: int = 1) -> bool:
    """Whether backprop through `window` should recompute activations: on CUDA when their estimate
    (`activation_bytes`) exceeds `CUDA_FREE_SHARE` of the free memory, elsewhere above `CPU_ACTIVATION_BYTES`.
    Checkpointing costs about one more decoder pass per step, so it runs only when memory asks for it."""
    need = activation_bytes(base, window, rows)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need > CUDA_FREE_SHARE * free
    return need > CPU_ACTIVATION_BYTES


def decode_each(base: LatentDecoder, tensors: dict[str, torch.Tensor], x: torch.Tensor, start: int,
                window: Window, stop: Optional[int] = None) -> torch.Tensor:
    """Run `base` on x[i] with the i-th slice of each stacked tensor (G, ...) it is given (weights, pinned
    statistics) swapped in; vectorised with vmap when G > 1."""
    from torch.func import functional_call, vmap

    if x.shape[0] == 1:
        return functional_call(base, {k: v[0] for k, v in tensors.items()}, (x, start, stop, window))
    with warnings.catch_warnings():  # attention has no vmap batching rule on some backends: a loop, still right
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return vmap(lambda t, xi: functional_call(base, t, (xi[None], start, stop, window))[0])(tensors, x)


def device_of(vae: nn.Module) -> torch.device:
    """The device the VAE's weights are on (where `latent` and `decoder` run)."""
    return next(vae.parameters()).device
