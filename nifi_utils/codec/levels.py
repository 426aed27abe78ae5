"""Nested rate levels of a 3DGS scene (GoDe/RAVE-style pruning + QAT fine-tuning).

NiFi (paper §3) prunes each scene to L nested levels with log-spaced sizes

    |G_l| = c_min * exp(l * (log N_max - log c_min) / (L - 1)),   l = 0..L-1,

removing, level by level from the finest down, the Gaussians with the smallest L2 norm of the
rendering-loss gradient with respect to their attributes, accumulated over all training views.
The levels are then fine-tuned jointly (a random level per iteration) with quantization-aware
training of the attributes the codec quantizes, and each level is stored by `container.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nifi_utils.codec.container import channels_to_scene, default_bits, fake_quantize, scene_to_channels
from nifi_utils.core.common import NifiError, progress
from nifi_utils.gs.gaussians import GaussianScene
from nifi_utils.gs.render import render


def level_sizes(n_total: int, c_min: int, n_levels: int, n_max: int | float = 0.85) -> list[int]:
    """Log-spaced level sizes from c_min to N_max (an int count, or a fraction of n_total if <= 1)."""
    top = int(round(n_max * n_total)) if isinstance(n_max, float) and n_max <= 1 else int(n_max)
    top = min(top, n_total)
    if n_levels < 1:
        raise NifiError(f"n_levels must be >= 1, got {n_levels}")
    if not 1 <= c_min <= top:
        raise NifiError(f"c_min={c_min} must be between 1 and the largest level size {top} (scene has {n_total})")
    if n_levels == 1:
        return [top]
    step = (math.log(top) - math.log(c_min)) / (n_levels - 1)
    sizes = [int(round(c_min * math.exp(l * step))) for l in range(n_levels)]
    sizes[-1] = top
    return sizes


def image_to_tensor(img, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 HxWx3 (numpy) or float tensor -> float [H,W,3] in [0,1]."""
    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))
    if t.dtype == torch.uint8:
        t = t.to(dtype) / 255.0
    return t[..., :3].to(device=device, dtype=dtype)


