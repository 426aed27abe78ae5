"""NiFi's one-step restorer on an SD3-architecture prior (diffusers + peft).

A prior folder has SD3's diffusers layout: `vae/`, `transformer/`, `scheduler/` (each
`save_pretrained`), plus `embeddings/default.npz` and `embeddings/null.npz` with the official keys
`prompt_embeds` [1, L, D] and `pooled_prompt_embeds` [1, P]. SD3-medium (paper profile) and the
lab's tiny prior (cpu profile) load through the same code.

Restoration (paper Eq. 7; official `restorer.py` / `inference.py`), images in [-1, 1]:

    x~    = E_phi-(pad8(I~)).sample() * scaling_factor         (no shift_factor)
    x~_t0 = sigma_t0 * eps + (1 - sigma_t0) * x~                sigma_t0 = scheduler sigma nearest t0
    x^    = x~_t0 - (sigma_t0 - sigma_next) * v_phi-(x~_t0, t0)  sigma_next = scheduler sigma nearest 0
    I^    = clamp(D(x^ / scaling_factor) / 2 + 1/2, 0, 1), cropped to the input size

With `t0=None` ("w/o t0", TSD-SR): x^ = x~ - 1 * v(x~, 1000), no noise. Unlike the official code
the noise comes from a seeded `torch.Generator`, so results are reproducible.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nifi_utils.core.facts import OFFICIAL_T0
from nifi_utils.core.common import NifiError, load_weights
# the restorer CLI's image reader and writer, with the lab's other image files (re-exported: the CLI imports them here)
from nifi_utils.core.images import IMAGE_SUFFIXES, read_image, write_image  # noqa: F401

TRANSFORMER_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj",
                            "linear", "proj_out"]
CRITIC_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
# The official encoder list (TSD-SR/NiFi) as patterns over AutoencoderKL's module names; the concrete
# list is whatever of these a given VAE has (32 modules for SD3's VAE with quant_conv).
VAE_ENCODER_LORA_PATTERNS = [
    r"encoder\.conv_in", r"encoder\.down_blocks\.\d+\.resnets\.\d+\.(conv1|conv2|conv_shortcut)",
    r"encoder\.down_blocks\.\d+\.downsamplers\.0\.conv", r"encoder\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)",
    r"encoder\.mid_block\.resnets\.\d+\.(conv1|conv2)", r"encoder\.conv_out", r"quant_conv",
]
# Beyond the official format (a documented extension, `distill.vae_lora: encoder_decoder`): the decoder too, every
# convolution and linear layer of AutoencoderKL's decoder (conv_in, mid_block, up_blocks, conv_out) and of the cpu
# prior's PatchAutoencoder (mid_block, conv_out, the full-resolution refine blocks). The official loader adds
# encoder adapters only, so it refuses such a checkpoint (unexpected keys), as ours does when asked for the encoder.
VAE_DECODER_LORA_PATTERNS = [r"post_quant_conv", r"decoder\..+"]
VAE_LORA_MODES = ("encoder", "encoder_decoder")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def vae_lora_targets(vae, mode: str = "encoder") -> list[str]:
    """Full module names of `vae` matched by the official encoder target list (`mode` "encoder") or by it and the
    decoder's (`mode` "encoder_decoder")."""
    if mode not in VAE_LORA_MODES:
        raise NifiError(f"vae_lora must be one of {', '.join(VAE_LORA_MODES)}, got {mode!r}")
    pats = VAE_ENCODER_LORA_PATTERNS + (VAE_DECODER_LORA_PATTERNS if mode == "encoder_decoder" else [])
    pats = [re.compile(p + r"$") for p in pats]
    names = [n for n, m in vae.named_modules()
             if any(p.match(n) for p in pats) and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]  # what peft adapts
    if not names:
        raise NifiError(f"{type(vae).__name__} has no module matching the VAE-encoder LoRA targets")
    return names


