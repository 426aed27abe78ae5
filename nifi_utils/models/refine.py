"""NiFi-3D, the restoration baked back into the decoded Gaussians.

NiFi restores every rendered frame on its own: each frame costs a diffusion step and neighbouring
frames disagree where the restorer invents detail. NiFi-3D does the restoring once, at the
receiver, and then renders a plain 3DGS (Difix3D+'s progressive 3D update, applied to a decoded
bitstream rather than a reconstruction):

    for each round:   render the current Gaussians from cameras around the content
                      restore those renders with the one-step restorer (pseudo ground truth)
                      fit the Gaussians to them (3DGS loss, densification, opacity pruning)

No bits are added: the cameras are synthesised around the decoded content (an orbit whose centre,
up axis and radius come from the Gaussians themselves), so a `.nifi` is refined as it is. The fit
cannot drift far from what was transmitted:
- a pixel's restored target is trusted only where the decoded render is opaque (alpha mask: a
  restorer can paint things into the empty background; the 3D model must not grow them) and in
  proportion to how close it stays to the decoded render (confidence exp(-|restored - decoded| / tau));
- the decoded renders themselves are a low-weight anchor on every pixel;
- densification is gradient-driven (3DGS: average screen-space position gradient; large Gaussians
  split in two, small ones cloned), capped at a multiple of the decoded count, and nearly
  transparent Gaussians are pruned.
The same code runs on CPU (our tiled rasterizer) and CUDA (gsplat); `render.rasterization` picks.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from nifi_utils.gs.cameras import Camera, look_at
from nifi_utils.core.facts import OFFICIAL_T0
from nifi_utils.core.common import NifiError, progress
from nifi_utils.gs.gaussians import GaussianScene
from nifi_utils.codec.levels import render_loss
from nifi_utils.gs.render import rasterization


@dataclass
class RefineConfig:
    # progressive rounds of (render, restore, fit) and Adam steps per round (one camera per step)
    rounds: int = 3
    steps_per_round: int = 45
    # synthesised cameras: rings at these elevations (degrees above the content's ground), n per ring
    n_cameras: int = 16
    elevations_deg: list = field(default_factory=lambda: [15.0, 32.0])
    fov_deg: float = 50.0
    # camera distance = radius_factor x the content's 95th-percentile horizontal extent
    radius_factor: float = 1.6
    # receiver render size for the pseudo-views (the restorer's working size)
    width: int = 128
    height: int = 128
    # 'auto' (least-variance axis of the opaque Gaussians, sign towards the long tail) or [x, y, z]
    up: object = "auto"
    background: list = field(default_factory=lambda: [0.62, 0.70, 0.80])
    # losses: 3DGS L1 + D-SSIM on the restored views, decoded renders as an L1 anchor
    lambda_dssim: float = 0.2
    anchor_weight: float = 0.2
    confidence_tau: float = 0.15
    alpha_mask: float = 0.5
    # learning rates (means scaled by the content extent, as in 3DGS)
    lr_means: float = 3.2e-4
    lr_quats: float = 1e-3
    lr_scales: float = 1e-2
    lr_opacity: float = 5e-2
    lr_sh: float = 1e-2
    # densification: at these fractions of each round's steps, the Gaussians with the largest mean
    # screen-space gradient (above grad_threshold, in pixels per unit loss; 0 = rank only) are split
    # (largest scale above split_scale x extent) or cloned, at most grow_per_event x the current count
    # per event and max_growth x the decoded count in all; opacity below prune_opacity is pruned.
    # (3DGS's absolute threshold assumes thousands of steps; with tens per round a ranked budget is
    # what bounds the growth)
    densify_at: list = field(default_factory=lambda: [0.3])
    grad_threshold: float = 0.0
    split_scale: float = 0.01
    grow_per_event: float = 0.3
    max_growth: float = 2.5
    prune_opacity: float = 0.005
    # split: 'axis' (two children along the largest axis, variance kept) or 'isotropic' (3DGS: two samples
    # from the parent, scales / 1.6); halve_opacity: copies get 1 - sqrt(1 - o) (density kept)
    split_mode: str = "axis"
    halve_opacity: bool = True
    # restorer settings (the distill stage's: t0 and latent mode of the variant)
    t0: float | None = OFFICIAL_T0
    latent: str = "mean"
    seed: int = 0

    @classmethod
    def from_params(cls, p: dict) -> "RefineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(p) - names)
        if unknown:
            raise NifiError(f"refine: unknown parameters {unknown}; known: {sorted(names)}")
        return cls(**p)

    def __post_init__(self):
        if self.rounds < 1 or self.steps_per_round < 1 or self.n_cameras < 2:
            raise NifiError("refine: rounds, steps_per_round >= 1 and n_cameras >= 2 are required")
        if self.split_mode not in ("axis", "isotropic"):
            raise NifiError(f"refine: split_mode must be 'axis' or 'isotropic', got {self.split_mode!r}")
        if self.max_growth < 1:
            raise NifiError(f"refine: max_growth must be >= 1 (a cap on the count relative to the decoded one), got {self.max_growth}")


# ------------------------------------------------------------------------------ cameras
def content_frame(scene: GaussianScene, up="auto", min_opacity: float = 0.3) -> dict:
    """Centre, up axis and horizontal extent of the decoded content (opaque Gaussians only)."""
    op = scene.opacities.detach().cpu().numpy()
    m = scene.means.detach().cpu().numpy().astype(np.float64)
    m = m[op >= min_opacity] if (op >= min_opacity).sum() >= 16 else m
    if len(m) < 4 or not np.isfinite(m).all():
        raise NifiError("refine: the decoded scene has too few (or non-finite) Gaussians to place cameras around")
    if isinstance(up, str):
        if up != "auto":
            raise NifiError(f"refine: up must be 'auto' or three numbers, got {up!r}")
        evals, evecs = np.linalg.eigh(np.cov(m.T))
        u = evecs[:, 0]
        h = m @ u
        lo, mid, hi = np.percentile(h, [5, 50, 95])
        u = u if hi - mid >= mid - lo else -u  # objects stand up from the ground: the long tail is up
    else:
        u = np.asarray(up, dtype=np.float64)
        if u.shape != (3,) or not np.isfinite(u).all() or np.linalg.norm(u) == 0:
            raise NifiError(f"refine: up must be three finite numbers, not all zero, got {up!r}")
    u = u / np.linalg.norm(u)
    h = m @ u
    ground, top = np.percentile(h, [5, 95])
    flat = m - np.outer(h, u)
    lo, hi = np.percentile(flat, [5, 95], axis=0)
    centre_flat = (lo + hi) / 2
    extent = float(np.percentile(np.linalg.norm(flat - centre_flat, axis=1), 95))
    if extent <= 0:
        raise NifiError("refine: the decoded content has no horizontal extent to orbit")
    target = centre_flat + u * (ground + 0.25 * (top - ground))
    return {"up": u, "target": target, "ground": float(ground), "extent": extent}


def orbit_cameras(frame: dict, cfg: RefineConfig) -> list[Camera]:
    """Rings of cameras around the content (no transmitted poses): `n_cameras` split over the elevations."""
    u, target, extent = frame["up"], frame["target"], frame["extent"]
    a = np.cross(u, [1.0, 0.0, 0.0] if abs(u[0]) < 0.9 else [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(u, a)
    radius = cfg.radius_factor * extent
    f = 0.5 * cfg.width / math.tan(math.radians(cfg.fov_deg) / 2)
    rings = len(cfg.elevations_deg)
    per = [cfg.n_cameras // rings + (1 if i < cfg.n_cameras % rings else 0) for i in range(rings)]
    cams = []
    for ri, (elev, n) in enumerate(zip(cfg.elevations_deg, per)):
        e = math.radians(elev)
        for k in range(n):
            az = 2 * math.pi * (k + 0.5 * ri) / n
            eye = target + radius * (math.cos(e) * (math.cos(az) * a + math.sin(az) * b) + math.sin(e) * u)
            cams.append(Camera(look_at(eye, target, up=tuple(u)), f, f, cfg.width / 2, cfg.height / 2,
                               cfg.width, cfg.height, f"orbit_{ri}_{k:02d}"))
    return cams


# ------------------------------------------------------------------------------ rendering
def render_meta(scene: GaussianScene, cam: Camera, background):
    """(rgb [H,W,3], alpha [H,W,1], means2d [N,2] with grad retained, visible [N] bool)."""
    dev, dt = scene.means.device, scene.means.dtype
    bg = torch.as_tensor(background, dtype=dt, device=dev)[None]
    kw = {"packed": False} if dev.type == "cuda" else {}
    colors, alphas, meta = rasterization(
        scene.means, scene.quats, scene.scales, scene.opacities, scene.sh, cam.viewmat().to(dev, dt)[None],
        cam.K().to(dev, dt)[None], cam.width, cam.height, sh_degree=scene.sh_degree, backgrounds=bg, **kw)
    m2d = meta["means2d"]
    if m2d.requires_grad:
        m2d.retain_grad()
    visible = (meta["radii"][0] > 0).reshape(len(scene), -1).all(-1)
    return colors[0, ..., :3], alphas[0], m2d, visible


@torch.no_grad()
def render_all(scene: GaussianScene, cams, background):
    out = [render_meta(scene, c, background) for c in cams]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


@torch.no_grad()
def restore_views(restorer, rgb: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """[V,H,W,3] renders -> restored [V,H,W,3], one image at a time (the restorer's batch-1 path)."""
    outs = []
    for i, im in enumerate(rgb):
        x = im.permute(2, 0, 1)[None].float().cpu()
        y = restorer.restore(x, t0=cfg.t0, seed=cfg.seed + i, sample=cfg.latent == "sample")
        outs.append(y[0].permute(1, 2, 0).to(rgb.device, rgb.dtype))
    return torch.stack(outs)


# ------------------------------------------------------------------------------ densification
def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)


