"""The cpu prior's autoencoder, `PatchAutoencoder` (AutoencoderKL's interface, patch PCA
plus zero-initialised residual blocks).

The lowest module of the models layer: `restorer.py` looks a VAE class up here by the `_class_name` of a
prior folder's `vae/config.json`, and `folders.py` (tiny instances, prior folders) and `prior.py` (its
training) build it; this module imports neither, so they form no import cycle.
"""
from __future__ import annotations

import torch


class _ResBlock(torch.nn.Module):
    """conv3x3 -> SiLU -> conv3x3, added to the input; the second conv starts at zero (identity block)."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(ch, hidden, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(hidden, ch, 3, padding=1)
        torch.nn.init.zeros_(self.conv2.weight)
        torch.nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(torch.nn.functional.silu(self.conv1(x)))


class _Mid(torch.nn.Module):
    def __init__(self, ch: int, hidden: int, n: int):
        super().__init__()
        self.resnets = torch.nn.ModuleList([_ResBlock(ch, hidden) for _ in range(n)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x


_CLASSES: dict = {}


def patch_autoencoder_class():
    """The PatchAutoencoder class, defined on first use (diffusers is imported only when needed)."""
    if "PatchAutoencoder" not in _CLASSES:
        _CLASSES["PatchAutoencoder"] = _define_patch_autoencoder()
    return _CLASSES["PatchAutoencoder"]


def _define_patch_autoencoder():
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.models.modeling_utils import ModelMixin

    class PatchAutoencoder(ModelMixin, ConfigMixin, PeftAdapterMixin):
        """A small autoencoder with `AutoencoderKL`'s interface whose linear path is a patch transform.

        encoder.conv_in (a `patch`x`patch`, stride-`patch` convolution) maps each pixel patch to
        `latent_channels` numbers: initialised with the PCA basis of training patches it *is* patch
        PCA, which reconstructs held-out natural images far better than a small randomly initialised
        AutoencoderKL trains to on 2 cores. Residual blocks (zero-initialised, so the model starts as
        exact PCA) refine it nonlinearly in latent space (encoder, decoder) and at full resolution
        (decoder). The posterior has a learned per-channel log-variance, kept small. Module names
        follow AutoencoderKL's, so the restorer's VAE-encoder LoRA finds conv_in, mid_block resnets
        and conv_out.
        """

        _supports_gradient_checkpointing = False

        @register_to_config
        def __init__(self, in_channels: int = 3, latent_channels: int = 16, patch: int = 4, hidden: int = 64,
                     n_res_enc: int = 1, n_res_dec: int = 2, pixel_hidden: int = 32, scaling_factor: float = 1.0,
                     shift_factor: float = 0.0, logvar_init: float = -8.0, downsample_factor: int = 4,
                     overlap: int = 0, n_res_pixel: int = 1):
            super().__init__()
            # `overlap` px on every side of a patch: the encoder reads and the decoder writes a (patch + 2 overlap)
            # footprint, so neighbouring latents share pixels and a latent error is not confined to (and does not
            # outline) its own patch; 0 is the per-patch transform of the first cpu prior
            k, pad = patch + 2 * overlap, overlap
            self.encoder = torch.nn.Module()
            self.encoder.conv_in = torch.nn.Conv2d(in_channels, latent_channels, k, stride=patch, padding=pad,
                                                   padding_mode="replicate" if pad else "zeros")
            self.encoder.mid_block = _Mid(latent_channels, hidden, n_res_enc)
            self.encoder.conv_out = torch.nn.Conv2d(latent_channels, latent_channels, 1)
            torch.nn.init.eye_(self.encoder.conv_out.weight[:, :, 0, 0])
            torch.nn.init.zeros_(self.encoder.conv_out.bias)
            self.logvar = torch.nn.Parameter(torch.full((latent_channels,), float(logvar_init)))
            self.decoder = torch.nn.Module()
            self.decoder.mid_block = _Mid(latent_channels, hidden, n_res_dec)
            self.decoder.conv_out = torch.nn.ConvTranspose2d(latent_channels, in_channels, k, stride=patch, padding=pad)
            # full-resolution refinement: stacked residual blocks whose receptive field spans patch boundaries
            self.decoder.refine = (_ResBlock(in_channels, pixel_hidden) if n_res_pixel == 1
                                   else _Mid(in_channels, pixel_hidden, n_res_pixel))

        def set_pca(self, channel_mean: torch.Tensor, basis: torch.Tensor):
            """z = B (x - m), x^ = B^T z + m per patch: channel_mean [3], basis [C, 3*p*p] with orthonormal
            rows in conv weight order (channel, y, x). The decoder's ConvTranspose2d is B^T."""
            p, c_in, o = self.config.patch, self.config.in_channels, self.config.overlap
            w = basis.reshape(-1, c_in, p, p).to(self.encoder.conv_in.weight)
            m = channel_mean.to(w)
            with torch.no_grad():  # the PCA fills the centre of an overlapping kernel: exact patch PCA at the start
                self.encoder.conv_in.weight.zero_()
                self.encoder.conv_in.weight[:, :, o:o + p, o:o + p] = w
                self.encoder.conv_in.bias.copy_(-(w * m[None, :, None, None]).sum((1, 2, 3)))
                self.decoder.conv_out.weight.zero_()
                self.decoder.conv_out.weight[:, :, o:o + p, o:o + p] = w
                self.decoder.conv_out.bias.copy_(m)
            return self

        def encode(self, x, return_dict: bool = True):
            h = self.encoder.conv_out(self.encoder.mid_block(self.encoder.conv_in(x)))
            lv = self.logvar.clamp(-12.0, 0.0).to(h)[None, :, None, None].expand_as(h)
            dist = DiagonalGaussianDistribution(torch.cat([h, lv], 1))
            return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

        def decode(self, z, return_dict: bool = True):
            x = self.decoder.refine(self.decoder.conv_out(self.decoder.mid_block(z)))
            return DecoderOutput(sample=x) if return_dict else (x,)

        def forward(self, x, sample_posterior: bool = False, generator=None):
            d = self.encode(x).latent_dist
            return self.decode(d.sample(generator) if sample_posterior else d.mode())

    return PatchAutoencoder


def __getattr__(name):  # `autoencoder.PatchAutoencoder`: the class a VAE config names, defined on first use
    if name == "PatchAutoencoder":
        return patch_autoencoder_class()
    raise AttributeError(name)
