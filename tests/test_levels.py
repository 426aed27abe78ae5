"""Rate levels: log-spaced sizes, nested gradient pruning, QAT fine-tuning."""
import math

import numpy as np
import pytest
import torch

from conftest import front_camera, random_scene
from nifi_utils.codec import levels as L
from nifi_utils.core.common import NifiError
from nifi_utils.gs.render import render


def test_level_sizes_are_log_spaced_from_c_min_to_n_max():
    sizes = L.level_sizes(100000, 4096, 3, 0.85)
    assert sizes[0] == 4096 and sizes[-1] == 85000
    assert sizes[1] == round(math.sqrt(4096 * 85000))  # geometric mean for L = 3
    five = L.level_sizes(10**6, 1000, 5, 10**5)
    ratios = np.diff(np.log(five))
    assert np.allclose(ratios, ratios[0], atol=1e-3)
    assert L.level_sizes(500, 10, 1, 200) == [200]
    with pytest.raises(NifiError, match="c_min"):
        L.level_sizes(100, 500, 3, 0.85)


def test_pruning_is_nested_and_keeps_the_highest_scores():
    scene = random_scene(200, seed=1)
    calls = []

    def scorer(sub):
        calls.append(len(sub))
        return sub.means[:, 0]  # keep the Gaussians with the largest x

    lv = L.prune_levels(scene, [10, 40, 120], scorer)
    assert [len(i) for i in lv] == [10, 40, 120]
    assert calls == [200, 120, 40]  # each round scores the already pruned model
    for small, big in zip(lv, lv[1:]):
        assert set(small.tolist()) <= set(big.tolist())
    order = torch.argsort(scene.means[:, 0], descending=True)
    assert set(lv[0].tolist()) == set(order[:10].tolist())
    with pytest.raises(NifiError, match="increase"):
        L.prune_levels(scene, [50, 20], scorer)


def _target(scene, cams, bg):
    with torch.no_grad():
        return [(render(scene, c, background=bg)["rgb"].clamp(0, 1) * 255).round().byte().numpy() for c in cams]


def test_gradient_scores_zero_for_gaussians_no_view_sees():
    scene = random_scene(60, seed=2, spread=0.5, log_scale=-2.5)
    scene.means[:5] -= torch.tensor([0.0, 50.0, 0.0])  # behind the camera (at y = -3, looking along +y)
    cams = [front_camera(24, 20)]
    target = _target(random_scene(60, seed=9, spread=0.5, log_scale=-2.5), cams, (0.2, 0.3, 0.4))
    s = L.gradient_scores(scene, cams, target, (0.2, 0.3, 0.4))
    assert s.shape == (60,) and torch.isfinite(s).all()
    assert (s[:5] == 0).all() and (s[5:] > 0).sum() > 20


def test_gradient_score_matches_finite_differences():
    """The score's opacity component equals a central finite difference of the loss (float64)."""
    scene = random_scene(30, seed=3, spread=0.4, log_scale=-2.0, dtype=torch.float64)
    cam = front_camera(16, 14)
    target = [np.full((14, 16, 3), 128, np.uint8)]
    i, eps = 7, 1e-6
    params = {k: v.detach().clone().requires_grad_(True) for k, v in scene.tensors().items()}
    out = render(L.GaussianScene(**params), cam, background=(0.0, 0.0, 0.0))
    L.render_loss(out["rgb"], L.image_to_tensor(target[0], dtype=torch.float64), 0.0).backward()

    def loss_at(delta):
        s = scene.map(lambda t: t.clone())
        s.opacity_logits[i] += delta
        o = render(s, cam, background=(0.0, 0.0, 0.0))["rgb"]
        return float(L.render_loss(o, L.image_to_tensor(target[0], dtype=torch.float64), 0.0))

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert params["opacity_logits"].grad[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)
    full = L.gradient_scores(scene, [cam], target, (0.0, 0.0, 0.0), lambda_dssim=0.0)
    assert full[i] >= abs(fd) * (1 - 1e-4)


def test_opacity_volume_scores_prefer_big_opaque_gaussians():
    scene = random_scene(4, seed=0)
    scene.opacity_logits[:] = torch.tensor([-3.0, 3.0, 3.0, -3.0])
    scene.log_scales[:] = torch.tensor([[-1.0], [-1.0], [-2.0], [-2.0]]).expand(4, 3)
    assert torch.argsort(L.opacity_volume_scores(scene), descending=True).tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("shared", [True, False])
def test_finetuning_reduces_the_loss_and_respects_sharing(shared):
    torch.manual_seed(0)
    bg = (0.5, 0.5, 0.5)
    full = random_scene(400, seed=4, spread=0.6, log_scale=-3.0, sh_degree=0)
    cams = [front_camera(24, 20), front_camera(24, 20, dist=2.5)]
    target = _target(full, cams, bg)
    lv = L.prune_levels(full, [40, 120], L.opacity_volume_scores)
    cfg = L.FinetuneConfig(steps=60, shared=shared, lr_scales=0.03, lr_means=1e-3)
    scenes, hist = L.finetune_levels(full, lv, [0, 0], cams, target, bg, cfg, seed=0)
    assert [len(s) for s in scenes] == [40, 120]
    losses = [h[1] for h in hist]
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < np.mean(losses[:10])
    # level 0's Gaussians inside level 1: one set of attributes when shared, separate copies otherwise
    pos = {int(g): k for k, g in enumerate(lv[1])}
    inner = torch.tensor([pos[int(g)] for g in lv[0]])
    same = torch.equal(scenes[0].means, scenes[1].means[inner])
    assert same == shared
