"""The `paper` profile end to end, through the same code, at toy sizes.

A scratch copy of the repository gets fake user data laid out the way a paper user has it:
- two "real" scenes in COLMAP text layout (`sparse/0/*.txt`, an image folder), rendered from a small
  random 3DGS scene that is also their "trained" `point_cloud.ply`: one `split: train` (a DL3DV
  stand-in), one `split: eval` (a Mip-NeRF 360 stand-in, with `images_2` at half the COLMAP resolution);
- an "SD3-medium" folder: a tiny SD3-architecture model in SD3's diffusers layout, and the separate
  embeddings file `prior.paper.sd3_embeddings` names;
- HAC++ stand-ins for the eval scene at two rates: test-view PNGs (blurred ground truth) and a
  `bitstreams/` folder whose size is the rate.
Its conf/profile/paper.yaml keeps the paper profile's keys and paper-only behaviours (colmap source, sd3
prior source, n_max as a fraction, SH degrees per level, LPIPS/DISTS in the benchmark, bf16,
show_paper) with sizes from the tiny profile, and the pipeline runs the way the README tells a paper user:
`python -m nifi_utils.pipeline.run prior` once (the stage is frozen), then `dvc exp run -S profile=paper` (DVC composes
params.yaml from conf/).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter

from nifi_utils.core.common import REPO_ROOT
from nifi_utils.pipeline.params import compose_params

W, H, N_VIEWS = 48, 32, 16  # 16 views: test views 0 and 8 (idx % 8 == 0)
HACPP_RATES = {"lambda0.5": [1500, 700], "lambda1.0": [900, 300, 200]}  # bitstream file sizes per rate


def _env(device: str) -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", NIFI_QUIET="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # `device: auto` must pick the CPU even on a GPU machine
    return env


def _copy_repo(work: Path) -> None:
    """Tracked and untracked (not ignored) files; of data/ and reports/ only the frozen prior's committed
    outputs and the paper's published Table 1 (pipeline inputs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO_ROOT / f).is_file() and (not f.startswith(("data/", "reports/")) or "prior" in f
                                          or f == "data/paper_table1.csv"):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / f, work / f)


# ---------------------------------------------------------------- fake user data
def _cameras(seed: int):
    from nifi_utils.gs.cameras import Camera, look_at

    rng = np.random.default_rng(seed)
    # a 60-degree arc, so test views 0 and 8 see the same Gaussians (the benchmark's consistency score)
    az = np.linspace(0, np.pi / 3, N_VIEWS) + rng.uniform(0, 2 * np.pi)
    f = 1.1 * W
    cams = []
    for i, a in enumerate(az):
        eye = [3.0 * np.cos(a), 3.0 * np.sin(a), 1.0 + 0.2 * np.sin(5 * a)]
        cams.append(Camera(look_at(eye, [0, 0, 0]), f, f, W / 2, H / 2, W, H, f"frame_{i:05d}"))
    return cams


