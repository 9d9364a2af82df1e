"""Tables from run records: the results table (mean ± std over seeds, the paired difference to
CutMix with its confidence interval and test, cost relative to CutMix), a dependency-free markdown
writer, and small display tables for notebooks."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tokenmix.methods.base import MixedBatch
from tokenmix.train.runs import Run

#: columns of :func:`results_table`, in order
RESULT_COLUMNS: tuple[str, ...] = ("method", "model", "dataset", "train_images", "epochs", "n_seeds", "top1_mean",
                                   "top1_std", "best_top1", "train_top1", "time_per_epoch_s", "images_per_s",
                                   "rel_time_vs_cutmix")
#: the method every other method's cost is compared with
REFERENCE_METHOD = "cutmix"


#: config fields that make a protocol: runs that differ in one of them are never pooled or paired
PAIR_KEYS: tuple[str, ...] = ("model", "dataset", "epochs", "train_subset", "test_subset", "img_size", "batch_size",
                              "lr", "hflip", "crop_padding", "randaugment", "smoothing")


def _protocol(run: Run) -> tuple[str, ...]:
    return tuple(str(run.config.get(k)) for k in PAIR_KEYS)


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
        train_images: the training-set size (``train_subset``; 0 = the whole split).
        epochs: the run length, e.g. ``"10"``.
        n_seeds: number of runs in the group (one per seed).
        top1_mean, top1_std: mean and sample standard deviation (ddof=1; NaN for one run) of the
            final test top-1 (%).
        best_top1: mean over the runs of each run's best-epoch test top-1 (%).
        train_top1: mean final clean top-1 on the training images (``eval_train``; NaN if not logged).
        time_per_epoch_s, images_per_s: means over the runs (training throughput; time per epoch
            includes evaluation).
        rel_time_vs_cutmix: time_per_epoch_s / that of ``cutmix`` on the same model and dataset
            (NaN when there is no CutMix row).

    Runs of one method under different protocols (:data:`PAIR_KEYS`, e.g. another training-set
    size or schedule) are different rows, never pooled as seeds. Rows are sorted by dataset,
    model, protocol, method.
    """
    rows: dict[tuple, list[Run]] = {}
    for run in runs:
        if not run.complete:
            continue
        rows.setdefault((_protocol(run), method_label(run)), []).append(run)
    out = []
    for (proto, method), group in sorted(rows.items(), key=lambda kv: (kv[0][0][1], kv[0][0][0], kv[0][0], kv[0][1])):
        final = np.array([_num(r.summary.get("final_top1")) for r in group])
        cfg = group[0].config
        out.append({
            "method": method, "model": str(cfg.get("model", "?")), "dataset": str(cfg.get("dataset", "?")),
            "train_images": int(cfg.get("train_subset", 0) or 0), "epochs": str(cfg.get("epochs", "?")),
            "n_seeds": len(group),
            "top1_mean": float(np.mean(final)),
            "top1_std": float(np.std(final, ddof=1)) if len(group) > 1 else float("nan"),
            "best_top1": float(np.mean([_num(r.summary.get("best_top1")) for r in group])),
            "train_top1": float(np.mean([_num(r.summary.get("final_train_top1")) for r in group])),
            "time_per_epoch_s": float(np.mean([_num(r.summary.get("time_per_epoch_s")) for r in group])),
            "images_per_s": float(np.mean([_num(r.summary.get("images_per_s")) for r in group])),
        })
    df = pd.DataFrame(out, columns=list(RESULT_COLUMNS[:-1]))
    ref = {(r["model"], r["dataset"], r["train_images"], r["epochs"]): r["time_per_epoch_s"]
           for r in out if r["method"] == REFERENCE_METHOD}
    df["rel_time_vs_cutmix"] = [
        row.time_per_epoch_s / ref[k] if (k := (row.model, row.dataset, row.train_images, row.epochs)) in ref
        else float("nan") for row in df.itertuples()]
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# paired statistics

