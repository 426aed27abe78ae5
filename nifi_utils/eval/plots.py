"""Rate-distortion curves, Table 1 and the qualitative grid from `benchmark.csv`.

The benchmark stage writes one row per (method, codec, rate, scene, view). Here those rows are
averaged (per scene first, then over scenes, the 3DGS convention), drawn against the rate in MB
(log axis, compression ratio on top), laid out in the shape of the paper's Table 1 (csv, Markdown,
LaTeX; best / second / third marked where a paired bootstrap separates them, "tied" otherwise; every
mean with its 95 % two-level bootstrap interval, `nifi_utils.measure.stats`) and shown as a grid of images with zoomed crops. The paper's
published Table 1 lives in `data/paper_table1.csv` so its curves can be drawn beside ours.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from nifi_utils.core.facts import (LAST_BASELINE, METHOD_LABELS, METHOD_ORDER, METRIC_LABELS, OUR_CODEC,  # noqa: F401
                                   higher_is_better)
from nifi_utils.core.common import NifiError
from nifi_utils.core.images import read_rgb
from nifi_utils.measure.stats import MAY_BE_UNDEFINED, mean_ci, tiers

METHOD_COLORS = {"3dgs": "black", "compressed": "tab:gray", "bm3d": "tab:blue", "regression": "tab:green",
                 "img2img": "tab:orange",
                 "nifi": "tab:red", "nifi_no_tsd": "tab:purple", "nifi_wo_t0": "tab:pink",
                 "nifi_3d": "tab:brown", "nifi_3d_plus": "darkred",
                 "paper_SwinIR": "tab:green", "paper_DiffBIR": "tab:olive", "paper_Difix3D": "tab:cyan"}
EXTRA_COLORS = ["tab:green", "tab:olive", "tab:cyan", "tab:brown", "gold", "teal"]
KEY_COLUMNS = ["method", "codec", "rate", "scene", "view"]
REQUIRED_COLUMNS = KEY_COLUMNS + ["bytes", "size_mb", "ratio"]
# the paper's method names -> ours, so a published curve takes the colour of our counterpart
PAPER_METHODS = {"3DGS-30K": "3dgs", "HAC++": "compressed", "BM3D": "bm3d", "SwinIR": "regression",
                 "Img2Img (SD3)": "img2img", "NiFi": "nifi",
                 "NiFi w/o t0": "nifi_wo_t0"}
PAPER_COLUMNS = ["dataset", "lambda", "method", "size_mb", "lpips", "dists", "source"]
# which of our metrics the paper's columns are comparable with (same network family)
PAPER_METRIC_OF = {"lpips_alex": "lpips", "dists": "dists"}


def metric_label(metric: str) -> str:
    """Axis/table label of a metric with its direction (↓ lower is better, ↑ higher is better)."""
    return f"{METRIC_LABELS.get(metric, metric)} {'↑' if higher_is_better(metric) else '↓'}"


def method_label(method: str) -> str:
    """Table 1 row name of a benchmark method (`external_swinir` -> '+ swinir')."""
    return METHOD_LABELS.get(method, "+ " + method.removeprefix("external_"))


def method_sort_key(method: str) -> tuple:
    """Paper order: 3DGS, compressed, BM3D, regression, Img2Img, external restorers, NiFi variants."""
    k = METHOD_ORDER.index(LAST_BASELINE) + 1  # external restorers go right after the baselines
    if method in METHOD_ORDER:
        i = METHOD_ORDER.index(method)
        return (i if i < k else i + 1, "")
    return (k, method)


def method_color(method: str) -> str:
    """A fixed colour per method, so every figure of the lab reads the same way."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return EXTRA_COLORS[sum(map(ord, method)) % len(EXTRA_COLORS)]


def natural_key(text: str) -> list:
    """Sort 'level10' after 'level2' and 'lambda0.5' before 'lambda1.0' (numbers always sit at odd positions)."""
    return [float(t) if re.fullmatch(r"\d+(\.\d+)?", t) else t for t in re.split(r"(\d+(?:\.\d+)?)", str(text))]


def evaluation_scenes(scenes) -> list[str]:
    """The scenes results are reported on: `eval_*` where those exist (procedural profiles), else all (real datasets)."""
    scenes = sorted(set(scenes))
    ev = [s for s in scenes if s.startswith("eval_")]
    return ev or scenes


