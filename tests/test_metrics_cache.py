"""ST-LPIPS with the ground truth's features kept between calls (metrics._reference_features) gives the
package's own forward, and changed reference images are never served stale features."""
import collections

import pytest
import torch

from nifi_utils.measure import metrics


def _imgs(seed, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_cached_reference_matches_the_package_forward(net):
    p, g = _imgs(0), _imgs(1)
    model = metrics.stlpips_model(net, "cpu")
    want = model(p, g, normalize=True).reshape(-1)
    first = metrics.stlpips(p, g, net)   # computes and keeps g's features
    again = metrics.stlpips(p, g, net)   # served from the cache
    assert torch.allclose(first, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(first, again)


def test_changed_reference_is_not_served_stale_features():
    p, g = _imgs(2), _imgs(3)
    metrics.stlpips(p, g)
    g2 = g.clone()
    g2[0, :, :8, :8] = 1.0 - g2[0, :, :8, :8]  # same shape, other pixels
    model = metrics.stlpips_model("alex", "cpu")
    assert torch.allclose(metrics.stlpips(p, g2), model(p, g2, normalize=True).reshape(-1), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(metrics.stlpips(p, g2), metrics.stlpips(p, g))


def test_gradient_reaches_the_prediction_through_the_cached_path():
    p, g = _imgs(4).requires_grad_(True), _imgs(5)
    metrics.stlpips(p, g)  # cache g
    metrics.stlpips(p, g).sum().backward()
    q = p.detach().clone().requires_grad_(True)
    metrics.stlpips_model("alex", "cpu")(q, g, normalize=True).sum().backward()
    assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "REF_CACHE_BYTES", 1)  # nothing fits: computed, never kept
    monkeypatch.setattr(metrics, "_REF_CACHE", collections.OrderedDict())
    metrics.stlpips(_imgs(6), _imgs(7))
    assert len(metrics._REF_CACHE) == 0