def densify(params: dict, grad_avg: torch.Tensor, extent: float, cfg: RefineConfig, cap: int,
            gen: torch.Generator) -> tuple[dict, dict]:
    """3DGS clone/split by mean screen-space gradient, then opacity pruning; returns (params, counts).

    Selected Gaussians whose largest scale exceeds `split_scale x extent` are replaced by two samples
    drawn from themselves with scales / 1.6; the others are cloned in place (3DGS). At most
    `grow_per_event x N` are selected, the highest gradients first, never beyond `cap` in total."""
    with torch.no_grad():
        n = len(params["means"])
        room = max(0, min(cap - n, int(cfg.grow_per_event * n)))
        cand = (grad_avg > cfg.grad_threshold).nonzero()[:, 0]
        cand = cand[torch.argsort(grad_avg[cand], descending=True)][:room]
        big = params["log_scales"][cand].max(-1).values.exp() > cfg.split_scale * extent
        split, clone = cand[big], cand[~big]
        # a copy must not double the local density: both copies get opacity 1 - sqrt(1 - o), which
        # composites to the original o where they overlap (Bulo et al. 2024, "Revising densification")
        if cfg.halve_opacity:
            sel = torch.cat([clone, split])
            o = torch.sigmoid(params["opacity_logits"][sel]).clamp(1e-6, 1 - 1e-6)
            half = torch.logit((1 - torch.sqrt(1 - o)).clamp(1e-6, 1 - 1e-6))
            params = dict(params)
            params["opacity_logits"] = params["opacity_logits"].index_copy(0, sel, half)
        new = {k: [v] for k, v in params.items()}
        if len(clone):
            for k, v in params.items():
                new[k].append(v[clone])
        if len(split) and cfg.split_mode == "isotropic":
            s = params["log_scales"][split].exp()
            R = _quat_to_rotmat(params["quats"][split])
            for _ in range(2):
                offs = torch.randn(len(split), 3, generator=gen).to(s) * s
                for k, v in params.items():
                    if k == "means":
                        new[k].append(v[split] + (R @ offs[..., None])[..., 0])
                    elif k == "log_scales":
                        new[k].append(v[split] - math.log(1.6))
                    else:
                        new[k].append(v[split])
        elif len(split):
            # split along the largest axis only: children at +-0.6 sigma with 0.8 sigma keep the parent's
            # variance along it (0.6^2 + 0.8^2 = 1) and its extent across it, so the render barely changes
            # at the split and the children can then move apart (3DGS's isotropic 1/1.6 split opens holes
            # that a few hundred CPU steps do not close: measured -2 dB on a decoded level)
            ls = params["log_scales"][split]
            axis = ls.argmax(-1)
            R = _quat_to_rotmat(params["quats"][split])
            dirv = R.gather(2, axis[:, None, None].expand(-1, 3, 1))[..., 0] * ls.max(-1).values.exp()[:, None]
            shrunk = ls.scatter(1, axis[:, None], ls.max(-1, keepdim=True).values + math.log(0.8))
            for sign in (-0.6, 0.6):
                for k, v in params.items():
                    if k == "means":
                        new[k].append(v[split] + sign * dirv)
                    elif k == "log_scales":
                        new[k].append(shrunk)
                    else:
                        new[k].append(v[split])
        out = {k: torch.cat(v, 0) for k, v in new.items()}
        keep = torch.ones(len(out["means"]), dtype=torch.bool, device=out["means"].device)
        keep[split] = False  # a split Gaussian is replaced by its two samples
        keep &= torch.sigmoid(out["opacity_logits"]) >= cfg.prune_opacity
        out = {k: v[keep].contiguous() for k, v in out.items()}
    q = torch.quantile(grad_avg, torch.tensor([0.5, 0.9, 0.99], dtype=grad_avg.dtype)).tolist() if len(grad_avg) else [0, 0, 0]
    return out, {"grad_p50_p90_p99": [round(v, 6) for v in q], "cloned": int(len(clone)), "split": int(len(split)), "pruned": int((~keep).sum()) - int(len(split)),
                 "n": int(len(out["means"]))}