def load_benchmark(path: str | Path, metrics=()) -> pd.DataFrame:
    """Read benchmark.csv (keys as strings: view '0008' stays '0008') and check the columns we need."""
    path = Path(path)
    if not path.is_file():
        raise NifiError(f"{path} not found: the benchmark stage makes it (`python -m nifi_utils.pipeline.run benchmark`)")
    df = pd.read_csv(path, dtype={k: str for k in KEY_COLUMNS})
    missing = [c for c in [*REQUIRED_COLUMNS, *metrics] if c not in df.columns]
    if missing:
        raise NifiError(f"{path} has no column(s) {', '.join(missing)} (columns: {', '.join(df.columns)}); "
                        "rerun the benchmark stage with those metrics or drop them from the profile's plots section (conf/)")
    if df.empty:
        raise NifiError(f"{path} has no rows: the benchmark stage evaluated nothing")
    return df


def aggregate(df: pd.DataFrame, metrics, ci: bool = True) -> pd.DataFrame:
    """Mean per (method, codec, rate): first over each scene's views, then over scenes (NaN-aware); with `ci`,
    `<metric>_lo` / `<metric>_hi`, the 95 % two-level bootstrap interval of each mean."""
    cols = ["bytes", "size_mb", "ratio", *(["size_mib"] if "size_mib" in df else []), *metrics]
    per_scene = df.groupby(["method", "codec", "rate", "scene"], sort=False)[cols].mean()
    per_scene["n_images"] = df.groupby(["method", "codec", "rate", "scene"], sort=False).size()
    agg = per_scene.groupby(level=["method", "codec", "rate"], sort=False)[cols].mean()
    agg["n_scenes"] = per_scene.groupby(level=["method", "codec", "rate"], sort=False).size()
    agg["n_images"] = per_scene.groupby(level=["method", "codec", "rate"], sort=False)["n_images"].sum()
    if ci:  # 95 % interval of each mean: scenes resampled, then views within them (nifi_utils.measure.stats)
        groups = list(df.groupby(["method", "codec", "rate"], sort=False))
        for m in metrics:
            # a metric missing for some images has no interval here (the benchmark refuses such rows)
            bounds = {k: mean_ci(g, m)[1:] if g[m].notna().all() or m in MAY_BE_UNDEFINED else (np.nan, np.nan)
                      for k, g in groups}
            agg[f"{m}_lo"] = [bounds[k][0] for k in agg.index]
            agg[f"{m}_hi"] = [bounds[k][1] for k in agg.index]
    agg = agg.reset_index()
    agg.insert(1, "label", agg["method"].map(method_label))
    keys = [(method_sort_key(m), c != OUR_CODEC, c, natural_key(r)) for m, c, r in zip(agg["method"], agg["codec"], agg["rate"])]
    return agg.iloc[sorted(range(len(agg)), key=keys.__getitem__)].reset_index(drop=True)


def reference_mb(agg: pd.DataFrame) -> float:
    """Size of the uncompressed 3DGS (.ply) in MB: the 3dgs row, else size x ratio of the compressed rows."""
    ref = agg.loc[agg["method"] == "3dgs", "size_mb"]
    if len(ref):
        return float(ref.iloc[0])
    comp = agg[agg["method"] == "compressed"]
    if comp.empty:
        raise NifiError("benchmark.csv has neither a 3dgs nor a compressed row: nothing to compare the rate with")
    return float((comp["size_mb"] * comp["ratio"]).mean())


# ---------------------------------------------------------------- rate-distortion figure


def load_paper_table(path: str | Path) -> pd.DataFrame:
    """The paper's Table 1 as data: one row per (dataset, lambda, method); 3DGS-30K repeated at every lambda."""
    path = Path(path)
    if not path.is_file():
        raise NifiError(f"{path} not found: it is committed with the lab (the paper's Table 1); restore it from git")
    df = pd.read_csv(path, dtype={"dataset": str, "lambda": str, "method": str, "source": str})
    if list(df.columns) != PAPER_COLUMNS:
        raise NifiError(f"{path}: columns {list(df.columns)}, expected {PAPER_COLUMNS}")
    return df


