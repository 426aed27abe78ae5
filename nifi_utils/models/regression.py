"""The regression restorer, the strongest simple baseline (SwinIR's role in the paper's Table 1).

A residual U-Net, out = x + f(x), with features at full, 1/2 and 1/4 resolution (width 32, 64, 128: 0.47 M
parameters), trained on the distill stage's own pairs with NiFi's crops, batch, steps, seed stream and data loss
(l2 + the perceptual network NiFi trains on), AdamW with cosine decay. Every convolution pads by reflection, as
an image-restoration network is built (zero padding paints a frame along the border), and an input is reflected up
to a multiple of 4 and cropped back, so any size restores. The last convolution starts at zero: the network starts
as the identity (the compressed render), and every change it makes is learnt.

Written here, not taken from a library, because the baseline must train on exactly NiFi's pairs, crops and loss
in the same stage (SwinIR's released weights restore other degradations at other scales).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nifi_utils.core.common import NifiError, load_weights, progress


@dataclass
class RegressionConfig:
    width: int = 32  # channels at full resolution (x2 per scale)
    scales: int = 3  # resolutions: full, 1/2, 1/4
    lr: float = 5e-4  # AdamW, cosine decay to 0 over `steps`
    weight_decay: float = 1e-4
    steps: int = 1200  # NiFi's steps, batch and crop (the distill section's)
    batch: int = 4
    crop: int = 64
    l2_weight: float = 1.0  # pixel MSE of images in [-1, 1]
    perceptual_weight: float = 1.0
    perceptual: str = "stlpips_alex"  # NiFi's perceptual network (distill.perceptual)
    eval_every: int = 0
    seed: int = 0


def _conv(cin: int, cout: int, stride: int = 1) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode="reflect")


class _Block(torch.nn.Module):
    """Two 3x3 convolutions with SiLU, the first changing the width."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1, self.c2 = _conv(cin, cout), _conv(cout, cout)

    def forward(self, x):
        return F.silu(self.c2(F.silu(self.c1(x))))


