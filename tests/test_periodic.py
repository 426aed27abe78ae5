"""The periodic-artifact score: flags a lattice with the latent grid's period, not natural or smooth images."""
import numpy as np
import pytest
import torch
from skimage import data

from nifi_utils.core.common import NifiError
from nifi_utils.measure.metrics import periodic_artifact


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()


def _crop(name, y=60, x=60, n=128):
    im = getattr(data, name)()
    im = im if im.ndim == 3 else np.repeat(im[..., None], 3, -1)
    return im[y:y + n, x:x + n, :3] / 255.0


def _dots(h, w, period=8, phase=(0, 0)):
    yy, xx = np.mgrid[0:h, 0:w]
    return (((yy - phase[0]) % period == 0) & ((xx - phase[1]) % period == 0)).astype(float)[..., None]


@pytest.mark.parametrize("name", ["astronaut", "rocket", "brick"])
def test_dot_grid_on_a_natural_image_is_flagged(name):
    a = _crop(name)
    clean = float(periodic_artifact(_t(a)))
    dotted = float(periodic_artifact(_t(np.clip(a + 0.03 * _dots(128, 128, phase=(3, 5)), 0, 1))))
    assert abs(clean) < 0.15
    assert dotted > clean + 0.3


def test_stronger_lattice_scores_higher_and_4px_blocks_count():
    a = _crop("astronaut")
    scores = [float(periodic_artifact(_t(np.clip(a + amp * _dots(128, 128), 0, 1)))) for amp in (0.0, 0.02, 0.05, 0.1)]
    assert all(b > s for s, b in zip(scores, scores[1:])), scores
    # a 4-px checker lands on a subset of the 8-px lattice frequencies
    yy, xx = np.mgrid[0:128, 0:128]
    checker = (((yy // 2) + (xx // 2)) % 2)[..., None].astype(float)
    assert float(periodic_artifact(_t(np.clip(a + 0.03 * checker, 0, 1)))) > scores[0] + 0.1  # 4 of 63 frequencies


def test_natural_smooth_and_flat_images_stay_near_zero():
    yy, xx = np.mgrid[0:96, 0:160]
    smooth = np.stack([xx / 159, yy / 95, 0.5 + 0.2 * np.sin(xx / 30.0)], -1)
    for im in (smooth, np.round(smooth * 255) / 255, _crop("chelsea", n=96)[:, :96]):
        assert abs(float(periodic_artifact(_t(im)))) < 0.15
    assert float(periodic_artifact(torch.full((1, 3, 32, 32), 0.4))) == pytest.approx(0.0, abs=1e-6)
    # white noise: every frequency holds the same power on average
    assert abs(float(periodic_artifact(torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))).mean())) < 0.08


def test_batch_non_square_and_errors():
    a = _crop("astronaut", n=128)[:, :100]
    both = periodic_artifact(torch.cat([_t(a), _t(np.clip(a + 0.05 * _dots(128, 100), 0, 1))]))
    assert both.shape == (2,) and both[1] > both[0] + 0.3
    with pytest.raises(NifiError, match="at least 16x16"):
        periodic_artifact(torch.rand(1, 3, 12, 40))
