"""The benchmark's baselines, the multi-view consistency measure and its rows.

Every method is applied to the same compressed test renders (paper §4.2): `compressed` (none),
`bm3d` (noise level estimated per image), `img2img` (the prior without LoRA, K Euler steps from t0
with classifier-free guidance), the NiFi restorers, and restored images from other tools.

The consistency measure goes beyond the paper. A restorer that invents detail independently in each
view produces images that no single 3D scene explains. We warp restored view i into test view j
through the *uncompressed* scene's rendered depth and the cameras, and compare colours on co-visible
pixels; the same warp on the ground truth gives the floor (view-dependent colour, resampling), so the
reported number is error(method) / error(ground truth): ~1 is as consistent as the real views.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nifi_utils.eval.bm3d import bm3d_many, bm3d_restore, estimate_noise_sigma  # noqa: F401  (re-exported)
from nifi_utils.gs.cameras import Camera
from nifi_utils.core.common import NifiError
from nifi_utils.core.facts import METHOD_ORDER, NIFI_VARIANTS, OUR_CODEC, REFINED  # noqa: F401
from nifi_utils.core.images import read_rgb
from nifi_utils.measure.metrics import to_bchw




# ---------------------------------------------------------------------- multi-view consistency
@dataclass
class ViewGeometry:
    """What the warp needs of one view: its camera and the uncompressed scene's depth and alpha there."""
    camera: Camera
    depth: torch.Tensor  # [H,W] expected z-depth in the camera's frame
    alpha: torch.Tensor  # [H,W] accumulated opacity


def render_geometry(scene, cameras: list[Camera]) -> list[ViewGeometry]:
    """Depth and alpha of the (uncompressed) scene in each camera."""
    from nifi_utils.gs.render import render

    out = []
    with torch.no_grad():
        for cam in cameras:
            r = render(scene, cam)
            out.append(ViewGeometry(cam, r["depth"][..., 0].float().cpu(), r["alpha"][..., 0].float().cpu()))
    return out


def _pixel_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    # pixel (x, y) covers [x, x+1): its centre is x + 0.5 (gsplat's convention)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    return xs, ys


def warp_correspondences(src: ViewGeometry, dst: ViewGeometry, depth_tol: float = 0.02, min_alpha: float = 0.95):
    """Where each pixel of `src` lands in `dst` and whether it is co-visible there.

    Back-projects src's pixels with its depth, projects them into dst, and keeps those inside dst's
    image, on a surface in both views (alpha >= min_alpha) and not occluded in dst (its rendered depth
    agrees within depth_tol relative). Returns (grid [1,H,W,2] for grid_sample, valid [H,W] bool)."""
    h, w = src.depth.shape
    xs, ys = _pixel_grid(h, w)
    c = src.camera
    d = src.depth.double()
    pts_cam = torch.stack([(xs - c.cx) / c.fx * d, (ys - c.cy) / c.fy * d, d, torch.ones_like(d)], -1)
    cam_to_world = torch.linalg.inv(c.viewmat().double())
    world = pts_cam @ cam_to_world.T
    q = world @ dst.camera.viewmat().double().T
    z = q[..., 2]
    zc = z.clamp(min=1e-9)
    u = dst.camera.fx * q[..., 0] / zc + dst.camera.cx
    v = dst.camera.fy * q[..., 1] / zc + dst.camera.cy
    hd, wd = dst.depth.shape
    grid = torch.stack([u / wd * 2 - 1, v / hd * 2 - 1], -1)[None].float()  # align_corners=False convention
    d_dst = F.grid_sample(dst.depth[None, None], grid, mode="bilinear", align_corners=False)[0, 0].double()
    a_dst = F.grid_sample(dst.alpha[None, None], grid, mode="bilinear", align_corners=False)[0, 0]
    valid = ((z > 1e-6) & (u >= 0.5) & (u <= wd - 0.5) & (v >= 0.5) & (v <= hd - 0.5)
             & (src.alpha >= min_alpha) & (a_dst >= min_alpha) & ((z - d_dst).abs() <= depth_tol * z))
    return grid, valid