def plot_rd(agg: pd.DataFrame, metrics, paper: pd.DataFrame | None = None, paper_dataset: str = ""):
    """Figure: one subplot per metric, metric against size in MB (log), ratio to 3DGS on the top axis."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ref_mb = reference_mb(agg)
    ncols = min(3, len(metrics))
    nrows = int(np.ceil(len(metrics) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.7 * nrows), squeeze=False)
    handles = {}
    curves = agg[agg["method"] != "3dgs"]
    ref = agg[agg["method"] == "3dgs"]
    codecs = sorted(curves["codec"].unique(), key=lambda c: (c != OUR_CODEC, c))
    styles = {c: (s, m) for c, s, m in zip(codecs, ["-", "--", ":", "-."] * 4, ["o", "s", "^", "D"] * 4)}
    for ax, metric in zip(axes.flat, metrics):
        for (method, codec), g in curves.groupby(["method", "codec"], sort=False):
            g = g.dropna(subset=[metric]).sort_values("size_mb")
            if g.empty:
                continue
            ls, mk = styles[codec]
            name = method_label(method) + ("" if codec == OUR_CODEC else f" [{codec}]")
            # the unrestored curve is drawn wide underneath, so a restorer that changes nothing still shows it
            wide = method == "compressed"
            handles[name] = ax.plot(g["size_mb"], g[metric], ls=ls, marker=mk, ms=6 if wide else 4, lw=3 if wide else 1.5,
                                    alpha=0.6 if wide else 1, zorder=1 if wide else 2, color=method_color(method), label=name)[0]
            if f"{metric}_lo" in g and g[f"{metric}_lo"].notna().any():  # 95 % bootstrap interval of each mean
                yerr = np.stack([g[metric] - g[f"{metric}_lo"], g[f"{metric}_hi"] - g[metric]]).clip(min=0)
                ax.errorbar(g["size_mb"], g[metric], yerr=yerr, fmt="none", ecolor=method_color(method), elinewidth=1,
                            capsize=2, alpha=0.7, zorder=1 if wide else 2)
        if paper is not None and metric in PAPER_METRIC_OF:
            _draw_paper(ax, paper, paper_dataset, PAPER_METRIC_OF[metric], handles)
        if not curves[metric].notna().any():
            ax.text(0.5, 0.5, f"{metric}: not computed", transform=ax.transAxes, ha="center", fontsize=9, color="gray")
        if len(ref) and np.isfinite(ref[metric].iloc[0]):
            y = float(ref[metric].iloc[0])
            ax.axhline(y, color="black", ls="--", lw=1)
            lo, hi = ax.get_ylim()
            # the label goes on the side of the line with room; at the left, the low-rate end, curves are far from it
            ax.annotate(f"3DGS, uncompressed ({fmt_mb(ref_mb)} MB)", (0.02, y), xycoords=("axes fraction", "data"),
                        ha="left", va="bottom" if (y - lo) / (hi - lo) < 0.85 else "top", fontsize=7)
        _size_ticks(ax, ref_mb, [round(float(x), 12) for x in curves['size_mb']])
        ax.set_xlabel("size (MB, log)", fontsize=8)
        ax.set_title(metric_label(metric), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    handles["3DGS, uncompressed"] = Line2D([], [], color="black", ls="--", lw=1)
    if len(metrics) < axes.size:  # an empty panel holds the legend
        axes.flat[len(metrics)].legend(handles.values(), handles.keys(), loc="center", fontsize=8, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(handles) - 1) // 4), 1, 1))
    return fig


def plot_perception_distortion(agg: pd.DataFrame, judge: str, distortions=("psnr", "ssim"), codec: str = OUR_CODEC,
                               held_out: bool = True):
    """Figure: the perception-distortion plane (Blau and Michaeli, CVPR 2018), one column per rate of `codec`, one
    row per distortion metric: every method at (distortion, held-out perceptual `judge`) with 95 % intervals on both
    axes. Better is towards the lower right (higher PSNR/SSIM, lower perceptual distance); a method beats another
    only where it is better on both axes, otherwise they trade one for the other."""
    import matplotlib.pyplot as plt

    sub = agg[(agg["codec"] == codec) & (agg["method"] != "3dgs")]
    rates = sorted(sub["rate"].unique(), key=natural_key)
    if not rates or judge not in sub:
        raise NifiError(f"no {codec} rows with {judge!r} in the benchmark: nothing to draw on the perception-distortion plane")
    fig, axes = plt.subplots(len(distortions), len(rates), figsize=(3.8 * len(rates), 3.3 * len(distortions)), squeeze=False)
    handles = {}
    for j, rate in enumerate(rates):
        g = sub[sub["rate"] == rate]
        for i, dist in enumerate(distortions):
            ax = axes[i, j]
            for _, row in g.iterrows():
                x, y = row.get(dist), row.get(judge)
                if not (np.isfinite(x) and np.isfinite(y)):
                    continue
                xe = [[max(x - row.get(f"{dist}_lo", x), 0)], [max(row.get(f"{dist}_hi", x) - x, 0)]]
                ye = [[max(y - row.get(f"{judge}_lo", y), 0)], [max(row.get(f"{judge}_hi", y) - y, 0)]]
                xe, ye = np.nan_to_num(xe), np.nan_to_num(ye)
                h = ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt="o", ms=5, color=method_color(row["method"]), capsize=2,
                                elinewidth=1, label=method_label(row["method"]))
                handles[method_label(row["method"])] = h
            ax.set_xlabel(metric_label(dist), fontsize=8)
            ax.set_ylabel(f"{metric_label(judge)}{', held out' if held_out else ', trained on'} ↓", fontsize=8)
            mb = g["size_mb"].mean()
            ax.set_title(f"{rate} ({fmt_mb(mb)} MB)", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, lw=0.5)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle("Perception-distortion plane: better is lower right; error bars 95 % two-level bootstrap", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(handles) - 1) // 5), 1, 0.97))
    return fig


def _thin(xs: list[float], min_frac: float = 0.08) -> list[float]:
    """Drop log-axis ticks closer than `min_frac` of the axis span to the previous one (their labels would overlap)."""
    xs = sorted(set(xs))
    if len(xs) < 2:
        return xs
    span = np.log(xs[-1] / xs[0])
    out = [xs[0]]
    for x in xs[1:]:
        if np.log(x / out[-1]) > min_frac * span:
            out.append(x)
    return out


def _size_ticks(ax, ref_mb: float, ours: list[float]) -> None:
    """Log size axis ticked at the drawn rates (bottom: MB, top: our ratio to the .ply), not at powers of ten."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    # data lines only: axhline's x data are axes fractions
    data = [ln for ln in ax.get_lines() if ln.get_transform() is ax.transData]
    xs = [round(float(x), 12) for ln in data for x in np.atleast_1d(ln.get_xdata()) if float(x) > 0]
    ticks = _thin(xs)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_mb(v)))
    # ratio = mean .ply size / size: the same axis read as "how many times smaller than 3DGS" (the table's ratio is
    # the mean of per-scene ratios: equal when scenes have one size); our rates only, as a published point's ratio
    # is relative to the paper's 3DGS
    top = ax.secondary_xaxis("top", functions=(lambda v: ref_mb / np.maximum(v, 1e-12), lambda r: ref_mb / np.maximum(r, 1e-12)))
    top.xaxis.set_major_locator(FixedLocator([ref_mb / t for t in ticks if any(np.isclose(t, o, rtol=1e-9) for o in ours)]))
    top.xaxis.set_minor_locator(NullLocator())
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}×" if v >= 10 else f"{v:.2g}×"))
    top.set_xlabel("compression ratio vs. 3DGS (ours)", fontsize=7)
    top.tick_params(labelsize=7)