def _optimizer(params: dict, cfg: RefineConfig, extent: float) -> torch.optim.Adam:
    lrs = {"means": cfg.lr_means * extent, "quats": cfg.lr_quats, "log_scales": cfg.lr_scales,
           "opacity_logits": cfg.lr_opacity, "sh": cfg.lr_sh}
    return torch.optim.Adam([{"params": [params[k]], "lr": lr, "name": k} for k, lr in lrs.items()], eps=1e-15)


# ------------------------------------------------------------------------------ the refinement
def refine_scene(scene: GaussianScene, restorer, cfg: RefineConfig, device="cpu",
                 desc: str = "refine") -> tuple[GaussianScene, dict]:
    """Refine decoded Gaussians against restored renders of synthesised cameras.

    Returns (refined scene, report: cameras' frame, loss per step, counts per densification event,
    seconds)."""
    t_start = time.time()
    dev = torch.device(device)
    base = scene.detach().to(dev, torch.float32)
    n0 = len(base)
    if n0 == 0:
        raise NifiError("refine: the decoded scene has no Gaussians")
    frame = content_frame(base, cfg.up)
    cams = orbit_cameras(frame, cfg)
    bg = tuple(cfg.background)
    anchor_rgb, anchor_alpha = render_all(base, cams, bg)
    seen = (anchor_alpha >= cfg.alpha_mask).float()
    if float(seen.mean()) < 0.01:
        raise NifiError(f"refine: the synthesised cameras see almost nothing of the scene "
                        f"({100 * float(seen.mean()):.2f} % opaque pixels); pass `up` or check the file")
    extent = frame["extent"]
    cap = int(cfg.max_growth * n0)
    params = {k: v.clone().requires_grad_(True) for k, v in base.tensors().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    history, events, round_stats = [], [], []
    for r in range(cfg.rounds):
        cur_rgb, _ = render_all(GaussianScene(**{k: v.detach() for k, v in params.items()}), cams, bg)
        target = restore_views(restorer, cur_rgb, cfg)
        conf = torch.exp(-(target - anchor_rgb).abs().mean(-1, keepdim=True) / cfg.confidence_tau) * seen
        round_stats.append({"round": r, "mean_confidence": float(conf.mean()),
                            "restored_change": float((target - cur_rgb).abs().mean())})
        opt = _optimizer(params, cfg, extent)
        grad_sum = torch.zeros(len(params["means"]), device=dev)
        grad_cnt = torch.zeros_like(grad_sum)
        dens_steps = {int(f * cfg.steps_per_round) for f in cfg.densify_at if 0 < f < 1}
        for step in progress(range(cfg.steps_per_round), desc=f"{desc} r{r}", leave=False):
            v = int(rng.integers(len(cams)))
            rgb, _alpha, m2d, visible = render_meta(GaussianScene(**params), cams[v], bg)
            w = conf[v]
            l_restored = (1 - cfg.lambda_dssim) * ((rgb - target[v]).abs() * w).sum() / (3 * w.sum()).clamp(min=1)
            if cfg.lambda_dssim > 0:
                l_restored = l_restored + cfg.lambda_dssim * (render_loss(rgb * w + target[v] * (1 - w), target[v], 1.0))
            loss = l_restored + cfg.anchor_weight * (rgb - anchor_rgb[v]).abs().mean()
            if not torch.isfinite(loss):
                raise NifiError(f"refine diverged at round {r} step {step} (loss {float(loss)}); lower the learning rates")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for t in params.values():
                if t.grad is not None:
                    t.grad.nan_to_num_(0.0, 0.0, 0.0)
            opt.step()
            if m2d.grad is not None:
                g = m2d.grad.reshape(len(grad_sum), -1, 2)[:, 0].norm(dim=-1) if m2d.grad.ndim == 3 else m2d.grad.norm(dim=-1)
                grad_sum += torch.where(visible, g.reshape(-1), torch.zeros_like(grad_sum))
                grad_cnt += visible.float()
            history.append({"round": r, "step": step, "loss": float(loss.detach()), "n": len(params["means"])})
            if step + 1 in dens_steps:
                new, counts = densify({k: v.detach() for k, v in params.items()}, grad_sum / grad_cnt.clamp(min=1),
                                      extent, cfg, cap, gen)
                params = {k: v.requires_grad_(True) for k, v in new.items()}
                opt = _optimizer(params, cfg, extent)
                grad_sum = torch.zeros(len(params["means"]), device=dev)
                grad_cnt = torch.zeros_like(grad_sum)
                events.append({"round": r, "step": step + 1, **counts})
    out = GaussianScene(**{k: v.detach() for k, v in params.items()})
    if not all(torch.isfinite(t).all() for t in out.tensors().values()):
        raise NifiError("refine produced non-finite attributes; lower the learning rates")
    report = {"n_decoded": n0, "n_refined": len(out), "cap": cap, "events": events, "rounds": round_stats,
              "loss": [h["loss"] for h in history], "frame": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                             for k, v in frame.items()},
              "n_cameras": len(cams), "seconds": round(time.time() - t_start, 2), "config": asdict(cfg)}
    return out.to("cpu"), report


