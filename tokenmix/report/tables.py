"""Tables from run records: the results table (mean ± std over seeds, cost relative to CutMix),
a dependency-free markdown writer, and small display tables for notebooks."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tokenmix.methods.base import MixedBatch
from tokenmix.train.runs import Run

#: columns of :func:`results_table`, in order
RESULT_COLUMNS: tuple[str, ...] = ("method", "model", "dataset", "epochs", "n_seeds", "top1_mean", "top1_std",
                                   "best_top1", "time_per_epoch_s", "images_per_s", "rel_time_vs_cutmix")
#: the method every other method's cost is compared with
REFERENCE_METHOD = "cutmix"


def method_label(run: Run) -> str:
    """``method``, ``method[variant]`` for non-official variants, then ``{k=v,...}`` for the
    run's ``method_kwargs`` (runs that differ in them are different rows, not seeds)."""
    cfg, summ = run.config, run.summary or {}
    method = str(cfg.get("method", summ.get("method", "?")))
    variant = cfg.get("variant", summ.get("variant", "official"))
    label = method if not variant or variant == "official" else f"{method}[{variant}]"
    kwargs = cfg.get("method_kwargs") or {}
    return label + ("{" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + "}" if kwargs else "")


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def results_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (method, model, dataset) over the **complete** runs (others are ignored).

    Columns (``RESULT_COLUMNS``):
        method: the method name, with ``[variant]`` appended for non-official variants.
        epochs: the run length, e.g. ``"10"`` (``"2/10"`` if the group mixes lengths).
        n_seeds: number of runs in the group (one per seed).
        top1_mean, top1_std: mean and sample standard deviation (ddof=1; NaN for one run) of the
            final test top-1 (%).
        best_top1: mean over the runs of each run's best-epoch test top-1 (%).
        time_per_epoch_s, images_per_s: means over the runs (training throughput; time per epoch
            includes evaluation).
        rel_time_vs_cutmix: time_per_epoch_s / that of ``cutmix`` on the same model and dataset
            (NaN when there is no CutMix row).

    Rows are sorted by dataset, model, method.
    """
    rows: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        if not run.complete:
            continue
        cfg, summ = run.config, run.summary or {}
        key = (method_label(run), str(cfg.get("model", summ.get("model", "?"))),
               str(cfg.get("dataset", summ.get("dataset", "?"))))
        rows.setdefault(key, []).append(run)
    out = []
    for (method, model, dataset), group in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        final = np.array([_num(r.summary.get("final_top1")) for r in group])
        epochs = sorted({int(r.summary.get("epochs", r.config.get("epochs", 0))) for r in group})
        out.append({
            "method": method, "model": model, "dataset": dataset, "epochs": "/".join(map(str, epochs)),
            "n_seeds": len(group),
            "top1_mean": float(np.mean(final)),
            "top1_std": float(np.std(final, ddof=1)) if len(group) > 1 else float("nan"),
            "best_top1": float(np.mean([_num(r.summary.get("best_top1")) for r in group])),
            "time_per_epoch_s": float(np.mean([_num(r.summary.get("time_per_epoch_s")) for r in group])),
            "images_per_s": float(np.mean([_num(r.summary.get("images_per_s")) for r in group])),
        })
    df = pd.DataFrame(out, columns=list(RESULT_COLUMNS[:-1]))
    ref = {(r["model"], r["dataset"]): r["time_per_epoch_s"] for r in out if r["method"] == REFERENCE_METHOD}
    df["rel_time_vs_cutmix"] = [
        row.time_per_epoch_s / ref[(row.model, row.dataset)] if (row.model, row.dataset) in ref else float("nan")
        for row in df.itertuples()]
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# markdown

def _cell(v: Any, floatfmt: str) -> str:
    if isinstance(v, (float, np.floating)):
        return "—" if math.isnan(v) else format(float(v), floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".2f", right: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``df`` (no index), without the ``tabulate`` package.

    Floats use ``floatfmt`` (NaN -> "—"); ``|`` is escaped. Columns named in ``right`` (default:
    the numeric columns) are right-aligned, the others left-aligned.
    """
    header = [str(c) for c in df.columns]
    body = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    if right is None:
        right = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    numeric = [c in set(right) for c in df.columns]
    widths = [max([len(h)] + [len(r[j]) for r in body] + [3]) for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in body]) + "\n"