def _write_colmap_scene(root: Path, scene, cams, images_subdir: str, colmap_scale: int, background) -> None:
    """COLMAP text model (PINHOLE, cameras at `colmap_scale` x the image size, as for Mip-NeRF 360's
    images_2/images_4) and the images rendered from `scene` (the "photographs")."""
    from nifi_utils.gs.cameras import GL_TO_CV
    from nifi_utils.gs.render import render
    from nifi_utils.gs.scenes import _rotmat_to_quat

    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True)
    (root / images_subdir).mkdir(parents=True)
    c = cams[0]
    s = colmap_scale
    (sparse / "cameras.txt").write_text("# Camera list\n"
                                        f"1 PINHOLE {W * s} {H * s} {c.fx * s} {c.fy * s} {c.cx * s} {c.cy * s}\n")
    lines = ["# Image list"]
    for i, cam in enumerate(reversed(cams)):  # COLMAP's order is not the name order
        w2c = np.linalg.inv(cam.c2w @ GL_TO_CV)
        q = _rotmat_to_quat(w2c[None, :3, :3])[0]
        t = w2c[:3, 3]
        lines += [f"{i + 1} {' '.join(f'{v:.12f}' for v in (*q, *t))} 1 {cam.name}.png", ""]
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    (sparse / "points3D.txt").write_text("# 3D point list\n")
    with torch.no_grad():
        for cam in cams:
            rgb = render(scene, cam, background=background, backend="auto")["rgb"]
            Image.fromarray((rgb.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy()).save(root / images_subdir / f"{cam.name}.png")


def _make_user_data(user: Path, background) -> dict:
    from conftest import random_scene

    from nifi_utils.models.folders import TinySD3Config, save_prior, tiny_sd3
    from nifi_utils.models.restorer import save_embeddings

    paths = {"datasets": []}
    for k, (name, split, images, scale) in enumerate([("dl3dv_fake", "train", "images", 1),
                                                      ("mipnerf360_fake", "eval", "images_2", 2)]):
        scene = random_scene(n=1000, seed=10 + k, sh_degree=3, log_scale=-2.0)
        ds = user / "datasets" / name
        _write_colmap_scene(ds, scene, _cameras(20 + k), images, scale, background)
        ply = user / "trained_3dgs" / name / "point_cloud" / "iteration_30000" / "point_cloud.ply"
        ply.parent.mkdir(parents=True)
        scene.save_ply(ply)
        paths["datasets"].append({"name": name, "split": split, "colmap_dir": str(ds), "images": images, "ply": str(ply)})

    # "SD3-medium": SD3's architecture and diffusers layout (16 latent channels, its VAE scaling factor), tiny
    sd3 = user / "models" / "stable-diffusion-3-medium-diffusers"
    r = tiny_sd3(TinySD3Config(latent_channels=16, scaling_factor=1.5305, vae_channels=[16, 32], text_dim=32,
                               pooled_dim=16, text_len=8, sample_size=32, pos_embed_max_size=64), seed=0)
    save_prior(r, sd3)
    paths["sd3_dir"] = str(sd3)
    paths["sd3_embeddings"] = str(save_embeddings(user / "models" / "nifi" / "default_embeddings.npz", r.prompt_embeds, r.pooled))

    # HAC++ stand-in for the eval scene: blurred test views (named like them) + a bitstreams folder per rate
    ev = paths["datasets"][1]
    test_names = sorted(p.name for p in (Path(ev["colmap_dir"]) / ev["images"]).glob("*.png"))[::8]
    rng = np.random.default_rng(0)
    paths["external_codecs"], paths["hacpp_bytes"] = [], {}
    for j, (rate, sizes) in enumerate(HACPP_RATES.items()):
        base = user / "hacpp" / ev["name"] / rate
        for n in test_names:
            (base / "test_renders").mkdir(parents=True, exist_ok=True)
            Image.open(Path(ev["colmap_dir"]) / ev["images"] / n).filter(ImageFilter.GaussianBlur(1.5 - 0.5 * j)).save(
                base / "test_renders" / n)
        for i, size in enumerate(sizes):  # HAC++ writes several files, some in sub-folders
            f = base / "bitstreams" / ("" if i == 0 else f"sub{i}") / f"part{i}.b"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths["external_codecs"].append({"name": "hacpp", "scene": ev["name"], "rate": rate,
                                         "folder": str(base / "test_renders"), "bitstreams": str(base / "bitstreams")})
        paths["hacpp_bytes"][rate] = sum(sizes)
    return paths


def _paper_params(paper: dict, tiny: dict, user: dict) -> dict:
    """The paper profile's sections, same keys: paths to the fake data, sizes from the tiny profile."""
    from nifi_utils.measure.metrics import metric_available

    p = {s: dict(paper[s]) for s in ("scenes", "synthesis", "prior", "distill", "refine", "benchmark", "plots", "viewer")}
    p["scenes"].update(datasets=user["datasets"])
    p["synthesis"].update({k: tiny["synthesis"][k] for k in ("c_min", "processes")}, finetune_steps=5,
                          external_codecs=user["external_codecs"])  # n_max stays the paper's fraction (0.85)
    p["prior"].update(sd3_dir=user["sd3_dir"], sd3_embeddings=user["sd3_embeddings"])
    p["distill"].update({k: tiny["distill"][k] for k in ("rank", "critic_rank", "batch", "eval_views")},
                        base_model=user["sd3_dir"], steps=2, checkpoint_every=2, eval_every=2, crop=32)
    p["refine"].update(base_model=user["sd3_dir"], config=tiny["refine"]["config"])
    p["viewer"].update({k: tiny["viewer"][k] for k in ("workers", "browser_checks")})
    p["benchmark"].update(base_model=user["sd3_dir"], img2img_steps=2)
    p["plots"].update({k: tiny["plots"][k] for k in ("grid_views", "grid_crop")})
    # LPIPS / DISTS need torchvision's ImageNet weights. The benchmark skips them with a note, but the
    # distillation loss and Table 1 cannot do without the metric they name: there, ST-LPIPS stands in
    have = {m: metric_available(m) for m in ("lpips_alex", "dists")}
    if not have["lpips_alex"]:
        p["distill"]["perceptual"] = "stlpips_alex"
    if not all(have.values()):
        p["plots"]["table_metrics"] = ["stlpips_alex", "stlpips_vgg"]
        p["plots"]["rd_metrics"] = [m for m in p["plots"]["rd_metrics"] if have.get(m, True)]
    return p


# ---------------------------------------------------------------- the run
def _run_paper_profile(tmp_path: Path, device: str) -> None:
    import pandas as pd

    from nifi_utils.codec.levels import level_sizes
    from nifi_utils.measure.metrics import metric_available

    work = tmp_path / "lab"
    _copy_repo(work)
    env = _env(device)
    # conf/ composed as `dvc exp run -S profile=...` composes params.yaml, read as DVC reads it (5e-06 is a float)
    paper, tiny = compose_params("paper"), compose_params("tiny")
    # the paper-only behaviours this test keeps
    assert paper["scenes"]["source"] == "colmap" and paper["prior"]["source"] == "sd3"
    assert {"lpips_alex", "lpips_vgg", "dists"} <= set(paper["benchmark"]["metrics"])
    assert paper["benchmark"]["device"] == "auto" and paper["distill"]["mixed_precision"] == "bf16"
    assert paper["plots"]["show_paper"] and paper["plots"]["paper_dataset"]
    assert isinstance(paper["synthesis"]["n_max"], float) and isinstance(paper["distill"]["lr_g"], float)
    user = _make_user_data(tmp_path / "user", paper["synthesis"]["background"])
    for stage, sub in _paper_params(paper, tiny, user).items():
        assert set(sub) == set(paper[stage]), stage
        paper[stage] = sub
    # the scratch copy's paper profile: whole sections (an override file may set every key of a stage)
    (work / "conf" / "profile" / "paper.yaml").write_text("# @package _global_\n" + yaml.safe_dump(paper, sort_keys=False))

    def run(*cmd):
        r = subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
        return r.stdout + r.stderr

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    # the README's paper recipe: the frozen prior stage checks the SD3 folder once, then DVC runs the rest
    run(sys.executable, "-m", "nifi_utils.pipeline.run", "prior", "--profile", "paper", "--quiet")
    out = run("dvc", "exp", "run", "-S", "profile=paper")
    for stage in ("scenes", "synthesis", "distill", "refine", "benchmark", "plots", "viewer"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    assert "Running stage 'prior'" not in out
    assert "Running stage" not in run("dvc", "repro")  # nothing left to do: the lock matches
    assert not (work / "data" / "cpu" / "scenes").exists() and not (work / "data" / "tiny" / "scenes").exists()

    rep, data = work / "reports" / "paper", work / "data" / "paper"
    assert json.loads((rep / "prior.json").read_text())["source"] == "sd3"
    scenes = json.loads((rep / "scenes.json").read_text())
    assert {(s["name"], s["split"], s["source"], s["n_views"]) for s in scenes["scenes"]} == {
        ("dl3dv_fake", "train", "colmap", N_VIEWS), ("mipnerf360_fake", "eval", "colmap", N_VIEWS)}
    meta = json.loads((data / "scenes" / "mipnerf360_fake" / "transforms.json").read_text())
    assert (meta["w"], meta["h"], meta["test_ids"]) == (W, H, [0, 8])  # images_2: intrinsics scaled by 1/2

    syn = json.loads((rep / "synthesis.json").read_text())
    for sc in syn["scenes"]:
        # the COLMAP cameras are imported exactly: the "trained" 3DGS renders the photographs again
        assert sc["uncompressed"]["psnr"] > 40, sc["uncompressed"]
        want = level_sizes(sc["n_gaussians"], paper["synthesis"]["c_min"], 3, 0.85)
        assert [(lv["n_gaussians"], lv["sh_degree"]) for lv in sc["levels"]] == list(zip(want, [0, 1, 3]))
    assert sorted((e["rate"], e["bytes"]) for e in syn["external"]) == sorted(user["hacpp_bytes"].items())

    distill = json.loads((rep / "distill.json").read_text())
    assert distill["base_model"] == user["sd3_dir"] and distill["n_pairs"] == 3 * 14 and distill["n_heldout"] == 3 * 2
    for v in ("nifi", "nifi_wo_t0"):
        assert distill["variants"][v]["config"]["mixed_precision"] == "bf16" and (data / "restorer" / f"{v}.pt").is_file()
    assert (data / "restorer" / "regression.pt").is_file()  # the baseline trains on every profile

    df = pd.read_csv(rep / "benchmark.csv", dtype={"view": str, "rate": str})
    methods = ["compressed", *paper["benchmark"]["methods"]]
    # NiFi-3D refines our codec's bitstreams; another codec's renders have no Gaussians to refine
    want = {(m, "nifi3dgs", f"level{i}") for m in methods for i in range(3)} | {
        (m, "hacpp", r) for m in methods if not m.startswith("nifi_3d") for r in HACPP_RATES} | {
        ("3dgs", "uncompressed", "uncompressed")}
    assert set(zip(df["method"], df["codec"], df["rate"])) == want
    assert (df.groupby(["method", "codec", "rate"]).size() == 2).all()  # the eval scene's 2 test views
    assert set(df["scene"]) == {"mipnerf360_fake"} and set(df["device"]) == {device}
    for rate, nbytes in user["hacpp_bytes"].items():
        assert (df.loc[(df.codec == "hacpp") & (df.rate == rate), "bytes"] == nbytes).all()
    restored = df[~df.method.isin(["3dgs"])]
    assert restored[["psnr", "ssim", "stlpips_alex", "stlpips_vgg", "mv_consistency"]].notna().all().all()
    metrics = json.loads((rep / "metrics.json").read_text())
    assert metrics["provenance"]["profile"] == "paper" and metrics["provenance"]["device"] == device
    for m in ("lpips_alex", "lpips_vgg", "dists"):
        if metric_available(m):
            assert m in metrics["metric_backends"] and df[m].notna().all()
        else:  # skipped with a note, not a crash
            assert "torchvision" in metrics["metrics_skipped"][m] and m not in df.columns

    for f in ("table1.md", "table1.csv", "table1.tex", "rd_curves.csv", "figures/rd_curves.png", "figures/rd_curves.pdf",
              "figures/qualitative_grid.png", "figures/consistency.png", "figures/scenes_contact_sheet.png",
              "figures/artifacts_per_rate.png", "figures/prior.png", "figures/distill_examples.png"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    table = (rep / "table1.md").read_text()
    assert all(f"hacpp {r}" in table for r in HACPP_RATES) and all(f"nifi3dgs level{i}" in table for i in range(3))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_paper_profile_end_to_end(tmp_path, device):
    """CPU: CUDA hidden, `device: auto` picks the CPU. cuda: the same run on a GPU (gsplat, bf16 autocast)."""
    _run_paper_profile(tmp_path, device)
