"""Short distillations side by side, for the screening scripts (`lattice_sources.py`, `t0_sweep.py`).

Every variant trains from the same prior, pairs and seed through the distill stage's own path
(`nifi_utils.models.distill.train_variant`), on the profile's `distill` section with a few overrides, and is scored
on the training scenes' held-out test views with the held-out judge (the ST-LPIPS network the profile does not
train on), the metric it trains on, PSNR, SSIM, the lattice it paints (periodic-artifact excess over the ground
truth) and the detail it adds where the ground truth is flat.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLUMNS = ("heldout_judge", "heldout_trained", "heldout_psnr", "heldout_ssim", "heldout_periodic_excess",
           "heldout_flat_excess")


def named(scores: dict, evaluate) -> dict:
    """`scores` with the judge's and the trained metric's columns also under the generic names of COLUMNS."""
    return scores | {f"heldout_{role}": scores[f"heldout_{getattr(evaluate, role)}"]
                     for role in ("judge", "trained") if f"heldout_{getattr(evaluate, role)}" in scores}


def setup(profile: str, steps: int, eval_every: int, full_at_start: bool = False):
    """(base config dict, pairs, HeldoutEval, the compressed inputs' scores, params section)."""
    from nifi_utils.models.distill import DistillConfig, HeldoutEval, PairSet, heldout_pairs
    from nifi_utils.pipeline.params import stage_params

    p = stage_params("distill", profile)
    fields = set(DistillConfig.__dataclass_fields__)
    base = {k: v for k, v in p.items() if k in fields} | {"steps": steps, "eval_every": eval_every,
                                                          "checkpoint_every": 10**9, "seed": 0}
    data = ROOT / "data" / profile
    pairs = PairSet.from_pairs_dir(data / "pairs")
    lq, hq, lv = heldout_pairs(data / "renders", sorted({m[0] for m in pairs.meta}), p["eval_views"])
    # each variant is scored with the latent mode it trains with (the distill stage's curves sample)
    evaluate = HeldoutEval(lq, hq, lv, seed=0, sample=None, full_at_start=full_at_start, trained=p["perceptual"])
    compressed = named(evaluate.scores(lq, full=True), evaluate)
    return base, pairs, evaluate, compressed, p


def run(name: str, cfg, base_model: Path, pairs, evaluate) -> dict:
    """Train one variant (nothing kept on disk); its curve and its first and last full evaluations."""
    from nifi_utils.models.distill import train_variant

    with tempfile.TemporaryDirectory() as tmp:
        out = train_variant(name, cfg, base_model, Path(tmp) / "ckpt", Path(tmp) / f"{name}.pt", pairs, evaluate)
    hist = out["history"]
    hist = [named(h, evaluate) for h in hist]
    curve = [{k: h[k] for k in ("step", "lattice", *COLUMNS) if k in h} for h in hist if "heldout_judge" in h]
    final = {k: v for k, v in hist[-1].items() if k.startswith("heldout_")}
    start = {k: v for k, v in hist[0].items() if k.startswith("heldout_")}
    return {"seconds": round(out["result"]["seconds"], 1), "start": start, "final": final, "curve": curve}


def row(name: str, scores: dict) -> str:
    """One printed line: judge, trained metric, PSNR, SSIM, lattice excess, flat-region excess."""
    f = [scores.get(c) for c in COLUMNS]
    return f"{name:28s} " + "  ".join("   -  " if v is None else f"{v:6.3f}" if abs(v) < 10 else f"{v:6.2f}" for v in f)


HEADER = f"{'variant':28s} {'judge':>6s}  {'trained':>6s}  {'PSNR':>6s}  {'SSIM':>6s}  {'lattice':>7s}  {'flat':>6s}"
