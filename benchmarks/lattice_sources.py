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
import time
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

    import torch

    from nifi_utils.common import provenance, seed_everything
    from nifi_utils.distill import DistillConfig, Distiller, PairSet, config_dict, heldout_pairs
    from nifi_utils.metrics import periodic_artifact, stlpips
    from nifi_utils.params import load_params
    from nifi_utils.restorer import Restorer

    p = load_params(ROOT / "params.yaml")["distill"][args.profile]
    fields = set(DistillConfig.__dataclass_fields__)
    base = {k: v for k, v in p.items() if k in fields} | {"steps": args.steps, "eval_every": args.eval_every,
                                                          "checkpoint_every": 10**9, "seed": 0}
    data = ROOT / "data" / args.profile
    pairs = PairSet.from_pairs_dir(data / "pairs")
    lq, hq, _ = heldout_pairs(data / "renders", sorted({m[0] for m in pairs.meta}), p["eval_views"])
    gt_periodic = periodic_artifact(hq)
    results = {"compressed": {"heldout_stlpips": float(stlpips(lq, hq).mean()),
                              "heldout_periodic_excess": float((periodic_artifact(lq) - gt_periodic).mean())}}
    for name in args.variants.split(","):
        cfg = DistillConfig(**{**base, **VARIANTS[name]})
        seed_everything(0)
        d = Distiller(Restorer.from_pretrained(ROOT / p["base_model"]), cfg)

        def evaluate(d):
            with torch.no_grad():
                out = torch.cat([d.r.restore(lq[i:i + 8], t0=d.cfg.t0, seed=0, sample=d.cfg.latent == "sample")
                                 for i in range(0, len(lq), 8)])
            return {"heldout_stlpips": float(stlpips(out, hq).mean()),
                    "heldout_periodic_excess": float((periodic_artifact(out) - gt_periodic).mean())}

        t = time.time()
        d.history.append({"step": 0, **evaluate(d)})
        d.train(pairs, cfg.steps, evaluate=evaluate, desc=name)
        if d.history[-1].get("heldout_stlpips") is None:
            d.history[-1].update(evaluate(d))
        curve = [{k: h[k] for k in ("step", "heldout_stlpips", "heldout_periodic_excess") if k in h}
                 for h in d.history if "heldout_stlpips" in h]
        results[name] = {"overrides": VARIANTS[name], "seconds": round(time.time() - t, 1), "curve": curve}
        print(f"{name}: {curve[-1]}  ({time.time() - t:.0f} s)")
    out = {"what": __doc__.splitlines()[0], "profile": args.profile, "steps": args.steps, "base_config": config_dict(DistillConfig(**base)),
           "n_heldout": len(lq), "results": results, "provenance": provenance(args.profile, 0, "cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
