"""Where does a restorer's lattice come from, and what removes it without losing fidelity? One command.

Short distillation runs from the same prior, pairs and seed, one per variant (the profile's `distill` section
with single overrides), scored on the training scenes' held-out test views: ST-LPIPS alex (the
training loss's metric), ST-LPIPS vgg (never trained on), PSNR, SSIM and the periodic-artifact excess over the
ground truth (`nifi_utils.measure.metrics.periodic_artifact`; 0: no lattice), every `--eval-every` steps for alex and
the lattice, at the start and the end for all. The compressed inputs are the row to beat.

Variants (overrides of the base config): the loss terms one by one (`no_tsd`, `no_perc`, `l2_only`), the
lattice term (`lattice_w<W>`: `lattice_weight` W), smaller t0 with and without it, and the LoRA rank.
Writes studies/results/lattice_sources.json.

    python studies/lattice_sources.py [--profile cpu] [--steps 300] [--variants nifi,lattice_w1,...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import screening

ROOT = screening.ROOT

VARIANTS = {
    "nifi": {"lattice_weight": 0.0},
    "no_tsd": {"lattice_weight": 0.0, "tsd_weight": 0.0},
    "no_perc": {"lattice_weight": 0.0, "perceptual_weight": 0.0},
    "l2_only": {"lattice_weight": 0.0, "tsd_weight": 0.0, "perceptual_weight": 0.0},
    "perc_vgg": {"lattice_weight": 0.0, "perceptual": "stlpips_vgg"},  # trains on the held-out metric: a reference only
    "lattice_w1": {"lattice_weight": 1.0},
    "lattice_w5": {"lattice_weight": 5.0},
    "lattice_w20": {"lattice_weight": 20.0},
    "t0_99": {"lattice_weight": 0.0, "t0": 99},
    "t0_49": {"lattice_weight": 0.0, "t0": 49},
    "t0_99_lattice_w5": {"lattice_weight": 5.0, "t0": 99},
    "t0_49_lattice_w5": {"lattice_weight": 5.0, "t0": 49},
    "t0_49_lattice_w20": {"lattice_weight": 20.0, "t0": 49},
    "lattice_w1_l2x4": {"lattice_weight": 1.0, "l2_weight": 4.0},
    "rank64": {"lattice_weight": 0.0, "rank": 64, "critic_rank": 64},
    # which VAE modules phi- adapts and which network it trains on (the profile's: decoder LoRA, vgg)
    "recipe": {},
    "encoder_only": {"vae_lora": "encoder"},
    "recipe_no_tsd": {"tsd_weight": 0.0},
    "recipe_wo_t0": {"t0": None},
    "recipe_no_lattice": {"lattice_weight": 0.0},
}
# what studies/results/lattice_sources.json holds (the screen behind the cpu profile's lattice_weight and t0)
DEFAULT = "nifi,lattice_w5,lattice_w20,t0_49,t0_49_lattice_w5,t0_49_lattice_w20"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "lattice_sources.json"))
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    from nifi_utils.core.common import provenance
    from nifi_utils.models.distill import DistillConfig, config_dict

    base, pairs, evaluate, compressed, p = screening.setup(args.profile, args.steps, args.eval_every)
    results = {"compressed": {"final": compressed}}
    print(screening.HEADER)
    print(screening.row("compressed", compressed), flush=True)
    for name in names:
        cfg = DistillConfig(**{**base, **VARIANTS[name]})
        results[name] = {"overrides": VARIANTS[name], **screening.run(name, cfg, ROOT / p["base_model"], pairs, evaluate)}
        print(screening.row(name, results[name]["final"]), flush=True)
    out = {"what": __doc__.splitlines()[0], "profile": args.profile, "steps": args.steps,
           "base_config": config_dict(DistillConfig(**base)), "n_heldout": len(evaluate.lq),
           "columns": {"heldout_judge": f"{evaluate.judge} (held out: never a training loss)",
                       "heldout_trained": f"{evaluate.trained} (the training loss's metric)", "heldout_psnr": "PSNR dB",
                       "heldout_ssim": "SSIM", "heldout_periodic_excess": "periodic-artifact score minus the GT's",
                       "heldout_flat_excess": "detail added where the GT is flat (RMS high-pass minus the GT's)"},
           "results": results, "provenance": provenance(args.profile, 0, "cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
