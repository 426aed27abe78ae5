"""Uncertainty of benchmark means, by a two-level (scenes, then views) bootstrap.

A benchmark mean is taken over the test views of each evaluation scene, then over scenes. Views of
one scene are not independent (they share its content), so resampling images alone would make the
intervals too narrow: each bootstrap replicate draws scenes with replacement, then, within every
drawn scene, its views with replacement (the "cases bootstrap" of hierarchical data). Comparisons
are *paired*: both methods are evaluated on the same resampled images, so the scene-to-scene
spread that both share cancels. Percentile intervals; with few scenes they are too narrow (a
bootstrap cannot know the spread of scenes it never saw): read them with the scene count.
pandas/numpy only (no torch), so the plots stage can import it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nifi_utils.core.common import NifiError

N_BOOT = 2000
LEVEL = 0.95


def scene_view_bootstrap(values, scenes, n_boot: int = N_BOOT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(point [k], replicates [n_boot, k]) of the scene-then-view mean of each column of `values` [N, k].

    Every column is resampled with the same indices (paired). `scenes` [N] labels each row's scene."""
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    scenes = np.asarray(scenes)
    if len(scenes) != len(v) or len(v) == 0:
        raise NifiError(f"bootstrap: {len(v)} values for {len(scenes)} scene labels")
    if not np.isfinite(v).all():
        raise NifiError(f"bootstrap: {int((~np.isfinite(v)).any(1).sum())} of {len(v)} images have a missing (NaN) value")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(scenes == s) for s in pd.unique(scenes)]
    # per scene, n_boot resamples of its views -> [S, n_boot, k]
    per_scene = np.stack([v[g[rng.integers(len(g), size=(n_boot, len(g)))]].mean(1) for g in groups])
    pick = rng.integers(len(groups), size=(n_boot, len(groups)))
    boot = per_scene[pick, np.arange(n_boot)[:, None]].mean(1)
    point = np.stack([v[g].mean(0) for g in groups]).mean(0)
    return point, boot


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    a = (1 - level) / 2
    lo, hi = np.quantile(replicates, [a, 1 - a])
    return float(lo), float(hi)


# metrics that are undefined for some images by construction (no co-visible partner view): their NaN rows
# are left out; any other missing value is an error, never a silently smaller sample
MAY_BE_UNDEFINED = {"mv_consistency"}


def scene_view_mean(df: pd.DataFrame, column: str) -> float:
    """The point estimate: mean over each scene's views, then over scenes (NaN values left out)."""
    return float(df.groupby("scene")[column].mean().mean())


def mean_ci(df: pd.DataFrame, column: str, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) of `column` over the rows of one (method, codec, rate) group: scene-then-view mean and
    its 95 % interval. NaN where the column is absent or missing for every row; a missing value is an error
    (except for MAY_BE_UNDEFINED metrics, whose undefined rows are left out)."""
    if column not in df or df[column].isna().all():
        return float("nan"), float("nan"), float("nan")
    if column in MAY_BE_UNDEFINED:
        df = df[df[column].notna()]
    vals = df[column].to_numpy(dtype=np.float64)
    if not np.isnan(vals).any() and np.isinf(vals).any():  # e.g. the PSNR of identical images: a mean, no interval
        return scene_view_mean(df, column), float("nan"), float("nan")
    point, boot = scene_view_bootstrap(df[column].to_numpy(), df["scene"].to_numpy(), n_boot, seed)
    return (float(point[0]), *interval(boot[:, 0]))


def aligned(a: pd.DataFrame, b: pd.DataFrame, column: str, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Per-image values of two methods on the same (scene, view) images, as [N, 2], and the scene labels."""
    ka = a.set_index(["scene", "view"])[column]
    kb = b.set_index(["scene", "view"])[column]
    if set(ka.index) != set(kb.index):
        only = sorted(set(ka.index) ^ set(kb.index))[:3]
        raise NifiError(f"paired comparison {what}: the two methods were scored on different images, e.g. {only}")
    kb = kb.loc[ka.index]
    return np.stack([ka.to_numpy(), kb.to_numpy()], 1), np.array([s for s, _ in ka.index])


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, column: str, n_boot: int = N_BOOT, seed: int = 0,
                      what: str = "") -> tuple[float, float, float]:
    """(mean of a - b, lo, hi): the 95 % interval of the paired difference of two methods' per-image values."""
    vals, scenes = aligned(a, b, column, what)
    point, boot = scene_view_bootstrap(vals, scenes, n_boot, seed)
    return (float(point[0] - point[1]), *interval(boot[:, 0] - boot[:, 1]))


def relative_gain(base: pd.DataFrame, new: pd.DataFrame, column: str, n_boot: int = N_BOOT, seed: int = 0,
                  what: str = "") -> tuple[float, float, float]:
    """(1 - mean(new) / mean(base), lo, hi): the relative improvement of a lower-is-better metric, paired."""
    vals, scenes = aligned(base, new, column, what)
    point, boot = scene_view_bootstrap(vals, scenes, n_boot, seed)
    return (float(1 - point[1] / point[0]), *interval(1 - boot[:, 1] / boot[:, 0]))


def tiers(groups: dict, column: str, lower_is_better: bool, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Rank methods into tiers: sorted by mean, a method opens a new tier only when the paired 95 % interval
    of its difference to the leader of the current tier excludes zero; otherwise it is tied with that tier.
    `groups`: method -> its rows (scene, view, column). Returns method -> (tier (1 = best), tied: bool)."""
    means = {m: scene_view_mean(g, column) if column in g else float("nan") for m, g in groups.items()}
    order = sorted((m for m in means if np.isfinite(means[m])), key=lambda m: means[m] if lower_is_better else -means[m])
    out, tier, leader, members = {}, 0, None, {}
    for m in order:
        if leader is not None:
            _, lo, hi = paired_difference(groups[m], groups[leader], column, n_boot, seed, f"{m} vs {leader} ({column})")
            same = lo <= 0 <= hi
        if leader is None or not same:
            tier, leader = tier + 1, m
        out[m] = tier
        members.setdefault(tier, []).append(m)
    return {m: (t, len(members[t]) > 1) for m, t in out.items()}
