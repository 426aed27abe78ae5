# %% [markdown]
# # 06 · See it in 3D: an offline viewer of every scene at every rate
#
# **Purpose.** Table 1 says how far each rate is from the uncompressed scene on average; a person
# deciding whether 0.014 MB is acceptable wants to orbit the scene. This stage writes one HTML page per
# evaluation scene that switches between the uncompressed 3DGS, every rate's decoded Gaussians and, once
# the `refine` stage has run, the Gaussians NiFi-3D refined at the receiver, with size in MB and
# compression ratio on screen and the held-out test cameras as starting views.
#
# The viewer is PlayCanvas' SuperSplat viewer as `splat-transform` (pinned in the Makefile) bundles it:
# everything is inside the page (no network, works from `file://`). Each variant goes in as PlayCanvas'
# compressed `.ply` (splat-transform's SOG format needs a GPU for its SH clustering), so the page is
# ~3.3 MB of viewer plus the variants, once per scene.
#
# **Inputs.** `data/<profile>/scenes/` (uncompressed `point_cloud.ply`, `transforms.json`),
# `data/<profile>/bitstreams/` (`.nifi` per level), `data/<profile>/refined/` where present.
# **Outputs.** `reports/<profile>/viewer/`: `index.html`, `<scene>.html`, `viewer.json` (sizes, times,
# browser check).
#
# **Runtime.** The uncompressed scene's conversion dominates each page; the optional browser check opens the
# pages once more. The summary cell prints this run's time, and `reports/<profile>/timings.json` keeps the last run
# of every stage.

# %% tags=["parameters"]
profile = "tiny"
seed = 0
max_scenes = 1
workers = 1
background = [0.62, 0.7, 0.8]
browser_checks = 0

# %%
import json
import time
from concurrent.futures import ThreadPoolExecutor

from nifi_utils.eval import viewer
from nifi_utils.core.common import provenance, repo_path
from nifi_utils.pipeline.lab import require_inputs
from nifi_utils.gs.splat_tools import PINNED, missing_reason, splat_transform_path

require_inputs("viewer", profile)  # an upstream output missing: one line naming what to run first, nothing written
data_root = repo_path("data", profile)
out_dir = repo_path("reports", profile, "viewer")
out_dir.mkdir(parents=True, exist_ok=True)
refined_root = data_root / "refined"
t_start = time.time()
scene_dirs = viewer.evaluation_scene_dirs(data_root / "scenes")
if max_scenes:
    scene_dirs = scene_dirs[:max_scenes]
print(f"{len(scene_dirs)} evaluation scene(s): {', '.join(d.name for d in scene_dirs)}")
print(f"refined Gaussians (NiFi-3D): {'present' if refined_root.is_dir() else 'absent (the refine stage has not run)'}")

# %% [markdown]
# ## The tool
# Without `splat-transform` (set-up installs it only where `npm` exists) the stage still succeeds, but
# writes an index that says what is missing and records it in `viewer.json`: the viewer is a convenience,
# never an input to a number in `reports/`.

# %%
exe = splat_transform_path()
summary = {"splat_transform": PINNED, "scenes": [], "browser_check": None,
           "provenance": provenance(profile, seed)}
if exe is None:
    summary["skipped"] = missing_reason()
    viewer.write_index(out_dir, [], f"NiFi viewer ({profile})", f"No pages: {missing_reason()}.")
    print("SKIPPED:", missing_reason())
else:
    template, default_settings = viewer.viewer_template()
    print(f"{exe}: viewer page template {len(template) / 1e6:.1f} MB")

# %% [markdown]
# ## One page per scene
# Each page holds every variant of its scene. Sizes are what a receiver downloads: the `.ply` for the
# uncompressed scene, the `.nifi` bitstream for a rate (and for the refined Gaussians, which the receiver
# computes from that same bitstream). Scenes are rotated so their cameras' up is the viewer's up.

# %%
def export(scene_dir):
    return viewer.export_scene(scene_dir, data_root / "bitstreams" / scene_dir.name, refined_root / scene_dir.name,
                               out_dir / f"{scene_dir.name}.html", template, default_settings, background)


if exe is not None:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(export, scene_dirs))
    summary["scenes"] = rows
    viewer.write_index(out_dir, rows, f"NiFi viewer ({profile})",
                       "One page per evaluation scene; on each page, pick a variant (uncompressed, a rate, refined) "
                       "and a test view. Everything is inside the page: it works offline, from file://.")
    for r in rows:
        sizes = ", ".join(f"{v['key']} {v['MB']:.4g} MB ({v['ratio']:.0f}x)" for v in r["variants"])
        print(f"{r['page']}: {r['page_bytes'] / 1e6:.1f} MB page, {r['seconds']:.1f} s; {sizes}")

# %% [markdown]
# ## A look in a real browser
# Where Chromium is installed, open the first `browser_checks` pages headless (software WebGL, network
# off), wait for the viewer's first frame and screenshot the lowest rate and the uncompressed scene from
# the first test camera. A blank page or identical screenshots would mean the page does not draw.
# The test suite does the same for every page (`tests/test_viewer.py`).

# %%
checks = []
if exe is not None and browser_checks and viewer.chromium_path() is None:
    summary["browser_check"] = "skipped: chromium not installed"
    print(summary["browser_check"])
elif exe is not None and browser_checks:
    with viewer.Browser(800, 600) as browser:
        for r in summary["scenes"][:browser_checks]:
            keys = [v["key"] for v in r["variants"]]
            shots = {}
            for key in dict.fromkeys([keys[1] if len(keys) > 1 else keys[0], keys[0]]):
                waited = browser.open(viewer.page_url(out_dir / r["page"], key, 0))
                shots[key] = browser.screenshot(out_dir / f"{r['scene']}_{key}.png")
                checks.append({"page": r["page"], "variant": key, "seconds_to_first_frame": round(waited, 2),
                               "drawn_fraction": round(viewer.drawn_fraction(shots[key]), 3)})
            if len(shots) == 2:
                a, b = shots.values()
                checks[-1]["mean_abs_diff_to_other_variant"] = round(float(abs(a.astype(int) - b).mean()), 2)
    summary["browser_check"] = checks
    for c in checks:
        print(c)

# %%
summary["seconds"] = round(time.time() - t_start, 1)
(out_dir / "viewer.json").write_text(json.dumps(summary, indent=2))
total = sum(r["page_bytes"] for r in summary["scenes"])
print(f"{len(summary['scenes'])} page(s), {total / 1e6:.1f} MB in all, {summary['seconds']} s -> {out_dir}/index.html")

# %% [markdown]
# ## Opening it
# `reports/<profile>/viewer/index.html` in any browser with WebGL 2 (or WebGPU). Drag to orbit, scroll
# to zoom; the panel switches the variant and the starting test view (the page reloads). For your own
# file: `python -m nifi_utils view scene.ply --out page.html` (or a `.nifi`).
