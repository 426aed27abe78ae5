"""GPU benchmark at paper scale: an SD3-medium-shaped restorer and gsplat's CUDA rasterizer.

Needs CUDA (exits 2 with one line otherwise). No weights are downloaded: the restorer is an
`SD3Transformer2DModel` + `AutoencoderKL` with SD3-medium's configuration (24 joint blocks of width
1536, 16 latent channels, 8x VAE) and random weights, which costs the same time and memory as the
real one. Measured, side by side in one process:
- one-step restore (bf16, LoRA rank 64 on transformer and VAE encoder) at 512² and 1024²: ms per
  image and peak GPU memory; K = 20 Euler-step img2img with CFG 7.5 at 512² (the paper's baseline);
- one NiFi distillation step (fp32 master weights, bf16 autocast, batch 1, 512² crops, ST-LPIPS
  alex): seconds per step and peak memory, all losses finite;
- gsplat's CUDA rasterizer against this repository's CPU rasterizer on the same scene and cameras:
  max |difference| of colour and alpha, and ms per render at 128² and 512².
Writes benchmarks/results/gpu_paper_scale.json.

    python benchmarks/gpu_paper_scale.py [--out FILE] [--cases restore,distill,gsplat] [--perceptual stlpips_alex|none]
                                         [--lattice-weight W]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SD3_MEDIUM = dict(vae_channels=[128, 256, 512, 512], vae_layers_per_block=2, vae_norm_groups=32, latent_channels=16,
                  scaling_factor=1.5305, dit_layers=24, dit_heads=24, dit_head_dim=64, patch_size=2, text_dim=4096,
                  caption_dim=1536, pooled_dim=2048, text_len=333, sample_size=128, pos_embed_max_size=192)


def timed(fn, repeats: int = 3) -> dict:
    fn()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return {"ms": (time.perf_counter() - t) / repeats * 1000, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def sd3_medium_shaped():
    from nifi_utils.models.folders import TinySD3Config, tiny_sd3

    with torch.device("cuda"):  # built on the GPU: 2 B parameters initialise in seconds there
        r = tiny_sd3(TinySD3Config(**SD3_MEDIUM), seed=0)
    return r.to("cuda")


def restorer_cases(out: dict) -> None:
    r = sd3_medium_shaped()
    out["params"] = {"transformer": sum(p.numel() for p in r.transformer.parameters()),
                     "vae": sum(p.numel() for p in r.vae.parameters())}
    r = r.to(dtype=torch.bfloat16).add_lora(rank=64)
    for s in (512, 1024):
        img = torch.rand(1, 3, s, s, device="cuda")
        res = timed(lambda: r.restore(img, t0=199, seed=0))
        y = r.restore(img, t0=199, seed=0)
        out[f"restore_bf16_{s}"] = {**res, "finite": bool(torch.isfinite(y).all()), "shape": list(y.shape)}
        print(s, out[f"restore_bf16_{s}"], flush=True)
    img = torch.rand(1, 3, 512, 512, device="cuda")
    out["img2img_bf16_512_K20_cfg7.5"] = timed(lambda: r.img2img(img, t0=199, steps=20, guidance=7.5), repeats=1)
    out["img2img_over_restore_512"] = out["img2img_bf16_512_K20_cfg7.5"]["ms"] / out["restore_bf16_512"]["ms"]
    print("img2img", out["img2img_bf16_512_K20_cfg7.5"], flush=True)


def distill_case(out: dict, perceptual: str = "stlpips_alex", lattice_weight: float = 0.0) -> None:
    import numpy as np

    from nifi_utils.models.distill import Distiller, DistillConfig, PairSet

    r = sd3_medium_shaped()
    g = torch.Generator().manual_seed(0)
    hq = (torch.rand(4, 3, 512, 512, generator=g) * 255).byte()
    lq = (hq.float() * 0.8 + 20).byte()
    d = Distiller(r, DistillConfig(rank=64, critic_rank=64, batch=1, crop=512, mixed_precision="bf16",
                                   perceptual="stlpips_alex" if perceptual == "none" else perceptual,
                                   perceptual_weight=0.0 if perceptual == "none" else 1.0, lattice_weight=lattice_weight))
    pairs = PairSet(lq, hq, [("s", 0, str(i)) for i in range(4)])
    d.train(pairs, 1)  # warm-up step
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    n = 4
    t = time.perf_counter()
    hist = d.train(pairs, 1 + n)  # `steps` is the step to reach, not a count
    torch.cuda.synchronize()
    last = [v for k, v in hist[-1].items() if k != "step"]
    key = "distill_step_bf16_512_b1" + ("" if perceptual == "stlpips_alex" and not lattice_weight
                                        else f"_perceptual-{perceptual}_lattice-{lattice_weight:g}")
    out[key] = {"s_per_step": (time.perf_counter() - t) / n, "steps_timed": n,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "lattice_period_px": d.lattice_period,
                "losses_finite": bool(np.isfinite(last).all()), "last_losses": hist[-1]}
    print("distill", out[key], flush=True)


def gsplat_case(out: dict) -> None:
    from conftest import front_camera, random_scene

    from nifi_utils.gs.render import rasterization

    rows = []
    for res, n in ((128, 3000), (512, 30000)):
        scene = random_scene(n=n, seed=11)
        cams = [front_camera(res, res), front_camera(res, res, dist=2.0)]
        args = [torch.stack([c.viewmat() for c in cams]), torch.stack([c.K() for c in cams])]
        base = [scene.means, scene.quats, scene.scales, scene.opacities, scene.sh] + args + [res, res]
        kw = dict(sh_degree=3, render_mode="RGB+ED", backgrounds=torch.tensor([[0.1, 0.2, 0.3]] * 2), packed=False)
        t = time.perf_counter()
        c_cpu, a_cpu, _ = rasterization(*base, **kw)
        cpu_ms = (time.perf_counter() - t) * 1000
        cuda = [a.cuda() if torch.is_tensor(a) else a for a in base]
        kwc = {**kw, "backgrounds": kw["backgrounds"].cuda()}
        res_gpu = timed(lambda: rasterization(*cuda, **kwc), repeats=5)
        c_gpu, a_gpu, _ = rasterization(*cuda, **kwc)
        rows.append({"res": res, "gaussians": n, "cameras": 2, "cpu_ms": cpu_ms, "gsplat_cuda_ms": res_gpu["ms"],
                     "max_abs_diff_rgb": float((c_cpu[..., :3] - c_gpu.cpu()[..., :3]).abs().max()),
                     "max_abs_diff_alpha": float((a_cpu - a_gpu.cpu()).abs().max())})
        print(rows[-1], flush=True)
    out["gsplat_vs_cpu"] = rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_paper_scale.json"))
    ap.add_argument("--cases", default="restore,distill,gsplat")
    ap.add_argument("--perceptual", default="stlpips_alex", help="the distill case's perceptual loss, or none")
    ap.add_argument("--lattice-weight", type=float, default=0.0, help="the distill case's lattice term weight")
    a = ap.parse_args()
    cases = a.cases.split(",")
    if not set(cases) <= {"restore", "distill", "gsplat"}:
        print(f"error: --cases takes restore, distill and gsplat, got {a.cases!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: gpu_paper_scale.py needs CUDA (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import diffusers
    import peft

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}
    if "gsplat" in cases:
        import gsplat

        versions["gsplat"] = gsplat.__version__
    out = {"device": torch.cuda.get_device_name(0), "versions": versions,
           "config": SD3_MEDIUM, "weights": "random (SD3-medium shapes; time and memory do not depend on the values)"}
    if "restore" in cases:
        restorer_cases(out)
        torch.cuda.empty_cache()
    if "distill" in cases:
        distill_case(out, a.perceptual, a.lattice_weight)
        torch.cuda.empty_cache()
    if "gsplat" in cases:
        gsplat_case(out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
