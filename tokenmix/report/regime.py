"""The regime pilot: where does mixing help a small ViT? (``configs/fmnist_regime.yaml``,
``notebooks/21_regime.ipynb``).

The pilot trains no mixing, Mixup, CutMix and one token-level method over training-set size x
schedule x augmentation x model width, one seed each, logging the clean accuracy on training
images beside the test accuracy. These functions read its run records:

- :func:`regime_of` names a run's protocol (``"1000 img x 60 ep, no aug, vit_cpu"``);
- :func:`regime_table` one row per (regime, method): final / best test top-1, clean train top-1,
  the train - test gap, and each method's difference to no mixing in that regime;
- :func:`regime_summary` one row per regime: every method's final top-1 side by side, CutMix - none
  and the best mixing method - none (the number the study's regime is chosen on);
- :func:`plot_regimes` test (solid) and clean-train (dashed) top-1 over epochs, one panel per regime;
- :func:`write_regime_report` writes ``regime.{png,svg}``, ``regime.csv`` and ``regime.md``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tokenmix import methods
from tokenmix.report.figures import save_and_close, write_csv, write_if_changed
from tokenmix.report.tables import markdown_table, method_label
from tokenmix.train.runs import Run, list_runs

#: the method every other one is compared with in the pilot
BASELINE = "none"
#: files written by :func:`write_regime_report`
REGIME_OUTPUTS: tuple[str, ...] = ("regime.png", "regime.svg", "regime.csv", "regime.md")


def _aug(cfg: dict) -> str:
    crop = int(cfg.get("crop_padding", -1))
    parts = (["crop"] if crop != 0 else []) + (["flip"] if cfg.get("hflip", True) else [])
    return "+".join(parts) if parts else "no aug"


#: the baselines first, then the other methods alphabetically
_FIRST: tuple[str, ...] = (BASELINE, "mixup", "cutmix", "mixup_cutmix")


def _method_rank(label: str) -> tuple[int, str]:
    return (_FIRST.index(label), "") if label in _FIRST else (len(_FIRST), label)


def regime_of(run: Run) -> str:
    """A run's protocol as a short name: training images x epochs, augmentation, model."""
    cfg = run.config
    n = int(cfg.get("train_subset", 0) or 0)
    return f"{n or 'all'} img x {cfg.get('epochs')} ep, {_aug(cfg)}, {cfg.get('model')}"


def regime_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (regime, method) over the complete runs (seeds averaged).

    Columns: regime, model, train_images, epochs, augmentation, method, n_seeds, top1 (final test
    top-1, %), best_top1, train_top1 (final clean accuracy on the logged training images, %), gap
    (train_top1 - top1), vs_none (top1 - that of no mixing in the same regime, points), images_seen
    (training images x epochs).
    """
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.complete:
            groups.setdefault((regime_of(run), method_label(run)), []).append(run)
    rows = []
    for (regime, method), group in groups.items():
        cfg = group[0].config
        n = int(cfg.get("train_subset", 0) or 0)
        mean = lambda key: float(np.mean([float(r.summary.get(key, math.nan)) for r in group]))  # noqa: E731
        rows.append({"regime": regime, "model": cfg.get("model"), "train_images": n, "epochs": int(cfg["epochs"]),
                     "augmentation": _aug(cfg), "method": method, "n_seeds": len(group),
                     "top1": mean("final_top1"), "best_top1": mean("best_top1"),
                     "train_top1": mean("final_train_top1"), "images_seen": n * int(cfg["epochs"])})
    df = pd.DataFrame(rows, columns=["regime", "model", "train_images", "epochs", "augmentation", "method",
                                     "n_seeds", "top1", "best_top1", "train_top1", "images_seen"])
    if df.empty:
        return df.assign(gap=[], vs_none=[])
    df["gap"] = df["train_top1"] - df["top1"]
    base = df[df.method == BASELINE].set_index("regime")["top1"]
    df["vs_none"] = [row.top1 - base.get(row.regime, math.nan) for row in df.itertuples()]
    return (df.assign(_m=df.method.map(_method_rank), _a=df.augmentation != "no aug")  # no augmentation first
              .sort_values(["model", "_a", "augmentation", "train_images", "epochs", "_m"]).drop(columns=["_m", "_a"])
              .reset_index(drop=True))


def regime_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per regime of a :func:`regime_table`: each method's final top-1 side by side, no
    mixing's train - test gap, ``cutmix - none`` and the best mixing method minus none."""
    if table.empty:
        return pd.DataFrame()
    wide = table.pivot_table(index="regime", columns="method", values="top1", sort=False)
    wide = wide[sorted(wide.columns, key=_method_rank)]
    meta = table.drop_duplicates("regime").set_index("regime")[["model", "train_images", "epochs", "augmentation"]]
    gap = table[table.method == BASELINE].set_index("regime")["gap"].rename("gap of none")
    out = meta.join(wide).join(gap)
    mixing = [c for c in wide.columns if c != BASELINE]
    if BASELINE in wide.columns:
        if "cutmix" in wide.columns:
            out["cutmix - none"] = wide["cutmix"] - wide[BASELINE]
        if mixing:
            out["best mixing - none"] = wide[mixing].max(axis=1) - wide[BASELINE]
    return out.reset_index()


