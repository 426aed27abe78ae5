"""Image metrics, each labelled by what it is and which backend computed it.

ST-LPIPS (shift-tolerant LPIPS, `stlpips-pytorch`) ships its complete AlexNet/VGG weights and runs
offline; it is *not* LPIPS and is never reported under that name. Real LPIPS needs torchvision's
ImageNet backbones, which exist only where a user has them (see `lpips_available`).
"""
from __future__ import annotations

import collections
import functools
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

from nifi_utils.core.common import NifiError


def to_bchw(img) -> torch.Tensor:
    """uint8 or float HxWx3, 3xHxW, BxHxWx3 or BxCxHxW -> float BxCxHxW (uint8 scaled to [0,1])."""
    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:  # one CxHxW image
        t = t[None]
    elif t.ndim == 3:
        t = t[..., :3].permute(2, 0, 1)[None]
    elif t.ndim == 4 and t.shape[1] != 3 and t.shape[-1] == 3:  # a stack of HxWx3 images
        t = t.permute(0, 3, 1, 2)
    return t.float()


def _pair(pred, gt, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as BxCxHxW; a metric of images of different shapes is a mistake, never a broadcast."""
    p, g = to_bchw(pred), to_bchw(gt)
    if p.shape != g.shape:
        raise NifiError(f"{what} of images of different shapes {tuple(p.shape)} and {tuple(g.shape)}")
    return p, g.to(p.device)


def psnr(pred, gt) -> float:
    """PSNR in dB of images in [0, 1] (uint8 inputs are scaled)."""
    p, g = _pair(pred, gt, "PSNR")
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
    """ST-LPIPS distance per image (lower is better); differentiable w.r.t. `pred`.

    The ground truth's half of the network runs once per distinct `gt` batch (`_reference_features`): an
    evaluation scores many methods and steps against the same ground truth. The value is the model's own
    forward, op for op (tests/test_metrics_cache.py compares them)."""
    p, g = _pair(pred, gt, "ST-LPIPS")
    model = stlpips_model(net, str(p.device))
    if not (getattr(model, "version", None) == "0.1" and model.lpips and not model.spatial):
        return model(p, g, normalize=True).reshape(-1)  # a configuration the split below does not cover
    from stlpips_pytorch.stlpips import spatial_average
    from stlpips_pytorch.utils import normalize_tensor

    ref = _reference_features(model, net, g)
    outs = model.net.forward(model.scaling_layer(2 * p - 1))
    val = 0
    for kk in range(model.L):
        val = val + spatial_average(model.lins[kk]((normalize_tensor(outs[kk]) - ref[kk]) ** 2), keepdim=True)
    return val.reshape(-1)


_REF_CACHE: "collections.OrderedDict[tuple, list[torch.Tensor]]" = collections.OrderedDict()  # oldest first
REF_CACHE_BYTES = 128 * 2**20


def _reference_features(model, net: str, g: torch.Tensor) -> list[torch.Tensor]:
    """The normalised features of reference images `g`, kept for the most recent distinct batches up to
    REF_CACHE_BYTES (a batch larger than that is computed and not kept). The key is the images' bytes (a
    digest), shape, dtype, device and network, so changed images are never served stale features. Written by
    hand because the ST-LPIPS package computes both halves in every call."""
    import hashlib

    gc = g.detach().contiguous()
    key = (net, str(gc.device), tuple(gc.shape), str(gc.dtype),
           hashlib.blake2b(gc.cpu().numpy().tobytes(), digest_size=16).hexdigest())
    if key in _REF_CACHE:
        _REF_CACHE.move_to_end(key)
        return _REF_CACHE[key]
    from stlpips_pytorch.utils import normalize_tensor

    with torch.no_grad():
        feats = [normalize_tensor(o) for o in model.net.forward(model.scaling_layer(2 * gc - 1))]
    nbytes = lambda fs: sum(f.numel() * f.element_size() for f in fs)  # noqa: E731
    if nbytes(feats) <= REF_CACHE_BYTES:
        _REF_CACHE[key] = feats
        while sum(nbytes(v) for v in _REF_CACHE.values()) > REF_CACHE_BYTES:
            _REF_CACHE.popitem(last=False)
    return feats


TORCHVISION_WEIGHTS = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def _backbone_cached(net: str) -> bool:
    """torchvision importable and its ImageNet `net` weights already in the torch hub cache (never downloaded)."""
    import importlib.util
    import os

    return (importlib.util.find_spec("torchvision") is not None
            and os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_WEIGHTS[net])))


def lpips_available(net: str = "alex") -> bool:
    """Real LPIPS needs torchvision and its ImageNet backbone already in the torch hub cache: we never
    download (lpips would fetch the backbone on first use)."""
    import importlib.util

    return importlib.util.find_spec("lpips") is not None and _backbone_cached(net)


@functools.lru_cache(maxsize=4)
def lpips_model(net: str = "alex", device: str = "cpu") -> torch.nn.Module:
    if not lpips_available(net):
        raise NifiError(f"real LPIPS ({net}) needs torchvision and {TORCHVISION_WEIGHTS[net]} in the torch hub cache "
                        f"({torch.hub.get_dir()}/checkpoints); offline, use ST-LPIPS")
    import lpips as lp

    return lp.LPIPS(net=net, verbose=False).eval().requires_grad_(False).to(device)


def lpips(pred, gt, net: str = "alex") -> torch.Tensor:
    """LPIPS (Zhang et al.) per image; only where `lpips_available(net)`."""
    p, g = _pair(pred, gt, "LPIPS")
    return lpips_model(net, str(p.device))(p, g, normalize=True).reshape(-1)


METRIC_BACKENDS = {
    "psnr": "nifi_utils.measure.metrics.psnr (MSE on [0,1] images)",
    "stlpips_alex": "stlpips-pytorch 0.0.2, net=alex, variant=shift_tolerant (ST-LPIPS, not LPIPS)",
    "stlpips_vgg": "stlpips-pytorch 0.0.2, net=vgg, variant=shift_tolerant (ST-LPIPS, not LPIPS)",
    "lpips_alex": "lpips 0.1.4, net=alex, torchvision ImageNet backbone (only where its weights are cached)",
    "lpips_vgg": "lpips 0.1.4, net=vgg, torchvision ImageNet backbone (only where its weights are cached)",
}


def ssim(pred, gt) -> torch.Tensor:
    """SSIM per image (torchmetrics, Gaussian window 11, sigma 1.5; higher is better)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, g = _pair(pred, gt, "SSIM")
    return structural_similarity_index_measure(p, g, data_range=1.0, reduction="none").reshape(-1)


