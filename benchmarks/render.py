"""Render benchmark: tiled CPU rasterizer against the dense reference, side by side in one run.

For N in {2k, 8k, 32k} Gaussians (procedural scenes, an orbit view) at 64², 128², 256²: forward
and forward+backward time (median of repeats) and peak memory, each case in a fresh subprocess
(peak RSS above the process's resident size before the call). The dense reference runs wherever
its N x H x W tensors fit the memory limit. Writes benchmarks/results/render.json with the targets:
32k Gaussians at 128² forward+backward < 1 s and < 1.5 GB; >= 10x faster than dense where it runs.

    python benchmarks/render.py [--quick] [--out FILE]
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
DENSE_LIMIT_GB = 8.0


def case(method: str, n: int, res: int, backward: bool, repeats: int) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT / "tests"))  # the dense reference lives with the tests it checks
    from dense_raster import rasterization_dense

    from nifi_utils.gs.render import rasterization
    from nifi_utils.gs.scenes import SceneSpec, generate_scene

    scene, cams = generate_scene(SceneSpec("bench", 1234, "train", n, 8, res, res))
    cam = cams[1]
    vm, K = cam.viewmat()[None], cam.K()[None]
    fn = rasterization if method == "tiled" else rasterization_dense
    params = [t.clone().requires_grad_(backward) for t in (scene.means, scene.quats, scene.scales, scene.opacities, scene.sh)]

    def once():
        with torch.set_grad_enabled(backward):
            c, a, _ = fn(*params, vm, K, res, res, sh_degree=3)
            if backward:
                (c.sum() + a.sum()).backward()

    with open("/proc/self/statm") as f:  # resident size (kB) before the first call
        cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    once()  # warm-up (its peak counts: it is the same call)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mem_gb": (max(peak, rss0) - cur) / 1e6,
            "process_peak_gb": max(peak, rss0) / 1e6}


def run_child(method, n, res, backward, repeats):
    code = (f"import json,sys; sys.path.insert(0,{str(ROOT)!r}); sys.path.insert(0,{str(ROOT / 'benchmarks')!r}); "
            f"import render as b; print('RESULT'+json.dumps(b.case({method!r},{n},{res},{backward},{repeats})))")
    env = dict(os.environ, NIFI_QUIET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT")), None)
    if r.returncode != 0 or line is None:
        return {"error": (r.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(line[6:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only 32k at 128² (the target case)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "render.json"))
    args = ap.parse_args()
    import torch

    grid = [(32000, 128)] if args.quick else [(n, r) for n in (2000, 8000, 32000) for r in (64, 128, 256)]
    rows = []
    for n, res in grid:
        row = {"n_gaussians": n, "resolution": res}
        for backward in (False, True):
            key = "fwd_bwd" if backward else "fwd"
            row[f"tiled_{key}"] = run_child("tiled", n, res, backward, args.repeats)
            dense_gb = n * res * res * 4 * (14 if backward else 6) / 1e9
            if dense_gb <= DENSE_LIMIT_GB:
                row[f"dense_{key}"] = run_child("dense", n, res, backward, max(1, args.repeats // 2))
            else:
                row[f"dense_{key}"] = {"skipped": f"needs ~{dense_gb:.0f} GB"}
            d, t = row[f"dense_{key}"], row[f"tiled_{key}"]
            if "seconds" in d and "seconds" in t:
                row[f"speedup_{key}"] = d["seconds"] / t["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    target = next((r for r in rows if r["n_gaussians"] == 32000 and r["resolution"] == 128), None)
    checks = {}
    if target:
        fb = target["tiled_fwd_bwd"]
        checks["32k_128_fwd_bwd_under_1s"] = fb.get("seconds", 1e9) < 1.0
        checks["32k_128_fwd_bwd_under_1.5GB"] = fb.get("peak_mem_gb", 1e9) < 1.5
    speedups = [r[k] for r in rows for k in ("speedup_fwd", "speedup_fwd_bwd") if k in r]
    if speedups:
        checks["at_least_10x_faster_than_dense_where_it_runs"] = min(speedups) >= 10
    out = {"benchmark": "render", "cpu_threads": torch.get_num_threads(), "nproc": os.cpu_count(),
           "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "targets": checks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(checks, indent=1))
    print(f"wrote {args.out}")
    errors = [v["error"] for r in rows for v in r.values() if isinstance(v, dict) and "error" in v]
    if errors:
        sys.exit(f"error: {len(errors)} benchmark cases failed, first: {errors[0]}")


if __name__ == "__main__":
    main()