class RegressionUNet(torch.nn.Module):
    """[B,3,H,W] in [0,1] -> restored [B,3,H,W]: x + f(x), a U-Net of `scales` resolutions."""

    def __init__(self, width: int = 32, scales: int = 3):
        super().__init__()
        if scales < 1:
            raise NifiError(f"regression: scales must be >= 1, got {scales}")
        ch = [width * 2 ** i for i in range(scales)]
        self.scales = scales
        self.inc = _Block(3, ch[0])
        self.down = torch.nn.ModuleList([_conv(ch[i], ch[i], 2) for i in range(scales - 1)])
        self.enc = torch.nn.ModuleList([_Block(ch[i], ch[i + 1]) for i in range(scales - 1)])
        self.up = torch.nn.ModuleList([torch.nn.Conv2d(ch[i + 1], ch[i], 1) for i in range(scales - 1)])
        self.dec = torch.nn.ModuleList([_Block(2 * ch[i], ch[i]) for i in range(scales - 1)])
        self.out = torch.nn.Conv2d(ch[0], 3, 3, padding=1, padding_mode="reflect")
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        m = 2 ** (self.scales - 1)
        h, w = x01.shape[-2:]
        # up to a multiple of m, and at least 2 px at the coarsest scale (a reflected border needs a neighbour)
        ph, pw = max((-h) % m, 2 * m - h), max((-w) % m, 2 * m - w)
        x = x01 * 2 - 1
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        skips, f = [], self.inc(x)
        for down, enc in zip(self.down, self.enc):
            skips.append(f)
            f = enc(down(f))
        for i in reversed(range(self.scales - 1)):
            f = self.up[i](F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False))
            f = self.dec[i](torch.cat([f, skips[i]], 1))
        y = x + self.out(f)
        return (y[..., :h, :w] + 1) / 2

    @torch.no_grad()
    def restore(self, img01: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> restored, clamped to [0,1], float32 on the input's device."""
        if img01.ndim != 4 or img01.shape[1] != 3:
            raise NifiError(f"restore expects a [B,3,H,W] image batch, got {tuple(img01.shape)}")
        dev = next(self.parameters()).device
        out = [self(img01[i:i + chunk].to(dev).float()).clamp(0, 1) for i in range(0, len(img01), chunk)]
        return torch.cat(out).to(img01.device)


def save_regression(model: RegressionUNet, cfg: RegressionConfig, path: str | Path) -> Path:
    """{'regression': state dict, 'config': how it was built and trained} (loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"regression": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": asdict(cfg)}, path)
    return path


def load_regression(path: str | Path, device="cpu") -> RegressionUNet:
    """The network a `save_regression` file holds, built from the config it carries."""
    path = Path(path)
    ck = load_weights(path, "regression checkpoint not found: {path} (the distill stage writes it: variant `regression`)")
    if not isinstance(ck, dict) or "regression" not in ck or "config" not in ck:
        keys = list(ck)[:5] if isinstance(ck, dict) else type(ck).__name__
        raise NifiError(f"{path}: not a regression restorer (expected keys 'regression' and 'config', got {keys})")
    c = ck["config"]
    model = RegressionUNet(int(c.get("width", 32)), int(c.get("scales", 3)))
    try:
        model.load_state_dict(ck["regression"])
    except RuntimeError as e:
        raise NifiError(f"{path}: weights do not fit the network its config describes ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False).to(device)


def train_regression(name: str, cfg: RegressionConfig, out_path: str | Path, pairs, evaluate, device="cpu",
                     **_ignored) -> dict:
    """Train the regression restorer on `pairs` (the distill stage's PairSet) and export it to `out_path`; a record
    shaped like `distill.train_variant`'s (config, seconds, final held-out scores, history), so the stage reports
    every restorer alike. `evaluate`: the stage's HeldoutEval (its `scores(images, full)`)."""
    import resource

    from nifi_utils.core.common import seed_everything
    from nifi_utils.measure.metrics import perceptual_fn

    seed_everything(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)  # NiFi's stream: the same pairs and crops in the same order
    model = RegressionUNet(cfg.width, cfg.scales).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    perc = perceptual_fn(cfg.perceptual, device) if cfg.perceptual_weight > 0 else None

    def held(full=False):
        model.eval()
        out = evaluate.scores(model.restore(evaluate.lq), full)
        model.train()
        return out

    t = time.time()
    history = [{"step": 0, **held(getattr(evaluate, "full_at_start", False))}]
    for step in progress(range(1, cfg.steps + 1), desc=name):
        lq, hq = pairs.batch(cfg.batch, cfg.crop, g)
        lq, hq = lq.to(device), hq.to(device)
        out = model(lq)
        l2 = F.mse_loss(out * 2 - 1, hq * 2 - 1)
        loss = cfg.l2_weight * l2
        logs = {"step": step, "l2": float(l2.detach())}
        if perc is not None:
            lp = perc(out.clamp(0, 1), hq)
            loss = loss + cfg.perceptual_weight * lp
            logs["perceptual"] = float(lp.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        logs["loss_g"] = float(loss.detach())
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            logs.update(held())
        history.append(logs)
    history[-1].update(held(full=True))
    save_regression(model, cfg, out_path)
    seconds = time.time() - t
    judge = getattr(evaluate, "judge", "stlpips_vgg")
    print(f"{name}: {seconds:.0f} s, held-out {judge} {history[-1]['heldout_' + judge]:.4f}", flush=True)
    return {"name": name, "history": history, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "result": {"config": asdict(cfg), "seconds": seconds, "final": history[-1],
                       "ckpt_bytes": Path(out_path).stat().st_size, "processes": 1,
                       "parameters": sum(p.numel() for p in model.parameters())}}