def _draw_paper(ax, paper: pd.DataFrame, dataset: str, column: str, handles: dict) -> None:
    """Published curves of one dataset (hollow markers, dotted), HAC++ sizes on the x axis."""
    from matplotlib.lines import Line2D

    sub = paper[paper["dataset"] == dataset]
    if sub.empty:
        known = ", ".join(sorted(paper["dataset"].unique()))
        raise NifiError(f"paper_dataset {dataset!r} is not in the paper table (datasets: {known})")
    for method, g in sub.groupby("method", sort=False):
        color = method_color(PAPER_METHODS.get(method, f"paper_{method}"))
        name = f"{method} (published, {dataset})"
        if method == "3DGS-30K":
            ax.axhline(g[column].iloc[0], color=color, ls=":", lw=1)
            handles[name] = Line2D([], [], color=color, ls=":")
            continue
        g = g.sort_values("size_mb")
        handles[name] = ax.plot(g["size_mb"], g[column], ls=":", marker="o", mfc="none", ms=4, color=color, alpha=0.8)[0]


def rd_table(agg: pd.DataFrame, metrics) -> pd.DataFrame:
    """The curves' data (one row per method x codec x rate): what rd_curves.csv and DVC plots read."""
    cols = ["method", "label", "codec", "rate", "size_mb", *(["size_mib"] if "size_mib" in agg else []), "bytes", "ratio",
            "n_scenes", "n_images", *dict.fromkeys(metrics), *[f"{m}_{b}" for m in dict.fromkeys(metrics) for b in ("lo", "hi")]]
    return agg[[c for c in cols if c in agg]].copy()


