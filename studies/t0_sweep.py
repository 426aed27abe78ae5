"""The paper's central claim as a lab result: how the start t0 of the one-step restore trades fidelity for generation.

Distils the restorer at several t0 (w/o t0 = TSD-SR's start at sigma 1, then 399, 199, 99, 49 and the smallest
timestep the scheduler has) with everything else from the profile's `distill` section, and scores each on the
training scenes' held-out test views (never a training pair): ST-LPIPS alex (the training loss's metric),
ST-LPIPS vgg (never trained on), PSNR, SSIM and the lattice (periodic-artifact excess over the ground truth).
Beside each, the prior's own untrained one step from the same t0 (the floor distillation starts from) and the
compressed inputs. At the smallest timestep sigma_t0 equals the step's target sigma, so the Euler step is zero
and only the encoder's LoRA can act (a restorer that is a fine-tuned autoencoder round trip).

Writes studies/results/t0_sweep.json and t0_sweep.png. `--untrained-only` scores only the prior's own one step
at each t0 (seconds, no distillation), e.g. to compare another prior folder (`--base-model`) with the stage's.

    python studies/t0_sweep.py [--profile cpu] [--steps 300] [--t0 none,399,199,99,49,min]
    python studies/t0_sweep.py --untrained-only --base-model OTHER_PRIOR --out studies/results/OTHER.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import screening

ROOT = screening.ROOT
PANELS = [("heldout_trained", "perceptual, trained on ↓"), ("heldout_judge", "perceptual, held out (judge) ↓"),
          ("heldout_ssim", "SSIM ↑"), ("heldout_psnr", "PSNR (dB) ↑"), ("heldout_periodic_excess", "lattice excess over GT ↓")]


def parse_t0(text: str, smallest: float) -> list:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok == "none":
            out.append(None)
        elif tok == "min":
            out.append(smallest)
        else:
            try:
                v = float(tok)
            except ValueError:
                raise SystemExit(f"error: --t0 entries are numbers, 'none' or 'min', got {tok!r}") from None
            if not 0 < v <= 1000:
                raise SystemExit(f"error: t0 {v:g} is outside the scheduler's (0, 1000]")
            out.append(v)
    return out


def figure(res: dict, compressed: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(res.values())
    labels = [r["label"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.3))
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(x, [r["final"][key] for r in rows], "o-", label="distilled")
        ax.plot(x, [r["start"][key] for r in rows], "s--", color="gray", label="prior's own one step (untrained)")
        ax.axhline(compressed[key], color="k", lw=1, ls=":", label="compressed input")
        if key == "heldout_periodic_excess":
            ax.axhline(0.05, color="r", lw=0.8, ls="-.", label="target 0.05")
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_xlabel("t0 (sigma)", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("t0 sweep: distilled restorers on the training scenes' held-out views", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--t0", default="none,399,199,99,49,min")
    ap.add_argument("--lattice-weight", type=float, default=None, help="default: the profile's distill.lattice_weight")
    ap.add_argument("--base-model", default=None, help="the prior folder (default: the profile's distill.base_model)")
    ap.add_argument("--untrained-only", action="store_true", help="only the prior's own one step at each t0")
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "t0_sweep.json"))
    args = ap.parse_args(argv)

    from nifi_utils.core.common import provenance
    from nifi_utils.models.distill import DistillConfig, config_dict
    from nifi_utils.models.restorer import Restorer

    base, pairs, evaluate, compressed, p = screening.setup(args.profile, args.steps, args.eval_every, full_at_start=True)
    if args.lattice_weight is not None:
        base["lattice_weight"] = args.lattice_weight
    base_model = Path(args.base_model) if args.base_model else ROOT / p["base_model"]
    if not (base_model / "transformer" / "config.json").is_file():
        raise SystemExit(f"error: {base_model} is not a prior folder (no transformer/config.json)")
    prior = Restorer.from_pretrained(base_model)
    smallest = float(prior.scheduler.timesteps.min())
    results = {}
    print(screening.HEADER)
    print(screening.row("compressed", compressed), flush=True)
    for t0 in parse_t0(args.t0, smallest):
        _, s0, s1 = prior.schedule(t0)
        name = "wo_t0" if t0 is None else f"t0_{t0:g}"
        label = "w/o t0\n(1.0)" if t0 is None else f"{t0:.0f}\n({s0:.3f})" if t0 >= 1 else f"{t0:.2f}\n({s0:.4f})"
        cfg = DistillConfig(**{**base, "t0": t0})
        if args.untrained_only:
            r = {"start": screening.named(evaluate.scores(evaluate.restore_with(prior, t0, cfg.latent), full=True), evaluate)}
            r["final"] = r["start"]  # nothing trained: the figure's two lines coincide
        else:
            r = screening.run(name, cfg, base_model, pairs, evaluate)
        results[name] = {"t0": t0, "sigma_t0": s0, "sigma_next": s1, "label": label, **r}
        print(screening.row(f"{name} untrained", r["start"]))
        if not args.untrained_only:
            print(screening.row(f"{name} distilled", r["final"]), flush=True)
    out_json = Path(args.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    figure(results, compressed, out_json.with_suffix(".png"))
    best = min(results, key=lambda k: results[k]["final"]["heldout_judge"])
    out = {"what": __doc__.splitlines()[0], "profile": args.profile, "steps": 0 if args.untrained_only else args.steps,
           "base_model": str(base_model),
           "base_config": config_dict(DistillConfig(**base)), "n_heldout": len(evaluate.lq),
           "smallest_timestep": smallest, "compressed": compressed, "results": results,
           "judge": evaluate.judge, "trained": evaluate.trained, "best_on_heldout_judge": best, "provenance": provenance(args.profile, 0, "cpu")}
    out_json.write_text(json.dumps(out, indent=1))
    print(f"best t0 on {evaluate.judge} (held out): {best}\n-> {out_json} and {out_json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