def dists_available() -> bool:
    """DISTS (torchmetrics) needs torchvision's ImageNet VGG16 already in the torch hub cache."""
    return _backbone_cached("vgg")


@functools.lru_cache(maxsize=2)
def dists_model(device: str = "cpu") -> torch.nn.Module:
    if not dists_available():
        raise NifiError(f"DISTS needs torchvision and {TORCHVISION_WEIGHTS['vgg']} in the torch hub cache "
                        f"({torch.hub.get_dir()}/checkpoints); offline, use ST-LPIPS")
    from torchmetrics.functional.image.dists import DISTSNetwork

    return DISTSNetwork().eval().requires_grad_(False).to(device)


def dists(pred, gt) -> torch.Tensor:
    """DISTS per image (Ding et al., VGG16 backbone; lower is better); only where `dists_available()`."""
    p, g = _pair(pred, gt, "DISTS")
    return dists_model(str(p.device))(p, g).reshape(-1)


@functools.lru_cache(maxsize=16)  # built in Python loops, the same for every image of a size
def _lattice_masks(h: int, w: int, period: int, ring: tuple[int, int]) -> list:
    """Per lattice frequency of an h x w FFT grid: its 3x3 peak window and its spectral neighbourhood, as flat
    index tensors. Off-axis frequencies compare with a Chebyshev ring around them that leaves out the axes;
    frequencies on an axis (where straight horizontal or vertical image structure puts its power) compare
    with their neighbours along that axis. Other lattice windows and DC never count as neighbourhood."""
    fy = sorted({round(k * h / period) % h for k in range(period)})
    fx = sorted({round(k * w / period) % w for k in range(period)})
    bins = [(a, b) for a in fy for b in fx if (a, b) != (0, 0)]
    taken = torch.zeros(h, w, dtype=torch.bool)
    for a, b in bins + [(0, 0)]:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                taken[(a + dy) % h, (b + dx) % w] = True

    def near_axis(f, n):  # within a bin of the zero frequency (the Hann window spreads an axis that far)
        return min(f % n, (-f) % n) <= 1

    out = []
    r0, r1 = ring
    for a, b in bins:
        peak = [((a + dy) % h) * w + (b + dx) % w for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        if a == 0:  # horizontal-frequency axis: neighbours along it
            offs = [(dy, dx) for dy in (-1, 0, 1) for dx in range(-r1, r1 + 1) if abs(dx) >= r0]
        elif b == 0:
            offs = [(dy, dx) for dx in (-1, 0, 1) for dy in range(-r1, r1 + 1) if abs(dy) >= r0]
        else:
            offs = [(dy, dx) for dy in range(-r1, r1 + 1) for dx in range(-r1, r1 + 1) if max(abs(dy), abs(dx)) >= r0
                    and not near_axis(a + dy, h) and not near_axis(b + dx, w)]
        neigh = sorted({((a + dy) % h) * w + (b + dx) % w for dy, dx in offs if not taken[(a + dy) % h, (b + dx) % w]})
        if len(neigh) >= 4:
            out.append((torch.tensor(peak), torch.tensor(neigh)))
    return out


def periodic_artifact(img, period: int = 8, ring: tuple[int, int] = (2, 5)) -> torch.Tensor:
    """Periodic-artifact score per image (lower is better; ~0 for natural images).

    The latent grid of a patch autoencoder (4 px) times the transformer's patch (2) repeats every 8 px,
    and a lattice with that period puts its energy at the frequencies (k H / 8, l W / 8). Per such
    frequency, the luminance spectrum's power in a 3x3 window (Hann-windowed FFT) is compared with what
    its spectral neighbourhood predicts for a 3x3 window (a ring of radius 2-5 bins; along the axis for
    frequencies on an axis); the score is the mean over frequencies of log10 of that ratio: ~0 when the
    lattice frequencies hold what the surrounding spectrum does, 0.3 for twice that, 0.6 for ~4x. Each
    frequency counts equally, so a faint lattice shows where the image's own spectrum is weak (high
    frequencies). Periods that divide 8 (the 4-px latent blocks) land on a subset and are caught too."""
    x = to_bchw(img)
    x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]) if x.shape[1] == 3 else x.mean(1)
    b, h, w = x.shape
    if min(h, w) < 2 * period:
        raise NifiError(f"periodic_artifact needs images of at least {2 * period}x{2 * period} px, got {h}x{w}")
    x = x.double()
    x = x - x.mean((-2, -1), keepdim=True)
    win = (torch.hann_window(h, periodic=False, dtype=torch.float64)[:, None]
           * torch.hann_window(w, periodic=False, dtype=torch.float64)[None])
    pw = torch.fft.fft2(x * win).abs().pow(2).reshape(b, -1)
    masks = _lattice_masks(h, w, period, ring)
    floor = 1e-10 * pw.mean(1) + 1e-30  # a flat image scores 0, not 0/0
    ratios = [(pw[:, pk].mean(1) + floor) / (pw[:, nb].mean(1) + floor) for pk, nb in masks]
    return torch.log10(torch.stack(ratios, 1)).mean(1).float()


