"""The invention score: detail added where the ground truth is flat, tested on what it must catch (ripples, a grid,
white noise) and what it must not (the ground truth itself, a smoother image, detail on the ground truth's edges)."""
import numpy as np
import torch

from nifi_utils.measure.metrics import flat_excess, flat_mask


def _scene(size=96, seed=0):
    """A flat sky over a textured half: the flat region is the top, the detail the bottom."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((1, 3, size, size), 0.6)
    img[..., size // 2:, :] = torch.rand(1, 3, size // 2, size, generator=g) * 0.6 + 0.2
    return img


def test_the_ground_truth_scores_zero_and_a_blur_scores_at_most_zero():
    gt = _scene()
    assert abs(float(flat_excess(gt, gt))) < 1e-9
    blurred = torch.nn.functional.avg_pool2d(gt, 3, stride=1, padding=1, count_include_pad=False)
    assert float(flat_excess(blurred, gt)) <= 1e-6


def test_ripples_a_grid_and_noise_in_flat_regions_score_positive_and_grow_with_amplitude():
    gt = _scene()
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    ripple = torch.sin(2 * np.pi * (xx + 0.5 * yy) / 5)[None, None]
    grid = ((xx % 8 == 0) | (yy % 8 == 0)).float()[None, None] - 0.03
    noise = torch.randn(1, 1, 96, 96, generator=torch.Generator().manual_seed(2))
    for pattern in (ripple, grid, noise):
        scores = [float(flat_excess((gt + a * pattern).clamp(0, 1), gt)) for a in (0.01, 0.03, 0.1)]
        assert scores[0] > 0 and scores[0] < scores[1] < scores[2], scores


def test_detail_added_only_on_the_textured_half_is_not_counted():
    gt = _scene()
    mask = flat_mask(gt)
    assert mask[..., :40, :].float().mean() > 0.9 and mask[..., 56:, :].float().mean() < 0.05
    noisy = gt.clone()
    noisy[..., 60:, :] += 0.1 * torch.randn(1, 3, 36, 96, generator=torch.Generator().manual_seed(3))
    assert abs(float(flat_excess(noisy.clamp(0, 1), gt))) < 1e-3


def test_batches_score_per_image():
    gt = torch.cat([_scene(seed=0), _scene(seed=1)])
    out = gt.clone()
    out[1] += 0.05 * torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(4))
    s = flat_excess(out.clamp(0, 1), gt)
    assert s.shape == (2,) and abs(float(s[0])) < 1e-9 and float(s[1]) > 0.01
