# %% [markdown]
# # 03b · NiFi-3D: bake the restoration into the Gaussians at the receiver
#
# **Purpose.** NiFi (notebook 03) restores every rendered frame on its own: each frame costs a
# diffusion step, and neighbouring frames disagree wherever the restorer invents detail. Here the
# receiver restores *once*: it decodes the `.nifi`, renders it from cameras around the content,
# restores those renders with the one-step restorer, and fits the decoded Gaussians to them, in
# progressive rounds (Difix3D+'s 3D update, CVPR 2025, applied to a decoded bitstream). The result is
# a plain 3DGS `.ply`: it renders in milliseconds and every view comes from the same 3D model.
#
# The receiver knows only the bitstream. Cameras are **synthesised** around the decoded content (an
# orbit whose centre, up axis and radius come from the Gaussians), so no bits are added to the rate.
# Three guards keep the fit from drifting away from what was transmitted:
# - restored pixels count only where the decoded render is opaque (the restorer may paint into empty
#   background; the 3D model must not grow it), weighted by a confidence
#   $c = \exp(-|\hat x - x_{\rm dec}| / \tau)$ that trusts small corrections more than large ones;
# - the decoded renders are a low-weight L1 anchor on every pixel;
# - densification is gradient-driven (3DGS: the mean screen-space position gradient decides who is
#   cloned or split), capped at a multiple of the decoded count; nearly transparent Gaussians are pruned.
#
# **Inputs.** `data/<p>/bitstreams/` (the `.nifi` of every evaluation scene and rate), `data/<p>/records/`
# (which scenes are evaluation scenes), `data/<p>/prior/`, `data/<p>/restorer/<variant>.pt` and
# `reports/<p>/distill.json` (the variant's t0 and latent mode).
# **Outputs.** `data/<p>/refined/<scene>/<rate>.ply` (INRIA `.ply`), `reports/<p>/refine.json`,
# `reports/<p>/figures/refine_views.png`. The benchmark (notebook 04) renders the refined scenes at the
# test cameras (`nifi_3d`) and restores those renders once more per frame (`nifi_3d_plus`).
#
# **Runtime.** The (scene, rate) jobs run side by side over `workers` processes, one thread each; `paper` renders
# on a GPU (gsplat). The last cell prints this run's time, and `reports/<profile>/timings.json` keeps the last run
# of every stage.

# %% tags=["parameters"]
profile = "tiny"
seed = 0
base_model = "data/tiny/prior"
variant = "nifi"
workers = 1
device = "auto"
figure_scene = 0
config = {"rounds": 2, "steps_per_round": 6, "n_cameras": 4, "elevations_deg": [15.0, 32.0], "fov_deg": 50.0, "radius_factor": 1.6, "width": 48, "height": 48, "up": "auto", "lambda_dssim": 0.2, "anchor_weight": 0.2, "confidence_tau": 0.15, "alpha_mask": 0.5, "lr_means": 0.00032, "lr_quats": 0.001, "lr_scales": 0.01, "lr_opacity": 0.05, "lr_sh": 0.01, "densify_at": [0.5], "grad_threshold": 0.0, "grow_per_event": 0.25, "max_growth": 1.5, "split_mode": "axis", "halve_opacity": True}

# %%
import json
import shutil
import time

import matplotlib.pyplot as plt
import numpy as np

from nifi_utils.core.common import pick_device, provenance, repo_path, seed_everything
from nifi_utils.pipeline.lab import require_inputs
from nifi_utils.models.refine import (RefineConfig, content_frame, load_restorer, orbit_cameras, refine_many, render_all,
                               restore_views)

require_inputs("refine", profile)  # an upstream output missing: one line naming what to run first, nothing written
t_start = time.time()
seed_everything(seed)
dev = pick_device(device)
data = repo_path("data", profile)
records = {r["scene"]: r for r in (json.loads(p.read_text()) for p in sorted((data / "records").glob("*.json")))}
eval_scenes = [s for s, r in records.items() if r.get("split", "eval") == "eval"]
distill = json.loads(repo_path("reports", profile, "distill.json").read_text())
vcfg = distill["variants"][variant]["config"]
background = records[eval_scenes[0]]["config"]["background"]  # the synthesis stage's (the restorer trained on it)
cfg = RefineConfig.from_params({**config, "t0": vcfg["t0"], "latent": vcfg["latent"], "seed": seed, "background": background})
ckpt = data / "restorer" / f"{variant}.pt"
out_dir = data / "refined"
shutil.rmtree(out_dir, ignore_errors=True)
print(f"device {dev}; restorer {ckpt.name} (t0 {cfg.t0}, latent {cfg.latent}); {len(eval_scenes)} evaluation scenes")