def plot_regimes(runs: Sequence[Run], ncols: int = 3, title: str | None = None) -> Figure:
    """Test top-1 (solid) and clean train top-1 (dashed) over epochs, one panel per regime and one
    colour per method (each method class's ``colour``)."""
    by_regime: dict[str, list[Run]] = {}
    for run in runs:
        if run.complete:
            by_regime.setdefault(regime_of(run), []).append(run)
    table = regime_table(runs)
    names = list(dict.fromkeys(table["regime"])) if not table.empty else []
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for run in sorted(by_regime[name], key=lambda r: method_label(r)):
            label = method_label(run)
            cls = methods.method_class(str(run.config.get("method")))
            evals = [m for m in run.metrics if "top1" in m]
            ep = [m["epoch"] for m in evals]
            ax.plot(ep, [m["top1"] for m in evals], color=cls.colour, lw=1.4, label=label)
            if any("train_top1" in m for m in evals):
                ax.plot(ep, [m.get("train_top1", math.nan) for m in evals], color=cls.colour, lw=0.9, ls="--")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 (%)", fontsize=8)
    if names:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title or "Where mixing helps: test top-1 (solid) and clean train top-1 (dashed)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


def regime_markdown(summary: pd.DataFrame) -> str:
    """``regime.md``: the per-regime summary as a table with a legend."""
    if summary.empty:
        return "# Regime pilot\n\nNo complete runs.\n"
    show = summary.drop(columns=["regime"]).copy()
    show.insert(0, "regime", summary["regime"])
    return ("# Regime pilot\n\nGenerated by `python -m tokenmix report --regime ...` from the pilot's run records "
            "(one seed per cell); do not edit.\n\n" + markdown_table(show) +
            "\nFinal test top-1 (%) per method; `gap of none`: clean train top-1 minus test top-1 of the run "
            "without mixing (how much it overfits); the last columns: differences in points.\n")


def write_regime_report(runs_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Write :data:`REGIME_OUTPUTS` for the pilot's records under ``runs_dir`` (nothing when there
    is no complete run); same records -> same bytes."""
    runs = [r for r in list_runs(runs_dir) if r.complete]
    if not runs:
        return []
    out = Path(figures_dir)
    paths = save_and_close(plot_regimes(runs), out / "regime")
    table = regime_table(runs)
    write_csv(out / "regime.csv", table)
    write_if_changed(out / "regime.md", regime_markdown(regime_summary(table)).encode())
    return paths + [out / "regime.csv", out / "regime.md"]


__all__ = ["BASELINE", "REGIME_OUTPUTS", "plot_regimes", "regime_markdown", "regime_of", "regime_summary",
           "regime_table", "write_regime_report"]
