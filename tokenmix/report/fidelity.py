"""Label-fidelity report: every label rule on the same mixes, against two oracles, over training.

- :func:`find_fidelity_run` - the run whose checkpoints are measured (CutMix with kept epoch
  checkpoints preferred);
- :func:`fidelity_records` - the measurements (:func:`tokenmix.analysis.fidelity.measure_checkpoints`),
  cached as analysis records under ``<runs_dir>/analysis/label_fidelity.csv`` so that a clone
  without checkpoints redraws the figures;
- :func:`plot_fidelity` - per mask, each rule's error and correlation against both oracles;
- :func:`plot_fidelity_training` - the same numbers against the epoch of the checkpoint;
- :func:`fidelity_markdown` - the final checkpoint's table as markdown;
- :func:`write_label_fidelity` - ``figures/label_fidelity.{csv,md,png,svg}`` and
  ``label_fidelity_training.{png,svg}`` (called by the report).

The measurement itself (oracles, masks, rules): :mod:`tokenmix.analysis.fidelity`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tokenmix.analysis.fidelity import MASKS, ORACLES, RULES, TARGETS, measure_checkpoints
from tokenmix.analysis.records import cached_measurement
from tokenmix.report.figures import _finish, save_figure, write_if_changed
from tokenmix.report.tables import markdown_table
from tokenmix.train.runs import CHECKPOINT, Run, epoch_checkpoint_name, list_runs

#: colours of the rules (CutMix green and TokenMix red as in the other report figures)
RULE_COLOURS: dict[str, str] = {
    "area": "tab:green", "TransMix (official)": "tab:blue", "TransMix (paper)": "tab:cyan",
    "TL-Align": "tab:purple", "MixPro (PAL)": "tab:pink", "TokenMix (teacher)": "tab:red",
    "TokenMixup (saliency)": "tab:brown",
}
#: files written by :func:`write_label_fidelity`
FIDELITY_OUTPUTS: tuple[str, ...] = ("label_fidelity.csv", "label_fidelity.md", "label_fidelity.png",
                                     "label_fidelity.svg", "label_fidelity_training.png", "label_fidelity_training.svg")
#: the measurement's parameters (the record is recomputed when they change)
FIDELITY_PARAMS: dict[str, int] = {"n_batches": 16, "batch_size": 32, "seed": 0}


def _colour(rule: str, i: int) -> str:
    return RULE_COLOURS.get(rule, f"C{i % 10}")


def find_fidelity_run(runs_dir: str | Path, dataset: str = "fashion_mnist", model: str = "vit_cpu",
                      prefer: Sequence[str] = ("cutmix",)) -> Run | None:
    """The complete run of ``model`` on ``dataset`` to measure: among the runs of the first method
    in ``prefer`` that has one (else of any method), those that kept epoch checkpoints
    (``checkpoint_every``) first, then by run id; None if there is none. Its checkpoints need not
    be on disk (the stored record is used then)."""
    runs = [r for r in list_runs(runs_dir) if r.complete and r.config.get("dataset") == dataset
            and r.config.get("model") == model]
    for method in list(prefer) + [None]:
        sel = [r for r in runs if method is None or r.config.get("method") == method]
        if sel:
            return sorted(sel, key=lambda r: (not r.config.get("checkpoint_every"), r.run_id))[0]
    return None


def checkpoint_files(run: Run) -> list[Path]:
    """The checkpoint files a run's record says it wrote (kept epochs, then the final one)."""
    every, epochs = int(run.config.get("checkpoint_every") or 0), int(run.config.get("epochs", 0))
    kept = [run.path / epoch_checkpoint_name(e) for e in range(every, epochs + 1, every)] if every else []
    return kept + [run.path / CHECKPOINT]


