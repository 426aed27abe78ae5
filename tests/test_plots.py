"""Plots stage library (CPU, synthetic data): aggregation, Table 1 ranking and formats, figures, the paper's table."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from nifi_utils.eval import plots  # noqa: E402
from nifi_utils.core.common import REPO_ROOT, NifiError  # noqa: E402

METRICS = ["psnr", "ssim", "stlpips_alex", "stlpips_vgg", "mv_consistency"]
# stlpips_alex (lower better): nifi < nifi_no_tsd < nifi_wo_t0 < img2img < bm3d < compressed; 3dgs best of all but unranked.
# psnr (higher better) deliberately in another order: bm3d > compressed > img2img > the rest.
KNOWN = {
    "3dgs": dict(stlpips_alex=0.050, stlpips_vgg=0.060, psnr=40.0),
    "compressed": dict(stlpips_alex=0.500, stlpips_vgg=0.510, psnr=29.0),
    "bm3d": dict(stlpips_alex=0.400, stlpips_vgg=0.410, psnr=30.0),
    "img2img": dict(stlpips_alex=0.300, stlpips_vgg=0.150, psnr=28.0),
    "nifi": dict(stlpips_alex=0.100, stlpips_vgg=0.200, psnr=25.0),
    "nifi_no_tsd": dict(stlpips_alex=0.200, stlpips_vgg=0.300, psnr=24.0),
    "nifi_wo_t0": dict(stlpips_alex=0.250, stlpips_vgg=0.350, psnr=23.0),
}


def _row(method, rate, scene, view, nbytes, **m):
    codec = "uncompressed" if method == "3dgs" else "nifi3dgs"
    base = dict(method=method, codec=codec, rate=rate, scene=scene, view=view, bytes=nbytes, size_mb=nbytes / 1e6,
                size_mib=nbytes / 2**20, ratio=1e6 / nbytes, ssim=0.9, mv_consistency=1.1, ms_per_image=1.0, device="cpu")
    return {**base, **m}


def known_frame(rates=("level0", "level1")) -> pd.DataFrame:
    """Every rate has the same known order; the level shifts every value by the same amount (ranks unchanged)."""
    rows = []
    for scene in ("eval_00", "eval_01"):
        for view in ("0000", "0008"):
            rows.append(_row("3dgs", "uncompressed", scene, view, 1_000_000, **KNOWN["3dgs"]))
            for k, rate in enumerate(rates):
                for method, vals in KNOWN.items():
                    if method != "3dgs":
                        shifted = {m: v - 0.01 * k if m != "psnr" else v + k for m, v in vals.items()}
                        rows.append(_row(method, rate, scene, view, 1000 * (k + 1), **shifted))
    return pd.DataFrame(rows)


@pytest.fixture
def agg():
    return plots.aggregate(known_frame(), METRICS)


def test_aggregate_is_the_mean_per_scene_then_over_scenes():
    rows = [_row("nifi", "level0", "eval_00", "0000", 1000, psnr=20.0, stlpips_alex=0.1, stlpips_vgg=0.1),
            _row("nifi", "level0", "eval_00", "0008", 1000, psnr=22.0, stlpips_alex=0.3, stlpips_vgg=np.nan),
            _row("nifi", "level0", "eval_01", "0000", 3000, psnr=30.0, stlpips_alex=0.5, stlpips_vgg=0.5)]
    a = plots.aggregate(pd.DataFrame(rows), METRICS).iloc[0]
    # per scene 21 and 30 dB -> 25.5 (a flat mean over the three images would be 24)
    assert a["psnr"] == pytest.approx(25.5)
    assert a["stlpips_alex"] == pytest.approx(0.35)  # scene means 0.2 and 0.5
    assert a["stlpips_vgg"] == pytest.approx(0.3)  # NaN left out: scene means 0.1 and 0.5
    assert a["size_mb"] == pytest.approx(0.002)
    assert (a["n_scenes"], a["n_images"]) == (2, 3)


def test_aggregate_orders_methods_like_the_paper(agg):
    order = list(dict.fromkeys(agg["method"]))
    assert order == ["3dgs", "compressed", "bm3d", "img2img", "nifi", "nifi_no_tsd", "nifi_wo_t0"]
    assert plots.method_sort_key("external_swinir") > plots.method_sort_key("img2img")
    assert plots.method_sort_key("external_swinir") < plots.method_sort_key("nifi")


def test_natural_rate_order():
    assert sorted(["level10", "level2", "level0"], key=plots.natural_key) == ["level0", "level2", "level10"]
    assert sorted(["lambda1.0", "lambda0.5", "lambda0.1"], key=plots.natural_key) == ["lambda0.1", "lambda0.5", "lambda1.0"]


def test_table_ranks_lower_is_better(agg):
    t = plots.build_table1(agg, ["stlpips_alex", "stlpips_vgg"])
    for rate in ("level0", "level1"):
        r = t[t["rate"] == rate].set_index("method")
        assert r.loc["nifi", "rank_stlpips_alex"] == 1
        assert r.loc["nifi_no_tsd", "rank_stlpips_alex"] == 2
        assert r.loc["nifi_wo_t0", "rank_stlpips_alex"] == 3
        assert r.loc["compressed", "rank_stlpips_alex"] == 6
        # the second metric ranks on its own values: img2img is best there
        assert r.loc["img2img", "rank_stlpips_vgg"] == 1 and r.loc["nifi", "rank_stlpips_vgg"] == 2
    assert t.loc[t["method"] == "3dgs", "rank_stlpips_alex"].isna().all()


def test_table_ranks_higher_is_better_for_psnr(agg):
    t = plots.build_table1(agg, ["psnr", "stlpips_alex"])
    r = t[t["rate"] == "level0"].set_index("method")
    assert r.loc["bm3d", "rank_psnr"] == 1 and r.loc["compressed", "rank_psnr"] == 2 and r.loc["img2img", "rank_psnr"] == 3
    assert r.loc["nifi_wo_t0", "rank_psnr"] == 6


def test_ties_at_printed_precision_share_a_mark():
    s = pd.Series([0.1001, 0.1004, 0.2])
    assert list(plots.rank_rows(s, "stlpips_alex", 3)) == [1, 1, 2]


def test_markdown_and_latex_mark_the_right_cells(agg):
    t = plots.build_table1(agg, ["stlpips_alex", "stlpips_vgg"])
    md = plots.table1_markdown(t, ["stlpips_alex", "stlpips_vgg"])
    row = next(line for line in md.splitlines() if line.startswith("| + NiFi |"))
    assert row.split("|")[2].strip() == "**0.100** / <ins>0.200</ins>"
    row = next(line for line in md.splitlines() if line.startswith("| + NiFi w/o t0 |"))
    assert row.split("|")[2].strip() == "*0.250* / 0.350"
    row = next(line for line in md.splitlines() if line.startswith("| 3DGS (uncompressed) |"))
    assert row.split("|")[2].strip() == "0.050 / 0.060"  # the reference is never marked
    assert "not LPIPS" in md and "offline" in md
    header = md.splitlines()[0]
    assert "level0 (0.001 MB)" in header and "level1 (0.002 MB)" in header
    assert any(line.startswith("| compressed size") for line in md.splitlines())
    tex = plots.table1_latex(t, ["stlpips_alex", "stlpips_vgg"])
    assert "\\textbf{0.100} / \\underline{0.200}" in tex and "\\textit{0.250} / 0.350" in tex
    assert tex.count("\\begin{tabular}") == 1 and "\\end{tabular}" in tex


def test_write_table1_files(agg, tmp_path):
    t = plots.build_table1(agg, ["stlpips_alex", "stlpips_vgg"])
    paths = plots.write_table1(t, ["stlpips_alex", "stlpips_vgg"], tmp_path / "sub" / "table1", note="a note")
    assert [p.name for p in paths] == ["table1.csv", "table1.md", "table1.tex"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    back = pd.read_csv(paths[0])
    nifi = back[(back["method"] == "nifi") & (back["rate"] == "level0")].iloc[0]
    assert nifi["cell"] == "0.100 / 0.200" and nifi["rank_stlpips_alex"] == 1
    assert "a note" in paths[1].read_text()


def test_table_needs_two_metrics(agg):
    with pytest.raises(NifiError, match="two metrics"):
        plots.build_table1(agg, ["stlpips_alex"])


def test_missing_benchmark_csv_names_file_and_stage(tmp_path):
    missing = tmp_path / "reports" / "tiny" / "benchmark.csv"
    with pytest.raises(NifiError, match="benchmark stage") as e:
        plots.load_benchmark(missing)
    assert str(missing) in str(e.value)


def test_missing_metric_column_is_an_error(tmp_path):
    p = tmp_path / "benchmark.csv"
    known_frame().drop(columns=["ssim"]).to_csv(p, index=False)
    with pytest.raises(NifiError, match="ssim"):
        plots.load_benchmark(p, ["stlpips_alex", "ssim"])


def test_load_benchmark_keeps_view_names(tmp_path):
    p = tmp_path / "benchmark.csv"
    known_frame().to_csv(p, index=False)
    df = plots.load_benchmark(p, METRICS)
    assert set(df["view"]) == {"0000", "0008"}


def test_rd_table_and_figure(agg, tmp_path):
    rd = plots.rd_table(agg, METRICS)
    assert {"method", "size_mb", "stlpips_alex"} <= set(rd.columns)
    assert len(rd) == len(rd[["method", "codec", "rate"]].drop_duplicates()) == 1 + 6 * 2
    fig = plots.plot_rd(agg, METRICS)
    axes = [a for a in fig.axes if a.get_title()]
    assert len(axes) == len(METRICS)
    assert all(a.get_xscale() == "log" for a in axes)
    # one labelled curve per method (6) + the 3DGS reference line (error-bar caps are unlabelled)
    assert len([ln for ln in axes[0].get_lines() if not ln.get_label().startswith("_")]) == 6
    assert any(len(set(ln.get_ydata())) == 1 and ln.get_linestyle() == "--" for ln in axes[0].get_lines())
    fig.savefig(tmp_path / "rd.png"), fig.savefig(tmp_path / "rd.pdf")
    plt.close(fig)
    assert (tmp_path / "rd.png").stat().st_size > 0 and (tmp_path / "rd.pdf").stat().st_size > 0


def test_all_nan_metric_still_plots(agg):
    agg = agg.assign(mv_consistency=np.nan)
    fig = plots.plot_rd(agg, ["stlpips_alex", "mv_consistency"])
    plt.close(fig)


def test_paper_curves_only_on_comparable_metrics(agg):
    paper = plots.load_paper_table(REPO_ROOT / "data" / "paper_table1.csv")
    agg = agg.assign(lpips_alex=agg["stlpips_alex"], lpips_alex_lo=agg["stlpips_alex_lo"], lpips_alex_hi=agg["stlpips_alex_hi"])
    fig = plots.plot_rd(agg, ["lpips_alex", "stlpips_alex"], paper, "DB")
    lp, st = [a for a in fig.axes if a.get_title()][:2]
    assert len(lp.get_lines()) == len(st.get_lines()) + 9  # 8 published curves + the published 3DGS line
    plt.close(fig)
    with pytest.raises(NifiError, match="paper_dataset"):
        plots.plot_rd(agg, ["lpips_alex"], paper, "LLFF")


# ---------------------------------------------------------------- the paper's Table 1 as data


@pytest.fixture(scope="module")
def paper():
    return plots.load_paper_table(REPO_ROOT / "data" / "paper_table1.csv")


def _paper(paper, dataset, lam, method):
    r = paper[(paper["dataset"] == dataset) & (paper["lambda"] == lam) & (paper["method"] == method)]
    assert len(r) == 1
    return r.iloc[0]


def test_paper_table_shape(paper):
    assert list(paper.columns) == plots.PAPER_COLUMNS
    assert len(paper) == 9 * 3 * 3
    assert set(paper["dataset"]) == {"Mip-NeRF360", "T&T", "DB"}
    assert paper["method"].nunique() == 9
    for _, g in paper.groupby(["method", "dataset"]):
        assert sorted(g["lambda"]) == ["0.1", "0.5", "1.0"]
    assert paper[["size_mb", "lpips", "dists"]].notna().all().all()
    assert paper["source"].str.contains("arXiv 2602.04549 Table 1").all()


def test_paper_table_spot_values(paper):
    # values as printed in the paper's Table 1 (arXiv 2602.04549)
    r = _paper(paper, "Mip-NeRF360", "0.1", "NiFi")
    assert (r["lpips"], r["dists"], r["size_mb"]) == (0.178, 0.109, 1.152)
    assert _paper(paper, "DB", "0.5", "3DGS-30K")["size_mb"] == 555
    r = _paper(paper, "DB", "1.0", "HAC++")
    assert (r["lpips"], r["dists"], r["size_mb"]) == (0.337, 0.249, 0.110)
    r = _paper(paper, "T&T", "0.5", "NiFi w/o t0")
    assert (r["lpips"], r["dists"]) == (0.229, 0.147)
    r = _paper(paper, "Mip-NeRF360", "1.0", "Difix3D")
    assert (r["lpips"], r["dists"]) == (0.330, 0.152)
    assert _paper(paper, "T&T", "0.1", "3DGS-30K")["lpips"] == 0.125


def test_paper_table_is_consistent_with_its_derived_ratios(paper):
    # the spec's compression-ratio table (derived from the sizes, rounded to integers)
    expected = {"Mip-NeRF360": (500, 1613, 2583), "T&T": (258, 890, 1474), "DB": (927, 3033, 5045)}
    for ds, ratios in expected.items():
        for lam, want in zip(("0.1", "0.5", "1.0"), ratios):
            got = _paper(paper, ds, lam, "3DGS-30K")["size_mb"] / _paper(paper, ds, lam, "HAC++")["size_mb"]
            assert abs(got - want) <= 1, (ds, lam, got)


def test_paper_nifi_has_the_best_lpips_of_every_restorer(paper):
    for (ds, lam), g in paper[paper["method"] != "3DGS-30K"].groupby(["dataset", "lambda"]):
        assert g.loc[g["lpips"].idxmin(), "method"] == "NiFi", (ds, lam)


def test_missing_paper_table_is_an_error(tmp_path):
    with pytest.raises(NifiError, match="paper_table1"):
        plots.load_paper_table(tmp_path / "paper_table1.csv")


# ---------------------------------------------------------------- crops and the grid


def test_find_crop_lands_on_the_detail():
    rng = np.random.default_rng(0)
    img = np.full((64, 80, 3), 0.5)
    img[40:50, 10:20] = rng.random((10, 10, 3))
    y, x = plots.find_crop(img, 16)
    assert 0 <= y <= 64 - 16 and 0 <= x <= 80 - 16
    assert y <= 40 and y + 16 >= 50 and x <= 10 and x + 16 >= 20
    # a crop larger than the image is clipped to it
    assert plots.find_crop(img[:8, :8], 16) == (0, 0)


def _write_images(root, df):
    rng = np.random.default_rng(1)
    for (m, s, r, v), _ in df.groupby(["method", "scene", "rate", "view"]):
        for method in ("gt", m) if m != "3dgs" else ():
            p = plots.image_path(root, method, s, r, v)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(p)


def test_grid_figure(tmp_path):
    df = known_frame()
    _write_images(tmp_path, df)
    pairs, rates, methods = plots.grid_selection(df, 1)
    assert pairs == [("eval_00", "0000"), ("eval_01", "0000")] and rates == ["level0", "level1"]
    assert methods[0] == "compressed" and "3dgs" not in methods
    fig = plots.plot_grid(df, tmp_path, 1, 8, "stlpips_alex")
    # per (scene, view, rate): a row of images and a row of crops, one column per method + ground truth
    assert len(fig.axes) == 2 * len(pairs) * len(rates) * (len(methods) + 1)
    assert any("0.100" in a.get_title() for a in fig.axes)
    fig.savefig(tmp_path / "grid.png")
    plt.close(fig)


def test_grid_missing_image_names_the_stage(tmp_path):
    df = known_frame()
    _write_images(tmp_path, df)
    plots.image_path(tmp_path, "nifi", "eval_00", "level0", "0000").unlink()
    with pytest.raises(NifiError, match="benchmark stage"):
        plots.plot_grid(df, tmp_path, 1, 8, "stlpips_alex")


def test_crop_row_boxes_the_grids_crop_in_every_panel():
    from matplotlib.patches import Rectangle

    rng = np.random.default_rng(2)
    gt = np.full((40, 48, 3), 128, np.uint8)
    gt[5:13, 30:38] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    panels = [("ground truth", gt), ("compressed", gt // 2), ("nifi", gt[::-1].copy())]
    fig = plots.crop_row(panels, 10, "title")
    y, x = plots.find_crop(gt, 10)
    top, crops = fig.axes[:3], fig.axes[3:]  # row-major: the images, then their crops
    assert [a.get_title() for a in top] == ["ground truth", "compressed", "nifi"]
    boxes = [p for a in top for p in a.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 3 and all(b.get_xy() == (x - 0.5, y - 0.5) and b.get_width() == 10 for b in boxes)
    assert all(np.array_equal(a.images[0].get_array(), im[y:y + 10, x:x + 10]) for a, (_, im) in zip(crops, panels))
    plt.close(fig)
    fig = plots.image_row(panels, "row")
    assert [a.get_title() for a in fig.axes] == ["ground truth", "compressed", "nifi"]
    plt.close(fig)


def test_evaluation_scenes():
    assert plots.evaluation_scenes(["train_00", "eval_01", "eval_00"]) == ["eval_00", "eval_01"]
    assert plots.evaluation_scenes(["bicycle", "garden"]) == ["bicycle", "garden"]


def test_image_path_accepts_view_names_with_or_without_extension(tmp_path):
    a = plots.image_path(tmp_path, "nifi", "eval_00", "level0", "0008")
    assert a == plots.image_path(tmp_path, "nifi", "eval_00", "level0", "0008.png")
    assert a == tmp_path / "benchmark" / "nifi" / "eval_00" / "level0" / "0008.png"
    renders = tmp_path / "renders" / "eval_00"
    assert plots.image_path(tmp_path, "gt", "eval_00", "level0", "0008.png") == renders / "gt" / "0008.png"
    assert plots.image_path(tmp_path, "compressed", "eval_00", "level1", "0008") == renders / "level1" / "0008.png"


def test_table_ranks_with_paired_bootstrap_ties():
    """With the per-image rows, a rank below another needs a paired interval that excludes zero: a row whose
    per-image differences to the leader straddle zero is tied with it (marked ≈), a clear gap is not."""
    rng = np.random.default_rng(0)
    rows = []
    for scene in ("eval_00", "eval_01", "eval_02"):
        for view in ("0000", "0008", "0016", "0024"):
            base = rng.uniform(0.2, 0.6)
            noise = rng.normal(0, 0.02)
            for method, v in (("compressed", base + 0.2), ("nifi", base), ("nifi_no_tsd", base + noise),
                              ("img2img", base + 0.1)):
                rows.append(_row(method, "level0", scene, view, 1000, stlpips_alex=v, stlpips_vgg=v, psnr=20.0))
    df = pd.DataFrame(rows)
    agg = plots.aggregate(df, METRICS)
    assert (agg["stlpips_alex_lo"] <= agg["stlpips_alex"]).all() and (agg["stlpips_alex"] <= agg["stlpips_alex_hi"]).all()
    t = plots.build_table1(agg, ["stlpips_alex", "stlpips_vgg"], df).set_index("method")
    assert t.loc["nifi", "rank_stlpips_alex"] == t.loc["nifi_no_tsd", "rank_stlpips_alex"] == 1
    assert t.loc["nifi", "tied_stlpips_alex"] and t.loc["nifi_no_tsd", "tied_stlpips_alex"]
    assert t.loc["img2img", "rank_stlpips_alex"] == 2 and not t.loc["img2img", "tied_stlpips_alex"]
    assert t.loc["compressed", "rank_stlpips_alex"] == 3
    md = plots.table1_markdown(t.reset_index(), ["stlpips_alex", "stlpips_vgg"])
    row = next(line for line in md.splitlines() if line.startswith("| + Img2Img |"))
    assert "≈" not in row and "<ins>" in row
    assert "≈" in next(line for line in md.splitlines() if line.startswith("| + NiFi |"))
    # without noise the paired differences are exact: the same ranks as the dense ranking
    known = known_frame()
    a = plots.aggregate(known, METRICS)
    dense = plots.build_table1(a, ["stlpips_alex", "psnr"])
    paired = plots.build_table1(a, ["stlpips_alex", "psnr"], known)
    assert list(dense["rank_stlpips_alex"].fillna(0)) == list(paired["rank_stlpips_alex"].fillna(0))
    assert list(dense["rank_psnr"].fillna(0)) == list(paired["rank_psnr"].fillna(0))
    fig = plots.plot_rd(a, ["stlpips_alex", "psnr"])
    plt.close(fig)