#: right-aligned columns of :func:`results_display`
DISPLAY_NUMERIC: tuple[str, ...] = ("epochs", "seeds", "top-1 (%)", "best top-1 (%)", "s / epoch", "images / s",
                                    "time vs CutMix")


def results_display(df: pd.DataFrame) -> pd.DataFrame:
    """The results table formatted for reading: ``mean ± std`` top-1, rounded times, ``×`` cost."""
    def pm(mean: float, std: float) -> str:
        return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"

    return pd.DataFrame({
        "method": df["method"], "model": df["model"], "dataset": df["dataset"], "epochs": df["epochs"],
        "seeds": df["n_seeds"].astype(int),
        "top-1 (%)": [pm(m, s) for m, s in zip(df["top1_mean"], df["top1_std"])],
        "best top-1 (%)": [f"{v:.2f}" for v in df["best_top1"]],
        "s / epoch": [f"{v:.1f}" for v in df["time_per_epoch_s"]],
        "images / s": [f"{v:.0f}" for v in df["images_per_s"]],
        "time vs CutMix": ["—" if math.isnan(v) else f"{v:.2f}×" for v in df["rel_time_vs_cutmix"]],
    }, columns=["method", "model", "dataset", "epochs", "seeds", "top-1 (%)", "best top-1 (%)",
                "s / epoch", "images / s", "time vs CutMix"])


def results_markdown(df: pd.DataFrame) -> str:
    """The markdown written to ``figures/results.md``: the formatted table and a legend."""
    return ("# Results\n\n"
            "Generated by `python -m tokenmix report` from the complete run records; do not edit.\n\n"
            + markdown_table(results_display(df), right=DISPLAY_NUMERIC) +
            "\nTop-1: final test top-1 accuracy, mean ± sample std over seeds. Best: mean over seeds of each "
            "run's best epoch. Time per epoch includes evaluation; images/s is training throughput. "
            "Time vs CutMix: time per epoch relative to CutMix on the same model and dataset "
            "(only comparable when the runs share a machine).\n")


# ---------------------------------------------------------------------------------------------
# small display tables

SUMMARY_KEYS: tuple[str, ...] = ("run_id", "method", "variant", "model", "dataset", "epochs", "final_top1",
                                 "final_top5", "best_top1", "time_per_epoch_s", "images_per_s",
                                 "peak_memory_mb", "params", "device")


def summary_table(summary: Mapping[str, Any], keys: Sequence[str] = SUMMARY_KEYS) -> pd.DataFrame:
    """A run summary (``train(cfg)`` / ``summary.json``) as a two-column table of its main fields
    (missing keys are skipped); floats rounded to 2 decimals."""
    rows = [(k, round(v, 2) if isinstance(v, float) else v) for k, v in summary.items() if k in keys]
    order = {k: i for i, k in enumerate(keys)}
    rows.sort(key=lambda kv: order[kv[0]])
    return pd.DataFrame(rows, columns=["field", "value"]).set_index("field")


def mixed_targets_table(mixed: MixedBatch, class_names: Sequence[str] | None = None, n: int = 8,
                        decimals: int = 3) -> pd.DataFrame:
    """Per sample of a mixed batch: own and partner class, ``lam_area`` (own area share), the
    partner's mean token share, and the soft target's weight on the own and partner classes."""
    n = min(n, mixed.x.shape[0])
    y, yp = mixed.y[:n].cpu().long(), mixed.y_partner[:n].cpu().long()
    t = mixed.target[:n].detach().cpu().float()
    idx = np.arange(n)

    def name(k: int) -> str:
        return str(class_names[k]) if class_names is not None and k < len(class_names) else str(k)

    return pd.DataFrame({
        "own": [name(int(k)) for k in y], "partner": [name(int(k)) for k in yp],
        "lam_area": mixed.lam_area[:n].detach().cpu().float().numpy(),
        "partner_share": mixed.partner_mask[:n].detach().cpu().float().mean(1).numpy(),
        "target[own]": t[idx, y].numpy(), "target[partner]": t[idx, yp].numpy(),
    }).round(decimals)
