"""The BM3D baseline (the `bm3d` package), noise level estimated per image.

Kept free of torch so that BM3D worker processes start in a fraction of a second: BM3D's C core is
single-threaded per call, so the benchmark spreads images over processes instead.
"""
from __future__ import annotations

import time

import numpy as np


def estimate_noise_sigma(img01: np.ndarray) -> float:
    """Noise standard deviation of an image in [0, 1], estimated per image (wavelet MAD, scikit-image)."""
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(np.asarray(img01, dtype=np.float64), channel_axis=-1, average_sigmas=True))


def bm3d_restore(img01: np.ndarray, sigma: float | None = None) -> tuple[np.ndarray, float, float]:
    """BM3D (colour version, default profile, one thread) with the per-image noise estimate.

    Returns (restored float image in [0, 1], sigma used, seconds)."""
    import bm3d

    img = np.asarray(img01, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"BM3D expects an HxWx3 image, got {img.shape}")
    s = estimate_noise_sigma(img) if sigma is None else float(sigma)
    profile = bm3d.BM3DProfile()
    profile.num_threads = 1  # measured: its own threading is slower than one thread per process here
    t = time.perf_counter()
    # sigma 0 would divide by zero inside BM3D; a clean image gets a floor one 8-bit step wide
    out = bm3d.bm3d_rgb(img, max(s, 1.0 / 255), profile=profile)
    return np.clip(out, 0.0, 1.0), s, time.perf_counter() - t


def _worker(args):
    return bm3d_restore(*args)


def bm3d_many(images: list[np.ndarray], workers: int = 1, sigma: float | None = None) -> list[tuple[np.ndarray, float, float]]:
    """BM3D over many images at noise level `sigma` (None: estimated per image), spread over `workers` processes
    (spawned: safe beside torch's threads)."""
    if workers <= 1 or len(images) <= 1:
        return [bm3d_restore(im, sigma) for im in images]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(images)), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_worker, [(im, sigma) for im in images]))
