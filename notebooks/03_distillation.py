# %% [markdown]
# # 03 · NiFi distillation: training the one-step restorer
#
# **Purpose.** The paper's contribution (§3, Eqs. 1, 4-8), which the authors did not release:
# artifact-aware distribution-matching distillation of the prior into a one-step restorer, and the baseline
# it must beat.
# - Generator $\phi^-$: LoRA on the transformer and the VAE encoder (the official lists); with `vae_lora:
#   encoder_decoder` (cpu) on the decoder too. It restores in one step from the degraded latent noised to $t_0$:
#   $\hat x = \tilde x_{t_0} - (\sigma_{t_0} - \sigma_{next})\, v_{\phi^-}(\tilde x_{t_0}, t_0)$.
# - Critic $\phi^+$: a LoRA on a frozen copy of the transformer, trained by the flow-matching loss on the
#   (detached) restored latents (Eq. 8); the frozen prior is the real score.
# - Generator loss (Eq. 6): target-score distillation (TSD-SR, Eq. 5, $\alpha = 0.7$, CFG on both scores)
#   through the stop-gradient MSE trick, plus latent $\ell_2$ and a perceptual term (`perceptual`), plus (beyond
#   the paper, `lattice_weight`) an $\ell_2$ on the latent grid's harmonics of (restored $-$ clean) in pixels:
#   every other term lets the restorer paint an 8-px lattice into flat regions.
# - **Judged on what it never sees.** Two ST-LPIPS networks exist offline; the restorers train on one
#   (`perceptual`, vgg on cpu) and are judged on the other (`judge`, alex), beside PSNR, SSIM, the lattice score and
#   the detail they add where the ground truth is flat (`flat_excess`). A restorer can lower the metric it trains
#   on through a cheap direction (here the latent grid) without restoring anything, and such a gain does not
#   carry over to the other network. The judge is derived from `perceptual` in one place
#   (`judge_metric`), so changing the loss can never leave the judge trained on.
# - **The baseline it must beat**: `regression`, a 0.48 M-parameter residual U-Net trained on the same pairs,
#   crops, batch, steps, seed and data loss (SwinIR's role in Table 1). A diffusion restorer that loses to a
#   plain regression network at equal distortion has not earned its prior.
# - Variants: `nifi`, `nifi_wo_t0` (one Euler step from $\sigma = 1$ on the clean degraded latent, Table 1's
#   last row), `nifi_no_tsd` ($\ell_2$ + perceptual only: what distribution matching adds) and `regression`.
#
# **Inputs.** `data/<profile>/pairs/` (synthesis), `data/<profile>/prior/` (prior),
# `data/<profile>/renders/train_*` (held-out test views of training scenes).
# **Outputs.** `data/<profile>/restorer/<variant>.pt` (official checkpoint format),
# `reports/<profile>/distill.json`, `reports/<profile>/distill_curves.csv` (DVC plots),
# `reports/<profile>/figures/distill_examples.png`.
#
# **Runtime.** The variants train side by side in `workers` processes, one thread each (on `cpu` three variants
# share the two cores, so none waits alone at the end); starting the worker processes is a fixed cost of its own,
# visible on `tiny`. The last cell prints this run's time, and `reports/<profile>/timings.json` keeps the last run
# of every stage. `paper`: SD3-medium, 60k steps at batch 4, GPU only.

# %% tags=["parameters"]
profile = "tiny"
seed = 0
base_model = "data/tiny/prior"
variants = ["nifi", "nifi_wo_t0", "regression"]
rank = 4
critic_rank = 4
t0 = 199
alpha = 0.7
cfg_scale = 7.5
tsd_weight = 1.0
l2_weight = 1.0
perceptual_weight = 1.0
perceptual = "stlpips_vgg"
vae_lora = "encoder_decoder"
lattice_weight = 1.0
t_index_min = 50
t_index_max = 950
critic_loss = "flow"
latent = "sample"
lr_g = 0.001
lr_c = 0.001
weight_decay = 0.0001
grad_clip = 1.0
steps = 10
batch = 2
crop = 48
prompt_dropout = 0.1
grad_accum = 1
checkpoint_every = 5
eval_every = 5
mixed_precision = "no"
eval_views = 8
workers = 1
processes = 1
regression_width = 32
regression_lr = 0.0005

