"""SD3-architecture model folders (the prior's layout) and tiny instances of them.

`save_prior` writes SD3's diffusers layout (`vae/`, `transformer/`, `scheduler/` with
`save_pretrained`, plus `embeddings/{default,null}.npz`), so `Restorer.from_pretrained` loads a tiny
model and SD3-medium through one code path. `tiny_sd3` builds a randomly initialised instance (tests,
benchmarks, and the starting point of the `prior` stage's training).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nifi_utils.models.autoencoder import patch_autoencoder_class  # noqa: F401  (re-exported: prior.py and tests import it from here)
from nifi_utils.core.common import NifiError
from nifi_utils.models.restorer import Restorer, save_embeddings


@dataclass
class TinySD3Config:
    vae_channels: list = field(default_factory=lambda: [16, 32])  # 2 blocks -> 2x downsampling
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 4
    latent_channels: int = 4
    scaling_factor: float = 1.0
    dit_layers: int = 1
    dit_heads: int = 2
    dit_head_dim: int = 8
    patch_size: int = 2
    text_dim: int = 32  # joint_attention_dim (SD3: 4096)
    caption_dim: int = 16  # caption_projection_dim (SD3: 1152)
    pooled_dim: int = 16  # pooled_projection_dim (SD3: 2048)
    text_len: int = 8  # tokens in the fixed prompt embeddings (SD3: 333)
    sample_size: int = 32  # latent size the positional embedding is built for
    pos_embed_max_size: int = 64
    shift: float = 3.0  # SD3's scheduler shift


def tiny_sd3(cfg: TinySD3Config | None = None, seed: int = 0) -> Restorer:
    """A randomly initialised SD3-architecture Restorer (AutoencoderKL + SD3Transformer2DModel)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    cfg = cfg or TinySD3Config()
    torch.manual_seed(seed)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
                        layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
                        norm_num_groups=cfg.vae_norm_groups, scaling_factor=cfg.scaling_factor,
                        use_quant_conv=True, use_post_quant_conv=True)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        num_layers=cfg.dit_layers, attention_head_dim=cfg.dit_head_dim, num_attention_heads=cfg.dit_heads,
        joint_attention_dim=cfg.text_dim, caption_projection_dim=cfg.caption_dim,
        pooled_projection_dim=cfg.pooled_dim, out_channels=cfg.latent_channels,
        pos_embed_max_size=cfg.pos_embed_max_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    g = torch.Generator().manual_seed(seed + 1)
    pe = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device="cpu")  # CPU draw: same on every device
    pp = torch.randn(1, cfg.pooled_dim, generator=g, device="cpu")
    return Restorer(vae, transformer, scheduler, pe, pp, torch.zeros_like(pe), torch.zeros_like(pp))


def save_prior(r: Restorer, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """SD3's folder layout; `register_to_config` keeps the VAE scaling factor across save/load."""
    folder = Path(folder)
    if any("lora_" in n for m in (r.vae, r.transformer) for n, _ in m.named_parameters()):
        raise NifiError("save_prior: the models carry LoRA adapters; save the prior before adding them "
                        "(the adapters go to a checkpoint with Restorer.save_lora)")
    folder.mkdir(parents=True, exist_ok=True)
    r.vae.register_to_config(scaling_factor=float(r.vae.config.scaling_factor))
    vae, tr = r.vae, r.transformer
    if dtype is not None:  # a converted copy; the caller's models keep their dtype
        import copy

        vae, tr = copy.deepcopy(vae).to(dtype), copy.deepcopy(tr).to(dtype)
    vae.save_pretrained(folder / "vae")
    tr.save_pretrained(folder / "transformer")
    r.scheduler.save_pretrained(folder / "scheduler")
    save_embeddings(folder / "embeddings" / "default.npz", r.prompt_embeds, r.pooled)
    if r.null_embeds is not None:
        save_embeddings(folder / "embeddings" / "null.npz", r.null_embeds, r.null_pooled)
    return folder


def __getattr__(name):  # `models.PatchAutoencoder`, as before the class moved to autoencoder.py
    if name == "PatchAutoencoder":
        return patch_autoencoder_class()
    raise AttributeError(name)