# ------------------------------------------------------------------------------ receiver entry points
_RESTORERS: dict = {}


def load_restorer(base_model, ckpt, device="cpu"):
    """The one-step restorer (prior + LoRA), cached per process: a worker refines many levels with one."""
    from pathlib import Path

    from nifi_utils.models.restorer import Restorer

    key = (str(Path(base_model).resolve()), str(Path(ckpt).resolve()) if ckpt else None, str(device))
    if key not in _RESTORERS:
        if ckpt and not Path(ckpt).is_file():
            raise NifiError(f"restorer checkpoint {ckpt} not found (run the distill stage, or pass --ckpt)")
        r = Restorer.from_pretrained(base_model, device=device)
        if ckpt:
            r.load_lora(ckpt)
        _RESTORERS[key] = r
    return _RESTORERS[key]


def refine_file(nifi_path, out_ply, base_model, ckpt, cfg: RefineConfig, device="cpu", desc: str = "refine") -> dict:
    """Decode a `.nifi`, refine it, write an INRIA `.ply` (atomically: a failure leaves no file)."""
    import os
    from pathlib import Path

    from nifi_utils.codec import container as codec

    out_ply = Path(out_ply)
    scene, head = codec.load(nifi_path)
    restorer = load_restorer(base_model, ckpt, device)
    refined, report = refine_scene(scene, restorer, cfg, device=device, desc=desc)
    tmp = out_ply.with_name(out_ply.name + ".partial")
    try:
        refined.save_ply(tmp)
        os.replace(tmp, out_ply)
    finally:
        tmp.unlink(missing_ok=True)
    return {**report, "input": str(nifi_path), "output": str(out_ply), "bytes": Path(nifi_path).stat().st_size,
            "sh_degree": head["sh_degree"]}


def _job(job: dict) -> dict:
    cfg = RefineConfig.from_params(job["config"])
    rep = refine_file(job["nifi"], job["out"], job["base_model"], job["ckpt"], cfg, job.get("device", "cpu"),
                      desc=f"{job['scene']} {job['rate']}")
    return {"scene": job["scene"], "rate": job["rate"], **rep}


def refine_many(jobs: list[dict], workers: int = 1) -> list[dict]:
    """Run refine jobs ({scene, rate, nifi, out, base_model, ckpt, config, device}) over `workers` processes
    (`workers.process_map`: one torch thread each on CPU; small renders do not scale over threads, independent
    jobs do)."""
    from nifi_utils.core.workers import process_map

    return process_map(_job, jobs, workers, names=[f"{j['scene']} {j['rate']}" for j in jobs], what="refine job",
                       desc="refine")
