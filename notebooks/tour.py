# %% [markdown]
# # A guided tour of the NiFi lab
#
# **Purpose.** The lab's story in one sitting, read from what the pipeline already computed (nothing is trained or
# rendered here). *Nix and Fix* (NiFi, arXiv 2602.04549) asks: if a 3D Gaussian Splatting (3DGS) scene is
# compressed until its renders are visibly damaged (hundreds to thousands of times smaller), can a one-step
# diffusion restorer repair the renders at the receiver? We follow one scene through that path:
# 1. the scene and one ground-truth view;
# 2. the codec at every rate: bytes, compression ratio and what the render looks like;
# 3. the restorers side by side on that view, with zoomed crops, and their scores;
# 4. the perception-distortion plane: who is better once fidelity and perceived quality are both counted;
# 5. the scene in 3D, in the offline viewer.
#
# This notebook is not a pipeline stage: each section names the stage notebook that made what it shows, which is
# where to go for the method itself.
#
# **Inputs.** The outputs of the `scenes`, `synthesis`, `distill`, `benchmark` and `viewer` stages: the `cpu` profile's where
# `make repro` wrote them, otherwise the `tiny` profile's (`make lab` prepares them). `profile = ""` picks in that
# order; name one to choose. **Outputs.** None (figures inline).
#
# **Runtime.** It only reads images and tables (the viewer page loads in the browser); how long the stages that
# made them took is read from `reports/<profile>/timings.json` at the end.

# %% tags=["parameters"]
profile = ""
scene = ""
view = 0
rate = ""
zoom = 4

# %%
import json
import os

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import IFrame, display

from nifi_utils.core.common import repo_path
from nifi_utils.core.images import read_rgb
from nifi_utils.eval import plots
from nifi_utils.pipeline.lab import pick_profile, require_outputs

SHOWN = ["scenes", "synthesis", "distill", "benchmark", "viewer"]  # the stages whose outputs this tour reads
if profile:
    require_outputs(SHOWN, profile, "the tour")
else:
    profile = pick_profile(SHOWN)  # cpu where `make repro` ran, else tiny; neither: one line saying what to run
data, reports = repo_path("data", profile), repo_path("reports", profile)
synthesis = json.loads((reports / "synthesis.json").read_text())
distill = json.loads((reports / "distill.json").read_text())
# the perceptual network the restorers train on, and the one that judges them (never trained on)
trained, judge = distill["perceptual"], distill["judge"]
records = {r["scene"]: r for r in synthesis["scenes"]}
eval_scenes = [s for s, r in records.items() if r["split"] == "eval"]
# every score, one row per method, codec, rate, scene and test view (view names as written: '0008.png')
bench = plots.load_benchmark(reports / "benchmark.csv")
bench = bench[bench["scene"].isin(eval_scenes)]
scene = scene or eval_scenes[0]
views = sorted(bench.loc[bench["scene"] == scene, "view"].unique())
vname = views[view]
rec = records[scene]
levels = [f"level{lv['level']}" for lv in rec["levels"]]
rate = rate or levels[0]
print(f"profile {profile}: {len(eval_scenes)} evaluation scene(s), {len(records) - len(eval_scenes)} training scene(s); "
      f"showing {scene}, test view {vname}, rate {rate}")


def image(method, at_rate=rate):
    """The test view as a method made it: `gt`, `3dgs` (the uncompressed scene), `compressed` or a restorer."""
    return read_rgb(plots.image_path(data, method, scene, at_rate, vname))


# %% [markdown]
# ## 1. A scene and its ground truth
# The offline profiles cannot download Mip-NeRF 360, so stage `scenes` (`00_scenes`) builds its own: textured
# objects on a ground plane, each surface covered with flat Gaussians, photographed from a ring of cameras. The
# uncompressed 3DGS is the INRIA `.ply` a 3DGS trainer would write; every 8th camera is a *test view*, never used
# for training anything. Evaluation scenes (`eval_*`) are never seen by the restorer or its prior.