# %% [markdown]
# ## What the receiver sees: synthesised cameras and their restored renders
# The content frame: the up axis is the opaque Gaussians' least-variance direction (the ground), signed
# towards the long tail (objects stand up from it); the cameras ring the content at
# `radius_factor` x its 95th-percentile horizontal extent, at two elevations. Top row: the decoded
# level rendered from some of these cameras; bottom: the same views after the one-step restorer,
# the pseudo ground truth of the first round.

# %%
from nifi_utils.codec import container as codec

s0 = eval_scenes[min(figure_scene, len(eval_scenes) - 1)]
lv0 = records[s0]["levels"][0]["level"]
scene0, _ = codec.load(data / "bitstreams" / s0 / f"level{lv0}.nifi")
frame = content_frame(scene0, cfg.up)
cams = orbit_cameras(frame, cfg)
shown = cams[:: max(1, len(cams) // 6)][:6]
rgb, alpha = render_all(scene0, shown, tuple(cfg.background))
restored = restore_views(load_restorer(repo_path(base_model), ckpt), rgb, cfg)
fig, axes = plt.subplots(2, len(shown), figsize=(1.8 * len(shown), 3.9), squeeze=False)
for c in range(len(shown)):
    axes[0, c].imshow(rgb[c].clamp(0, 1).numpy()), axes[0, c].set_title(shown[c].name, fontsize=7)
    axes[1, c].imshow(restored[c].numpy())
    for ax in axes[:, c]:
        ax.axis("off")
axes[0, 0].text(-0.1, 0.5, "decoded", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
axes[1, 0].text(-0.1, 0.5, "restored", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
fig.suptitle(f"{profile}: {s0} level{lv0}, synthesised cameras (up {np.round(frame['up'], 2).tolist()}, "
             f"extent {frame['extent']:.2f})", fontsize=8)
fig.tight_layout()
fig.savefig(repo_path("reports", profile, "figures", "refine_views.png"), dpi=110)
plt.show()

# %% [markdown]
# ## Refine every evaluation scene at every rate
# Independent jobs, spread over `workers` processes (one torch thread each on CPU: a 128² render does not
# scale over threads, two renders side by side do). Each writes `data/<p>/refined/<scene>/<rate>.ply`.

# %%
jobs = [{"scene": s, "rate": f"level{lv['level']}", "nifi": str(data / "bitstreams" / s / f"level{lv['level']}.nifi"),
         "out": str(out_dir / s / f"level{lv['level']}.ply"), "base_model": str(repo_path(base_model)), "ckpt": str(ckpt),
         "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "device": str(dev)}
        for s in eval_scenes for lv in records[s]["levels"]]
for j in jobs:
    (out_dir / j["scene"]).mkdir(parents=True, exist_ok=True)
reports = refine_many(jobs, workers if dev.type == "cpu" else 1)
for r in reports:
    ev = "; ".join(f"+{e['cloned']} cloned, {e['split']} split, -{e['pruned']} pruned" for e in r["events"])
    print(f"{r['scene']} {r['rate']}: {r['n_decoded']} -> {r['n_refined']} Gaussians ({ev or 'no densification'}), "
          f"loss {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}, {r['seconds']:.1f} s")

# %% [markdown]
# ## The fit: loss per step
# Each round starts from new pseudo-views (the current model, restored again), so the loss jumps at a
# round's start; within a round it should fall, and a densification event (new Gaussians, fresh Adam
# state) may bump it before it falls again.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for r in reports:
    ax.plot(r["loss"], lw=0.8, alpha=0.8, label=f"{r['scene']} {r['rate']}")
ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(f"{profile}: refine loss", fontsize=9)
if len(reports) <= 8:
    ax.legend(fontsize=6)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Report

# %%
report = {"variant": variant, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
          "cameras": "synthesised orbit around the decoded content (no bits added to the rate)",
          "jobs": [{k: r[k] for k in ("scene", "rate", "n_decoded", "n_refined", "cap", "events", "rounds", "seconds", "bytes")}
                   | {"loss_first": r["loss"][0], "loss_last": r["loss"][-1]} for r in reports],
          "workers": workers, "seconds": round(time.time() - t_start, 1), "provenance": provenance(profile, seed, dev)}
repo_path("reports", profile, "refine.json").write_text(json.dumps(report, indent=1))
print(f"stage time {time.time() - t_start:.0f} s")
