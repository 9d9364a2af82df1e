"""Label-fidelity report: each label rule's partner share against the foreground-mass oracle.

- :func:`plot_fidelity` - bar chart of the mean absolute error per rule (with the area share's
  error on the same mixes marked) and small multiples of predicted vs oracle partner share;
- :func:`fidelity_markdown` - the table as markdown;
- :func:`find_fidelity_run` - the run whose checkpoint is measured;
- :func:`write_label_fidelity` - ``figures/label_fidelity.{csv,md,png,svg}`` (called by the report).

The measurement itself (oracle, rules, adaptations): :mod:`tokenmix.analysis.fidelity`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tokenmix.analysis.fidelity import RULES, TABLE_COLUMNS, measure_run, summarize
from tokenmix.report.figures import _finish, save_figure, write_if_changed
from tokenmix.report.tables import markdown_table
from tokenmix.train.runs import Run, list_runs

#: colours of the rules (CutMix green and TokenMix red as in the other report figures)
RULE_COLOURS: dict[str, str] = {
    "CutMix (area)": "tab:green", "TransMix (official)": "tab:blue", "TransMix (paper)": "tab:cyan",
    "TL-Align": "tab:purple", "TokenMix (teacher)": "tab:red", "SMMix (area)": "tab:orange",
    "TokenMixup (HTM saliency)": "tab:brown",
}
#: files written by :func:`write_label_fidelity`
FIDELITY_OUTPUTS: tuple[str, ...] = ("label_fidelity.csv", "label_fidelity.md", "label_fidelity.png",
                                     "label_fidelity.svg")
FIDELITY_STEM = "label_fidelity"


def _colour(rule: str, i: int) -> str:
    return RULE_COLOURS.get(rule, f"C{i % 10}")


def plot_fidelity(data: pd.DataFrame, table: pd.DataFrame | None = None, title: str | None = None,
                  save: str | Path | None = None) -> Figure:
    """The label-fidelity figure.

    Args:
        data: the per-sample shares (:func:`tokenmix.analysis.fidelity.fidelity_samples`: columns rule,
            predicted, oracle, area), or just the summary table
            (:func:`tokenmix.analysis.fidelity.summarize`; then only the bar chart is drawn).
        table: the summary (default: computed from ``data``; rules without samples are shown as
            skipped).
        title, save: figure title; path stem for PNG + SVG.
    Returns:
        The Figure: the bar chart, plus one scatter per rule when ``data`` holds samples.
    """
    has_samples = {"predicted", "oracle"} <= set(data.columns)
    if table is None:
        table = summarize(data) if has_samples else data
    if not len(table):
        raise ValueError("nothing to plot: an empty fidelity table")
    rules = list(table["rule"])
    n_sc = len(rules) if has_samples else 0
    ncols = min(4, max(n_sc, 1))
    nrows = math.ceil(n_sc / ncols) if n_sc else 1
    fig = plt.figure(figsize=(4.6 + (2.45 * ncols if n_sc else 0), max(3.6, 2.5 * nrows + 0.6)))
    gs = fig.add_gridspec(nrows, 1 + (ncols if n_sc else 0), width_ratios=[1.9] + [1] * (ncols if n_sc else 0),
                          wspace=0.35, hspace=0.55)
    ax = fig.add_subplot(gs[:, 0])
    y = np.arange(len(rules))
    mae = table["MAE"].to_numpy(dtype=float)
    area = table["area MAE"].to_numpy(dtype=float) if "area MAE" in table else np.full(len(rules), np.nan)
    ax.barh(y, np.nan_to_num(mae), color=[_colour(r, i) for i, r in enumerate(rules)], alpha=0.85)
    ok = ~np.isnan(area)
    ax.scatter(area[ok], y[ok], marker="|", s=260, color="black", lw=2, zorder=3,
               label="area share on the same mixes")
    for i, v in enumerate(mae):
        right = np.nanmax([v, area[i], 0.0]) if not (np.isnan(v) and np.isnan(area[i])) else 0.0
        ax.text(0.002 if np.isnan(v) else right + 0.004, i, "skipped" if np.isnan(v) else f"{v:.3f}", va="center",
                ha="left", fontsize=7, color="0.4" if np.isnan(v) else "black")
    ax.set_yticks(y, [f"{r}\n(n = {int(n)})" for r, n in zip(rules, table["n"])], fontsize=7)
    ax.invert_yaxis()
    finite = np.concatenate([mae[~np.isnan(mae)], area[ok]])
    ax.set_xlim(0, (float(finite.max()) if finite.size else 0.1) * 1.45 + 1e-3)
    ax.set_xlabel("mean absolute error vs oracle partner share", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    if ok.any():
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), frameon=False)
    ax.set_title("error of each label rule", fontsize=9)
    for i, rule in enumerate(rules if has_samples else []):
        sax = fig.add_subplot(gs[i // ncols, 1 + i % ncols])
        d = data[data["rule"] == rule]
        sax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        if len(d):
            sax.scatter(d["oracle"], d["predicted"], s=5, alpha=0.45, color=_colour(rule, i), lw=0)
            row = table[table["rule"] == rule].iloc[0]
            r = row["pearson"]
            sax.text(0.03, 0.97, f"MAE {row['MAE']:.3f}\nr = " + ("—" if pd.isna(r) else f"{r:.2f}"),
                     transform=sax.transAxes, va="top", ha="left", fontsize=6.5)
        else:
            sax.text(0.5, 0.5, "skipped", transform=sax.transAxes, ha="center", va="center", fontsize=8, color="0.4")
        sax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        sax.set_title(rule, fontsize=7.5)
        sax.tick_params(labelsize=6)
        if i % ncols == 0:
            sax.set_ylabel("predicted partner share", fontsize=7)
        if i // ncols == nrows - 1 or i + ncols >= n_sc:
            sax.set_xlabel("oracle partner share", fontsize=7)
    fig.suptitle(title or "label fidelity: partner share of each label rule vs the visible foreground mass",
                 fontsize=10)
    return _finish(fig, save)


def fidelity_markdown(table: pd.DataFrame, heading: str | None = None) -> str:
    """The table as GitHub markdown (3 decimals, NaN as —), under an optional heading paragraph."""
    text = markdown_table(table, floatfmt=".3f", right=[c for c in ("n", "MAE", "RMSE", "pearson", "mean predicted",
                                                                     "mean oracle", "area MAE") if c in table])
    return (heading.rstrip() + "\n\n" + text) if heading else text


def find_fidelity_run(runs_dir: str | Path, dataset: str = "fashion_mnist", model: str = "vit_cpu",
                      prefer: Sequence[str] = ("cutmix",)) -> Run | None:
    """The complete run (with a checkpoint) of ``model`` on ``dataset`` to measure: the first by
    run id of the first method in ``prefer`` that has one, else the first such run of any method;
    None if there is none."""
    runs = [r for r in list_runs(runs_dir) if r.has_checkpoint and r.config.get("dataset") == dataset
            and r.config.get("model") == model]
    for method in prefer:
        sel = [r for r in runs if r.config.get("method") == method]
        if sel:
            return sel[0]
    return runs[0] if runs else None


def write_label_fidelity(runs_dir: str | Path, figures_dir: str | Path, data_dir: str | Path = "data",
                         n_batches: int = 16, batch_size: int = 32, seed: int = 0, dataset: str = "fashion_mnist",
                         model: str = "vit_cpu") -> list[Path]:
    """``label_fidelity.{csv,md,png,svg}`` in ``figures_dir`` for the checkpoint of
    :func:`find_fidelity_run` (CutMix preferred) on a fixed subset of ``n_batches * batch_size``
    test images (:func:`tokenmix.analysis.fidelity.measure_run`). Without a teacher cache (test split)
    under ``data_dir`` the TokenMix row is marked skipped. Same inputs -> same bytes.

    Returns:
        The paths written, or [] (writing nothing) when there is no suitable run.
    """
    run = find_fidelity_run(runs_dir, dataset, model)
    if run is None:
        return []
    table, samples = measure_run(run.path, data_dir, n_batches, batch_size, seed)
    out = Path(figures_dir)
    n_img = n_batches * batch_size
    desc = (f"checkpoint `{run.run_id}` ({run.config.get('method')}, {model}), {n_img} {dataset} test images in "
            f"{n_batches} batches of {batch_size}, seed {seed}")
    fig = plot_fidelity(samples, table, title=f"label fidelity of {run.run_id}: partner share of each rule vs the "
                                              f"visible foreground mass ({n_img} test images)")
    try:
        paths = save_figure(fig, out / FIDELITY_STEM)
    finally:
        plt.close(fig)
    csv = table.to_csv(index=False, float_format="%.4f", lineterminator="\n")
    write_if_changed(out / "label_fidelity.csv", csv.encode())
    md = fidelity_markdown(table, f"Label fidelity: {desc}. Errors are in partner-share units against the "
                                  "foreground-mass oracle (see `tokenmix/analysis/fidelity.py`); `area MAE` is the area "
                                  "share's error on the same mixes.")
    write_if_changed(out / "label_fidelity.md", md.encode())
    return [out / "label_fidelity.csv", out / "label_fidelity.md"] + paths


__all__ = ["FIDELITY_OUTPUTS", "RULE_COLOURS", "TABLE_COLUMNS", "RULES", "fidelity_markdown", "find_fidelity_run",
           "plot_fidelity", "write_label_fidelity"]
