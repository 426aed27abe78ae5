"""Two-level bootstrap: interval coverage on synthetic data with a known mean, pairing, tiers, bad input."""
import numpy as np
import pandas as pd
import pytest

from nifi_utils.core.common import NifiError
from nifi_utils.measure.stats import interval, mean_ci, paired_difference, relative_gain, scene_view_bootstrap, tiers


def _frame(rng, mu, n_scenes=10, n_views=5, scene_sd=0.5, view_sd=0.5, shared=None):
    eff = rng.normal(0, scene_sd, n_scenes) if shared is None else shared
    rows = [{"scene": f"s{s}", "view": f"{v:04d}", "x": mu + eff[s] + rng.normal(0, view_sd)}
            for s in range(n_scenes) for v in range(n_views)]
    return pd.DataFrame(rows)


def test_intervals_cover_the_true_mean_about_as_often_as_they_should():
    """Scenes drawn from a population with mean mu, views within scenes: the 95 % interval of the
    scene-then-view mean should contain mu in ~95 % of repeated experiments (percentile bootstrap with
    10 scenes under-covers slightly)."""
    rng = np.random.default_rng(0)
    hits = [lo <= 1.0 <= hi for _ in range(300) for _, lo, hi in [mean_ci(_frame(rng, 1.0), "x", n_boot=400,
                                                                           seed=int(rng.integers(1e9)))]]
    assert 0.86 <= np.mean(hits) <= 0.99, np.mean(hits)
    # resampling images alone would ignore the scene effect: the two-level interval is wider than that
    df = _frame(rng, 1.0, scene_sd=1.0)
    _, lo, hi = mean_ci(df, "x")
    naive = np.quantile([df["x"].sample(len(df), replace=True, random_state=i).mean() for i in range(400)], [0.025, 0.975])
    assert hi - lo > 1.5 * (naive[1] - naive[0])


def test_paired_difference_sees_a_small_shift_that_scene_spread_hides():
    rng = np.random.default_rng(1)
    eff = rng.normal(0, 1.0, 10)
    a, b = _frame(rng, 1.00, shared=eff, view_sd=0.02), _frame(rng, 1.05, shared=eff, view_sd=0.02)
    _, alo, ahi = mean_ci(a, "x")
    _, blo, bhi = mean_ci(b, "x")
    assert alo < bhi and blo < ahi  # the unpaired intervals overlap
    d, lo, hi = paired_difference(a, b, "x")
    assert d == pytest.approx(-0.05, abs=0.01) and hi < 0
    g, glo, ghi = relative_gain(b, a, "x")
    assert glo < g < ghi
    # tiers: b is worse than a (lower is better); a copy of a is tied with it
    t = tiers({"a": a, "b": b, "a2": a.assign(x=a["x"] + rng.normal(0, 1e-4, len(a)))}, "x", lower_is_better=True)
    assert t["b"] == (2, False) and t["a"][0] == t["a2"][0] == 1 and t["a"][1] and t["a2"][1]


def test_point_estimate_is_scene_then_view_mean_and_errors_are_clear():
    df = pd.DataFrame({"scene": ["a", "a", "a", "b"], "view": ["0", "1", "2", "0"], "x": [1.0, 1.0, 1.0, 3.0]})
    m, lo, hi = mean_ci(df, "x")
    assert m == pytest.approx(2.0) and lo <= m <= hi
    point, boot = scene_view_bootstrap(df[["x"]].to_numpy(), df["scene"].to_numpy(), n_boot=50)
    assert boot.shape == (50, 1) and interval(boot[:, 0])[0] >= 1.0
    with pytest.raises(NifiError, match="missing"):
        mean_ci(df.assign(x=[1.0, np.nan, 1.0, 3.0]), "x")
    with pytest.raises(NifiError, match="different images"):
        paired_difference(df, df.iloc[:3], "x", what="nifi vs compressed")
    assert np.isnan(mean_ci(df, "absent")[0])


def test_infinite_values_have_a_mean_but_no_interval():
    df = pd.DataFrame({"scene": ["a", "b"], "view": ["0", "0"], "psnr": [np.inf, np.inf]})
    m, lo, hi = mean_ci(df, "psnr")
    assert m == np.inf and np.isnan(lo) and np.isnan(hi)