# %%
meta = json.loads((data / "scenes" / scene / "transforms.json").read_text())
print(f"{scene}: {rec['n_gaussians']} Gaussians, uncompressed .ply {rec['ply_bytes'] / 1e6:.2f} MB, "
      f"{len(meta['frames'])} cameras of which {len(views)} test views")
plots.image_row([("ground truth (test view)", image("gt")), ("uncompressed 3DGS, rendered", image("3dgs"))],
                f"{scene} / {vname}", 3.2)
plt.show()

# %% [markdown]
# ## 2. The codec at every rate
# Stage `synthesis` (`01_artifact_synthesis`) prunes the scene to a few nested levels of Gaussians, fine-tunes them
# with quantization in the loop, and entropy-codes each level into a `.nifi` file. The rate *is* that file's size.
# The renders below are decoded from those files: this is what a receiver would see before any restoration.

# %%
rows = [{"rate": f"level{lv['level']}", "Gaussians": lv["n_gaussians"], "bytes": lv["bytes"],
         "ratio": f"{lv['ratio_to_ply']:.0f}x", "PSNR (dB)": round(lv["psnr"], 2),
         "ST-LPIPS alex": round(lv["stlpips_alex"], 3)} for lv in rec["levels"]]
display(pd.DataFrame(rows).set_index("rate"))
plots.image_row([(f"uncompressed\n{rec['ply_bytes'] / 1e6:.2f} MB", image("3dgs"))]
                + [(f"{r['rate']}: {r['bytes'] / 1e3:.1f} kB ({r['ratio']})", image("compressed", r["rate"])) for r in rows],
                f"{scene} / {vname}: decoded renders")
plt.show()

# %% [markdown]
# ## 3. The restorers, side by side
# Stage `benchmark` (`04_benchmark`) restores every compressed test view with every method and scores it against
# the ground truth. The methods shown are whatever the benchmark wrote (`data/<profile>/benchmark/<method>/`):
# classical denoising (BM3D), the prior used as img2img, a regression CNN trained on the same pairs and loss (the
# strongest simple baseline, where the run has it), and the distilled one-step restorers: NiFi and its ablations
# (w/o t0 takes its one step from $\sigma = 1$ on the degraded latent itself instead of noising it to $t_0$ first;
# w/o TSD drops the distribution-matching term). NiFi-3D fits the restorations into the decoded Gaussians at the
# receiver (`03b_refine`). Zoomed crops are where artifacts and invented detail show first: the crop sits where the
# ground truth has the most gradient energy, as in the qualitative grid of `05_rate_distortion`.