def fidelity_records(runs_dir: str | Path, data_dir: str | Path = "data", dataset: str = "fashion_mnist",
                     model: str = "vit_cpu", **params: int) -> tuple[Run, pd.DataFrame] | None:
    """(run, table over its checkpoints) for :func:`find_fidelity_run`, measured when its
    checkpoints are present and the record is missing or stale, else read from the record;
    None when there is no run or neither checkpoints nor a record."""
    run = find_fidelity_run(runs_dir, dataset, model)
    if run is None:
        return None
    params = {**FIDELITY_PARAMS, **params}
    # the masks and rules measured are part of the fingerprint: a new mask or rule re-measures
    key = {**params, "run": run.run_id, "masks": list(MASKS), "rules": list(RULES)}
    df = cached_measurement(runs_dir, "label_fidelity", checkpoint_files(run), key,
                            lambda: measure_checkpoints(run.path, data_dir, **params))
    return None if df is None else (run, df)


def _final(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["epoch"] == df["epoch"].max()].drop(columns=["epoch", "top1"]).reset_index(drop=True)


def plot_fidelity(table: pd.DataFrame, title: str | None = None, save: str | Path | None = None) -> Figure:
    """One row per mask: each rule's mean absolute error (left) and Pearson correlation (right)
    against both oracles (solid bars: own-share oracle, hatched: mass oracle).

    Args:
        table: :func:`tokenmix.analysis.fidelity.summarize` (one checkpoint; with an ``epoch``
            column, the last epoch is drawn).
    """
    if "epoch" in table:
        table = _final(table)
    if not len(table):
        raise ValueError("nothing to plot: an empty fidelity table")
    masks = [m for m in MASKS if m in set(table["mask"])]
    fig, axes = plt.subplots(len(masks), 2, figsize=(10, 2.4 * len(masks) + 0.8), squeeze=False)
    for row, mask in enumerate(masks):
        t = table[table["mask"] == mask]
        rules = list(t["rule"])
        y = np.arange(len(rules))
        for col, metric in enumerate(("MAE", "pearson")):
            ax = axes[row, col]
            for k, oracle in enumerate(reversed(ORACLES)):  # own share on top
                v = t[f"{metric} ({oracle})"].to_numpy(dtype=float)
                ax.barh(y + (0.2 if k == 0 else -0.2), np.nan_to_num(v), height=0.38,
                        color=[_colour(r, i) for i, r in enumerate(rules)], alpha=0.9 if k else 0.55,
                        hatch="" if k else "///", edgecolor="white" if k else "0.3", lw=0.3,
                        label=f"{oracle} oracle")
                for yi, vi in zip(y, v):
                    ax.text(0 if np.isnan(vi) else vi, yi + (0.2 if k == 0 else -0.2),
                            " n/a" if np.isnan(vi) else f" {vi:.3f}", va="center", fontsize=6)
            ax.set_yticks(y, rules if col == 0 else [""] * len(rules), fontsize=7)
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(axis="x", labelsize=7)
            if metric == "pearson":
                ax.axvline(0, color="0.4", lw=0.6)
            ax.set_title(f"{mask}: {'mean absolute error' if metric == 'MAE' else 'Pearson r'} of the partner share",
                         fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "label fidelity: each rule's partner share against two pixel oracles", fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)


