"""Restore benchmark: the one-step restorer against K-step img2img with the same prior, side by side.

For the `cpu` profile's prior (data/cpu/prior, with the restorer checkpoint if present; otherwise a
randomly initialised stand-in of the planned cpu-prior size, said so in the JSON): ms per image at
the cpu profile's resolution (128²) and at 960x640 with latent tiling, split into VAE encode,
transformer and VAE decode; one-step restore vs K = 5, 10, 20 Euler steps from the same t0; peak
resident memory of each case in a fresh subprocess. Targets: one-step <= 1.1 x (encode +
transformer + decode measured separately); 960x640 tiled restore < 4 GB peak on CPU.
Writes benchmarks/results/restore.json.

    python benchmarks/restore.py [--base-model DIR] [--device cpu] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The stand-in until the prior stage lands: the size its issue plans (4x VAE, 16 latent channels,
# 4-layer width-128 DiT), random weights. Timing does not depend on the weights.
STANDIN = dict(vae_channels=[32, 64, 64], vae_layers_per_block=1, vae_norm_groups=8, latent_channels=16,
               dit_layers=4, dit_heads=4, dit_head_dim=32, text_dim=64, caption_dim=128, pooled_dim=64, text_len=16,
               sample_size=32, pos_embed_max_size=192)


def load(base: str | None, device: str):
    import torch

    from nifi_utils.models.folders import TinySD3Config, tiny_sd3
    from nifi_utils.models.restorer import Restorer

    if base and Path(base, "transformer").is_dir():
        r = Restorer.from_pretrained(base, device=device)
        ckpt = ROOT / "data/cpu/restorer/nifi.pt"
        if ckpt.is_file():
            r.load_lora(ckpt)
        return r.to(device), {"model": str(base), "checkpoint": str(ckpt) if ckpt.is_file() else None}
    r = tiny_sd3(TinySD3Config(**STANDIN))
    r.add_lora(rank=16)
    torch.set_grad_enabled(False)
    return r.to(device), {"model": "random stand-in", "config": STANDIN, "lora_rank": 16}


def case(kind: str, h: int, w: int, tile: int | None, repeats: int, base: str | None, device: str) -> dict:
    import resource

    import torch

    torch.set_grad_enabled(False)
    r, meta = load(base, device)
    img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def best(fn):
        fn()  # warm-up
        sync()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1000

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = (img * 2 - 1).to(r.device)
    out = {"kind": kind, "h": h, "w": w, "tile": tile}
    if kind == "parts":
        z = r.encode(x, torch.Generator().manual_seed(0))
        _, s0, _ = r.schedule(199)
        out["vae_encode_ms"] = best(lambda: r.encode(x, torch.Generator().manual_seed(0)))
        out["transformer_ms"] = best(lambda: r.velocity(z, 199.0, tile=tile))
        out["vae_decode_ms"] = best(lambda: r.decode(z, (h, w)))
        out["sum_ms"] = out["vae_encode_ms"] + out["transformer_ms"] + out["vae_decode_ms"]
        # the ratio is taken side by side in this process (separate processes differ by a few %)
        out["one_step_same_process_ms"] = best(lambda: r.restore(img, t0=199, seed=0, tile=tile))
    elif kind == "one_step":
        out["ms"] = best(lambda: r.restore(img, t0=199, seed=0, tile=tile))
    else:
        k = int(kind.split("_")[1])
        out["ms"] = best(lambda: r.img2img(img, t0=199, steps=k, seed=0, tile=tile))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["rss_before_gb"] = rss0 / 2**20
    out["model"] = meta
    return out


def run_case(args, kind, h, w, tile):
    repeats = args.repeats if h * w > 256 * 256 else max(args.repeats, 20)  # small cases are noisy: more repeats
    cmd = [sys.executable, __file__, "--case", json.dumps([kind, h, w, tile]), "--repeats", str(repeats),
           "--device", args.device] + (["--base-model", args.base_model] if args.base_model else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"case {kind} {h}x{w} failed:\n{r.stderr[-2000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("CASE ")][-1]
    return json.loads(line[5:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default=str(ROOT / "data/cpu/prior"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tile", type=int, default=64, help="latent tile for 960x640")
    ap.add_argument("--quick", action="store_true", help="K = 5 only, 3 repeats")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "restore.json"))
    args = ap.parse_args()
    if args.case:
        kind, h, w, tile = json.loads(args.case)
        print("CASE " + json.dumps(case(kind, h, w, tile, args.repeats, args.base_model, args.device)), flush=True)
        return
    import torch

    from nifi_utils.core.common import provenance

    if args.quick:
        args.repeats = 3
    ks = [5] if args.quick else [5, 10, 20]
    results = []
    for (h, w, tile) in [(128, 128, None), (640, 960, args.tile)]:
        for kind in ["parts", "one_step"] + [f"img2img_{k}" for k in ks]:
            row = run_case(args, kind, h, w, tile)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "model"}), flush=True)
    summary = {}
    for (h, w) in [(128, 128), (640, 960)]:
        rows = {r["kind"]: r for r in results if (r["h"], r["w"]) == (h, w)}
        one = rows["one_step"]["ms"]
        s = {"one_step_ms": one, "parts_sum_ms": rows["parts"]["sum_ms"],
             "one_step_over_parts": rows["parts"]["one_step_same_process_ms"] / rows["parts"]["sum_ms"],
             "vae_share_of_parts": (rows["parts"]["vae_encode_ms"] + rows["parts"]["vae_decode_ms"]) / rows["parts"]["sum_ms"],
             "one_step_peak_rss_gb": rows["one_step"]["peak_rss_gb"]}
        for k in ks:
            s[f"speedup_vs_img2img_{k}"] = rows[f"img2img_{k}"]["ms"] / one
        summary[f"{h}x{w}"] = s
    checks = {
        "one_step_at_most_1.1x_parts": all(v["one_step_over_parts"] <= 1.1 for v in summary.values()),
        "960x640_tiled_peak_under_4gb": summary["640x960"]["one_step_peak_rss_gb"] < 4.0,
    }
    out = {"benchmark": "restore", "device": args.device, "cpu_threads": torch.get_num_threads(),
           "nproc": os.cpu_count(), "tile": args.tile, "model": results[0]["model"], "results": results,
           "summary": summary, "checks": checks, "provenance": provenance("cpu", 0, args.device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"summary": summary, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
