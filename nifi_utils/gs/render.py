"""3DGS rasterization with gsplat's conventions on CUDA and on CPU.

On CUDA, `rasterization` calls `gsplat.rasterization`. gsplat ships no CPU compositing (its
`_rasterize_to_pixels` reference needs CUDA), and nothing maintained on PyPI rasterizes 3DGS
differentiably on CPU, so the CPU path is written here: gsplat's pure-PyTorch EWA projection
and SH evaluation, then our own tiled front-to-back compositing. It reproduces the CUDA kernel's
rules (opacity-aware 3.33-sigma boxes, tile binning, depth order, alpha clamp 0.999, skip alpha
< 1/255, stop when transmittance <= 1e-4) so the two backends swap freely.

Memory stays bounded: Gaussians are binned to tiles, tiles are processed in batches of
similar length, each batch walks its depth-sorted list in chunks and stops early once every
pixel is opaque, and under autograd each batch is checkpointed (recomputed in backward).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ALPHA_THRESHOLD = 1.0 / 255.0
T_THRESHOLD = 1e-4
ALPHA_MAX = 0.999


def _gsplat_torch_impl():
    from gsplat.cuda import _torch_impl  # pure PyTorch, imports without the CUDA extension

    return _torch_impl


def project_gaussians(means, quats, scales, opacities, viewmat, K, width, height,
                      near_plane=0.01, far_plane=1e10, radius_clip=0.0, eps2d=0.3, antialiased=False):
    """EWA projection for one camera, with gsplat CUDA's culling and opacity-aware radii.

    Returns means2d [N,2], conics [N,3] (a, b, c of the inverse 2D covariance), depths [N],
    opacities [N] (times the anti-aliasing compensation when asked), radii [N,2] (int, 0 = culled).
    """
    ti = _gsplat_torch_impl()
    covars, _ = ti._quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    means_c, covars_c = ti._world_to_cam(means, covars, viewmat[None])
    depths = means_c[0, :, 2]
    # Gaussians at or behind the near plane are culled below, but the perspective projection divides
    # by their depth: at z == 0 (met in practice once positions are quantized to a grid) its backward
    # gives inf * 0 = NaN. Project them from a harmless point instead; they get exactly zero gradient.
    behind = (depths.detach() <= near_plane)[None, :, None]
    safe = torch.zeros_like(means_c).index_fill_(-1, torch.tensor([2], device=means_c.device), 1.0)
    means_c = torch.where(behind, safe, means_c)
    means2d, cov2d = ti._persp_proj(means_c, covars_c, K[None], width, height)
    means2d, cov2d = means2d[0], cov2d[0]
    det_orig = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    cov2d = cov2d + torch.eye(2, dtype=cov2d.dtype, device=cov2d.device) * eps2d
    det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    if antialiased:
        opacities = opacities * torch.sqrt(torch.clamp(det_orig / det.clamp(min=1e-10), min=0.0))
    detc = det.clamp(min=1e-10)
    conics = torch.stack([cov2d[:, 1, 1] / detc, -(cov2d[:, 0, 1] + cov2d[:, 1, 0]) / 2.0 / detc, cov2d[:, 0, 0] / detc], -1)
    with torch.no_grad():
        op = opacities.detach()
        extend = torch.sqrt(2.0 * torch.log(op.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp(max=3.33)
        rx = torch.ceil(extend * torch.sqrt(cov2d[:, 0, 0].detach().clamp(min=0)))
        ry = torch.ceil(extend * torch.sqrt(cov2d[:, 1, 1].detach().clamp(min=0)))
        m = means2d.detach()
        valid = (det.detach() > 0) & (depths.detach() > near_plane) & (depths.detach() < far_plane)
        valid &= op >= ALPHA_THRESHOLD
        valid &= (rx > radius_clip) | (ry > radius_clip)
        valid &= (m[:, 0] + rx > 0) & (m[:, 0] - rx < width) & (m[:, 1] + ry > 0) & (m[:, 1] - ry < height)
        valid &= torch.isfinite(m).all(-1)
        radii = torch.stack([rx, ry], -1).where(valid[:, None], torch.zeros_like(rx)[:, None]).int()
    return means2d, conics, depths, opacities, radii


def tile_ranges(means2d: Tensor, radii: Tensor, tile_size: int, tiles_x: int, tiles_y: int):
    """[min, max) tile range per Gaussian on each axis, exactly as gsplat's `isect_tiles` kernel."""
    m = means2d.detach().float()
    r = radii.float()
    tx, ty = m[:, 0] / tile_size, m[:, 1] / tile_size
    rx, ry = r[:, 0] / tile_size, r[:, 1] / tile_size
    x0 = torch.floor(tx - rx).clamp(0, tiles_x).long()
    y0 = torch.floor(ty - ry).clamp(0, tiles_y).long()
    x1 = torch.ceil(tx + rx).clamp(0, tiles_x).long()
    y1 = torch.ceil(ty + ry).clamp(0, tiles_y).long()
    on = (radii > 0).all(-1)
    x1, y1 = torch.where(on, x1, x0), torch.where(on, y1, y0)
    return x0, y0, x1, y1