def warp_error(img_src: torch.Tensor, img_dst: torch.Tensor, grid: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean absolute colour difference between src pixels and dst sampled where they land ([3,H,W] in [0,1])."""
    if int(valid.sum()) == 0:
        return float("nan")
    sampled = F.grid_sample(img_dst[None].float(), grid, mode="bilinear", align_corners=False)[0]
    return float((img_src.float() - sampled).abs().mean(0)[valid].mean())


class ConsistencyMeter:
    """Multi-view consistency of a set of test views: per view, the mean warp error into every other view,
    relative to the same measure on ground truth. The correspondences are computed once per scene."""

    def __init__(self, geometry: list[ViewGeometry], gt_images: list, depth_tol: float = 0.02, min_pixels: int = 64):
        self.n = len(geometry)
        self.pairs = {}
        for i in range(self.n):
            for j in range(self.n):
                if i != j:
                    grid, valid = warp_correspondences(geometry[i], geometry[j], depth_tol)
                    if int(valid.sum()) >= min_pixels:
                        self.pairs[(i, j)] = (grid, valid)
        self.gt_error = self.errors(gt_images, relative=False)

    def covisible_fraction(self) -> float:
        if not self.pairs:
            return 0.0
        return float(np.mean([float(v.float().mean()) for _, v in self.pairs.values()]))

    def errors(self, images: list, relative: bool = True) -> np.ndarray:
        """Per view: mean warp error over its co-visible partner views (NaN where it has none)."""
        if len(images) != self.n:
            raise NifiError(f"consistency needs {self.n} views, got {len(images)}")
        ims = [as_chw(im) for im in images]
        out = np.full(self.n, np.nan)
        for i in range(self.n):
            e = [warp_error(ims[i], ims[j], *self.pairs[(i, j)]) for j in range(self.n) if (i, j) in self.pairs]
            if e:
                out[i] = float(np.mean(e))
        return out / self.gt_error if relative else out


def as_chw(img) -> torch.Tensor:
    """uint8/float HxWx3, [3,H,W] or [1,3,H,W] -> float [3,H,W] (uint8 scaled to [0,1])."""
    return to_bchw(img)[0]


# ---------------------------------------------------------------------- inputs
def list_test_views(renders_dir: Path, max_views: int = 0) -> list[str]:
    """The test-view file names of a scene (its ground-truth folder); the first `max_views` of them (0: all).
    Asking for more views than the scene has is an error, never a silently smaller sample."""
    views = sorted(p.name for p in (renders_dir / "gt").glob("*.png"))
    if not views:
        raise NifiError(f"no ground-truth test views in {renders_dir / 'gt'} (run the synthesis stage)")
    if max_views < 0 or max_views > len(views):
        raise NifiError(f"max_views = {max_views}, but {renders_dir.name} has {len(views)} test views "
                        f"(use 0 for all, or generate more views: scenes.n_views_eval)")
    return views[: max_views or None]


def load_rgb(path: Path) -> np.ndarray:
    """An RGB uint8 HxWx3 image (`core.images.read_rgb`); a missing file is one NifiError line."""
    return read_rgb(path)


def save_rgb(img, path: Path) -> np.ndarray:
    """Write an image in [0,1] (HxWx3 or [3,H,W]) as 8-bit PNG; returns what was written, which is what is scored."""
    from PIL import Image

    t = as_chw(img)
    u8 = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8).save(path)
    return u8


def external_restorer_images(entry: dict, views: list[str], shape: tuple) -> list[np.ndarray]:
    """Another tool's restored images of our compressed renders: one PNG per test view, same size."""
    for k in ("name", "scene", "rate", "folder"):
        if k not in entry:
            raise NifiError(f"external restorer entry {entry} lacks {k!r} (needs name, scene, rate, folder)")
    folder = Path(entry["folder"])
    if not folder.is_dir():
        raise NifiError(f"external restorer {entry['name']}: folder {folder} not found")
    out = []
    for v in views:
        if not (folder / v).is_file():
            raise NifiError(f"external restorer {entry['name']}: {folder / v} missing (one PNG per test view)")
        im = load_rgb(folder / v)
        if im.shape != shape:
            raise NifiError(f"external restorer {entry['name']}: {v} is {im.shape}, the test view is {shape}")
        out.append(im)
    return out


# ---------------------------------------------------------------------- scoring, summaries, targets
def score_rows(method: str, scene: str, codec: str, rate: str, ims: list, gt_ims: list, views: list[str], ms: list,
               nbytes: int, ply_bytes: int, metrics: list[str], meter: "ConsistencyMeter | None", device: str) -> list[dict]:
    """One benchmark.csv row per test view: full-reference metrics against the ground truth, multi-view
    consistency, and the periodic-artifact score of the image and of its ground truth (and their difference)."""
    from nifi_utils.measure.metrics import flat_excess, image_metrics, periodic_artifact

    if not (len(ims) == len(gt_ims) == len(views) == len(ms)):
        raise NifiError(f"{method} {scene} {rate}: {len(ims)} images, {len(gt_ims)} ground truths, {len(views)} views")
    sc = image_metrics(np.stack(ims), np.stack(gt_ims), metrics)
    mv = meter.errors(ims) if meter is not None else np.full(len(ims), np.nan)
    pa = periodic_artifact(np.stack(ims)).numpy().astype(np.float64)
    pg = periodic_artifact(np.stack(gt_ims)).numpy().astype(np.float64)
    fx = flat_excess(np.stack(ims), np.stack(gt_ims)).numpy().astype(np.float64)
    return [{"method": method, "codec": codec, "rate": rate, "scene": scene, "view": v, "bytes": nbytes,
             "size_mb": nbytes / 1e6, "size_mib": nbytes / 2**20, "ratio": ply_bytes / nbytes,
             **{m: float(sc[m][i]) for m in metrics}, "mv_consistency": float(mv[i]),
             "periodic": float(pa[i]), "periodic_gt": float(pg[i]), "periodic_excess": float(pa[i] - pg[i]),
             "flat_excess": float(fx[i]), "ms_per_image": ms[i], "device": device} for i, v in enumerate(views)]


def rate_key(codec: str, rate: str) -> str:
    """metrics.json's key of a rate: `level0` for our codec (and `uncompressed`), `<codec>_<rate>` otherwise."""
    return rate if codec in (OUR_CODEC, "uncompressed") else f"{codec}_{rate}"


def summary(df, columns: list[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """method -> rate key -> {column: mean, column_ci95: [lo, hi]} (scene-then-view means, two-level bootstrap)."""
    from nifi_utils.measure.stats import mean_ci, scene_view_mean

    out: dict = {}
    for (codec, rate, method), g in df.groupby(["codec", "rate", "method"], sort=False):
        cell = out.setdefault(method, {}).setdefault(rate_key(codec, rate), {})
        for c in columns:
            if c not in g or g[c].isna().all():
                cell[c] = None
                continue
            if c in ("size_mb", "size_mib", "ratio", "bytes", "ms_per_image"):
                cell[c] = round(scene_view_mean(g, c), 6)  # sizes/timings: no interval
                continue
            m, lo, hi = mean_ci(g, c, n_boot, seed)
            cell[c], cell[f"{c}_ci95"] = round(m, 6), [round(lo, 6), round(hi, 6)]
    return out


def check_targets(df, *, heldout: str, trained: str, heldout_gain: float = 0.15,
                  trained_gain: float = 0.20, transfer: float = 0.6, psnr_margin_db: float = 0.3,
                  ssim_margin: float = 0.03, periodic_mean: float = 0.05, periodic_upper: float = 0.10,
                  wo_t0_rates: int = 2, moonshot_rates: int = 2) -> tuple[dict, list[str]]:
    """The benchmark's targets for our codec, every rate, on 95 % paired bootstrap intervals where the
    target names one. `heldout`: the perceptual network NiFi never trains on (the judge); `trained`: the one it does.
    - against the regression row (the strongest simple baseline, trained on NiFi's pairs and data loss): never worse
      on `heldout` (lower bound of nifi - regression <= 0), less invention (flat-region excess below the regression
      row's), and at equal distortion (NiFi's PSNR at least the regression row's - `psnr_margin_db`, SSIM at least
      its - `ssim_margin`, mean paired differences); the paper's claim, below it on `heldout` (upper bound < 0) at
      `moonshot_rates` rates;
    - against the compressed render: better on `heldout` (upper bound < 0), at least `heldout_gain` / `trained_gain`
      relative gains on `heldout` / `trained`, and a held-out gain at least `transfer` x the trained gain (a gain on
      the trained metric alone means the restorer learnt the metric);
    - NiFi below w/o t0 on `heldout` (lower bound of w/o t0 - nifi > 0) at `wo_t0_rates` rates; NiFi's and w/o t0's
      periodic-artifact excess over the ground truth at most `periodic_mean` (upper bound at most `periodic_upper`);
    - NiFi best of the other restorers on both perceptual metrics (paired upper bound < 0)."""
    from nifi_utils.measure.stats import mean_ci, paired_difference, relative_gain, scene_view_mean

    ours = df[df["codec"] == OUR_CODEC]
    have = set(ours["method"])
    checks, lines = {}, []
    if "nifi" not in have or "compressed" not in have:
        return checks, ["no nifi or compressed rows: no targets checked"]
    others = [m for m in METHOD_ORDER + sorted(have)
              if m in have and m not in ("nifi", "nifi_no_tsd", "3dgs", "compressed", *REFINED)]
    others = list(dict.fromkeys(others))
    keys = [k for k in (heldout, trained) if k in ours and ours[k].notna().any()]
    wo_t0_better, beats_regression = [], []
    for r in sorted(set(ours["rate"])):
        at = {m: g for m, g in ours[ours["rate"] == r].groupby("method")}
        n, c = at["nifi"], at["compressed"]
        gains = {}
        if heldout in keys:
            d, lo, hi = paired_difference(n, c, heldout, what=f"{r} nifi vs compressed")
            checks[f"nifi_beats_compressed_{heldout}_{r}"] = bool(hi < 0)
            lines.append(f"{r}: nifi - compressed {heldout} (held out) {d:+.4f} [{lo:+.4f}, {hi:+.4f}] (target: upper bound < 0)")
        for key, want, role in ((heldout, heldout_gain, "held out"), (trained, trained_gain, "trained on")):
            if key in keys:
                g, lo, hi = relative_gain(c, n, key, what=f"{r} nifi vs compressed")
                gains[key] = g
                checks[f"nifi_improves_{key}_{round(100 * want)}pct_{r}"] = bool(g >= want)
                lines.append(f"{r}: nifi improves {key} ({role}) over compressed by {100 * g:.1f}% "
                             f"[{100 * lo:.1f}, {100 * hi:.1f}] (target: >= {100 * want:.0f}%)")
        if len(gains) == 2:
            ratio = gains[heldout] / gains[trained] if gains[trained] > 0 else float("nan")
            checks[f"nifi_gain_transfers_{r}"] = bool(ratio >= transfer)
            lines.append(f"{r}: held-out gain / trained gain {ratio:.2f} (target: >= {transfer})")
        for key in keys:
            if others:
                best = min(others, key=lambda m: scene_view_mean(at[m], key))
                d, lo, hi = paired_difference(n, at[best], key, what=f"{r} nifi vs {best}")
                checks[f"nifi_best_{key}_{r}"] = bool(hi < 0)
                lines.append(f"{r}: nifi - {best} (best other) {key} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        if "regression" in at:
            g = at["regression"]
            if heldout in keys:
                d, lo, hi = paired_difference(n, g, heldout, what=f"{r} nifi vs regression")
                checks[f"nifi_not_worse_than_regression_{heldout}_{r}"] = bool(lo <= 0)
                beats_regression.append(bool(hi < 0))
                lines.append(f"{r}: nifi - regression {heldout} (held out) {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                             f"(target: lower bound <= 0; paper's claim: upper bound < 0)")
            d, lo, hi = paired_difference(n, g, "flat_excess", what=f"{r} nifi vs regression (flat_excess)")
            checks[f"nifi_invents_less_than_regression_{r}"] = bool(d < 0)
            lines.append(f"{r}: nifi - regression flat-region excess {d:+.4f} [{lo:+.4f}, {hi:+.4f}] (target: < 0)")
            for metric, margin in (("psnr", psnr_margin_db), ("ssim", ssim_margin)):
                if metric in n and n[metric].notna().all():
                    d, lo, hi = paired_difference(n, g, metric, what=f"{r} nifi vs regression ({metric})")
                    checks[f"nifi_{metric}_within_{margin:g}_of_regression_{r}"] = bool(d >= -margin)
                    lines.append(f"{r}: nifi - regression {metric} {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (target: >= -{margin:g})")
        if "nifi_wo_t0" in at and heldout in keys:
            d, lo, hi = paired_difference(at["nifi_wo_t0"], n, heldout, what=f"{r} nifi_wo_t0 vs nifi")
            wo_t0_better.append(bool(lo > 0))
            lines.append(f"{r}: nifi_wo_t0 - nifi {heldout} {d:+.4f} [{lo:+.4f}, {hi:+.4f}] (nifi better where lower bound > 0)")
        for m in ("nifi", "nifi_wo_t0"):
            if m in at:
                e, lo, hi = mean_ci(at[m], "periodic_excess")
                checks[f"{m}_periodic_like_gt_{r}"] = bool(e <= periodic_mean and hi <= periodic_upper)
                lines.append(f"{r}: {m} periodic-artifact excess over GT {e:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"(target: <= {periodic_mean}, upper bound <= {periodic_upper})")
        refined_checks(at, r, trained, checks, lines)
    if wo_t0_better:
        checks[f"nifi_beats_wo_t0_{heldout}_at_{wo_t0_rates}_rates"] = sum(wo_t0_better) >= min(wo_t0_rates, len(wo_t0_better))
        lines.append(f"nifi better than nifi_wo_t0 on {heldout} at {sum(wo_t0_better)} of {len(wo_t0_better)} rates "
                     f"(target: >= {wo_t0_rates})")
    if beats_regression:
        checks[f"moonshot_nifi_beats_regression_{heldout}_at_{moonshot_rates}_rates"] = (
            sum(beats_regression) >= min(moonshot_rates, len(beats_regression)))
        lines.append(f"nifi better than regression on {heldout} at {sum(beats_regression)} of {len(beats_regression)} rates "
                     f"(the paper's claim; moonshot target: >= {moonshot_rates})")
    return checks, lines


def refined_checks(at: dict, r: str, key: str, checks: dict, lines: list, gain: float = 0.20, psnr_drop_db: float = 0.3,
                   consistency_margin: float = 0.05) -> None:
    """NiFi-3D's targets at rate `r`, on paired intervals: the refined 3DGS alone (`nifi_3d`) at least
    `gain` better than the compressed render on `key` (lower bound), PSNR at most `psnr_drop_db` below it (lower
    bound), multi-view inconsistency not above the compressed render's by more than `consistency_margin` (upper
    bound; 1.0 = ground truth's); refined + per-frame NiFi (`nifi_3d_plus`) better than NiFi on `key` and PSNR."""
    from nifi_utils.measure.stats import paired_difference, relative_gain

    c = at["compressed"]
    if "nifi_3d" in at:
        n3 = at["nifi_3d"]
        g, lo, hi = relative_gain(c, n3, key, what=f"{r} nifi_3d vs compressed")
        checks[f"nifi_3d_improves_{key}_{round(100 * gain)}pct_{r}"] = bool(lo >= gain)
        lines.append(f"{r}: nifi_3d improves {key} over compressed by {100 * g:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"(target: lower bound >= {100 * gain:.0f}%)")
        if "psnr" in n3 and n3["psnr"].notna().all():
            d, lo, hi = paired_difference(n3, c, "psnr", what=f"{r} nifi_3d vs compressed (psnr)")
            checks[f"nifi_3d_psnr_within_{psnr_drop_db:g}_{r}"] = bool(lo >= -psnr_drop_db)
            lines.append(f"{r}: nifi_3d - compressed psnr {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (target: lower bound >= -{psnr_drop_db:g})")
        if n3["mv_consistency"].notna().any():
            d, lo, hi = paired_difference(n3.dropna(subset=["mv_consistency"]), c.dropna(subset=["mv_consistency"]),
                                          "mv_consistency", what=f"{r} nifi_3d vs compressed (mv_consistency)")
            checks[f"nifi_3d_consistent_{r}"] = bool(hi <= consistency_margin)
            lines.append(f"{r}: nifi_3d - compressed mv_consistency {d:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                         f"(target: upper bound <= {consistency_margin})")
    if "nifi_3d_plus" in at and "nifi" in at:
        p, n = at["nifi_3d_plus"], at["nifi"]
        d, lo, hi = paired_difference(p, n, key, what=f"{r} nifi_3d_plus vs nifi")
        checks[f"nifi_3d_plus_better_{key}_{r}"] = bool(hi < 0)
        lines.append(f"{r}: nifi_3d_plus - nifi {key} {d:+.4f} [{lo:+.4f}, {hi:+.4f}] (target: upper bound < 0)")
        if "psnr" in p and p["psnr"].notna().all():
            d, lo, hi = paired_difference(p, n, "psnr", what=f"{r} nifi_3d_plus vs nifi (psnr)")
            checks[f"nifi_3d_plus_better_psnr_{r}"] = bool(lo > 0)
            lines.append(f"{r}: nifi_3d_plus - nifi psnr {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (target: lower bound > 0)")


# ---------------------------------------------------------------------- the stage's steps (one call each)
def assert_no_leakage(data: Path, scene_meta: dict, eval_scenes: list[str], corpus: dict) -> str:
    """Assert on the data that nothing of the evaluation scenes was trained on: pair folders belong to training
    scenes, evaluation seeds/layouts are neither training scenes' nor the prior corpus's, the photo split is
    disjoint, and no evaluation ground-truth image is byte-identical to a training image. Returns a summary."""
    import hashlib

    from nifi_utils.gs.scenes import EVAL_PHOTOS, TRAIN_PHOTOS

    def digest(p):
        return hashlib.sha1(load_rgb(p).tobytes()).hexdigest()

    def layout(s):
        return scene_meta[s].get("seed"), scene_meta[s].get("layout_id")

    if set(EVAL_PHOTOS) & set(TRAIN_PHOTOS):
        raise NifiError("evaluation and training photographs overlap")
    pair_scenes = sorted(p.name for p in (data / "pairs").iterdir() if p.is_dir())
    if not all(scene_meta[s].get("split") == "train" for s in pair_scenes) or set(pair_scenes) & set(eval_scenes):
        raise NifiError("a distillation pair comes from a non-training scene")
    procedural = [s for s in eval_scenes if scene_meta[s].get("source") == "procedural"]
    train_layouts = {layout(s) for s in scene_meta if s not in eval_scenes}
    if any(layout(s) in train_layouts for s in procedural):
        raise NifiError("an evaluation layout repeats a training one")
    prior_layouts = {(c.get("seed"), c.get("layout_id")) for c in corpus.get("scenes", []) + corpus.get("prior_scenes", [])}
    if any(layout(s) in prior_layouts for s in procedural):
        raise NifiError("an evaluation scene is in the prior's training corpus")
    if set(corpus.get("photos", [])) & set(EVAL_PHOTOS):
        raise NifiError("the prior trained on an evaluation photograph")
    train_hashes = {digest(p) for p in (data / "pairs").glob("*/clean/*.png")}
    eval_hashes = {digest(p) for s in eval_scenes for p in (data / "renders" / s / "gt").glob("*.png")}
    if train_hashes & eval_hashes:
        raise NifiError("an evaluation ground-truth image is also a training image")
    return (f"no leakage: {len(pair_scenes)} training scenes, {len(prior_layouts)} prior-corpus scenes, {len(eval_scenes)} "
            f"evaluation scenes, {len(train_hashes)} training / {len(eval_hashes)} evaluation images, photo split "
            f"{len(TRAIN_PHOTOS)}/{len(EVAL_PHOTOS)}")


def benchmark_inputs(data: Path, eval_scenes: list[str], records: dict, synthesis: dict) -> list[dict]:
    """Every (scene, codec, rate) to restore: our codec's levels and the external codecs' renders."""
    inputs = []
    for s in eval_scenes:
        rec = records[s]
        for lv in rec["levels"]:
            inputs.append({"scene": s, "codec": OUR_CODEC, "rate": f"level{lv['level']}", "bytes": lv["bytes"],
                           "folder": data / "renders" / s / f"level{lv['level']}", "ply_bytes": rec["ply_bytes"]})
        for e in synthesis.get("external", []):
            if e["scene"] == s:
                inputs.append({"scene": s, "codec": e["name"], "rate": e["rate"], "bytes": e["bytes"],
                               "folder": data / e["folder"], "ply_bytes": rec["ply_bytes"]})
    return inputs


def _clock(fn, device: torch.device):
    """(fn(), milliseconds), with the GPU's queue drained before and after so the time is the work's."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    y = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return y, 1000 * (time.perf_counter() - t)


def _timed(fn, im: np.ndarray, device: torch.device) -> tuple[torch.Tensor, float]:
    x = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255
    y, ms = _clock(lambda: fn(x), device)
    return y[0].cpu(), ms


def tune_bm3d_sigma(pairs_dir: Path, sigmas: list[float], n_pairs: int, perceptual: str, workers: int = 1,
                    seed: int = 0) -> tuple[float, dict]:
    """BM3D's noise level as its users would set it: the value of `sigmas` (in 8-bit steps) with the lowest data loss
    of the learned restorers (pixel MSE of [-1, 1] images + `perceptual`) on `n_pairs` training pairs drawn over
    every level (never an evaluation image). Returns (sigma in [0, 1] units, {sigma in steps: loss})."""
    from nifi_utils.models.distill import PairSet
    from nifi_utils.measure.metrics import image_metrics

    pairs = PairSet.from_pairs_dir(pairs_dir)
    idx = torch.randperm(len(pairs.lq), generator=torch.Generator().manual_seed(seed))[:n_pairs]
    lq = [pairs.lq[i].permute(1, 2, 0).numpy() / 255.0 for i in idx]
    hq = torch.stack([pairs.hq[i] for i in idx]).float() / 255
    losses = {}
    for s in sigmas:
        out = torch.stack([torch.from_numpy(o).permute(2, 0, 1).float()
                           for o, _, _ in bm3d_many(lq, workers=workers, sigma=s / 255.0)])
        mse = float(((out * 2 - hq * 2) ** 2).mean())
        losses[float(s)] = mse + float(image_metrics(out, hq, [perceptual])[perceptual].mean())
    best = min(losses, key=losses.get)
    return best / 255.0, losses


def nifi_restore_fn(variant: str, base_model: Path, restorer_dir: Path, cfg: dict, device: torch.device, seed: int,
                    tile: int | None):
    """A distilled variant's one-step restore [1,3,H,W] -> [1,3,H,W], with the t0 and latent mode it was trained with."""
    from nifi_utils.models.restorer import Restorer

    ckpt = restorer_dir / f"{variant}.pt"
    if not ckpt.is_file():
        raise NifiError(f"restorer checkpoint {ckpt} missing: run the distill stage (variants in params.yaml)")
    r = Restorer.from_pretrained(base_model, device=device).load_lora(ckpt)

    def fn(x):
        return r.restore(x, t0=cfg["t0"], seed=seed, tile=tile, sample=cfg["latent"] == "sample")
    return fn


def run_methods(methods: list[str], lq: dict, views: dict, out_img: Path, device: torch.device, base_model: Path,
                restorer_dir: Path, variant_cfg: dict, t0: float, img2img_steps: int, img2img_guidance: float,
                tile: int | None, seed: int, bm3d_sigma: float | None = None) -> dict:
    """Restore every input with every method, one image at a time (the latency a user sees), saving PNGs.

    `lq`: (scene, codec, rate) -> uint8 images. Returns (method, scene, codec, rate) -> (uint8 images as saved,
    ms per image). `compressed` is the input itself; BM3D's C core is single-threaded, so its images are
    spread over processes (at `bm3d_sigma`, or a per-image estimate where None); NiFi variants use the t0 and latent
    mode they were trained with (`variant_cfg`); `regression` is the distill stage's baseline network."""
    import os

    from nifi_utils.core.common import progress
    from nifi_utils.models.restorer import Restorer

    keys = list(lq)
    outputs = {("compressed", *k): (lq[k], [0.0] * len(lq[k])) for k in keys}
    if "bm3d" in methods:
        flat = [(k, i) for k in keys for i in range(len(lq[k]))]
        for (k, i), (im, _sigma, sec) in zip(flat, bm3d_many([lq[k][i] / 255.0 for k, i in flat], workers=os.cpu_count() or 1,
                                                           sigma=bm3d_sigma)):
            ims, ms = outputs.setdefault(("bm3d", *k), ([], []))
            ims.append(save_rgb(im, out_img / "bm3d" / k[0] / k[2] / views[k[0]][i]))
            ms.append(1000 * sec)
    for m in [m for m in methods if m in ("img2img", "regression") or m in NIFI_VARIANTS]:  # REFINED: see run_refined
        if m == "regression":
            from nifi_utils.models.regression import load_regression

            net = load_regression(restorer_dir / "regression.pt", device)

            def fn(x):
                return net.restore(x)
        elif m == "img2img":
            r = Restorer.from_pretrained(base_model, device=device)

            def fn(x):
                return r.img2img(x, t0=t0, steps=img2img_steps, guidance=img2img_guidance, seed=seed, tile=tile)
        else:
            fn = nifi_restore_fn(m, base_model, restorer_dir, variant_cfg[m], device, seed, tile)
        _timed(fn, lq[keys[0]][0], device)  # warm-up (allocations, kernels) is not part of the timing
        for k in progress(keys, desc=m):
            ims, ms = [], []
            for v, im in zip(views[k[0]], lq[k]):
                y, t_ms = _timed(fn, im, device)
                ims.append(save_rgb(y, out_img / m / k[0] / k[2] / v))
                ms.append(t_ms)
            outputs[(m, *k)] = (ims, ms)
    return outputs


def _timed_render(scene, cam, background, device: torch.device) -> tuple[np.ndarray, float]:
    from nifi_utils.gs.render import render

    with torch.no_grad():
        rgb, ms = _clock(lambda: render(scene, cam, background=background)["rgb"], device)
    return (rgb.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8), ms


def run_refined(methods: list[str], keys: list[tuple], views: dict, data: Path, out_img: Path, device: torch.device,
                base_model: Path, restorer_dir: Path, variant_cfg: dict, background, seed: int,
                tile: int | None) -> tuple[dict, dict]:
    """NiFi-3D rows: render the refine stage's `.ply` of every (scene, our codec, rate) at the test cameras
    (`nifi_3d`, ms = one render), then restore those renders with NiFi (`nifi_3d_plus`, ms = render + restore).
    The decoded level is rendered at the same cameras and timed the same way, so the two render times are
    measured side by side. Returns (outputs like `run_methods`, {'render_decoded_ms', 'render_refined_ms'})."""
    from nifi_utils.codec import container as codec
    from nifi_utils.gs.cameras import read_transforms
    from nifi_utils.core.common import progress
    from nifi_utils.gs.gaussians import read_ply

    wanted = [m for m in REFINED if m in methods]
    if not wanted:
        return {}, {}
    restore_fn = (nifi_restore_fn("nifi", base_model, restorer_dir, variant_cfg["nifi"], device, seed, tile)
                  if "nifi_3d_plus" in wanted else None)
    outputs, t_dec, t_ref = {}, [], []
    for k in progress([k for k in keys if k[1] == OUR_CODEC], desc="nifi_3d"):
        s, _, rate = k
        ply = data / "refined" / s / f"{rate}.ply"
        if not ply.is_file():
            raise NifiError(f"refined scene {ply} missing: run the refine stage (dvc repro refine)")
        cams = read_transforms(data / "scenes" / s / "transforms.json")
        names = [Path(p).stem + ".png" for p in cams.file_paths]
        refined = read_ply(ply).to(device)
        decoded = codec.load(data / "bitstreams" / s / f"{rate}.nifi")[0].to(device)
        _timed_render(refined, cams[names.index(views[s][0])], background, device)  # warm-up
        ims, ms, ims_p, ms_p = [], [], [], []
        for v in views[s]:
            cam = cams[names.index(v)]
            t_dec.append(_timed_render(decoded, cam, background, device)[1])
            im, t = _timed_render(refined, cam, background, device)
            t_ref.append(t)
            ims.append(save_rgb(im, out_img / "nifi_3d" / s / rate / v))
            ms.append(t)
            if restore_fn is not None:
                y, t_r = _timed(restore_fn, im, device)
                ims_p.append(save_rgb(y, out_img / "nifi_3d_plus" / s / rate / v))
                ms_p.append(t + t_r)
        if "nifi_3d" in wanted:
            outputs[("nifi_3d", *k)] = (ims, ms)
        if restore_fn is not None:
            outputs[("nifi_3d_plus", *k)] = (ims_p, ms_p)
    return outputs, {"render_decoded_ms": float(np.mean(t_dec)), "render_refined_ms": float(np.mean(t_ref))}


def consistency_figure(meter: "ConsistencyMeter", gt_ims: list, outputs: dict, views: list[str], methods: list[str],
                       scene: str, title: str):
    """One co-visible view pair: each method's view i and |view i - warp(view j)| on co-visible pixels."""
    import matplotlib.pyplot as plt

    if meter is None or not meter.pairs:
        fig = plt.figure(figsize=(3, 1))
        fig.text(0.1, 0.5, "consistency disabled or no co-visible pairs")
        return fig
    (i, j), (grid, valid) = next(iter(meter.pairs.items()))
    rate = sorted({k[3] for k in outputs if k[1] == scene and k[2] == OUR_CODEC})[0]
    shown = [("ground truth", gt_ims)] + [(m, outputs[(m, scene, OUR_CODEC, rate)][0]) for m in ["compressed", *methods]
                                          if (m, scene, OUR_CODEC, rate) in outputs]
    fig, axes = plt.subplots(2, len(shown), figsize=(2.2 * len(shown), 4.6), squeeze=False)
    for c, (name, ims) in enumerate(shown):
        a, b = as_chw(ims[i]), as_chw(ims[j])
        err = (a - F.grid_sample(b[None], grid, align_corners=False)[0]).abs().mean(0) * valid
        axes[0, c].imshow(ims[i]), axes[0, c].set_title(f"{name}\nview {views[i]}", fontsize=7)
        axes[1, c].imshow(err, cmap="magma", vmin=0, vmax=0.25)
        axes[1, c].set_title(f"|view i - warp(view j)|\nmean {float(err[valid].mean()):.4f}", fontsize=7)
        for ax in axes[:, c]:
            ax.axis("off")
    fig.suptitle(f"{title}: {scene}, {rate}, views {views[i]} <- {views[j]}", fontsize=8)
    fig.tight_layout()
    return fig


def consistency_meters(data: Path, eval_scenes: list[str], views: dict, gt: dict, device, depth_tol: float) -> dict:
    """Per evaluation scene, a ConsistencyMeter over its test views (uncompressed scene's depth, occlusion test)."""
    from nifi_utils.gs.cameras import read_transforms
    from nifi_utils.gs.gaussians import read_ply

    meters = {}
    for s in eval_scenes:
        cams = read_transforms(data / "scenes" / s / "transforms.json")
        names = [Path(p).stem + ".png" for p in cams.file_paths]  # the synthesis stage names renders this way
        scene = read_ply(data / "scenes" / s / "point_cloud.ply").to(device)
        geom = render_geometry(scene, [cams[names.index(v)] for v in views[s]])
        meters[s] = ConsistencyMeter(geom, gt[s], depth_tol)
    return meters


def score_all(outputs: dict, inputs: list[dict], gt: dict, views: dict, unc: dict, records: dict, metrics: list[str],
              meters: dict, device: str):
    """benchmark.csv as a DataFrame: the uncompressed 3DGS reference rows, then every (method, input) image."""
    import pandas as pd

    from nifi_utils.core.common import progress

    rows = []
    for s in unc:
        rows += score_rows("3dgs", s, "uncompressed", "uncompressed", unc[s], gt[s], views[s], [float("nan")] * len(unc[s]),
                           records[s]["ply_bytes"], records[s]["ply_bytes"], metrics, meters.get(s), device)
    by_key = {(i["scene"], i["codec"], i["rate"]): i for i in inputs}
    # scene by scene: the ground truth's ST-LPIPS features are computed once per scene (metrics.stlpips)
    for (m, s, codec, rate), (ims, ms) in progress(sorted(outputs.items(), key=lambda kv: kv[0][1]), desc="metrics"):
        i = by_key[(s, codec, rate)]
        rows += score_rows(m, s, codec, rate, ims, gt[s], views[s], ms, i["bytes"], i["ply_bytes"], metrics, meters.get(s), device)
    order = {m: n for n, m in enumerate(METHOD_ORDER)}
    return pd.DataFrame(rows).sort_values(["codec", "rate", "method", "scene", "view"],
                                          key=lambda c: c.map(order).fillna(99) if c.name == "method" else c)