# ---------------------------------------------------------------- Table 1


def rank_rows(values: pd.Series, metric: str, decimals: int) -> pd.Series:
    """Dense rank (1 = best) of the printed values, so rows that print the same share a mark; NaN stays NaN."""
    shown = values.round(decimals)
    return shown.rank(method="dense", ascending=not higher_is_better(metric))


def decimals_of(metric: str) -> int:
    """Printed decimals: 2 for PSNR (dB), 3 otherwise (the paper's precision)."""
    return 2 if metric == "psnr" else 3


def build_table1(agg: pd.DataFrame, table_metrics, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1's cells as data: one row per (method, codec, rate) with the two metrics and their ranks.

    Ranks are per column (codec, rate) and metric among every row except 3DGS (the uncompressed
    reference is not a competitor); the compressed row competes, so a restorer that hurts shows.
    With the per-image rows `df`, ranks are tiers (`nifi_utils.measure.stats.tiers`): a row is ranked below
    another only where the paired 95 % bootstrap interval of their per-image difference excludes
    zero; rows that cannot be told apart share a rank and `tied_<metric>` is True. Without `df`,
    ranks are dense ranks of the printed values."""
    if len(table_metrics) != 2:
        raise NifiError(f"table_metrics must name two metrics (Table 1's 'a / b' cells), got {list(table_metrics)}")
    cols = ["method", "label", "codec", "rate", "size_mb", "ratio", "n_scenes", "n_images", *table_metrics]
    t = agg[cols + [c for m in table_metrics for c in (f"{m}_lo", f"{m}_hi") if c in agg]].copy()
    for m in table_metrics:
        t[f"rank_{m}"] = np.nan
        t[f"tied_{m}"] = False
        ranked = t["method"] != "3dgs"
        if df is None:
            t.loc[ranked, f"rank_{m}"] = t[ranked].groupby(["codec", "rate"])[m].transform(
                lambda s, m=m: rank_rows(s, m, decimals_of(m)))
            continue
        for (codec, rate), g in t[ranked].groupby(["codec", "rate"], sort=False):
            rows = {meth: df[(df["method"] == meth) & (df["codec"] == codec) & (df["rate"] == rate)] for meth in g["method"]}
            tier = tiers(rows, m, lower_is_better=not higher_is_better(m))
            for i in g.index:
                if t.at[i, "method"] in tier:
                    t.at[i, f"rank_{m}"], t.at[i, f"tied_{m}"] = tier[t.at[i, "method"]]
    return t


def _columns(table: pd.DataFrame) -> list[tuple[str, str, float]]:
    """Table 1's columns: (codec, rate, size MB of the compressed row), our codec first, rates in natural order."""
    comp = table[table["method"] != "3dgs"]
    cols = comp.groupby(["codec", "rate"], sort=False)["size_mb"].mean()
    sized = table[table["method"] == "compressed"].set_index(["codec", "rate"])["size_mb"]
    keys = sorted(cols.index, key=lambda k: (k[0] != OUR_CODEC, k[0], natural_key(k[1])))
    return [(c, r, float(sized.get((c, r), cols[(c, r)]))) for c, r in keys]


def fmt_mb(x: float) -> str:
    """Sizes the way the paper prints them: 576, 1.152, 0.110; very small sizes with 3 significant digits."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3f}" if x >= 0.1 else f"{x:.3g}"


MARKS = {"md": ("**{}**", "<ins>{}</ins>", "*{}*"), "tex": ("\\textbf{{{}}}", "\\underline{{{}}}", "\\textit{{{}}}"),
         "plain": ("{}", "{}", "{}")}


def _cell(row, metrics, style) -> str:
    """One Table 1 cell, "a / b", each value marked by its rank in `style` (md, tex or plain); NaN prints '–'."""
    parts = []
    for m in metrics:
        v, r = row[m], row[f"rank_{m}"]
        if not np.isfinite(v):
            parts.append("–")
            continue
        s = f"{v:.{decimals_of(m)}f}"
        s = MARKS[style][int(r) - 1].format(s) if np.isfinite(r) and r <= 3 else s
        parts.append(s + ("≈" if row.get(f"tied_{m}", False) and np.isfinite(r) and r <= 3 else ""))
    return " / ".join(parts)


def table1_grid(table: pd.DataFrame, table_metrics, style: str = "md") -> tuple[list[str], list[list[str]]]:
    """Table 1 in the paper's shape: header and rows of strings (size rows, then 'a / b' cells)."""
    cols = _columns(table)
    multi_codec = len({c for c, _, _ in cols}) > 1
    header = ["method"] + [f"{c + ' ' if multi_codec else ''}{r} ({fmt_mb(mb)} MB)" for c, r, mb in cols]
    idx = table.set_index(["method", "codec", "rate"])
    rows = []
    ref = table[table["method"] == "3dgs"]
    if len(ref):
        r0 = ref.iloc[0]
        rows.append(["3DGS size (MB)", fmt_mb(r0["size_mb"])] + [""] * (len(cols) - 1))
        rows.append([method_label("3dgs"), _cell(r0, table_metrics, style)] + [""] * (len(cols) - 1))
    sizes = []
    for c, r, mb in cols:
        ratio = idx["ratio"].get(("compressed", c, r), np.nan)
        sizes.append(f"{fmt_mb(mb)} ({ratio:.0f}×)" if np.isfinite(ratio) else fmt_mb(mb))
    rows.append(["compressed size (MB, ratio)"] + sizes)
    for method in sorted(table.loc[table["method"] != "3dgs", "method"].unique(), key=method_sort_key):
        cells = []
        for c, r, _ in cols:
            cells.append(_cell(idx.loc[(method, c, r)], table_metrics, style) if (method, c, r) in idx.index else "–")
        rows.append([method_label(method)] + cells)
    return header, rows


def table1_markdown(table: pd.DataFrame, table_metrics, note: str = "") -> str:
    """Table 1 as Markdown, with a legend of the marks and a note on what the cells are."""
    header, rows = table1_grid(table, table_metrics, "md")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + table1_note(table_metrics) + (f"\n{note}\n" if note else "")


def table1_note(table_metrics) -> str:
    """What the cells are, how they are ranked and, for ST-LPIPS, why it stands in for LPIPS."""
    a, b = table_metrics
    text = (f"Cells: {metric_label(a)} / {metric_label(b)}, means over the test views of each evaluation scene, then over "
            "scenes. Best / second / third per column and metric among all rows but 3DGS: **bold** / <ins>underline</ins> / "
            "*italic*; a row ranks below another only where the 95 % paired bootstrap interval of their per-image "
            "difference (scenes, then views resampled) excludes zero: rows marked ≈ are tied with the others of their "
            "mark. The compressed row is the codec's output without restoration: our codec `nifi3dgs` (HAC++ in the "
            "paper), external codecs in their own columns.")
    if any(m.startswith("stlpips") for m in table_metrics):
        text += ("\n\nST-LPIPS is *shift-tolerant* LPIPS (Ghildyal & Liu, ECCV 2022), **not LPIPS**: its values are not "
                 "comparable with the paper's LPIPS / DISTS columns. It is used offline because it ships its complete "
                 "network weights, while LPIPS and DISTS need ImageNet-pretrained torchvision backbones that are not "
                 "available without a download (the `paper` profile uses lpips_alex / dists where they exist).")
    return text


def table1_latex(table: pd.DataFrame, table_metrics) -> str:
    """Table 1 as a LaTeX tabular (booktabs), best / second / third as textbf / underline / textit."""
    header, rows = table1_grid(table, table_metrics, "tex")
    tex = {"&": "\\&", "%": "\\%", "_": "\\_", "×": "$\\times$", "–": "--", "≈": "$^{\\approx}$"}
    esc = lambda s: "".join(tex.get(ch, ch) for ch in s)  # noqa: E731
    n = len(header) - 1
    comment = re.sub(r"\*\*|<ins>|</ins>|\*", "", table1_note(table_metrics)).replace("\n\n", " ")
    out = ["% " + comment, "\\begin{tabular}{l" + "c" * n + "}", "\\toprule",
           " & ".join(esc(h) for h in header) + " \\\\", "\\midrule"]
    for r in rows:
        if r[0] in ("3DGS size (MB)", method_label("3dgs")) and n > 1:
            out.append(f"{esc(r[0])} & \\multicolumn{{{n}}}{{c}}{{{esc(r[1])}}} \\\\")
        else:
            out.append(" & ".join(esc(c) for c in r) + " \\\\")  # marks hold none of the escaped characters
        if r[0] == "compressed size (MB, ratio)":
            out.append("\\midrule")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def write_table1(table: pd.DataFrame, table_metrics, out_stem: str | Path, note: str = "") -> list[Path]:
    """Write table1.csv (the cells as data, with ranks), table1.md and table1.tex; return the paths."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(s) for s in (".csv", ".md", ".tex")]
    t = table.copy()
    t["cell"] = [_cell(r, table_metrics, "plain") for _, r in t.iterrows()]
    t.to_csv(paths[0], index=False)
    paths[1].write_text("# Table 1 (this lab)\n\n" + table1_markdown(table, table_metrics, note))
    paths[2].write_text(table1_latex(table, table_metrics))
    return paths


# ---------------------------------------------------------------- qualitative grid


def find_crop(gt: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (y, x) of the size x size window with the most gradient energy in the GT (a detail-rich spot)."""
    g = np.asarray(gt, dtype=np.float64)
    g = g.mean(axis=-1) if g.ndim == 3 else g
    h, w = g.shape
    size = min(size, h, w)
    energy = np.zeros_like(g)
    energy[:, 1:] += np.diff(g, axis=1) ** 2
    energy[1:, :] += np.diff(g, axis=0) ** 2
    # summed-area table: every window's sum in O(1), so the search is exhaustive and deterministic
    s = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]
    y, x = np.unravel_index(int(np.argmax(win)), win.shape)
    # many windows tie when the detail is smaller than the crop (argmax takes the first): centre on the energy instead
    e = energy[y:y + size, x:x + size]
    if e.sum() > 0:
        cy = float((e.sum(1) * np.arange(size)).sum() / e.sum())
        cx = float((e.sum(0) * np.arange(size)).sum() / e.sum())
        y = int(np.clip(round(y + cy - (size - 1) / 2), 0, h - size))
        x = int(np.clip(round(x + cx - (size - 1) / 2), 0, w - size))
    return int(y), int(x)