def _bin_to_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Tile/Gaussian intersections sorted by (tile, depth): (flat gaussian ids, per-tile start, count)."""
    x0, y0, x1, y1 = tile_ranges(means2d, radii, tile_size, tiles_x, tiles_y)
    nx, ny = x1 - x0, y1 - y0
    counts = nx * ny
    n_isect = int(counts.sum())
    n_tiles = tiles_x * tiles_y
    dev = means2d.device
    if n_isect == 0:
        return (torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(n_tiles, dtype=torch.long, device=dev),
                torch.zeros(n_tiles, dtype=torch.long, device=dev))
    gid = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(n_isect, device=dev) - first[gid]
    tile = (y0[gid] + local // nx[gid]) * tiles_x + (x0[gid] + local % nx[gid])
    # depth rank (stable: ties keep index order, as gsplat's radix sort) then one sort by tile
    depth_rank = torch.empty_like(counts)
    depth_rank[torch.sort(depths.detach(), stable=True).indices] = torch.arange(len(counts), device=dev)
    order = torch.sort(tile * len(counts) + depth_rank[gid]).indices
    gid = gid[order]
    tcount = torch.bincount(tile, minlength=n_tiles)
    tstart = torch.cumsum(tcount, 0) - tcount
    return gid, tstart, tcount


def _pixel_features(tile_size: int, dtype, device) -> Tensor:
    """[P,6] features [x², xy, y², x, y, 1] of pixel centres relative to the tile centre, so that the Gaussian
    exponent of every (pixel, Gaussian) pair is one batched matrix product."""
    # centred on the tile: smaller magnitudes, less float32 cancellation in the expansion
    c = torch.arange(tile_size, dtype=dtype, device=device) + 0.5 - tile_size / 2
    py, px = torch.meshgrid(c, c, indexing="ij")
    px, py = px.reshape(-1), py.reshape(-1)
    return torch.stack([px * px, px * py, py * py, px, py, torch.ones_like(px)], -1)


def _composite_batch(feats, mean_local, conic, opac, color):
    """Front-to-back compositing of B tiles; inputs are per (tile, slot) [B,K,...] in depth order
    (padding slots have opacity 0). Returns colors [B,P,D] and alphas [B,P].

    Only ~5-15 % of a tile's (pixel, Gaussian) pairs reach gsplat's alpha >= 1/255 (measured on the cpu
    scenes), so the pairs are found first on the dense exponents,
    without autograd and without an exp, and everything after that (alpha, transmittance, weights, the sums)
    runs on those pairs only. The transmittance is a cumulative sum per pixel over its kept pairs in depth
    order: the pairs dropped there add exactly 0 to it, so it is the dense walk's sum.
    """
    B, K = opac.shape
    P = feats.shape[0]
    D = color.shape[-1]
    a, b, c = conic.unbind(-1)
    mx, my = mean_local.unbind(-1)
    # sigma = 0.5 a dx² + b dx dy + 0.5 c dy², dx = px - mx, expanded in the pixel features
    w = torch.stack([0.5 * a, b, 0.5 * c, -(a * mx + b * my), -(c * my + b * mx),
                     0.5 * a * mx * mx + b * mx * my + 0.5 * c * my * my], -1)  # [B,K,6]
    with torch.no_grad():
        # opac exp(-sigma) >= 1/255  <=>  sigma - log(255 opac) <= 0: the log folded into the constant feature's
        # weight, so the dense work is one product and one comparison (no exp); padding slots (opacity 0) get +inf.
        # A small margin here; the exact tests (gsplat's) on the candidates below
        shifted = w.detach().clone()
        shifted[..., 5] -= torch.log(opac.detach() / ALPHA_THRESHOLD)
        flat = (torch.matmul(feats, shifted.transpose(1, 2)).view(-1) <= 1e-3).nonzero().squeeze(1)  # [B,P,K] order
        rows, ki = flat // K, flat % K  # rows = tile * P + pixel, ascending; k ascending within a row: depth order
        bk, pi = (rows // P) * K + ki, rows % P
        cnt = torch.bincount(rows, minlength=B * P)
        pos = torch.arange(len(rows), device=rows.device) - (torch.cumsum(cnt, 0) - cnt)[rows]
        width = int(cnt.max()) if len(rows) else 0
        slot = rows * width + pos
    # flat index_select, not tensor[idx, idx] (advanced indexing is several times slower on CPU)
    sigma = (feats.index_select(0, pi) * w.reshape(B * K, 6).index_select(0, bk)).sum(-1)
    alpha = torch.clamp(opac.reshape(-1).index_select(0, bk) * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
    log1m = torch.log1p(-alpha)
    packed = log1m.new_zeros(B * P * width).index_copy(0, slot, log1m).view(B * P, width)
    cum = torch.cumsum(packed, -1).view(-1).index_select(0, slot)  # log T after each pair
    # gsplat stops *before* the Gaussian that would take T to <= 1e-4 (exclusive); T only falls, so a pixel
    # once done stays done
    weight = torch.where(cum > math.log(T_THRESHOLD), alpha * torch.exp(cum - log1m), torch.zeros_like(alpha))
    out_c = feats.new_zeros(B * P, D).index_add(0, rows, weight[:, None] * color.reshape(B * K, D).index_select(0, bk))
    out_a = feats.new_zeros(B * P).index_add(0, rows, weight)
    return out_c.view(B, P, D), out_a.view(B, P)


def rasterize_tiles(means2d, conics, colors, opacities, radii, depths, width, height,
                    tile_size=16, max_batch_elems=2_000_000, keep_elems=4_000_000):
    """Tiled CPU compositing for one camera: images [H,W,D] and alphas [H,W,1]."""
    dev, dt = means2d.device, means2d.dtype
    D = colors.shape[-1]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    P = tile_size * tile_size
    gid, tstart, tcount = _bin_to_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y)
    feats = _pixel_features(tile_size, dt, dev)
    tiles_c = [torch.zeros(0, P, D, dtype=dt, device=dev)]
    tiles_a = [torch.zeros(0, P, dtype=dt, device=dev)]
    tile_ids = [torch.zeros(0, dtype=torch.long, device=dev)]
    # longest lists first: batches of similar length waste little padding
    order = torch.sort(tcount, descending=True, stable=True).indices
    order = order[tcount[order] > 0].tolist()
    tc = tcount.tolist()
    i = 0
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, colors, opacities))
    # under autograd, batches keep their activations until `keep_elems` pairs are held; later
    # batches are checkpointed (recomputed in backward): small renders skip the recompute,
    # large ones stay within bounded memory
    kept = 0
    while i < len(order):
        kmax = tc[order[i]]
        nb = max(1, min(len(order) - i, max_batch_elems // max(1, kmax * P)))
        # close the batch where lists get much shorter: padding to kmax would waste work
        nb = max(1, next((j for j in range(nb) if tc[order[i + j]] < 0.7 * kmax), nb))
        ids = torch.tensor(order[i:i + nb], device=dev)
        i += nb
        slot = torch.arange(kmax, device=dev)
        valid = slot[None] < tcount[ids][:, None]
        g = gid[(tstart[ids][:, None] + slot[None]).clamp(max=max(len(gid) - 1, 0))]
        origin = (torch.stack([ids % tiles_x, ids // tiles_x], -1).to(dt) + 0.5) * tile_size

        def run(m2d, con, col, op, g=g, origin=origin, valid=valid):
            def pick(t):
                return t.index_select(0, g.reshape(-1)).view(*g.shape, *t.shape[1:])

            return _composite_batch(feats, pick(m2d) - origin[:, None], pick(con), pick(op) * valid, pick(col))

        if need_grad and kept + nb * kmax * P > keep_elems:
            c_b, a_b = checkpoint(run, means2d, conics, colors, opacities, use_reentrant=False)
        else:
            c_b, a_b = run(means2d, conics, colors, opacities)
            kept += nb * kmax * P if need_grad else 0
        tiles_c.append(c_b)
        tiles_a.append(a_b)
        tile_ids.append(ids)
    ids = torch.cat(tile_ids)
    img_c = torch.zeros(n_tiles, P, D, dtype=dt, device=dev).index_copy(0, ids, torch.cat(tiles_c))
    img_a = torch.zeros(n_tiles, P, dtype=dt, device=dev).index_copy(0, ids, torch.cat(tiles_a))

    def to_image(t, d):
        t = t.reshape(tiles_y, tiles_x, tile_size, tile_size, d).permute(0, 2, 1, 3, 4)
        return t.reshape(tiles_y * tile_size, tiles_x * tile_size, d)[:height, :width]

    return to_image(img_c, D), to_image(img_a, 1)


def _sh_colors(means, colors, viewmat, sh_degree, visible):
    """gsplat's SH colour: eval at view dirs from the camera centre, +0.5, clamp at 0."""
    ti = _gsplat_torch_impl()
    campos = torch.inverse(viewmat)[:3, 3]
    out = colors.new_zeros(colors.shape[0], 3)
    idx = visible.nonzero()[:, 0]
    dirs = means[idx] - campos
    out = out.index_copy(0, idx, ti._spherical_harmonics(sh_degree, dirs, colors[idx]))
    return torch.clamp_min(out + 0.5, 0.0)


