"""Scaling benchmark: one process with 2 torch threads against 2 ranks with 1 thread each (`accelerate launch`, gloo)
on the same machine, for distillation (steps/s and pairs/s at the same global batch: 2 ranks take `batch` / 2 pairs
each) and synthesis (scenes/min). Sizes from the profile's `distill` and `synthesis` sections; the inputs are made here, not the
stages' (a tiny random prior of the SD3 architecture, procedural pairs and scenes), so it runs without the pipeline.
Writes benchmarks/results/scaling.json. The committed result: the cpu profile's sizes with the stage's own prior,
the distillation part re-measured once `batch` became the global batch,

    python benchmarks/scaling.py --profile cpu --steps 60 --scenes 2 --base-model data/cpu/prior
    python benchmarks/scaling.py --profile cpu --steps 120 --base-model data/cpu/prior --only distill

    python benchmarks/scaling.py [--profile tiny|cpu] [--steps N] [--scenes N] [--base-model DIR] [--out FILE]
                                 [--only distill|synthesis]   (re-measure one part, keep the other in FILE)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pairs(n: int, size: int):
    import torch

    from nifi_utils.models.distill import PairSet

    g = torch.Generator().manual_seed(0)
    hq = torch.rand(n, 3, size, size, generator=g)
    lq = torch.nn.functional.avg_pool2d(hq, 3, 1, 1)
    to8 = lambda t: (t.clamp(0, 1) * 255).round().byte()  # noqa: E731
    return PairSet(to8(lq), to8(hq), [("s", 0, str(i)) for i in range(n)])


def distill_case(profile: str, steps: int, tmp: Path, processes: int, base_model: str | None = None) -> dict:
    import torch

    from nifi_utils.models.distill import DistillConfig, launch_variants, train_variants
    from nifi_utils.models.folders import save_prior, tiny_sd3
    from nifi_utils.pipeline.params import stage_params

    p = stage_params("distill", profile)
    keys = DistillConfig.__dataclass_fields__
    cfg = DistillConfig(**{**{k: v for k, v in p.items() if k in keys}, "steps": steps, "eval_every": 0,
                           "checkpoint_every": 0})
    base = Path(base_model) if base_model else tmp / "prior"
    if not base.is_dir():
        save_prior(tiny_sd3(seed=0), base)  # a tiny random prior of the SD3 architecture
    job = {"name": f"bench{processes}", "cfg": cfg, "base_model": str(base), "ckpt": str(tmp / f"ckpt{processes}"),
           "out_path": str(tmp / f"bench{processes}.pt"), "pairs": _pairs(16, max(cfg.crop, 32)),
           "evaluate": _no_eval_picklable()}
    t = time.time()
    if processes == 1:
        torch.set_num_threads(2)
        res = train_variants([job], 1)[0]
    else:
        res = launch_variants([job], processes)[0]
    wall = time.time() - t
    train_s = res["result"]["seconds"]  # training loop only (the model load and launch are in `wall`)
    return {"processes": processes, "threads_per_process": 2 if processes == 1 else 1, "steps": steps,
            "batch": cfg.batch, "batch_per_rank": cfg.batch // processes, "train_seconds": round(train_s, 2),
            "wall_seconds": round(wall, 2), "steps_per_s": round(steps / train_s, 3),
            "pairs_per_s": round(steps * cfg.batch / train_s, 3)}


def _no_eval(d, full=False):
    """No held-out evaluation: the timing is of training alone."""
    return {"heldout_stlpips": float("nan")}


def _no_eval_picklable():
    # run as a script this module is __main__, which the ranks cannot import: hand them `scaling._no_eval`
    import scaling

    return scaling._no_eval


def synthesis_case(profile: str, n_scenes: int, tmp: Path, processes: int) -> dict:
    import torch

    from nifi_utils.pipeline.params import stage_params
    from nifi_utils.gs.scenes import SceneSpec, build_scenes
    from nifi_utils.pipeline.synthesis import SynthesisConfig, synthesize, synthesize_ranks

    sp = stage_params("synthesis", profile)
    cfg = SynthesisConfig.from_params({**sp, "anchors": []})
    sc = stage_params("scenes", profile)
    root = tmp / "scenes"
    if not root.is_dir():
        specs = [SceneSpec(f"{'train' if i % 2 == 0 else 'eval'}_{i:02d}", 100 + i, "train" if i % 2 == 0 else "eval",
                           sc["n_gaussians"], sc["n_views"], sc["width"], sc["height"]) for i in range(n_scenes)]
        build_scenes(specs, root, workers=1)
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    t = time.time()
    if processes == 1:
        torch.set_num_threads(2)
        synthesize(dirs, tmp / "out1", cfg, 0, "0/1", "cpu")
    else:
        synthesize_ranks(dirs, tmp / f"out{processes}", cfg, 0, processes)
    wall = time.time() - t
    return {"processes": processes, "threads_per_process": 2 if processes == 1 else 1, "scenes": len(dirs),
            "wall_seconds": round(wall, 2), "scenes_per_min": round(60 * len(dirs) / wall, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny", choices=["tiny", "cpu"])
    ap.add_argument("--steps", type=int, default=20, help="distillation steps per case")
    ap.add_argument("--scenes", type=int, default=4, help="procedural scenes per synthesis case")
    ap.add_argument("--base-model", default=None,
                    help="distill from this prior folder (e.g. data/cpu/prior, the stage's own) instead of a tiny random one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    ap.add_argument("--only", choices=["distill", "synthesis"], help="measure only this part; the other is kept from --out")
    args = ap.parse_args(argv)
    os.environ.setdefault("NIFI_QUIET", "1")
    # the ranks import this module (as `scaling`) and the package
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    import torch

    from nifi_utils.core.common import provenance

    old = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).is_file() else {}
    now = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="nifi-scaling-") as tmp:
        tmp = Path(tmp)
        distill = ([distill_case(args.profile, args.steps, tmp, n, args.base_model) for n in (1, 2)]
                   if args.only != "synthesis" else old.get("distill"))
        synthesis = ([synthesis_case(args.profile, args.scenes, tmp, n) for n in (1, 2)]
                     if args.only != "distill" else old.get("synthesis"))
    out = {"what": "1 process x 2 torch threads vs 2 ranks x 1 thread (accelerate launch, gloo) on this machine; "
                   "distill: steps/s of the training loop at the same global batch (2 ranks take batch_per_rank pairs "
                   "each), synthesis: scenes/min including the launch",
           "profile": args.profile, "base_model": args.base_model or "tiny random SD3-architecture prior",
           "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
           "distill": distill, "synthesis": synthesis,
           "measured_utc": {part: now if args.only in (None, part) else old.get("measured_utc", {}).get(part, "earlier")
                            for part in ("distill", "synthesis")},
           "provenance": provenance(args.profile, 0, torch.device("cpu"))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps({k: out[k] for k in ("distill", "synthesis")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
