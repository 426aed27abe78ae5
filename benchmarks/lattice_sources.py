"""Where does a restorer's lattice come from? Each loss term of NiFi's distillation on its own.

Trains short distillation runs from the same prior, pairs and seed, one per variant, switching single
terms off: `nifi` (all terms), `no_tsd` (no distribution matching), `no_perc` (no perceptual term),
`l2_only` (latent l2 alone), and two candidate fixes (`tsd_t_le_875`: distribution matching only at
scheduler indices >= 300, i.e. t <= 875, none at the highest noise; `perc_vgg`: ST-LPIPS on VGG
features), and records, every `--eval-every` steps, the held-out ST-LPIPS and the
periodic-artifact excess over the ground truth (`nifi_utils.metrics.periodic_artifact`) of the
restored training-scene test views. Base configuration: `distill.<profile>` of params.yaml.
Writes benchmarks/results/lattice_sources.json.

    python benchmarks/lattice_sources.py [--profile cpu] [--steps 600] [--variants nifi,no_tsd,no_perc,l2_only]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"nifi": {}, "no_tsd": {"tsd_weight": 0.0}, "no_perc": {"perceptual_weight": 0.0},
            "l2_only": {"tsd_weight": 0.0, "perceptual_weight": 0.0},
            # candidate fixes inside the method: no distribution matching at the highest noise levels (scheduler
            # index < 300, t > 875: where this prior's score draws blocky patchworks), the perceptual term on VGG
            "tsd_t_le_875": {"t_index_min": 300}, "perc_vgg": {"perceptual": "stlpips_vgg"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--variants", default="nifi,no_tsd,no_perc,l2_only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lattice_sources.json"))
    args = ap.parse_args(argv)

    import tempfile

    from nifi_utils.common import provenance
    from nifi_utils.distill import DistillConfig, HeldoutEval, PairSet, config_dict, heldout_pairs, train_variant
    from nifi_utils.metrics import periodic_artifact, stlpips
    from nifi_utils.params import load_params

    p = load_params(ROOT / "params.yaml")["distill"][args.profile]
    fields = set(DistillConfig.__dataclass_fields__)
    base = {k: v for k, v in p.items() if k in fields} | {"steps": args.steps, "eval_every": args.eval_every,
                                                          "checkpoint_every": 10**9, "seed": 0}
    data = ROOT / "data" / args.profile
    pairs = PairSet.from_pairs_dir(data / "pairs")
    lq, hq, lv = heldout_pairs(data / "renders", sorted({m[0] for m in pairs.meta}), p["eval_views"])
    # each variant is scored with the latent mode it trains with (the distill stage's curves sample)
    evaluate = HeldoutEval(lq, hq, lv, seed=0, sample=None)
    results = {"compressed": {"heldout_stlpips": float(stlpips(lq, hq).mean()),
                              "heldout_periodic_excess": float((periodic_artifact(lq) - evaluate.gt_periodic).mean())}}
    for name in args.variants.split(","):
        cfg = DistillConfig(**{**base, **VARIANTS[name]})
        with tempfile.TemporaryDirectory() as tmp:  # the same training path as the stage, nothing kept
            run = train_variant(name, cfg, ROOT / p["base_model"], Path(tmp) / "ckpt", Path(tmp) / f"{name}.pt",
                                pairs, evaluate)
        curve = [{k: h[k] for k in ("step", "heldout_stlpips", "heldout_periodic_excess") if k in h}
                 for h in run["history"] if "heldout_stlpips" in h]
        results[name] = {"overrides": VARIANTS[name], "seconds": round(run["result"]["seconds"], 1), "curve": curve}
        print(f"{name}: {curve[-1]}")
    out = {"what": __doc__.splitlines()[0], "profile": args.profile, "steps": args.steps, "base_config": config_dict(DistillConfig(**base)),
           "n_heldout": len(lq), "results": results, "provenance": provenance(args.profile, 0, "cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