def _project_camera(means, quats, scales, opacities, colors, viewmats, Ks, ci, width, height, near_plane, far_plane,
                    radius_clip, eps2d, sh_degree, render_mode, rasterize_mode):
    """Projection and per-Gaussian colour (plus the depth channel the render mode asks for) for camera `ci`."""
    m2d, con, dep, op, radii = project_gaussians(
        means, quats, scales, opacities, viewmats[ci], Ks[ci], width, height, near_plane, far_plane,
        radius_clip, eps2d, antialiased=rasterize_mode == "antialiased")
    if sh_degree is not None:
        col = _sh_colors(means, colors, viewmats[ci], sh_degree, (radii > 0).all(-1))
    else:
        col = colors[ci] if colors.ndim == 3 else colors
    if render_mode in ("RGB+D", "RGB+ED"):
        col = torch.cat([col, dep[:, None]], -1)
    elif render_mode in ("D", "ED"):
        col = dep[:, None]
    return m2d, con, dep, op, radii, col


def rasterization(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmats: Tensor, Ks: Tensor, width: int, height: int,
    near_plane: float = 0.01, far_plane: float = 1e10, radius_clip: float = 0.0, eps2d: float = 0.3,
    sh_degree: int | None = None, packed: bool = True, tile_size: int = 16,
    backgrounds: Tensor | None = None,
    render_mode: Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"] = "RGB",
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    backend: Literal["auto", "gsplat", "torch"] = "auto",
    **kwargs,
):
    """`gsplat.rasterization` with the same arguments and returns, on CUDA (gsplat) or CPU (ours).

    means [N,3], quats [N,4], scales [N,3], opacities [N], colors [N,K,3] SH (with sh_degree) or
    [N,D] / [C,N,D]; viewmats [C,4,4] world-to-camera (OpenCV); Ks [C,3,3].
    Returns (render_colors [C,H,W,D'], render_alphas [C,H,W,1], meta).
    """
    if backend == "gsplat" or (backend == "auto" and means.is_cuda):
        import gsplat

        return gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
            far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d, sh_degree=sh_degree, packed=packed,
            tile_size=tile_size, backgrounds=backgrounds, render_mode=render_mode,
            rasterize_mode=rasterize_mode, **kwargs)
    bad = {k: v for k, v in kwargs.items() if v not in (None, False, "pinhole", 32)}
    if bad:
        raise NotImplementedError(f"CPU rasterization does not support: {', '.join(bad)}")
    if means.ndim != 2:
        raise NotImplementedError("CPU rasterization supports unbatched scenes: means [N,3]")
    assert render_mode in ("RGB", "D", "ED", "RGB+D", "RGB+ED"), render_mode
    C = viewmats.shape[0]
    quats = F.normalize(quats, dim=-1)
    outs_c, outs_a, meta = [], [], {"radii": [], "means2d": [], "depths": [], "conics": [], "opacities": []}
    cols = []
    for ci in range(C):
        m2d, con, dep, op, radii, col = _project_camera(
            means, quats, scales, opacities, colors, viewmats, Ks, ci, width, height, near_plane, far_plane,
            radius_clip, eps2d, sh_degree, render_mode, rasterize_mode)
        for k, v in zip(("radii", "means2d", "depths", "conics", "opacities"), (radii, m2d, dep, con, op)):
            meta[k].append(v)
        cols.append(col)
    # projection for every camera first, then compositing from the stacked tensors (as gsplat): the
    # returned meta["means2d"] is the tensor the images depend on, so `retain_grad()` on it gives the
    # screen-space gradient that 3DGS densification reads
    meta = {k: torch.stack(v) for k, v in meta.items()}
    for ci in range(C):
        m2d, con, dep, op, radii, col = (meta["means2d"][ci], meta["conics"][ci], meta["depths"][ci],
                                         meta["opacities"][ci], meta["radii"][ci], cols[ci])
        img, alpha = rasterize_tiles(m2d, con, col, op, radii, dep, width, height, tile_size)
        if backgrounds is not None:
            bg = backgrounds[ci]
            if render_mode in ("RGB+D", "RGB+ED"):
                bg = torch.cat([bg, bg.new_zeros(1)])
            elif render_mode in ("D", "ED"):
                bg = bg.new_zeros(1)
            img = img + (1.0 - alpha) * bg
        if render_mode in ("ED", "RGB+ED"):
            img = torch.cat([img[..., :-1], img[..., -1:] / alpha.clamp(min=1e-10)], -1)
        outs_c.append(img)
        outs_a.append(alpha)
    meta.update(width=width, height=height, tile_size=tile_size, n_cameras=C)
    return torch.stack(outs_c), torch.stack(outs_a), meta


def render(scene, camera, background=(0.0, 0.0, 0.0), sh_degree: int | None = None, backend="auto",
           tile_size: int = 16) -> dict[str, Tensor]:
    """Render a GaussianScene from a Camera: {'rgb' [H,W,3], 'alpha' [H,W,1], 'depth' [H,W,1]}.

    Differentiable w.r.t. every scene tensor; CUDA -> gsplat, CPU -> the tiled PyTorch path.
    """
    dev = scene.means.device
    dt = scene.means.dtype
    deg = scene.sh_degree if sh_degree is None else min(sh_degree, scene.sh_degree)
    bg = torch.as_tensor(background, dtype=dt, device=dev)[None]
    colors, alphas, _ = rasterization(
        scene.means, scene.quats, scene.scales, scene.opacities, scene.sh,
        camera.viewmat().to(dev, dt)[None], camera.K().to(dev, dt)[None], camera.width, camera.height,
        sh_degree=deg, backgrounds=bg, render_mode="RGB+ED", backend=backend, tile_size=tile_size)
    return {"rgb": colors[0, ..., :3], "alpha": alphas[0], "depth": colors[0, ..., 3:4]}
