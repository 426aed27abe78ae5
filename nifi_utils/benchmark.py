"""Layer 6 (evaluation): the benchmark's baselines, the multi-view consistency measure and its rows.

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

from .bm3d_baseline import bm3d_many, bm3d_restore, estimate_noise_sigma  # noqa: F401  (re-exported)
from .cameras import Camera
from .common import NifiError
from .metrics import to_bchw

METHOD_ORDER = ["3dgs", "compressed", "bm3d", "img2img", "nifi_wo_t0", "nifi_no_tsd", "nifi"]
NIFI_VARIANTS = ("nifi", "nifi_wo_t0", "nifi_no_tsd")
OUR_CODEC = "nifi3dgs"



# ---------------------------------------------------------------------- multi-view consistency
@dataclass
class ViewGeometry:
    """What the warp needs of one view: its camera and the uncompressed scene's depth and alpha there."""
    camera: Camera
    depth: torch.Tensor  # [H,W] expected z-depth in the camera's frame
    alpha: torch.Tensor  # [H,W] accumulated opacity


def render_geometry(scene, cameras: list[Camera]) -> list[ViewGeometry]:
    """Depth and alpha of the (uncompressed) scene in each camera."""
    from .render import render

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
def list_test_views(renders_dir: Path) -> list[str]:
    """The test-view file names of a scene (its ground-truth folder)."""
    views = sorted(p.name for p in (renders_dir / "gt").glob("*.png"))
    if not views:
        raise NifiError(f"no ground-truth test views in {renders_dir / 'gt'} (run the synthesis stage)")
    return views


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise NifiError(f"image {path} not found")
    return np.asarray(Image.open(path).convert("RGB"))


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
    from .metrics import image_metrics, periodic_artifact

    if not (len(ims) == len(gt_ims) == len(views) == len(ms)):
        raise NifiError(f"{method} {scene} {rate}: {len(ims)} images, {len(gt_ims)} ground truths, {len(views)} views")
    sc = image_metrics(np.stack(ims), np.stack(gt_ims), metrics)
    mv = meter.errors(ims) if meter is not None else np.full(len(ims), np.nan)
    pa = periodic_artifact(np.stack(ims)).numpy().astype(np.float64)
    pg = periodic_artifact(np.stack(gt_ims)).numpy().astype(np.float64)
    return [{"method": method, "codec": codec, "rate": rate, "scene": scene, "view": v, "bytes": nbytes,
             "size_mb": nbytes / 1e6, "size_mib": nbytes / 2**20, "ratio": ply_bytes / nbytes,
             **{m: float(sc[m][i]) for m in metrics}, "mv_consistency": float(mv[i]),
             "periodic": float(pa[i]), "periodic_gt": float(pg[i]), "periodic_excess": float(pa[i] - pg[i]),
             "ms_per_image": ms[i], "device": device} for i, v in enumerate(views)]


def rate_key(codec: str, rate: str) -> str:
    """metrics.json's key of a rate: `level0` for our codec (and `uncompressed`), `<codec>_<rate>` otherwise."""
    return rate if codec in (OUR_CODEC, "uncompressed") else f"{codec}_{rate}"


def summary(df, columns: list[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """method -> rate key -> {column: mean, column_ci95: [lo, hi]} (scene-then-view means, two-level bootstrap)."""
    from .stats import mean_ci

    out: dict = {}
    for (codec, rate, method), g in df.groupby(["codec", "rate", "method"], sort=False):
        cell = out.setdefault(method, {}).setdefault(rate_key(codec, rate), {})
        for c in columns:
            if c not in g or g[c].isna().all():
                cell[c] = None
                continue
            if c in ("size_mb", "size_mib", "ratio", "bytes", "ms_per_image"):
                cell[c] = round(float(g.groupby("scene")[c].mean().mean()), 6)  # sizes/timings: no interval
                continue
            m, lo, hi = mean_ci(g, c, n_boot, seed)
            cell[c], cell[f"{c}_ci95"] = round(m, 6), [round(lo, 6), round(hi, 6)]
    return out


def check_targets(df, key: str = "stlpips_alex", gain: float = 0.35, ssim_drop: float = 0.05, psnr_drop_db: float = 1.0,
                  periodic_margin: float = 0.05) -> tuple[dict, list[str]]:
    """The benchmark's targets, each decided on 95 % paired bootstrap intervals (our codec, every rate):
    NiFi better than every other restorer (interval of the difference below 0); NiFi's gain over the
    compressed render at least `gain` (lower bound); w/o t0 worse than NiFi; NiFi's SSIM and PSNR within
    `ssim_drop` / `psnr_drop_db` of the compressed render's (lower bound of the paired difference); NiFi's
    and w/o t0's periodic-artifact excess over the ground truth below `periodic_margin` (upper bound)."""
    from .stats import mean_ci, paired_difference, relative_gain

    ours = df[df["codec"] == OUR_CODEC]
    have = set(ours["method"])
    checks, lines = {}, []
    if "nifi" not in have or "compressed" not in have:
        return checks, ["no nifi or compressed rows: no targets checked"]
    others = [m for m in METHOD_ORDER + sorted(have) if m in have and m not in ("nifi", "nifi_no_tsd", "3dgs", "compressed")]
    others = list(dict.fromkeys(others))
    for r in sorted(set(ours["rate"])):
        at = {m: g for m, g in ours[ours["rate"] == r].groupby("method")}
        n = at["nifi"]
        if others:
            best = min(others, key=lambda m: mean_ci(at[m], key)[0])
            d, lo, hi = paired_difference(n, at[best], key, what=f"{r} nifi vs {best}")
            checks[f"nifi_best_{key}_{r}"] = bool(hi < 0)
            lines.append(f"{r}: nifi - {best} (best other) {key} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        g, lo, hi = relative_gain(at["compressed"], n, key, what=f"{r} nifi vs compressed")
        checks[f"nifi_improves_{key}_{round(100 * gain)}pct_{r}"] = bool(lo >= gain)
        lines.append(f"{r}: nifi improves {key} over compressed by {100 * g:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"(target: lower bound >= {100 * gain:.0f}%)")
        if "nifi_wo_t0" in at:
            d, lo, hi = paired_difference(at["nifi_wo_t0"], n, key, what=f"{r} nifi_wo_t0 vs nifi")
            checks[f"nifi_wo_t0_worse_{r}"] = bool(lo > 0)
            lines.append(f"{r}: nifi_wo_t0 - nifi {key} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        for metric, drop in (("ssim", ssim_drop), ("psnr", psnr_drop_db)):
            if metric in n and n[metric].notna().all():
                d, lo, hi = paired_difference(n, at["compressed"], metric, what=f"{r} nifi vs compressed ({metric})")
                checks[f"nifi_{metric}_within_{drop:g}_{r}"] = bool(lo >= -drop)
                lines.append(f"{r}: nifi - compressed {metric} {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (target: lower bound >= -{drop:g})")
        for m in ("nifi", "nifi_wo_t0"):
            if m in at:
                e, lo, hi = mean_ci(at[m], "periodic_excess")
                checks[f"{m}_periodic_like_gt_{r}"] = bool(hi < periodic_margin)
                lines.append(f"{r}: {m} periodic-artifact excess over GT {e:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"(target: upper bound < {periodic_margin})")
    return checks, lines
