"""A tiny random Segment Anything (about 40 k parameters) saved as a folder, built in-process with a fixed seed."""

from __future__ import annotations

from pathlib import Path


def build_sam(folder: Path, size: int = 64) -> Path:
    """SamModel + SamProcessor at `size` px (patch 8, hidden 32, 2 layers), saved to `folder`; returns it."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=dict(image_size=size, patch_size=8, hidden_size=32, output_channels=16, num_hidden_layers=2,
                           num_attention_heads=2, window_size=4, global_attn_indexes=[1], num_pos_feats=8, mlp_dim=64),
        prompt_encoder_config=dict(image_size=size, patch_size=8, hidden_size=16),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16))
    SamModel(cfg).eval().save_pretrained(folder)
    processor = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": size},
                                                               pad_size={"height": size, "width": size}))
    processor.save_pretrained(folder)
    return Path(folder)