def perceptual_fn(name: str, device):
    """Differentiable perceptual distance on [0,1] images (mean over the batch)."""
    if name.startswith("stlpips_"):
        model = stlpips_model(name.split("_", 1)[1], str(device))
        return lambda a, b: model(a, b, normalize=True).mean()
    if name.startswith("lpips_"):
        model = lpips_model(name.split("_", 1)[1], str(device))  # clear error where the weights are absent
        return lambda a, b: model(a, b, normalize=True).mean()
    raise NifiError(f"unknown perceptual loss {name!r}")


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None] if x.shape[1] == 3 else x.mean(1, keepdim=True)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] with reflected borders (radius 3 sigma)."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def flat_mask(gt, quantile: float = 0.3, erode: int = 2) -> torch.Tensor:
    """[B,1,H,W] bool: where the ground truth is flat, its lowest `quantile` of gradient magnitude (luminance,
    central differences after a 1-px blur) per image, eroded by `erode` px so a region's edges do not count."""
    g = _luma(to_bchw(gt).double())
    g = _blur(g, 1.0)
    gy = F.pad(g[..., 2:, :] - g[..., :-2, :], (0, 0, 1, 1), mode="replicate")
    gx = F.pad(g[..., :, 2:] - g[..., :, :-2], (1, 1, 0, 0), mode="replicate")
    mag = (gx ** 2 + gy ** 2).sqrt().flatten(1)
    thr = torch.quantile(mag, quantile, dim=1, keepdim=True)
    m = (mag <= thr).view_as(g).double()
    if erode:  # erosion = the minimum over a (2 erode + 1)^2 window: 1 - max-pool of the complement
        m = 1 - F.max_pool2d(1 - m, 2 * erode + 1, stride=1, padding=erode)
    return m > 0.5