#: columns of :func:`paired_table`, in order
PAIRED_COLUMNS: tuple[str, ...] = ("method", "model", "dataset", "reference", "n_pairs", "diff_mean", "diff_std",
                                   "ci_low", "ci_high", "t", "p_value", "p_holm", "significant")

def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaNs are left out of the family)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok])]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_table(runs: Sequence[Run], reference: str = REFERENCE_METHOD, confidence: float = 0.95,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Each method's **paired** difference in final test top-1 to ``reference`` (CutMix).

    A pair is two complete runs with the same seed and the same protocol (:data:`PAIR_KEYS`): the
    engine gives them the same initial weights and the same data order, so the difference removes
    the seed's share of the noise. Per method (columns :data:`PAIRED_COLUMNS`):

        n_pairs: seeds with both runs; diff_mean, diff_std: mean and sample std of
            ``top1(method) - top1(reference)`` (percentage points);
        ci_low, ci_high: the ``confidence`` t-interval of the mean difference (NaN below 2 pairs);
        t, p_value: the paired t-test (``scipy.stats.ttest_rel``, two-sided);
        p_holm: Holm-adjusted over the methods of the same (model, dataset, protocol) family;
        significant: ``p_holm < alpha``.

    A zero-variance set of differences gives an infinite t and p = 0 when the mean is not zero.
    """
    by: dict[tuple, dict[str, dict[int, float]]] = {}
    for run in runs:
        if run.complete:
            seeds = by.setdefault(_protocol(run), {}).setdefault(method_label(run), {})
            seeds[int(run.config.get("seed", 0))] = _num(run.summary.get("final_top1"))
    rows = []
    for key, methods_ in sorted(by.items()):
        ref = methods_.get(reference)
        if not ref:
            continue
        family = []
        for method, seeds in sorted(methods_.items()):
            if method == reference:
                continue
            common = sorted(set(seeds) & set(ref))
            d = np.array([seeds[s] - ref[s] for s in common])
            n = len(d)
            mean = float(d.mean()) if n else float("nan")
            sd = float(d.std(ddof=1)) if n > 1 else float("nan")
            lo = hi = t = pv = float("nan")
            if n > 1:
                if sd > 0:
                    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
                    lo, hi = mean - half, mean + half
                    res = stats.ttest_rel([seeds[s] for s in common], [ref[s] for s in common])
                    t, pv = float(res.statistic), float(res.pvalue)
                else:
                    lo = hi = mean
                    t, pv = (math.copysign(math.inf, mean), 0.0) if mean else (float("nan"), 1.0)
            family.append({"method": method, "model": key[0], "dataset": key[1], "reference": reference,
                           "n_pairs": n, "diff_mean": mean, "diff_std": sd, "ci_low": lo, "ci_high": hi,
                           "t": t, "p_value": pv})
        adjusted = holm([r["p_value"] for r in family])
        for r, ph in zip(family, adjusted):
            r["p_holm"] = float(ph)
            r["significant"] = bool(ph < alpha) if not math.isnan(ph) else False
        rows += family
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


# ---------------------------------------------------------------------------------------------
# masks x label rules (the ``compose`` method)

#: columns of :func:`ablation_table`, in order
ABLATION_COLUMNS: tuple[str, ...] = ("mask", "label", "model", "dataset", "n_seeds", "top1_mean", "top1_std",
                                     "n_pairs", "diff_mean", "ci_low", "ci_high", "p_value", "p_holm", "significant")


def _compose_parts(run: Run) -> tuple[str, str]:
    """(mask, label) of a ``compose`` run, each with its keywords when it has any; the mask also with
    the run's variant when it is not ``official`` (runs of different variants are never paired)."""
    kw = run.config.get("method_kwargs") or {}
    variant = run.config.get("variant") or "official"

    def part(name: str, extra: Any) -> str:
        return name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "}" if extra else "")

    mask = part(str(kw.get("mask", "cutmix")), kw.get("mask_kwargs"))
    return (mask if variant == "official" else f"{mask}[{variant}]",
            part(str(kw.get("label", "area")), kw.get("label_kwargs")))


