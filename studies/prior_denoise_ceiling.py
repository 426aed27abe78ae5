"""How close can any one-step denoiser at t0 get to the VAE round trip, on the prior's own latents?

The prior stage's denoising gate asks the tiny DiT to bring a held-out latent noised to t0 (sigma
0.198) back within 1 dB of the VAE round trip in one step. This script measures the ceiling that
the training data allows: it trains two much larger one-step denoisers *at t0 only* on the same
latents the prior's transformer sees (training split, 4 augmented copies), with fresh noise every
step, and tracks held-out PSNR (the gate's images, noise and decoding) as they train:
- a convolutional U-Net (28 M parameters, 32 -> 16 -> 8 latent pixels, skips);
- an `SD3Transformer2DModel` of 8 layers x 384 wide (41 M parameters; the prior's is 4 x 128).
Both train under bf16 autocast with an EMA copy; reference rows: the VAE round trip, the noisy latent
decoded, and the committed prior's one step. Meant for a GPU (minutes); on a CPU set --seconds low.
Writes studies/results/prior_denoise_ceiling.json.

    python studies/prior_denoise_ceiling.py [--profile cpu] [--seconds 140] [--out FILE]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nifi_utils.measure.metrics import psnr  # noqa: E402
from nifi_utils.models.prior import encode_latents, to_pm1, training_images  # noqa: E402
from nifi_utils.models.restorer import Restorer  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--profile", default="cpu")
ap.add_argument("--seconds", type=float, default=140.0, help="training time per denoiser")
ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "prior_denoise_ceiling.json"))
args = ap.parse_args()
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
EVAL = 500 if dev == "cuda" else 20
prior = Restorer.from_pretrained(ROOT / "data" / args.profile / "prior", dtype=torch.float32)
train_imgs, held_imgs, _ = training_images(ROOT / "data" / args.profile / "scenes", 64, 128, 0)
lat = encode_latents(prior.vae, to_pm1(train_imgs), 4, 0).to(dev)  # what the prior's transformer trains on
prior = prior.to(dev)
_, s0, _ = prior.schedule(199)
held = to_pm1(held_imgs).to(dev)
with torch.no_grad():
    zh = prior.encode(held, sample=False)
nh = torch.randn(zh.shape, generator=torch.Generator().manual_seed(0)).to(dev)
xth = s0 * nh + (1 - s0) * zh
clean = held * 0.5 + 0.5
size = tuple(held.shape[-2:])


def psnr_mean(z):
    """Mean per-image PSNR of the decoded latents against the clean held-out images (the prior gate's measure)."""
    with torch.no_grad():
        y = prior.decode(z, size).clamp(-1, 1) * 0.5 + 0.5
    return float(np.mean([psnr(a[None], b[None]) for a, b in zip(y, clean)]))

out = {"sigma_t0": s0, "vae_roundtrip": psnr_mean(zh), "noisy": psnr_mean(xth / (1 - s0))}
with torch.no_grad():
    out["prior_transformer_one_step"] = psnr_mean(xth - s0 * prior.velocity(xth, 199))
print(out, flush=True)


class Res(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.f = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
    def forward(s, x): return x + s.f(x)


class UNet(nn.Module):  # 32 -> 16 -> 8 with skips
    def __init__(s, c=192):
        super().__init__()
        s.i = nn.Conv2d(lat.shape[1], c, 3, padding=1)
        s.e1 = nn.Sequential(Res(c), Res(c)); s.d1 = nn.Conv2d(c, 2 * c, 4, 2, 1)
        s.e2 = nn.Sequential(Res(2 * c), Res(2 * c)); s.d2 = nn.Conv2d(2 * c, 2 * c, 4, 2, 1)
        s.m = nn.Sequential(Res(2 * c), Res(2 * c), Res(2 * c))
        s.u2 = nn.ConvTranspose2d(2 * c, 2 * c, 4, 2, 1); s.g2 = nn.Sequential(Res(2 * c), Res(2 * c))
        s.u1 = nn.ConvTranspose2d(2 * c, c, 4, 2, 1); s.g1 = nn.Sequential(Res(c), Res(c))
        s.o = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, lat.shape[1], 3, padding=1))
    def forward(s, x):
        h1 = s.e1(s.i(x)); h2 = s.e2(s.d1(h1)); h = s.m(s.d2(h2))
        h = s.g2(s.u2(h) + h2); h = s.g1(s.u1(h) + h1)
        return x - s0 * s.o(h)


def train(name, net, fwd, seconds, lr=2e-4, B=128):
    net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    ema = [p.detach().clone() for p in net.parameters()]
    t = time.time(); step = 0; curve = []
    while time.time() - t < seconds:
        x = lat[torch.randint(len(lat), (B,), device=dev)]
        eps = torch.randn_like(x); xt = (1 - s0) * x + s0 * eps
        with torch.autocast(dev, torch.bfloat16):
            pred = fwd(net, xt)
        loss = F.mse_loss(pred.float(), x)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); step += 1
        with torch.no_grad():
            for e, p in zip(ema, net.parameters()): e.lerp_(p, 0.001)
        if step % EVAL == 0:
            net.eval()
            with torch.no_grad(): r = psnr_mean(fwd(net, xth).float())
            net.train(); curve.append((step, round(time.time() - t), round(r, 3))); print(name, curve[-1], flush=True)
    with torch.no_grad():
        for e, p in zip(ema, net.parameters()): p.copy_(e)
    net.eval()
    with torch.no_grad(): r = psnr_mean(fwd(net, xth).float())
    out[name] = {"params": sum(p.numel() for p in net.parameters()), "steps": step, "final_ema": r, "curve": curve}
    print(name, out[name]["final_ema"], flush=True)


budget = args.seconds

train("unet_conv", UNet(), lambda n, x: n(x), budget)
from diffusers import SD3Transformer2DModel
tc = prior.transformer.config  # same latent and prompt widths as the prior's transformer, 8 x 384 inside
dit = SD3Transformer2DModel(sample_size=lat.shape[-1], patch_size=2, in_channels=tc.in_channels, num_layers=8,
                            attention_head_dim=64, num_attention_heads=6, joint_attention_dim=tc.joint_attention_dim,
                            caption_projection_dim=384, pooled_projection_dim=tc.pooled_projection_dim,
                            out_channels=tc.in_channels, pos_embed_max_size=lat.shape[-1])
pe, pp = prior.prompt_embeds.to(dev), prior.pooled.to(dev)


def fdit(n, x):
    b = x.shape[0]
    v = n(hidden_states=x, encoder_hidden_states=pe.expand(b, -1, -1), pooled_projections=pp.expand(b, -1),
          timestep=torch.full((b,), 199.0, device=dev), return_dict=False)[0]
    return x - s0 * v

train("dit_8x384", dit, fdit, budget)
out["prior"] = str(ROOT / "data" / args.profile / "prior")
out["device"] = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
out["seconds_per_model"] = budget
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(out, indent=1))
print(f"wrote {args.out}")