def image_path(data_root: str | Path, method: str, scene: str, rate: str, view: str) -> Path:
    """Where the benchmark (restorers) or synthesis (gt, compressed, uncompressed) stage wrote an image."""
    root = Path(data_root)
    name = view if view.endswith(".png") else f"{view}.png"  # benchmark.csv names views by their file ('0008.png')
    if method == "gt":
        return root / "renders" / scene / "gt" / name
    if method == "compressed":
        return root / "renders" / scene / rate / name
    if method == "3dgs":
        return root / "renders" / scene / "uncompressed" / name
    return root / "benchmark" / method / scene / rate / name


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 image (`core.images.read_rgb`); a missing file names the stage that writes it."""
    if not path.is_file():
        stage = "synthesis" if "renders" in path.parts else "benchmark"
        raise NifiError(f"{path} not found: the {stage} stage writes it")
    return read_rgb(path)


def grid_selection(df: pd.DataFrame, grid_views: int, codec: str = OUR_CODEC) -> tuple[list, list, list]:
    """(scene, view) pairs (first `grid_views` test views of each evaluation scene), rates and methods of the grid."""
    sub = df[(df["codec"] == codec) & (df["method"] != "3dgs")]
    scenes = evaluation_scenes(sub["scene"])
    pairs = [(s, v) for s in scenes for v in sorted(sub.loc[sub["scene"] == s, "view"].unique())[:grid_views]]
    rates = sorted(sub["rate"].unique(), key=natural_key)
    methods = sorted(sub["method"].unique(), key=method_sort_key)
    return pairs, rates, methods


def _show_with_crop(top, bot, im: np.ndarray, y: int, x: int, c: int) -> None:
    """`im` on the axes `top` with the c x c crop at (y, x) boxed in yellow; the crop on `bot`, magnified with
    nearest-neighbour interpolation (no smoothing hides an artifact)."""
    from matplotlib.patches import Rectangle

    top.imshow(im)
    top.add_patch(Rectangle((x - 0.5, y - 0.5), c, c, fill=False, ec="yellow", lw=1))
    bot.imshow(im[y:y + c, x:x + c], interpolation="nearest")


def image_row(panels: list[tuple[str, np.ndarray]], title: str = "", size: float = 2.6):
    """Figure: a row of (caption, image) panels."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size + 0.5), squeeze=False)
    for ax, (caption, im) in zip(axes[0], panels):
        ax.imshow(im)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def crop_row(panels: list[tuple[str, np.ndarray]], crop: int, title: str = ""):
    """Figure: a row of (caption, image) panels, the first the ground truth, and below each its crop where the
    ground truth has the most gradient energy (`find_crop`, the qualitative grid's crop), magnified."""
    import matplotlib.pyplot as plt

    y, x = find_crop(panels[0][1], crop)
    c = min(crop, *panels[0][1].shape[:2])
    fig, axes = plt.subplots(2, len(panels), figsize=(2.1 * len(panels), 4.4), squeeze=False)
    for j, (caption, im) in enumerate(panels):
        _show_with_crop(axes[0, j], axes[1, j], im, y, x, c)
        axes[0, j].set_title(caption, fontsize=8)
        for a in axes[:, j]:
            a.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_grid(df: pd.DataFrame, data_root: str | Path, grid_views: int, crop: int, metric: str, codec: str = OUR_CODEC):
    """Figure: per (scene, view, rate) a row of images (GT, compressed, restorers) and a row of their zoomed crops."""
    import matplotlib.pyplot as plt

    pairs, rates, methods = grid_selection(df, grid_views, codec)
    if not pairs:
        raise NifiError(f"benchmark.csv has no rows of codec {codec!r}: nothing to show in the qualitative grid")
    cols = ["gt"] + methods
    values = df[df["codec"] == codec].set_index(["method", "scene", "rate", "view"])[metric]
    blocks = [(s, v, r) for s, v in pairs for r in rates]
    size_mb = df[(df["codec"] == codec) & (df["method"] == "compressed")].groupby(["scene", "rate"])["size_mb"].mean()
    fig, axes = plt.subplots(2 * len(blocks), len(cols), figsize=(1.55 * len(cols), 1.75 * 2 * len(blocks)), squeeze=False)
    name = METRIC_LABELS.get(metric, metric)
    for b, (scene, view, rate) in enumerate(blocks):
        gt = read_image(image_path(data_root, "gt", scene, rate, view))
        y, x = find_crop(gt, crop)
        c = min(crop, *gt.shape[:2])
        for j, method in enumerate(cols):
            im = gt if method == "gt" else read_image(image_path(data_root, method, scene, rate, view))
            top, bot = axes[2 * b, j], axes[2 * b + 1, j]
            _show_with_crop(top, bot, im, y, x, c)
            top.set_title("ground truth" if method == "gt" else method_label(method).removeprefix("+ "), fontsize=7)
            v = values.get((method, scene, rate, view), np.nan)
            bot.set_title("crop" if method == "gt" else f"{name} {v:.3f}" if np.isfinite(v) else f"{name} –", fontsize=6)
            for a in (top, bot):
                a.set_xticks([]), a.set_yticks([])
        mb = size_mb.get((scene, rate), np.nan)
        axes[2 * b, 0].set_ylabel(f"{scene}\nview {view.removesuffix('.png')}\n{rate} ({fmt_mb(mb)} MB)", fontsize=7)
    height = fig.get_figheight()
    fig.suptitle(f"Qualitative comparison ({codec}); crops: {crop}px where the GT has most gradient energy, "
                 f"{name} of the whole image", fontsize=8, y=1 - 0.12 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # the title keeps a fixed 0.35 in, whatever the grid's height
    return fig