def ablation_table(runs: Sequence[Run], reference_label: str = "area", confidence: float = 0.95,
                   alpha: float = 0.05) -> pd.DataFrame:
    """The ablation grid's table: every ``compose`` (mask, label rule) cell with its top-1 over
    seeds and its **paired** difference to the same mask with the ``reference_label`` rule (the
    mask's own area label), i.e. what the label rule changes on that mask. Holm's adjustment runs
    over the rules of one mask (one family per mask, model and protocol). Columns
    :data:`ABLATION_COLUMNS`; empty without ``compose`` runs."""
    comp = [r for r in runs if r.complete and r.config.get("method") == "compose"]
    by_mask: dict[str, list[Run]] = {}
    for r in comp:
        by_mask.setdefault(_compose_parts(r)[0], []).append(r)
    rows = []
    for mask, rs in sorted(by_mask.items()):
        labels = {method_label(r): _compose_parts(r)[1] for r in rs}
        ref = next((m for m, lab in labels.items() if lab == reference_label), None)
        paired = paired_table(rs, ref, confidence, alpha) if ref else pd.DataFrame(columns=list(PAIRED_COLUMNS))
        look = {(p.method, p.model, p.dataset): p for p in paired.itertuples()}
        res = results_table(rs)
        for row in res.itertuples():
            p = look.get((row.method, row.model, row.dataset))
            rows.append({"mask": mask, "label": labels.get(row.method, row.method), "model": row.model,
                         "dataset": row.dataset, "n_seeds": row.n_seeds, "top1_mean": row.top1_mean,
                         "top1_std": row.top1_std, "n_pairs": p.n_pairs if p is not None else 0,
                         "diff_mean": p.diff_mean if p is not None else (0.0 if row.method == ref else float("nan")),
                         "ci_low": p.ci_low if p is not None else float("nan"),
                         "ci_high": p.ci_high if p is not None else float("nan"),
                         "p_value": p.p_value if p is not None else float("nan"),
                         "p_holm": p.p_holm if p is not None else float("nan"),
                         "significant": bool(p.significant) if p is not None else False})
    return pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))


def ablation_markdown(df: pd.DataFrame, reference_label: str = "area") -> str:
    """The markdown written to ``ablation.md``: one row per (mask, label rule) cell."""
    def diff(r: Any) -> str:
        if r.label == reference_label:
            return "0 (reference)"
        if not r.n_pairs:
            return "—"
        ci = "" if math.isnan(r.ci_low) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        return f"{r.diff_mean:+.2f}{ci}{' *' if r.significant else ''}"

    shown = pd.DataFrame({
        "mask": df["mask"], "label rule": df["label"], "model": df["model"], "seeds": df["n_seeds"].astype(int),
        "top-1 (%)": [f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}" for m, s in zip(df["top1_mean"],
                                                                                          df["top1_std"])],
        f"Δ vs {reference_label} label (pp) [95 % CI]": [diff(r) for r in df.itertuples()],
        "p (Holm)": ["—" if math.isnan(v) else f"{v:.3f}" for v in df["p_holm"]]})
    return ("# Masks x label rules\n\n"
            "Generated by `python -m tokenmix report` from the complete `compose` run records; do not edit.\n\n"
            + markdown_table(shown, right=("seeds", "top-1 (%)", f"Δ vs {reference_label} label (pp) [95 % CI]",
                                           "p (Holm)"))
            + f"\nTop-1: final test top-1, mean ± sample std over seeds. Δ: mean over seeds of the paired "
              f"difference (same seed = same initial weights and data order) to the same mask with the "
              f"{reference_label} label, with its 95 % t-interval; `*` marks p < 0.05 after Holm's adjustment "
              "over the label rules of that mask. Each rule trains with its own criterion (in the official "
              "variants TokenMix's teacher target with BCE, MixPro's PAL with hard-label CE; the others with "
              "the soft-target CE of the area label), so a Δ is the rule with its loss.\n")


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
DISPLAY_NUMERIC: tuple[str, ...] = ("train images", "epochs", "seeds", "top-1 (%)", "Δ vs CutMix (pp) [95 % CI]",
                                    "p (Holm)", "best top-1 (%)", "train top-1 (%)", "s / epoch", "time vs CutMix")


