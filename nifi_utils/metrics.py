"""Layer 6 (evaluation): image metrics, each labelled by what it is and which backend computed it.

ST-LPIPS (shift-tolerant LPIPS, `stlpips-pytorch`) ships its complete AlexNet/VGG weights and runs
offline; it is *not* LPIPS and is never reported under that name. Real LPIPS needs torchvision's
ImageNet backbones, which exist only where a user has them (see `lpips_available`).
"""
from __future__ import annotations

import functools
import sys
import types

import numpy as np
import torch

from .common import NifiError


def to_bchw(img) -> torch.Tensor:
    """uint8 HxWx3 / float HxWx3 / float BxCxHxW -> float BxCxHxW in [0,1]."""
    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    if t.ndim == 3:
        t = t[..., :3].permute(2, 0, 1)[None]
    return t.float()


def psnr(pred, gt) -> float:
    """PSNR in dB of images in [0, 1] (uint8 inputs are scaled)."""
    p, g = to_bchw(pred), to_bchw(gt)
    if p.shape != g.shape:
        raise NifiError(f"PSNR of images of different shapes {tuple(p.shape)} and {tuple(g.shape)}")
    mse = float(((p - g) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


@functools.lru_cache(maxsize=4)
def stlpips_model(net: str = "alex", device: str = "cpu") -> torch.nn.Module:
    """The ST-LPIPS network with its bundled weights (offline).

    `stlpips_pytorch` imports torchvision and torchsummary at module level but, for the
    shift-tolerant variant, uses neither: stubs satisfy the import and are removed right after
    (a leftover torchvision stub breaks transformers/peft)."""
    stubs = {}
    for name in ("torchvision", "torchvision.models", "torchsummary"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.summary = None
            mod.models = None
            stubs[name] = sys.modules[name] = mod
    try:
        from stlpips_pytorch import stlpips
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        model = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)
    model.eval().requires_grad_(False)
    return model.to(device)


def stlpips(pred, gt, net: str = "alex") -> torch.Tensor:
    """ST-LPIPS distance per image (lower is better); differentiable w.r.t. `pred`."""
    p, g = to_bchw(pred), to_bchw(gt)
    model = stlpips_model(net, str(p.device))
    return model(p, g.to(p.device), normalize=True).reshape(-1)


TORCHVISION_WEIGHTS = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def lpips_available(net: str = "alex") -> bool:
    """Real LPIPS needs torchvision and its ImageNet backbone already in the torch hub cache: we never
    download (lpips would fetch the backbone on first use)."""
    import importlib.util
    import os

    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("lpips") is None:
        return False
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_WEIGHTS[net]))


@functools.lru_cache(maxsize=4)
def lpips_model(net: str = "alex", device: str = "cpu") -> torch.nn.Module:
    if not lpips_available(net):
        raise NifiError(f"real LPIPS ({net}) needs torchvision and {TORCHVISION_WEIGHTS[net]} in the torch hub cache "
                        f"({torch.hub.get_dir()}/checkpoints); offline, use ST-LPIPS")
    import lpips as lp

    return lp.LPIPS(net=net, verbose=False).eval().requires_grad_(False).to(device)


def lpips(pred, gt, net: str = "alex") -> torch.Tensor:
    """LPIPS (Zhang et al.) per image; only where `lpips_available(net)`."""
    p, g = to_bchw(pred), to_bchw(gt)
    return lpips_model(net, str(p.device))(p, g.to(p.device), normalize=True).reshape(-1)


METRIC_BACKENDS = {
    "psnr": "nifi_utils.metrics.psnr (MSE on [0,1] images)",
    "stlpips_alex": "stlpips-pytorch 0.0.2, net=alex, variant=shift_tolerant (ST-LPIPS, not LPIPS)",
    "stlpips_vgg": "stlpips-pytorch 0.0.2, net=vgg, variant=shift_tolerant (ST-LPIPS, not LPIPS)",
    "lpips_alex": "lpips 0.1.4, net=alex, torchvision ImageNet backbone (only where its weights are cached)",
    "lpips_vgg": "lpips 0.1.4, net=vgg, torchvision ImageNet backbone (only where its weights are cached)",
}