def render_loss(pred: torch.Tensor, gt: torch.Tensor, lambda_dssim: float = 0.2) -> torch.Tensor:
    """3DGS training loss (1 - lambda) L1 + lambda (1 - SSIM); images [H,W,3]."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    l1 = (pred - gt).abs().mean()
    if lambda_dssim <= 0:
        return l1
    s = ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0)
    return (1 - lambda_dssim) * l1 + lambda_dssim * (1 - s)


def gradient_scores(scene: GaussianScene, cams, images, background, lambda_dssim: float = 0.2,
                    desc: str = "scores") -> torch.Tensor:
    """||dL/dG_i||_2 per Gaussian: gradients of the rendering loss w.r.t. every attribute of the
    Gaussian, accumulated (summed) over all views, then the L2 norm over the attributes (GoDe)."""
    if len(cams) != len(images) or not len(cams):
        raise NifiError(f"gradient scoring needs one image per camera (got {len(cams)} cameras, {len(images)} images)")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in scene.tensors().items()}
    for cam, img in progress(list(zip(cams, images)), desc=desc, leave=False):
        out = render(GaussianScene(**params), cam, background=background)
        render_loss(out["rgb"], image_to_tensor(img, out["rgb"].device), lambda_dssim).backward()
    g = torch.cat([p.grad.reshape(len(p), -1) for p in params.values()], 1)
    return g.norm(dim=1)


def opacity_volume_scores(scene: GaussianScene) -> torch.Tensor:
    """Image-free importance: opacity x geometric-mean scale (for a scene without images)."""
    return (scene.opacities * scene.log_scales.mean(1).exp()).detach()


def prune_levels(scene: GaussianScene, sizes: list[int], scorer) -> list[torch.Tensor]:
    """Nested index sets (level 0 smallest), pruning from the finest level down; `scorer(sub)` scores
    the Gaussians of the current (already pruned) model, so each round sees the previous pruning."""
    if sorted(sizes) != list(sizes) or sizes[-1] > len(scene):
        raise NifiError(f"level sizes {sizes} must increase and not exceed the scene's {len(scene)} Gaussians")
    keep = torch.arange(len(scene), device=scene.means.device)
    levels: list[torch.Tensor] = [keep] * len(sizes)
    for l in reversed(range(len(sizes))):
        if sizes[l] < len(keep):
            s = scorer(scene.subset(keep))
            order = torch.argsort(s, descending=True, stable=True)
            keep = keep[order[: sizes[l]]].sort().values
        levels[l] = keep
    return levels


@dataclass
class FinetuneConfig:
    steps: int = 200
    lr_means: float = 1.6e-4  # multiplied by the scene extent, as in 3DGS
    lr_quats: float = 1e-3
    lr_scales: float = 5e-3
    lr_opacity: float = 5e-2
    lr_sh: float = 2.5e-3
    lambda_dssim: float = 0.2
    qat: bool = True
    shared: bool = True  # RAVE: one set of attributes per Gaussian across levels
    level_sampling: str = "uniform"  # uniform (RAVE default) | sqrt_size (favour larger levels)
    bits: int = 8
    pos_bits: int = 12


def finetune_levels(scene: GaussianScene, levels: list[torch.Tensor], sh_degrees: list[int], cams, images,
                    background, cfg: FinetuneConfig, seed: int = 0, desc: str = "finetune"):
    """Fine-tune the pruned levels: each step renders one random level from one random training
    view; the attributes pass through fake quantization (QAT) at the codec's bits.

    `cfg.shared=True` is RAVE's joint fine-tuning: a Gaussian kept in several levels has one set of
    attributes. `False` gives each level its own copy (initialised from the same pruned Gaussians):
    every level is stored self-contained anyway, so sharing only constrains the coarse levels (which
    want large Gaussians) and the fine ones (which want small ones) to agree.

    Returns (one fine-tuned GaussianScene per level, history of (level, loss)).
    """
    if cfg.level_sampling == "uniform":
        probs = np.full(len(levels), 1.0 / len(levels))
    elif cfg.level_sampling == "sqrt_size":
        w = np.sqrt([len(i) for i in levels])
        probs = w / w.sum()
    else:
        raise NifiError(f"level_sampling must be 'uniform' or 'sqrt_size', got {cfg.level_sampling!r}")
    if cfg.shared:
        top = levels[-1]
        pos = torch.full((len(scene),), -1, dtype=torch.long, device=top.device)
        pos[top] = torch.arange(len(top), device=top.device)
        local = [pos[idx] for idx in levels]
        bases = [scene.subset(top).detach()]
    else:
        local = [None] * len(levels)
        bases = [scene.subset(idx).detach() for idx in levels]
    params = [{k: v.clone().requires_grad_(True) for k, v in b.tensors().items()} for b in bases]
    groups = []
    for b, p in zip(bases, params):
        extent = float((b.means - b.means.mean(0)).norm(dim=1).max()) if len(b) else 1.0
        groups += [
            {"params": [p["means"]], "lr": cfg.lr_means * extent},
            {"params": [p["quats"]], "lr": cfg.lr_quats},
            {"params": [p["log_scales"]], "lr": cfg.lr_scales},
            {"params": [p["opacity_logits"]], "lr": cfg.lr_opacity},
            {"params": [p["sh"]], "lr": cfg.lr_sh},
        ]
    opt = torch.optim.Adam(groups, eps=1e-15)

    def level_scene(l, ps):
        own = ps[0] if cfg.shared else ps[l]
        sub = GaussianScene(**own)
        return sub.subset(local[l]) if cfg.shared else sub

    rng = np.random.default_rng(seed)
    gts = [image_to_tensor(im, scene.means.device) for im in images]
    history = []
    skipped = 0
    for step in progress(range(cfg.steps), desc=desc, leave=False):
        l = int(rng.choice(len(levels), p=probs))
        v = int(rng.integers(len(cams)))
        sub = level_scene(l, params)
        deg = sh_degrees[l]
        if cfg.qat:
            ch = fake_quantize(scene_to_channels(sub, deg), default_bits(deg, cfg.bits, cfg.pos_bits))
            sub = channels_to_scene(ch, deg)
        else:
            sub = sub.with_sh_degree(deg)
        out = render(sub, cams[v], background=background)
        loss = render_loss(out["rgb"], gts[v], cfg.lambda_dssim)
        if not loss.requires_grad:  # no Gaussian of this level projects into this view
            history.append((l, float(loss)))
            continue
        if not torch.isfinite(loss):
            raise NifiError(f"fine-tuning diverged at step {step} (loss {float(loss)}); lower the learning rates")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # NaN-safe: a non-finite gradient entry is dropped rather than poisoning Adam's state (the one
        # cause seen so far, a Gaussian exactly on the camera plane, is fixed in render.py).
        for t in (t for p in params for t in p.values()):
            if t.grad is not None and not torch.isfinite(t.grad).all():
                t.grad.nan_to_num_(0.0, 0.0, 0.0)
                skipped += 1
        opt.step()
        history.append((l, float(loss.detach())))
    if not all(torch.isfinite(t).all() for p in params for t in p.values()):
        raise NifiError("fine-tuning produced non-finite attributes; lower the learning rates")
    if skipped:
        import warnings

        warnings.warn(f"fine-tuning zeroed non-finite gradient entries in {skipped} parameter tensors")
    with torch.no_grad():
        detached = [{k: v.detach() for k, v in p.items()} for p in params]
        return [level_scene(l, detached) for l in range(len(levels))], history
