"""--vae FOLDER|FILE: its own scaling_factor and force_upcast, the original layout, a VAE that does not fit (issue 20)."""

import pytest
import torch
from blended_dev.ldm_layout import VAE, vae_to_ldm

from blended.errors import ModelLoadError
from blended.models import load_model


def tiny_vae(force_upcast: bool, scaling_factor: float, widths=(8, 16, 16)):
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    return AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=32, scaling_factor=scaling_factor, force_upcast=force_upcast)


def test_a_vae_folder_brings_its_scaling_factor_and_force_upcast(tiny_dirs, tmp_path):
    folder = tmp_path / "fp16-fix"
    vae = tiny_vae(force_upcast=False, scaling_factor=0.3)
    vae.save_pretrained(str(folder), safe_serialization=True)
    stock = load_model(str(tiny_dirs["sdxl"]), dtype="fp16")
    assert stock.pipe.vae.dtype == torch.float32  # SDXL's VAE says force_upcast: decoded in fp32
    fixed = load_model(str(tiny_dirs["sdxl"]), dtype="fp16", vae=str(folder))
    assert fixed.pipe.vae.config.scaling_factor == 0.3 and fixed.pipe.vae.dtype == torch.float16
    assert fixed.describe()["vae"] == str(folder)
    assert all(torch.equal(v, vae.state_dict()[k].half()) for k, v in fixed.pipe.vae.state_dict().items())


def test_a_vae_file_in_the_original_layout(tiny_dirs, tmp_path):
    from safetensors.torch import save_file

    vae = tiny_vae(force_upcast=False, scaling_factor=0.5)
    path = tmp_path / "vae.safetensors"
    save_file({VAE + k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}, str(path))
    loaded = load_model(str(tiny_dirs["sd1"]), vae=str(path)).pipe.vae
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.state_dict().items())
    other = tiny_vae(False, 0.5, widths=(16, 32, 32))
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other.state_dict(), other.config).items()}, str(path))
    with pytest.raises(ModelLoadError, match="does not fit this model's VAE"):
        load_model(str(tiny_dirs["sd1"]), vae=str(path))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(tiny_dirs["sd1"]), vae=str(tmp_path / "vae.pt"))


def test_a_checkpoint_file_without_a_vae_takes_the_vae_folder(tiny_dirs, tmp_path):
    from diffusers import DiffusionPipeline
    from blended_dev.ldm_layout import write_single_file
    from safetensors.torch import load_file, save_file

    path = write_single_file(DiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"])), tmp_path / "no-vae.safetensors")
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith(VAE)}, str(path))
    with pytest.raises(ModelLoadError, match="holds no VAE weights"):
        load_model(str(path), model_config=str(tiny_dirs["sd1"]))
    vae = tiny_vae(force_upcast=False, scaling_factor=0.4)
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    loaded = load_model(str(path), model_config=str(tiny_dirs["sd1"]), vae=str(tmp_path / "vae"))
    assert loaded.pipe.vae.config.scaling_factor == 0.4
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.pipe.vae.state_dict().items())