# %%
import hashlib
import json
import resource
import shutil
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from nifi_utils.core.common import pick_device, provenance, repo_path
from nifi_utils.models.distill import (DistillConfig, HeldoutEval, PairSet, config_dict, heldout_pairs, judge_metric,
                                launch_variants, train_variants)
from nifi_utils.pipeline.lab import require_inputs
from nifi_utils.core.launch import check_processes
from nifi_utils.measure.metrics import METRIC_BACKENDS, image_metrics
from nifi_utils.models.regression import RegressionConfig, load_regression
from nifi_utils.models.restorer import Restorer

require_inputs("distill", profile)  # an upstream output missing: one line naming what to run first, nothing written
judge = judge_metric(perceptual)  # the held-out judge: the perceptual network no restorer here trains on
print(f"trained on {perceptual}; judged on {judge} (held out)")

out_dir = repo_path("data", profile, "restorer")
ckpt_root = repo_path("data", profile, "distill_checkpoints")  # not a DVC output: survives an interruption
report_path = repo_path("reports", profile, "distill.json")
curves_path = repo_path("reports", profile, "distill_curves.csv")
fig_path = repo_path("reports", profile, "figures", "distill_examples.png")
out_dir.mkdir(parents=True, exist_ok=True)
fig_path.parent.mkdir(parents=True, exist_ok=True)
device = pick_device("auto")
processes = check_processes(processes)  # more than the GPUs (or cores) here: one line, before any work
t_start = time.time()
pairs = PairSet.from_pairs_dir(repo_path("data", profile, "pairs"))
print(f"{len(pairs.lq)} training pairs from {len({m[0] for m in pairs.meta})} scenes")

# %% [markdown]
# ## Held-out pairs
# The training scenes' *test* views (every 8th), compressed at every level: never used for training.

# %%
train_scenes = sorted({m[0] for m in pairs.meta})  # the training split, whatever the scenes are called
held_lq, held_hq, held_lv = heldout_pairs(repo_path("data", profile, "renders"), train_scenes, eval_views)
levels = sorted(set(held_lv.tolist()))
# held-out ST-LPIPS per level and the lattice a restorer paints (its periodic-artifact score minus the GT's), per eval
# step; at the end also ST-LPIPS vgg, PSNR and SSIM, which no variant trains on. Each variant is scored with the
# latent mode it trains with and the benchmark restores with (`latent`: the posterior's mean on cpu, a sample on paper)
evaluate = HeldoutEval(held_lq, held_hq, held_lv, seed, sample=None, trained=perceptual, judge=judge)
compressed_scores = evaluate.scores(held_lq, full=True)
print({k: round(v, 4) for k, v in compressed_scores.items()}, "(compressed)")


# %% [markdown]
# ## The regression baseline, as a lesson of its own
# What a plain network does with the same supervision. `RegressionUNet` (`nifi_utils/models/regression.py`):
# - a U-Net with features at full, 1/2 and 1/4 resolution (width 32, 64, 128; two 3x3 convolutions per level,
#   SiLU), skip connections at every resolution, and a residual output $\hat I = \tilde I + f(\tilde I)$ whose
#   last convolution starts at zero, so training starts from the compressed render itself;
# - every convolution pads by *reflection* and inputs are reflected up to a multiple of 4: zero padding makes the
#   network paint a frame along the border;
# - trained with AdamW (`regression_lr`, cosine decay to 0) on pixel $\ell_2$ + `perceptual`, NiFi's pairs, crops,
#   batch, steps and seed stream: the only difference from NiFi is the model.
# It sees the input at full resolution, where the detail of a 128-px render lives (1-4 px); NiFi restores through
# a 4x-down latent, which is why the cpu profile adapts the decoder too.

# %%
from nifi_utils.models.regression import RegressionUNet

print(RegressionUNet(regression_width))
print(f"{sum(p.numel() for p in RegressionUNet(regression_width).parameters()) / 1e6:.2f} M parameters")

