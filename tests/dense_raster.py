"""The dense reference rasterizer the tests and the render benchmark hold the tiled CPU path against:
every (pixel, Gaussian) pair at once, cumprod over depth order, O(N x H x W) memory."""
import math

import torch
import torch.nn.functional as F

from nifi_utils.gs.render import ALPHA_MAX, ALPHA_THRESHOLD, T_THRESHOLD, _project_camera, tile_ranges


def rasterization_dense(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                        near_plane=0.01, far_plane=1e10, radius_clip=0.0, eps2d=0.3, sh_degree=None,
                        tile_size=16, backgrounds=None, render_mode="RGB", rasterize_mode="classic"):
    """Same rules as the CUDA kernel: support = the Gaussian's tiles, thresholds, exclusive stop."""
    C = viewmats.shape[0]
    quats = F.normalize(quats, dim=-1)
    outs_c, outs_a = [], []
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    ys, xs = torch.meshgrid(torch.arange(height, device=means.device), torch.arange(width, device=means.device), indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 2).to(means.dtype) + 0.5
    ptile = torch.div(torch.stack([xs, ys], -1).reshape(-1, 2), tile_size, rounding_mode="floor")
    for ci in range(C):
        m2d, con, dep, op, radii, col = _project_camera(
            means, quats, scales, opacities, colors, viewmats, Ks, ci, width, height, near_plane, far_plane,
            radius_clip, eps2d, sh_degree, render_mode, rasterize_mode)
        order = torch.sort(dep.detach(), stable=True).indices
        order = order[(radii[order] > 0).all(-1)]
        x0, y0, x1, y1 = tile_ranges(m2d[order], radii[order], tile_size, tiles_x, tiles_y)
        support = ((ptile[:, :1] >= x0) & (ptile[:, :1] < x1) & (ptile[:, 1:] >= y0) & (ptile[:, 1:] < y1))
        d = m2d[order][None] - pix[:, None]  # [HW,N,2]
        a, b, c = con[order].unbind(-1)
        sigma = 0.5 * (a * d[..., 0] ** 2 + c * d[..., 1] ** 2) + b * d[..., 0] * d[..., 1]
        alpha = torch.clamp(op[order] * torch.exp(-sigma), max=ALPHA_MAX)
        alpha = torch.where(support & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
        t_incl = torch.cumprod(1.0 - alpha, -1)
        t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], -1)
        w = torch.where(t_incl > T_THRESHOLD, alpha * t_excl, torch.zeros_like(alpha))
        img = (w @ col[order]).reshape(height, width, -1)
        alpha_img = w.sum(-1).reshape(height, width, 1)
        if backgrounds is not None:
            bg = backgrounds[ci]
            if render_mode in ("RGB+D", "RGB+ED"):
                bg = torch.cat([bg, bg.new_zeros(1)])
            img = img + (1.0 - alpha_img) * bg
        if render_mode == "RGB+ED":
            img = torch.cat([img[..., :-1], img[..., -1:] / alpha_img.clamp(min=1e-10)], -1)
        outs_c.append(img)
        outs_a.append(alpha_img)
    return torch.stack(outs_c), torch.stack(outs_a), {}