def _paired_cells(df: pd.DataFrame, paired: pd.DataFrame | None) -> tuple[list[str], list[str]]:
    """Per results row: the paired difference to CutMix with its CI (``*`` = significant after
    Holm) and the Holm-adjusted p-value, or "—"."""
    look = {} if paired is None else {(r.method, r.model, r.dataset): r for r in paired.itertuples()}
    diff, pv = [], []
    for row in df.itertuples():
        r = look.get((row.method, row.model, row.dataset))
        if row.method == REFERENCE_METHOD:
            diff.append("0 (reference)")
            pv.append("—")
        elif r is None or not r.n_pairs:
            diff.append("—")
            pv.append("—")
        else:
            ci = "" if math.isnan(r.ci_low) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
            diff.append(f"{r.diff_mean:+.2f}{ci}{' *' if r.significant else ''}")
            pv.append("—" if math.isnan(r.p_holm) else f"{r.p_holm:.3f}")
    return diff, pv


def results_display(df: pd.DataFrame, paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """The results table formatted for reading: ``mean ± std`` top-1, the paired difference to
    CutMix (from :func:`paired_table`, when given), rounded times, ``×`` cost."""
    def pm(mean: float, std: float) -> str:
        return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"

    diff, pv = _paired_cells(df, paired)
    out = pd.DataFrame({
        "method": df["method"], "model": df["model"], "dataset": df["dataset"],
        "train images": ["all" if not v else str(v) for v in df["train_images"]], "epochs": df["epochs"],
        "seeds": df["n_seeds"].astype(int),
        "top-1 (%)": [pm(m, s) for m, s in zip(df["top1_mean"], df["top1_std"])],
        "Δ vs CutMix (pp) [95 % CI]": diff, "p (Holm)": pv,
        "best top-1 (%)": [f"{v:.2f}" for v in df["best_top1"]],
        "train top-1 (%)": ["—" if math.isnan(v) else f"{v:.2f}" for v in df["train_top1"]],
        "s / epoch": [f"{v:.1f}" for v in df["time_per_epoch_s"]],
        "time vs CutMix": ["—" if math.isnan(v) else f"{v:.2f}×" for v in df["rel_time_vs_cutmix"]],
    })
    drop = [c for c, cond in (("Δ vs CutMix (pp) [95 % CI]", paired is None), ("p (Holm)", paired is None),
                              ("train top-1 (%)", bool(df["train_top1"].isna().all()) if len(df) else True))
            if cond]
    return out.drop(columns=drop)


def results_markdown(df: pd.DataFrame, paired: pd.DataFrame | None = None) -> str:
    """The markdown written to ``figures/results.md``: the formatted table and a legend."""
    legend = ("\nTop-1: final test top-1 accuracy, mean ± sample std over seeds. ")
    if paired is not None:
        legend += ("Δ vs CutMix: mean over seeds of the **paired** difference (same seed = same initial weights "
                   "and data order) to CutMix in percentage points, with its 95 % t-interval; `*` marks a "
                   "difference whose paired t-test stays below p = 0.05 after Holm's adjustment over the "
                   "methods of the table (p (Holm)). ")
    legend += ("Best: mean over seeds of each run's best evaluated epoch. Train top-1: clean accuracy on up to "
               "`eval_train` training images (the train/test gap), when logged. Time per epoch includes "
               "evaluation. Time vs CutMix: time per epoch relative to CutMix under the same protocol "
               "(only comparable when the runs share a machine).\n")
    return ("# Results\n\n"
            "Generated by `python -m tokenmix report` from the complete run records; do not edit.\n\n"
            + markdown_table(results_display(df, paired), right=DISPLAY_NUMERIC) + legend)


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