# %% [markdown]
# ## Train the variants
# One `Distiller` per variant from the same prior and seed; a checkpoint every `checkpoint_every` steps
# lets an interrupted run continue (same config hash) where it stopped. Variants are independent: on CPU
# they train side by side in `workers` processes (one torch thread each: the small transformer gains only 1.2x from
# a second thread, a second variant uses a core of its own); each seeds itself from `seed`, so results do not
# depend on `workers`.
# With `processes` > 1 each variant trains on that many ranks through `accelerate launch` (DDP). `batch` stays the
# pairs per optimizer step: every rank draws the whole batch and its noise from the one stream `seed` starts and
# trains on its share (batch / processes pairs), the LoRA gradients are averaged, so the trajectory is one process's
# up to float rounding; the main process evaluates, checkpoints and exports, and a checkpoint resumes on any number
# of processes.

# %%
base_cfg = dict(rank=rank, critic_rank=critic_rank, t0=t0, alpha=alpha, cfg_scale=cfg_scale, tsd_weight=tsd_weight,
                l2_weight=l2_weight, perceptual_weight=perceptual_weight, perceptual=perceptual, lattice_weight=lattice_weight,
                t_index_min=t_index_min, t_index_max=t_index_max, critic_loss=critic_loss, latent=latent, lr_g=lr_g,
                lr_c=lr_c, weight_decay=weight_decay, grad_clip=grad_clip, steps=steps, batch=batch, crop=crop,
                prompt_dropout=prompt_dropout, grad_accum=grad_accum, checkpoint_every=checkpoint_every,
                eval_every=eval_every, mixed_precision=mixed_precision, seed=seed, vae_lora=vae_lora)
# the ablations: Table 1's w/o t0; without the distribution-matching term; without the perceptual term
VARIANTS = {"nifi": {}, "nifi_wo_t0": {"t0": None}, "nifi_no_tsd": {"tsd_weight": 0.0}, "nifi_no_perc": {"perceptual_weight": 0.0}}
# the regression baseline (SwinIR's role in Table 1): NiFi's pairs, crops, batch, steps, seed and data loss
reg_cfg = RegressionConfig(width=regression_width, lr=regression_lr, weight_decay=weight_decay, steps=steps, batch=batch,
                           crop=crop, l2_weight=l2_weight, perceptual_weight=perceptual_weight, perceptual=perceptual,
                           eval_every=eval_every, seed=seed)
jobs = []
for name in [v for v in variants if v == "regression"]:
    jobs.append({"name": name, "cfg": reg_cfg, "out_path": str(out_dir / "regression.pt"), "pairs": pairs,
                 "evaluate": evaluate, "device": str(device)})
for name in [v for v in variants if v != "regression"]:
    cfg = DistillConfig(**{**base_cfg, **VARIANTS[name]})
    key = hashlib.sha1(json.dumps([config_dict(cfg), base_model], sort_keys=True).encode()).hexdigest()[:12]
    jobs.append({"name": name, "cfg": cfg, "base_model": str(repo_path(base_model)), "ckpt": str(ckpt_root / f"{name}-{key}"),
                 "out_path": str(out_dir / f"{name}.pt"), "pairs": pairs, "evaluate": evaluate, "device": str(device)})
nifi_jobs = [j for j in jobs if j["name"] != "regression"]
reg_jobs = [j for j in jobs if j["name"] == "regression"]
# heaviest first, so the cheap regression baseline fills a core at the end
done = (launch_variants(nifi_jobs, processes) + train_variants(reg_jobs, 1) if processes > 1
        else train_variants(nifi_jobs + reg_jobs, workers if device.type == "cpu" else 1))
results = {r["name"]: r["result"] for r in done}
curves = [{"variant": r["name"], **h} for r in done for h in r["history"]]
peak_rss_gb = max(r["peak_rss_gb"] for r in done)  # the largest process (with workers, each holds its own prior)
shutil.rmtree(ckpt_root, ignore_errors=True)  # finished: checkpoints are no longer needed

# %% [markdown]
# ## Curves: every loss term, the held-out ST-LPIPS and the lattice the restorer paints
# `lattice` is the training batch's error power at the latent grid's harmonics (logged whatever its weight);
# the last panel is the periodic-artifact score of the restored held-out views minus their ground truth's,
# per evaluation step: it shows when in training a lattice appears and which loss term brings it.