def lora_mode_of(vae_keys) -> str:
    """"encoder_decoder" if a checkpoint's VAE entry holds decoder weights, else "encoder" (the official form)."""
    pats = [re.compile(p + r"\.") for p in VAE_DECODER_LORA_PATTERNS]
    return "encoder_decoder" if any(p.match(k) for k in vae_keys for p in pats) else "encoder"


def checkpoint_meta(path: str | Path) -> dict:
    """A restorer checkpoint's "nifi" entry (how it was trained: t0, latent, vae_lora, ...); {} if it has none."""
    ck = load_weights(path)
    meta = ck.get("nifi", {}) if isinstance(ck, dict) else {}
    return dict(meta) if isinstance(meta, dict) else {}


def restore_settings(meta: dict, t0=..., latent: str | None = None) -> dict:
    """{'t0', 'sample'} to restore with: a checkpoint's "nifi" entry (the official t0 and a posterior sample for a
    file that does not say), overridden by `t0` (None: w/o t0) and `latent` where given."""
    t0 = meta.get("t0", OFFICIAL_T0) if t0 is ... else t0
    return {"t0": t0, "sample": (latent or meta.get("latent", "sample")) == "sample"}


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [1,L,D], pooled_prompt_embeds [1,P]) from an `.npz` with the official keys."""
    path = Path(path)
    if not path.is_file():
        raise NifiError(f"embeddings file not found: {path}")
    try:
        with np.load(path) as z:
            pe, pp = z["prompt_embeds"], z["pooled_prompt_embeds"]
    except KeyError as e:
        raise NifiError(f"{path}: missing key {e} (need prompt_embeds and pooled_prompt_embeds)") from None
    except (ValueError, OSError) as e:
        raise NifiError(f"{path}: not a readable .npz ({e})") from None
    pe, pp = torch.from_numpy(np.asarray(pe, np.float32)), torch.from_numpy(np.asarray(pp, np.float32))
    if pe.ndim == 2:
        pe = pe[None]
    if pp.ndim == 1:
        pp = pp[None]
    return pe, pp


def save_embeddings(path: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, prompt_embeds=prompt_embeds.detach().float().cpu().numpy(),
             pooled_prompt_embeds=pooled.detach().float().cpu().numpy())
    return path


# `...lora_A.weight` (peft's get_peft_model_state_dict) or `...lora_A.<adapter>.weight` (a model's state_dict())
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def _adapter_entries(model, adapter: str) -> dict:
    """The LoRA entries of one adapter in `model.state_dict()`, detached CPU copies (official keys)."""
    tag = f".{adapter}."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if ("lora_A" in k or "lora_B" in k) and tag in k}


def _to_model_keys(sd: dict, adapter: str) -> dict:
    """Checkpoint keys in either form -> the model's state-dict keys for `adapter`; other keys pass through
    unchanged (and are then reported as unexpected)."""
    out = {}
    for k, v in sd.items():
        m = _LORA_KEY.match(k)
        out[f"{m['module']}.{m['ab']}.{adapter}.weight" if m else k] = v
    return out


def _missing_model_message(base: Path) -> str:
    return (f"no prior model at {base}: run the pipeline (`make repro` builds data/cpu/prior) or point "
            f"--base-model at an SD3-medium folder in diffusers layout (vae/, transformer/, scheduler/)")


def gaussian_weights(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Separable Gaussian blending window for overlapping tiles (sigma = size / 4)."""
    def win(n):
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (0.25 * n)) ** 2)
    return (win(h)[:, None] * win(w)[None]).to(device=device, dtype=dtype)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with tiles of `tile` and at least `overlap` between neighbours."""
    if tile >= size:
        return [0]
    stride = max(tile - overlap, 1)
    n = math.ceil((size - tile) / stride) + 1
    return sorted({round(i * (size - tile) / (n - 1)) for i in range(n)})


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Pad the bottom/right of [B,C,H,W] to multiples of m: mirrored where the image is large enough (the
    official code's reflect padding), repeated edge pixels where it is not (reflect needs pad < size)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


class Restorer:
    """VAE + SD3 transformer + flow-matching scheduler, optional LoRA phi- on both, one-step restore."""

    def __init__(self, vae, transformer, scheduler, prompt_embeds, pooled, null_embeds=None, null_pooled=None):
        self.vae, self.transformer, self.scheduler = vae, transformer, scheduler
        self.prompt_embeds, self.pooled = prompt_embeds, pooled
        self.null_embeds, self.null_pooled = null_embeds, null_pooled
        self.vae_targets: list[str] = []
        self.adapter_name = "default"  # the official restorer.py's adapter name
        # how a loaded checkpoint was trained (its "nifi" entry): t0, latent mode, LoRA coverage; {} for official files
        self.meta: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, base: str | Path, embeddings: str | Path | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32) -> "Restorer":
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        base = Path(base)
        for sub in ("vae", "transformer", "scheduler"):
            if not (base / sub).is_dir():
                raise NifiError(_missing_model_message(base))
        vae_cls = AutoencoderKL
        cfg_path = base / "vae" / "config.json"
        if cfg_path.is_file():
            import json

            cls_name = json.loads(cfg_path.read_text()).get("_class_name", "AutoencoderKL")
            if cls_name != "AutoencoderKL":
                from nifi_utils.models import autoencoder

                vae_cls = getattr(autoencoder, cls_name, None)
                if vae_cls is None:
                    raise NifiError(f"{cfg_path}: unknown VAE class {cls_name!r}")
        vae = vae_cls.from_pretrained(base / "vae", torch_dtype=dtype)
        transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base / "scheduler")
        emb = Path(embeddings) if embeddings else base / "embeddings" / "default.npz"
        if not emb.is_file():
            raise NifiError(f"no prompt embeddings at {emb}: pass --embeddings FILE.npz (keys prompt_embeds, "
                            f"pooled_prompt_embeds; for SD3-medium make them once with its text encoders)")
        pe, pp = load_embeddings(emb)
        null = base / "embeddings" / "null.npz"
        ne, npool = load_embeddings(null) if null.is_file() else (None, None)
        r = cls(vae, transformer, scheduler, pe, pp, ne, npool)
        r.check_embeddings()
        return r.to(device, dtype)

    def check_embeddings(self):
        cfg = self.transformer.config
        if self.prompt_embeds.shape[-1] != cfg.joint_attention_dim or self.pooled.shape[-1] != cfg.pooled_projection_dim:
            raise NifiError(f"embeddings of width {self.prompt_embeds.shape[-1]}/{self.pooled.shape[-1]} do not fit the "
                            f"transformer ({cfg.joint_attention_dim}/{cfg.pooled_projection_dim})")

    def to(self, device=None, dtype=None) -> "Restorer":
        for m in (self.vae, self.transformer):
            if device is not None:
                m.to(device)
            if dtype is not None and next(m.parameters()).dtype != dtype:
                from diffusers.utils import logging as dlog

                level = dlog.get_verbosity()
                dlog.set_verbosity_error()  # the "modules to keep in float32: []" notice is empty noise here
                m.to(dtype=dtype)
                dlog.set_verbosity(level)
        for name in ("prompt_embeds", "pooled", "null_embeds", "null_pooled"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        cfg = self.vae.config
        return int(getattr(cfg, "downsample_factor", None) or 2 ** (len(cfg.block_out_channels) - 1))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # ------------------------------------------------------------------ LoRA phi-
    def add_lora(self, rank: int = 64, alpha: float | None = None, vae: bool = True, init="gaussian",
                 adapter_name: str = "default", vae_lora: str = "encoder"):
        """phi-: LoRA on the transformer (official targets) and, if `vae`, on the VAE encoder (`vae_lora`
        "encoder", the official list) or on its encoder and decoder ("encoder_decoder", our extension)."""
        from peft import LoraConfig

        alpha = rank if alpha is None else alpha
        self.adapter_name = adapter_name
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                                target_modules=TRANSFORMER_LORA_TARGETS), adapter_name=adapter_name)
        if vae:
            self.vae_targets = vae_lora_targets(self.vae, vae_lora)
            self.vae.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                            target_modules=self.vae_targets), adapter_name=adapter_name)
        return self

    def lora_state_dict(self) -> dict:
        """The official checkpoint: {'vae': ..., 'transformer': ...}, each the LoRA entries of the model's own
        `state_dict()` (adapter name included: `...to_q.lora_A.default.weight`). The official `restorer.py`
        adds adapters named 'default' and calls `load_state_dict(ckpt[part], strict=False)`, asserting
        no unexpected keys: exactly these keys load there."""
        out = {"transformer": _adapter_entries(self.transformer, self.adapter_name)}
        out["vae"] = _adapter_entries(self.vae, self.adapter_name) if self.vae_targets else {}
        return out

    def save_lora(self, path: str | Path, meta: dict | None = None) -> Path:
        """The official checkpoint, plus (if `meta`) a "nifi" entry of plain values saying how to use it (t0,
        latent mode, LoRA coverage): the official loader reads only 'vae' and 'transformer', so it still loads
        an encoder-only file; `restore` and `decompress --refine` default to what the entry says."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = self.lora_state_dict()
        if meta:
            sd["nifi"] = dict(meta)
        torch.save(sd, path)
        return path

    def restore_defaults(self) -> dict:
        """What the loaded checkpoint was trained with (`restore_settings` of its "nifi" entry)."""
        return restore_settings(self.meta)

    def load_lora(self, path: str | Path, alpha_over_rank: float = 1.0) -> "Restorer":
        """Load a restorer checkpoint (weights_only): the official form (model state-dict keys with the adapter
        name, `...lora_A.default.weight`) or peft's `get_peft_model_state_dict` form (`...lora_A.weight`).
        Adapters are created with the checkpoint's rank, read from the tensors (alpha = rank, as in the
        paper, unless `alpha_over_rank` says otherwise)."""
        path = Path(path)
        ckpt = load_weights(path)
        if not isinstance(ckpt, dict) or set(ckpt) - {"vae", "transformer", "nifi"} or "transformer" not in ckpt:
            keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise NifiError(f"{path}: expected a dict with keys 'vae' and 'transformer', got {keys}")
        for part in ("transformer", "vae"):
            got = ckpt.get(part, {})
            if not isinstance(got, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in got.items()):
                raise NifiError(f"{path}: the {part!r} entry is not a state dict of tensors")
        meta = ckpt.get("nifi", {})
        if not isinstance(meta, dict):
            raise NifiError(f"{path}: the 'nifi' entry is not a dict of settings")
        parts = {part: _to_model_keys(ckpt.get(part, {}), self.adapter_name) for part in ("transformer", "vae")}
        ranks = [v.shape[0] for k, v in parts["transformer"].items() if ".lora_A." in k]
        if not ranks:
            raise NifiError(f"{path}: the 'transformer' entry holds no LoRA weights (keys like "
                            f"'...to_q.lora_A.default.weight')")
        if not self._has_adapter():
            # an existing adapter (e.g. the official encoder list) is kept strict: decoder keys are then unexpected
            self.add_lora(rank=ranks[0], alpha=ranks[0] * alpha_over_rank, vae=bool(parts["vae"]),
                          vae_lora=lora_mode_of(parts["vae"]))
        for part, got in parts.items():
            model = self.transformer if part == "transformer" else self.vae
            want = _adapter_entries(model, self.adapter_name) if (part == "transformer" or self.vae_targets) else {}
            unexpected = sorted(set(got) - set(want))
            missing = sorted(set(want) - set(got))
            if unexpected:
                raise NifiError(f"{path}: {len(unexpected)} unexpected {part} keys, e.g. {unexpected[:3]} "
                                f"(checkpoint for another architecture?)")
            if missing:
                raise NifiError(f"{path}: {len(missing)} {part} LoRA keys missing, e.g. {missing[:3]}")
            bad = [k for k in got if tuple(got[k].shape) != tuple(want[k].shape)]
            if bad:
                raise NifiError(f"{path}: {part} key {bad[0]} has shape {tuple(got[bad[0]].shape)}, "
                                f"model expects {tuple(want[bad[0]].shape)} (a checkpoint of another rank or prior?)")
            if got:
                res = model.load_state_dict(got, strict=False)  # the official loading call
                assert not res.unexpected_keys, res.unexpected_keys  # checked above
        self.meta = dict(meta)
        return self

    def _has_adapter(self) -> bool:
        return any("lora_A" in n for n, _ in self.transformer.named_parameters())

    # ------------------------------------------------------------------ the flow-matching schedule
    def schedule(self, t0: float | None) -> tuple[float, float, float]:
        """(timestep passed to the transformer, sigma at t0, sigma of the step's target).

        t0 -> the scheduler's training-time sigma whose timestep is nearest (NiFi: argmin |timesteps - t0|);
        the Euler step goes to the sigma nearest t = 0. t0=None: TSD-SR's sigma = 1 -> 0 at t = 1000."""
        ts = self.scheduler.timesteps.double().cpu()
        sig = self.scheduler.sigmas.double().cpu()[: len(ts)]
        if t0 is None:
            return float(self.scheduler.config.num_train_timesteps), 1.0, 0.0
        i = int(torch.argmin((ts - float(t0)).abs()))
        j = int(torch.argmin(ts.abs()))
        return float(t0), float(sig[i]), float(sig[j])

    # ------------------------------------------------------------------ pieces (also used by training)
    def pad_image(self, img: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(img, self.vae_scale_factor)

    def encode(self, img_pm1: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
               randn=None):
        """latent = E(pad(img)).sample() * scaling_factor (mean if not `sample`), reflect-padded to the patch
        size. The posterior noise is drawn from a CPU generator, so it does not depend on the device; or from
        `randn(shape)` (training: a rank's share of the global batch's noise)."""
        dist = self.vae.encode(self.pad_image(img_pm1)).latent_dist
        z = dist.mean
        if sample:
            eps = (randn(z.shape) if randn is not None
                   else torch.randn(z.shape, generator=generator, dtype=torch.float32)).to(z)
            z = z + dist.std * eps
        z = z * self.scaling_factor
        return pad_to_multiple(z, self.transformer.config.patch_size)

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        img = self.vae.decode(z / self.scaling_factor).sample
        return img[..., : size[0], : size[1]]

    def velocity(self, x: torch.Tensor, timestep: float, tile: int | None = None, overlap: int = 8,
                 prompt_embeds=None, pooled=None) -> torch.Tensor:
        """v(x, t) of the transformer, optionally over overlapping latent tiles blended with Gaussian weights."""
        pe = self.prompt_embeds if prompt_embeds is None else prompt_embeds
        pp = self.pooled if pooled is None else pooled
        b = x.shape[0]
        pe, pp = pe.expand(b, -1, -1).to(x), pp.expand(b, -1).to(x)
        t = torch.full((b,), float(timestep), device=x.device, dtype=x.dtype)

        def run(z):
            return self.transformer(hidden_states=z, encoder_hidden_states=pe, pooled_projections=pp,
                                    timestep=t, return_dict=False)[0]

        h, w = x.shape[-2:]
        if not tile or (tile >= h and tile >= w):
            return run(x)
        p = self.transformer.config.patch_size
        tile = max(p, tile - tile % p)
        th, tw = min(tile, h), min(tile, w)
        out = torch.zeros_like(x)
        weight = torch.zeros((1, 1, h, w), device=x.device, dtype=x.dtype)
        win = gaussian_weights(th, tw, x.device, x.dtype)[None, None]
        for y0 in tile_starts(h, th, overlap):
            for x0 in tile_starts(w, tw, overlap):
                out[..., y0:y0 + th, x0:x0 + tw] += run(x[..., y0:y0 + th, x0:x0 + tw]) * win
                weight[..., y0:y0 + th, x0:x0 + tw] += win
        return out / weight

    def one_step(self, latent: torch.Tensor, t0: float | None = OFFICIAL_T0, generator: torch.Generator | None = None,
                 tile: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 7: noise the degraded latent to sigma_t0 and take one Euler step to sigma_next."""
        timestep, s0, s1 = self.schedule(t0)
        if t0 is None:
            x_t = latent
        else:
            if noise is None:
                noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
            x_t = s0 * noise + (1.0 - s0) * latent
        v = self.velocity(x_t, timestep, tile=tile)
        return x_t - (s0 - s1) * v

    def sampler_sigmas(self, t0: float, steps: int) -> list[float]:
        """K-step schedule from t0 to 0: `steps` equal steps in unshifted time s = t/1000, mapped through the
        scheduler's shift, sigma = shift s / (1 + (shift - 1) s); the last step lands on sigma = 0."""
        shift = float(self.scheduler.config.shift)
        _, s0, _ = self.schedule(t0)
        u0 = s0 / (shift - (shift - 1) * s0)  # invert the shift
        u = np.linspace(u0, 0.0, steps + 1)
        return [float(shift * x / (1 + (shift - 1) * x)) for x in u]

    def guided_velocity(self, x, timestep, guidance: float = 1.0, tile=None):
        """Classifier-free guidance v_u + g (v_c - v_u) with the null embeddings (g = 1: conditional only)."""
        v = self.velocity(x, timestep, tile=tile)
        if guidance == 1.0:
            return v
        if self.null_embeds is None:
            raise NifiError("classifier-free guidance needs null embeddings (embeddings/null.npz in the prior folder)")
        vu = self.velocity(x, timestep, tile=tile, prompt_embeds=self.null_embeds, pooled=self.null_pooled)
        return vu + guidance * (v - vu)

    @torch.no_grad()
    def img2img(self, img01: torch.Tensor, t0: float = OFFICIAL_T0, steps: int = 20, guidance: float = 1.0,
                seed: int | None = 0, tile: int | None = None) -> torch.Tensor:
        """Training-free baseline: noise the degraded latent to t0 and integrate K Euler steps of the prior."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        h, w = img01.shape[-2:]
        z = self.encode(img01.to(self.device, self.dtype) * 2 - 1, gen)
        sig = self.sampler_sigmas(t0, steps)
        noise = torch.randn(z.shape, generator=gen, dtype=torch.float32).to(z)
        x = sig[0] * noise + (1 - sig[0]) * z
        for a, b in zip(sig[:-1], sig[1:]):
            x = x - (a - b) * self.guided_velocity(x, 1000.0 * a, guidance, tile)
        out = self.decode(x, (h, w))
        return (out.float() * 0.5 + 0.5).clamp(0, 1).to(img01.device)

    # ------------------------------------------------------------------ the whole restore
    @torch.no_grad()
    def restore(self, img01: torch.Tensor, t0: float | None = OFFICIAL_T0, seed: int | None = 0, tile: int | None = None,
                sample: bool = True) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> restored [B,3,H,W] in [0,1] (float32, on the input's device)."""
        if img01.ndim != 4 or img01.shape[1] != 3:
            raise NifiError(f"restore expects a [B,3,H,W] image batch, got {tuple(img01.shape)}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        h, w = img01.shape[-2:]
        x = (img01.to(self.device, self.dtype) * 2 - 1)
        z = self.encode(x, gen, sample)
        z_hat = self.one_step(z, t0, gen, tile=tile)
        out = self.decode(z_hat, (h, w))
        return (out.float() * 0.5 + 0.5).clamp(0, 1).to(img01.device)

