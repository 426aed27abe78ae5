# %% [markdown]
# # 00 · The multi-view scene dataset
#
# **Purpose.** Build the "Multiview Scene Dataset" box of NiFi's Figure 2: scenes whose
# uncompressed 3D Gaussian Splatting (3DGS) model and ground-truth views everything downstream
# compresses, renders and restores.
#
# - `cpu` / `tiny` profiles: *procedural* scenes. A textured ground, a cylindrical backdrop and
#   5-8 textured objects (boxes, spheres, cylinders, tori) are covered with flat Gaussians tangent
#   to their surfaces, coloured from CC0 photographs bundled with scikit-image / scikit-learn or
#   procedural textures, with view-dependent colour in spherical-harmonic bands 1-3. Training and
#   evaluation scenes come from disjoint seed streams, and a fixed list of photographs is reserved
#   for evaluation scenes. Ground truth is a 2x supersampled, box-filtered render, so the
#   uncompressed 3DGS rendered at the target size is close to, not identical with, the ground truth.
# - `paper` profile: real datasets (COLMAP layout + a trained 3DGS `point_cloud.ply` per scene) from
#   paths in `conf/profile/paper.yaml`; nothing is downloaded.
#
# Views are split as in the 3DGS literature: test views are every 8th frame (`idx % 8 == 0`).
#
# **Inputs.** `params.yaml` → `scenes`. **Outputs.** `data/<profile>/scenes/<scene>/`
# (`point_cloud.ply`, `transforms.json`, `images/*.png`), `reports/<profile>/scenes.json`,
# `reports/<profile>/figures/scenes_contact_sheet.png`.
#
# **Runtime.** Rendering the supersampled ground-truth views dominates; scenes are built side by side over
# `workers` processes. The checks cell prints this run's time, and `reports/<profile>/timings.json` keeps the last
# run of every stage. `paper`: copying the datasets.

# %% tags=["parameters"]
profile = "tiny"
seed = 0
source = "procedural"
n_train = 1
n_eval = 1
n_views = 16
n_views_eval = 16
width = 48
height = 48
n_gaussians = 6000
gt_supersample = 2
sheet_views = 4
workers = 1
datasets = []

# %%
import json
import shutil
import time

from nifi_utils.core.common import pick_device, progress, provenance, repo_path
from nifi_utils.pipeline.lab import require_inputs
from nifi_utils.gs.scenes import SceneSpec, build_scenes, contact_sheet, import_colmap_scene, scene_seeds

require_inputs("scenes", profile)  # an upstream output missing: one line naming what to run first, nothing written
out_root = repo_path("data", profile, "scenes")
report_path = repo_path("reports", profile, "scenes.json")
sheet_path = repo_path("reports", profile, "figures", "scenes_contact_sheet.png")
if out_root.exists():
    shutil.rmtree(out_root)  # never mix scenes of two runs
out_root.mkdir(parents=True)
device = pick_device("auto")
t_start = time.time()

# %% [markdown]
# ## Generate (or import) the scenes
# Each procedural scene is a pure function of its seed. Ground-truth views are renders of the
# scene's own Gaussians (on CPU, our tiled rasterizer; on CUDA, `gsplat.rasterization`).
# Scenes are independent: on CPU they are spread over `workers` processes (one torch thread each: a
# 128² render does not scale over threads, two scenes side by side do); the files do not depend on it.

# %%
records = []
if source == "procedural":
    train_seeds, eval_seeds = scene_seeds(seed, n_train, n_eval)
    specs = [SceneSpec(f"train_{i:02d}", s, "train", n_gaussians, n_views, width, height) for i, s in enumerate(train_seeds)]
    # evaluation scenes may orbit with more views than training scenes: more held-out test views (idx % 8 == 0)
    specs += [SceneSpec(f"eval_{i:02d}", s, "eval", n_gaussians, n_views_eval or n_views, width, height)
              for i, s in enumerate(eval_seeds)]
    records = build_scenes(specs, out_root, gt_supersample, device, workers if device.type == "cpu" else 1)
elif source == "colmap":
    if not datasets:
        raise ValueError("scenes.datasets is empty: list your COLMAP scenes in conf/profile/paper.yaml (see docs/gpu.md)")
    for d in progress(datasets, desc="scenes"):
        folder = import_colmap_scene(d["name"], d["colmap_dir"], d["ply"], out_root / d["name"], d.get("images", "images"),
                                     width, d.get("split", "eval"))
        meta = json.loads((folder / "transforms.json").read_text())
        records.append({"name": d["name"], "split": meta["split"], "source": "colmap", "n_gaussians": meta["n_gaussians"],
                        "n_views": len(meta["frames"]), "ply_bytes": (folder / "point_cloud.ply").stat().st_size})
else:
    raise ValueError(f"unknown scenes source {source!r}: use 'procedural' or 'colmap'")

# %% [markdown]
# ## Checks
# Evaluation scenes must never share a layout with training scenes.

# %%
train_layouts = {r["layout_id"] for r in records if r["split"] == "train" and "layout_id" in r}  # procedural only
assert not any(r.get("layout_id") in train_layouts for r in records if r["split"] == "eval"), "eval layout reused in training"
assert all(r["ply_bytes"] > 0 and r["n_views"] > 0 for r in records), "empty scene"
seconds = time.time() - t_start
summary = {
    "scenes": records,
    "n_train": sum(r["split"] == "train" for r in records),
    "n_eval": sum(r["split"] == "eval" for r in records),
    "mean_ply_mb": sum(r["ply_bytes"] for r in records) / len(records) / 1e6,
    "workers": workers,
    "seconds": round(seconds, 1),
    "provenance": provenance(profile, seed, device),
}
report_path.parent.mkdir(parents=True, exist_ok=True)
report_path.write_text(json.dumps(summary, indent=1))
print(f"{len(records)} scenes, mean uncompressed .ply {summary['mean_ply_mb']:.1f} MB, {seconds:.1f} s")

# %% [markdown]
# ## Contact sheet
# One row per scene: a few ground-truth views, with their train/test role.

# %%
contact_sheet(sorted(p for p in out_root.iterdir() if p.is_dir()), sheet_path, n_cols=sheet_views,
              title=f"{profile} scenes (seed {seed})")
from IPython.display import Image as _Img, display  # noqa: E402

display(_Img(filename=str(sheet_path)))