# %%
cdf = pd.DataFrame(curves)
cdf["heldout_judge"] = cdf[f"heldout_{judge}"]  # the DVC plot's y (dvc.yaml), whichever network judges
cdf.to_csv(curves_path, index=False)
CURVES = ["loss_g", "l_kl", "loss_c", "lattice", "heldout_judge", "heldout_periodic_excess"]
fig, axes = plt.subplots(1, len(CURVES), figsize=(24, 3.2))
for name, g in cdf.groupby("variant"):
    for ax, col in zip(axes, CURVES):
        if col in g and g[col].notna().any():
            s = g[["step", col]].dropna()
            ax.plot(s["step"], s[col].rolling(5, min_periods=1).mean() if not col.startswith("heldout") else s[col],
                    label=name, marker="o" if col.startswith("heldout") else None, ms=3)
for ax, col in zip(axes, ["generator loss", "TSD term L_KL", "critic loss", "lattice-harmonic error (batch)",
                          f"held-out {judge} (never trained on)", "held-out periodic-artifact excess over GT"]):
    ax.set_title(col, fontsize=9), ax.set_xlabel("step", fontsize=8), ax.legend(fontsize=7)
axes[4].axhline(compressed_scores[f"heldout_{judge}"], color="k", ls="--", lw=1, label="compressed")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Restored held-out examples (one per rate)

# %%
idx = [int(np.flatnonzero(held_lv == lv)[0]) for lv in levels]
rows = []
for name in variants:
    if name == "regression":
        rows.append((name, load_regression(out_dir / "regression.pt").restore(held_lq[idx])))
        continue
    r = Restorer.from_pretrained(repo_path(base_model), device=device).load_lora(out_dir / f"{name}.pt")
    use = r.restore_defaults()  # the t0 and latent mode the checkpoint says it was trained with
    rows.append((name, r.restore(held_lq[idx], t0=use["t0"], seed=seed, sample=use["sample"])))
panels = [("compressed", held_lq[idx])] + rows + [("ground truth", held_hq[idx])]
fig, axes = plt.subplots(len(levels), len(panels), figsize=(2.3 * len(panels), 2.4 * len(levels)), squeeze=False)
for c, (name, ims) in enumerate(panels):
    score = image_metrics(ims, held_hq[idx], [judge])[judge]
    for rr, lv in enumerate(levels):
        axes[rr, c].imshow(ims[rr].permute(1, 2, 0).numpy())
        axes[rr, c].axis("off")
        axes[rr, c].set_title(f"{name}\nlevel {lv}, {judge} {score[rr]:.3f}" if name != "ground truth"
                              else f"ground truth, level {lv}", fontsize=7)
fig.tight_layout()
fig.savefig(fig_path, dpi=110)
plt.show()

# %% [markdown]
# ## Checks and report
# Target (cpu profile): restored held-out renders beat the compressed ones at every rate on the metric they train
# on *and* on the held-out judge. The table puts every final score beside the
# compressed inputs'; the benchmark stage decides the same on the evaluation scenes with intervals.

# %%
checks = {}
for name in variants:
    fin = results[name]["final"]
    for lv in levels:
        for key in (judge, perceptual):
            k = f"heldout_{key}_level{lv}"
            checks[f"{name}_beats_compressed_{key}_level{lv}"] = bool(fin[k] < compressed_scores[k])
for k, v in checks.items():
    print(f"{'PASS' if v else 'FAIL'}  {k}")
cols = [f"heldout_{judge}", f"heldout_{perceptual}", "heldout_psnr", "heldout_ssim", "heldout_periodic_excess",
        "heldout_flat_excess"]
print(pd.DataFrame({"compressed": compressed_scores} | {n: results[n]["final"] for n in variants})
      .T[cols].round(4).rename(columns=lambda c: c[8:]).to_string())
report = {"variants": results, "perceptual": perceptual, "judge": judge,
          "compressed_heldout": compressed_scores,
          "checks": checks, "n_pairs": len(pairs.lq), "n_heldout": len(held_lq), "base_model": base_model,
          "metric_backends": {k: METRIC_BACKENDS[k] for k in (perceptual, judge, "psnr", "ssim", "periodic", "flat_excess")},
          "peak_rss_gb": max(peak_rss_gb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
          "workers": workers, "processes": processes,
          "seconds": round(time.time() - t_start, 1), "provenance": provenance(profile, seed, device)}
report_path.write_text(json.dumps(report, indent=1, default=str))
print(f"stage time {time.time() - t_start:.0f} s, peak RSS {report['peak_rss_gb']:.2f} GB")