# %%
here = bench[(bench["scene"] == scene) & (bench["rate"] == rate) & (bench["view"] == vname)]
methods = sorted(set(here["method"]) - {"compressed"}, key=plots.method_sort_key)
panels = [("ground truth", image("gt")), (f"compressed ({rate})", image("compressed"))]
panels += [(plots.method_label(m).removeprefix("+ "), image(m)) for m in methods]
crop = max(8, min(panels[0][1].shape[:2]) // zoom)
plots.crop_row(panels, crop, f"{scene} / {vname} at {rate}; bottom: the yellow box, magnified")
plt.show()

# %% [markdown]
# Their scores on this rate, averaged over every evaluation scene's test views (`reports/<profile>/benchmark.csv`,
# one row per method, scene, view and rate). ST-LPIPS is a shift-tolerant LPIPS (lower is better), with an AlexNet or
# a VGG backbone: the learned restorers train on one and are judged on the other, which they never see (printed
# below), so a gain on the trained one alone is a restorer that learnt its metric. PSNR and
# SSIM measure fidelity (higher is better). The means are `plots.aggregate`'s, as in Table 1: over each scene's
# views, then over scenes.

# %%
cols = [c for c in (judge, trained, "psnr", "ssim", "periodic_excess", "flat_excess", "ms_per_image") if c in bench]
print(f"the learned restorers train on {trained} and are judged on {judge} (held out)")
ours = bench[bench["codec"].isin([plots.OUR_CODEC, "uncompressed"])]  # our codec's rates and the uncompressed scene
agg = plots.aggregate(ours, cols, ci=False)
table = agg[(agg["rate"] == rate) | (agg["method"] == "3dgs")].set_index("label")[cols]
display(table.round(3))

# %% [markdown]
# ## 4. The perception-distortion plane
# Restoring from so little information is a trade: a restorer that paints plausible detail looks better (lower
# ST-LPIPS) but moves away from the exact pixels (lower PSNR), and no restorer can be best at both (Blau & Michaeli,
# 2018). So neither axis alone decides; a method is better than another only where it is better on one axis at no
# cost on the other. One panel per rate (lowest first), every method a point with its 95 % bootstrap intervals; the
# held-out metric (the judge) is the vertical axis. Down and to the right is better; the uncompressed scene, far
# beyond every method at these rates, is printed below the plot. This is the plots stage's figure
# (`plots.plot_perception_distortion`, `05_rate_distortion`), drawn here for PSNR.

# %%
plane = plots.aggregate(ours, ["psnr", judge])  # with the intervals
plots.plot_perception_distortion(plane, judge, distortions=("psnr",))
plt.show()
ref = plane[plane["method"] == "3dgs"]  # the uncompressed scene: far better on both axes, printed, not drawn
if len(ref):
    print(f"uncompressed 3DGS, for reference: PSNR {ref['psnr'].iloc[0]:.2f} dB, {judge} {ref[judge].iloc[0]:.3f}")

# %% [markdown]
# The benchmark's own verdict (targets decided on paired bootstrap intervals, `04_benchmark`), and the
# rate-distortion curves and Table 1 with intervals and ties (`05_rate_distortion`, `reports/<profile>/table1.md`),
# go further than this picture: with a handful of scenes, only paired comparisons separate methods.

# %% [markdown]
# ## 5. The scene in 3D
# Stage `viewer` (`06_viewer`) writes one self-contained page per evaluation scene (PlayCanvas' SuperSplat viewer,
# no network): switch between the uncompressed scene, every rate's decoded Gaussians and NiFi-3D's refined ones;
# drag to orbit. It needs WebGL 2 in your browser.

# %%
page = reports / "viewer" / f"{scene}.html"
if page.is_file():
    display(IFrame(os.path.relpath(page, repo_path("notebooks")), width="100%", height=480))
else:  # the viewer stage ran without splat-transform (npm): its index says why
    print(f"no viewer page for {scene}: see {(reports / 'viewer' / 'index.html').relative_to(repo_path())}")

# %% [markdown]
# ## Where to go next
# - The stage notebooks, in order: `00_scenes` → `01_artifact_synthesis` → `02_prior` → `03_distillation` →
#   `03b_refine` → `04_benchmark` → `05_rate_distortion` → `06_viewer`. Each opens with its parameters (the `tiny`
#   profile) and runs top to bottom in JupyterLab once `make lab` has prepared the tiny outputs.
# - `make repro` runs the `cpu` profile; this tour then shows its results.
# - The reference: `README.md` and `docs/` (pipeline, parameters, the restorer and its study, the codec, NiFi-3D, the
#   viewer, GPUs and several nodes, reproducibility).
#
# How long each stage took in this profile's last run (`reports/<profile>/timings.json`, written by the pipeline
# runner: wall seconds with the kernel start, the machine's cores, when it finished):

# %%
timings_path = reports / "timings.json"
if timings_path.is_file():
    stages = json.loads(timings_path.read_text())["stages"]
    display(pd.DataFrame(stages).T[["seconds", "cores", "finished"]].rename_axis("stage"))
else:
    print(f"no {timings_path.relative_to(repo_path())}: this profile's stages did not run through the pipeline runner")
