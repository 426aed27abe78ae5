import os

import numpy as np
import pytest
import torch

from nifi_utils.gs.cameras import Camera, look_at
from nifi_utils.gs.gaussians import GaussianScene

os.environ.setdefault("NIFI_QUIET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_scene(n=300, seed=0, sh_degree=3, dtype=torch.float32, spread=1.0, log_scale=-3.0) -> GaussianScene:
    g = torch.Generator().manual_seed(seed)
    return GaussianScene(
        means=((torch.rand(n, 3, generator=g) - 0.5) * 2 * spread).to(dtype),
        quats=torch.randn(n, 4, generator=g).to(dtype),
        log_scales=(torch.randn(n, 3, generator=g) * 0.4 + log_scale).to(dtype),
        opacity_logits=(torch.randn(n, generator=g) * 1.5).to(dtype),
        sh=(torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.4).to(dtype),
    )


def front_camera(width=40, height=32, dist=3.0, f=None) -> Camera:
    f = f or 1.1 * width
    return Camera(look_at([0.2, -dist, 0.5], [0, 0, 0]), f, f * 1.02, width / 2 + 0.3, height / 2 - 0.2, width, height, "cam")


@pytest.fixture
def scene():
    return random_scene()


@pytest.fixture
def camera():
    return front_camera()