def plot_fidelity_training(df: pd.DataFrame, mask: str = "CutMix box", title: str | None = None,
                           save: str | Path | None = None) -> Figure:
    """Each rule's MAE and Pearson r on ``mask`` (rows: own-share and mass oracle) against the
    epoch of the checkpoint, with the checkpoint's test top-1 on the right axis of the first panel."""
    d = df[df["mask"] == mask]
    if d.empty:
        raise ValueError(f"no rows of mask {mask!r}; masks: {sorted(set(df['mask']))}")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.2), sharex=True)
    for r, oracle in enumerate(("own share", "mass")):
        for c, metric in enumerate(("MAE", "pearson")):
            ax = axes[r, c]
            for i, rule in enumerate(RULES):
                e = d[d["rule"] == rule].sort_values("epoch")
                if len(e) and e[f"{metric} ({oracle})"].notna().any():
                    ax.plot(e["epoch"], e[f"{metric} ({oracle})"], marker="o", ms=3, lw=1.4 if rule != "area" else 2.2,
                            color=_colour(rule, i), ls="--" if rule == "area" else "-", label=rule)
            ax.set_title(f"{metric} vs the {oracle} oracle", fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if r == 1:
                ax.set_xlabel("epoch of the checkpoint", fontsize=8)
    acc = d.drop_duplicates("epoch").sort_values("epoch").dropna(subset=["top1"])  # evaluated epochs only
    twin = axes[0, 0].twinx()
    twin.plot(acc["epoch"], acc["top1"], color="0.5", lw=0.8, ls=":", marker="s", ms=3, label="test top-1 (right)")
    twin.set_ylabel("test top-1 (%)", fontsize=7, color="0.4")
    twin.tick_params(labelsize=6, colors="0.4")
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(title or f"label fidelity over training ({mask}): does attention become a better label?", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _finish(fig, save)


def fidelity_markdown(table: pd.DataFrame, heading: str | None = None) -> str:
    """The table as GitHub markdown (3 decimals, NaN as —) with each rule's target, under an
    optional heading paragraph."""
    t = table.copy()
    t.insert(2, "estimates", [TARGETS.get(r, "") for r in t["rule"]])
    num = [c for c in t.columns if c.startswith(("MAE", "pearson", "mean")) or c == "n"]
    if "note" in t:
        t["note"] = ["" if pd.isna(v) else str(v) for v in t["note"]]
    text = markdown_table(t.drop(columns=[c for c in ("note",) if c in t and not any(t[c])]),
                          floatfmt=".3f", right=num)
    return (heading.rstrip() + "\n\n" + text) if heading else text


def write_label_fidelity(runs_dir: str | Path, figures_dir: str | Path, data_dir: str | Path = "data",
                         dataset: str = "fashion_mnist", model: str = "vit_cpu", **params: int) -> list[Path]:
    """:data:`FIDELITY_OUTPUTS` in ``figures_dir`` from :func:`fidelity_records` (the final
    checkpoint's table in the CSV/markdown/bar figure, every checkpoint in the training figure).
    Same records -> same bytes. Returns the paths written, or [] when there is nothing to draw."""
    found = fidelity_records(runs_dir, data_dir, dataset, model, **params)
    if found is None:
        return []
    run, df = found
    out = Path(figures_dir)
    final = _final(df)
    p = {**FIDELITY_PARAMS, **params}
    n_img = p["n_batches"] * p["batch_size"]
    epochs = sorted(int(e) for e in set(df["epoch"]))
    desc = (f"checkpoint `{run.run_id}` ({run.config.get('method')}, {model}, epoch {epochs[-1]}, test top-1 "
            f"{df[df['epoch'] == epochs[-1]]['top1'].iloc[0]:.2f} %), {n_img} {dataset} test images in "
            f"{p['n_batches']} batches of {p['batch_size']}, seed {p['seed']}")
    paths = []
    for stem, draw in (("label_fidelity", lambda: plot_fidelity(final, title=f"label fidelity of {run.run_id} "
                                                                f"(epoch {epochs[-1]}, {n_img} test images)")),
                       ("label_fidelity_training", lambda: plot_fidelity_training(
                           df, title=f"label fidelity over the training of {run.run_id} (CutMix boxes; epochs "
                                     f"{', '.join(map(str, epochs))})"))):
        fig = draw()
        try:
            paths += save_figure(fig, out / stem)
        finally:
            plt.close(fig)
    write_if_changed(out / "label_fidelity.csv",
                     final.to_csv(index=False, float_format="%.4f", lineterminator="\n").encode())
    md = fidelity_markdown(final, f"Label fidelity: {desc}. Every rule is scored on the same mixes of each mask; "
                                  "errors are in partner-share units against the own-share oracle (each source's "
                                  "surviving share of its own foreground, what the attention and teacher rules "
                                  "estimate) and the mass oracle (the share of the visible foreground mass); the "
                                  "`area` row of each mask is the baseline (see `tokenmix/analysis/fidelity.py`).")
    write_if_changed(out / "label_fidelity.md", md.encode())
    return [out / "label_fidelity.csv", out / "label_fidelity.md"] + paths


__all__ = ["FIDELITY_OUTPUTS", "FIDELITY_PARAMS", "RULE_COLOURS", "checkpoint_files", "fidelity_markdown",
           "fidelity_records", "find_fidelity_run", "plot_fidelity", "plot_fidelity_training", "write_label_fidelity"]