def highpass_rms(img, mask: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """RMS per image of the high-pass (image minus its Gaussian blur, luminance) inside `mask` [B,1,H,W]."""
    x = _luma(to_bchw(img).double())
    hp = x - _blur(x, sigma)
    m = mask.to(hp.device).double()
    return ((hp ** 2 * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp_min(1)).sqrt()


def flat_excess(img, gt, quantile: float = 0.3, sigma: float = 1.5) -> torch.Tensor:
    """Invention score per image (lower is better; ~0 for the ground truth, < 0 for a smoother image): the RMS of
    the luminance high-pass (detail finer than a `sigma`-px Gaussian) where the ground truth is flat (`flat_mask`),
    minus the ground truth's own there. Perceptual metrics reward plausible texture whether or not it is in the
    scene; detail added where the scene has none (ripples, grain, a lattice) is invented, and this measures how much.
    Written here because no library ships a reference-flat-region texture score."""
    p, g = _pair(img, gt, "flat_excess")
    mask = flat_mask(g, quantile)
    return (highpass_rms(p, mask, sigma) - highpass_rms(g, mask, sigma)).float()


METRIC_BACKENDS.update({
    "ssim": "torchmetrics 1.9.0 structural_similarity_index_measure (gaussian 11x11, sigma 1.5, data_range 1)",
    "dists": "torchmetrics 1.9.0 DISTSNetwork, torchvision ImageNet VGG16 (only where its weights are cached)",
    "flat_excess": "nifi_utils.measure.metrics.flat_excess: RMS of the luminance high-pass (minus a 1.5-px Gaussian blur) where "
                   "the ground truth is flat (lowest 30 % of its gradient magnitude, eroded 2 px), minus the ground truth's",
    "periodic": "nifi_utils.measure.metrics.periodic_artifact: log10 of luminance power at the 8-px lattice frequencies (3x3 "
                "windows, Hann-windowed FFT) over what their spectral neighbourhoods predict; no reference image",
})
from nifi_utils.core.facts import LOWER_IS_BETTER  # noqa: E402,F401  (re-exported: callers ask metrics)


def metric_available(name: str) -> bool:
    """Whether a metric can be computed here (LPIPS and DISTS need cached torchvision weights)."""
    if name in ("psnr", "ssim", "stlpips_alex", "stlpips_vgg"):
        return True
    if name in ("lpips_alex", "lpips_vgg"):
        return lpips_available(name.split("_")[1])
    if name == "dists":
        return dists_available()
    raise NifiError(f"unknown metric {name!r}; known: psnr, ssim, stlpips_alex, stlpips_vgg, lpips_alex, lpips_vgg, dists")


def image_metrics(pred, gt, names: list[str]) -> dict[str, np.ndarray]:
    """Every metric in `names` per image of a batch, as numpy arrays."""
    p, g = _pair(pred, gt, "metrics")
    out = {}
    with torch.no_grad():
        for n in names:
            if n == "psnr":
                out[n] = np.array([psnr(p[i:i + 1], g[i:i + 1]) for i in range(len(p))])
            elif n == "ssim":
                v = ssim(p, g)
            elif n.startswith("stlpips_"):
                v = stlpips(p, g, n.split("_")[1])
            elif n.startswith("lpips_"):
                v = lpips(p, g, n.split("_")[1])
            elif n == "dists":
                v = dists(p, g)
            else:
                raise NifiError(f"unknown metric {n!r}")
            if n != "psnr":
                out[n] = v.detach().cpu().numpy().astype(np.float64)
    return out
