"""The study report: the paper-reported numbers as data, accuracy vs training cost, a gallery of
every method's mixed images, and the helpers behind ``notebooks/20_results.ipynb``.

- :func:`paper_results` loads ``paper_results.csv`` (next to this module): one row per top-1
  number printed in a table of the five papers, with the table it comes from (``source``), the
  dataset, the timm model name (``pvt_* (v1)`` for PVT v1, which timm does not have), the method as
  a run label of this package (``name[variant]{k=v,...}``, as :func:`tokenmix.report.tables.method_label`
  writes it) and a note on what the paper's row or column means.
- :func:`results_with_paper` adds the matching paper number to a :func:`results_table`;
  :func:`paper_table_markdown` renders the numbers grouped by source (``figures/paper_results.md``).
- :func:`plot_accuracy_vs_time` (SMMix Figure 1 style) and :func:`plot_gallery`.
- :func:`write_study_figures` writes ``accuracy_vs_time.{png,svg}``, ``gallery.{png,svg}`` and
  ``paper_results.md`` (same inputs -> same bytes).
"""
from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from tokenmix import methods
from tokenmix.data import dataset_info, load_split
from tokenmix.methods import MixMethod
from tokenmix.methods.teacher_maps import load_teacher_maps
from tokenmix.models import create_model
from tokenmix.report.fidelity import plot_fidelity
from tokenmix.report.figures import (_class_name, _imshow, _tensor, save_figure, token_map_to_pixels, unnormalize,
                                     write_if_changed)
from tokenmix.report.tables import REFERENCE_METHOD, markdown_table, results_table
from tokenmix.train.runs import Run, list_runs

#: the paper numbers shipped with the package
PAPER_RESULTS_CSV = Path(__file__).with_name("paper_results.csv")
#: columns of ``paper_results.csv`` / :func:`paper_results`
PAPER_COLUMNS: tuple[str, ...] = ("paper", "source", "dataset", "model", "method", "top1", "notes")
#: the columns :func:`results_with_paper` adds
PAPER_TOP1, PAPER_SOURCE = "paper top-1", "source"
#: the rows of :func:`plot_gallery` by default: every registered method whose class sets ``gallery``
#: (one row per method: TokenMixup's HTM / VTM act inside the model, so its modes show the same images)
GALLERY_METHODS: tuple[str, ...] = tuple(n for n in methods.available() if methods.method_class(n).gallery)
#: files written by :func:`write_study_figures` (the figures only when their inputs exist)
STUDY_OUTPUTS: tuple[str, ...] = ("accuracy_vs_time.png", "accuracy_vs_time.svg", "gallery.png", "gallery.svg",
                                  "paper_results.md")


# ---------------------------------------------------------------------------------------------
# method labels

_LABEL = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?:\[(?P<variant>[^\]]*)\])?(?:\{(?P<kwargs>[^}]*)\})?$")


def parse_label(label: str) -> tuple[str, str | None, dict[str, str]]:
    """``"name[variant]{k=v,...}"`` (each part but the name optional) -> (name, variant or None,
    {k: v} with the values as strings). Raises ValueError for anything else."""
    m = _LABEL.match(str(label).strip())
    if not m:
        raise ValueError(f"not a method label of the form name[variant]{{k=v,...}}: {label!r}")
    kwargs: dict[str, str] = {}
    for part in filter(None, (m.group("kwargs") or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad method argument {part!r} in {label!r} (expected k=v)")
        kwargs[key.strip()] = value.strip()
    return m.group("name"), m.group("variant") or None, kwargs


def _non_default(name: str, kwargs: dict[str, str]) -> frozenset[tuple[str, str]]:
    """The arguments that differ from the method's defaults (compared as strings)."""
    try:
        defaults = methods.parameters(name)
    except ValueError:
        defaults = {}
    return frozenset((k, v) for k, v in kwargs.items() if k not in defaults or str(defaults[k]) != v)


def _typed(name: str, kwargs: dict[str, str]) -> dict[str, Any]:
    """String arguments of a label converted to the types of the method's defaults."""
    defaults = methods.parameters(name)
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        d = defaults.get(k)
        if isinstance(d, bool):
            out[k] = v.lower() in ("true", "1", "yes")
        elif isinstance(d, int):
            out[k] = int(float(v))
        elif isinstance(d, float):
            out[k] = float(v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# paper numbers

def paper_results(path: str | Path = PAPER_RESULTS_CSV) -> pd.DataFrame:
    """The paper-reported top-1 accuracies: one row per number (columns ``PAPER_COLUMNS``,
    ``top1`` a float in %, ``notes`` "" when empty), in file order (by paper, then table)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PAPER_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
    df = df[list(PAPER_COLUMNS)].copy()
    df["top1"] = df["top1"].astype(float)
    return df.reset_index(drop=True)


def _match_key(label: str) -> tuple[str, str | None, frozenset[tuple[str, str]]]:
    name, variant, kwargs = parse_label(label)
    return name, variant, _non_default(name, kwargs)


def paper_match(paper_df: pd.DataFrame, dataset: str, model: str, method: str) -> pd.Series | None:
    """The paper row for one of our (dataset, model, method label), or None.

    A paper row matches when dataset and model are equal, the method names are equal, the
    non-default method arguments are equal, and the paper row names no variant or ours. Among
    matches: the exact variant first, then the method's own paper (:attr:`~tokenmix.methods.MixMethod.paper`), then file
    order (each paper's main table comes first)."""
    try:
        name, variant, args = _match_key(method)
    except ValueError:
        return None
    variant = variant or "official"
    best: tuple[tuple[int, int, int], int] | None = None
    sel = paper_df[(paper_df["dataset"] == dataset) & (paper_df["model"] == model)]
    for pos, row in zip(sel.index, sel.itertuples(index=False)):
        try:
            p_name, p_variant, p_args = _match_key(row.method)
        except ValueError:
            continue
        if p_name != name or p_args != args or (p_variant is not None and p_variant != variant):
            continue
        rank = (0 if p_variant is not None else 1, 0 if methods.method_class(name).paper == row.paper else 1, int(pos))
        if best is None or rank < best[0]:
            best = (rank, pos)
    return None if best is None else paper_df.loc[best[1]]


def results_with_paper(df_ours: pd.DataFrame, paper_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """``df_ours`` (a :func:`~tokenmix.report.tables.results_table`, or any frame with ``method``,
    ``model`` and ``dataset`` columns) with two more columns: ``paper top-1`` (float, NaN when no
    paper reports that dataset, model and method) and ``source`` (the paper table, "" when none);
    see :func:`paper_match`. The CPU study (Fashion-MNIST, ``vit_cpu``) matches nothing."""
    paper_df = paper_results() if paper_df is None else paper_df
    out = df_ours.copy()
    top1, source = [], []
    for row in df_ours.itertuples(index=False):
        hit = paper_match(paper_df, str(row.dataset), str(row.model), str(row.method))
        top1.append(float("nan") if hit is None else float(hit["top1"]))
        source.append("" if hit is None else str(hit["source"]))
    out[PAPER_TOP1] = pd.Series(top1, index=out.index, dtype=float)
    out[PAPER_SOURCE] = pd.Series(source, index=out.index, dtype=object)
    return out


def _fmt_top1(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else f"{v:.1f}"


def paper_pivot(paper_df: pd.DataFrame | None = None, sources: Sequence[str] | None = None) -> pd.DataFrame:
    """A compact view: one row per (source, dataset, model), one column per method label, the
    top-1 as printed (the first number when a table has two for one cell); ``sources`` selects
    tables (default: all), in file order."""
    df = paper_results() if paper_df is None else paper_df
    if sources is not None:
        df = df[df["source"].isin(list(sources))]
    df = df.drop_duplicates(["source", "dataset", "model", "method"])
    order = {k: i for i, k in enumerate(dict.fromkeys(zip(df["source"], df["dataset"], df["model"])))}
    methods = list(dict.fromkeys(df["method"]))
    table = df.pivot(index=["source", "dataset", "model"], columns="method", values="top1")
    table = table.reindex(columns=methods)
    table = table.iloc[sorted(range(len(table)), key=lambda i: order[table.index[i]])]
    return table.map(lambda v: "" if pd.isna(v) else _fmt_top1(float(v)))


#: the main results table of each paper (for a short README section)
MAIN_TABLES: tuple[str, ...] = ("TransMix suppl. Table 2", "TokenMix Table 1", "TokenMixup Table 1", "SMMix Table 1",
                                "TL-Align Table 1", "MixPro abstract")


def paper_table_markdown(paper_df: pd.DataFrame | None = None, sources: Sequence[str] | None = None) -> str:
    """The paper-reported numbers as markdown, one table per source (paper table) in file order,
    with a short legend (for ``figures/paper_results.md`` and the README); ``sources`` selects
    tables (default: all; :data:`MAIN_TABLES` for a short version)."""
    df = paper_results() if paper_df is None else paper_df
    if sources is not None:
        df = df[df["source"].isin(list(sources))]
    parts = ["Top-1 accuracy (%) as printed in the papers' tables (ImageNet-1k unless the dataset says "
             "otherwise; 300-epoch GPU recipes, CIFAR for TokenMixup's CCT and TL-Align's transfer). "
             "Copied from the paper texts, not reproduced here: the CPU study (Fashion-MNIST, `vit_cpu`, a "
             "few epochs) shares no dataset or model with them, so its numbers are not comparable. "
             "`method` is this package's run label (`name[variant]{arguments}`); the paper's baseline "
             "rows map to `cutmix` or `mixup_cutmix` as the notes explain. `pvt_* (v1)` is PVT v1, which "
             "timm does not provide (it has PVT v2).\n"]
    for source in dict.fromkeys(df["source"]):
        sel = df[df["source"] == source]
        view = pd.DataFrame({"dataset": sel["dataset"], "model": sel["model"], "method": sel["method"],
                             "top-1 (%)": [_fmt_top1(float(v)) for v in sel["top1"]], "notes": sel["notes"]})
        parts.append(f"### {source} ({sel['paper'].iloc[0]})\n\n" + markdown_table(view, right=("top-1 (%)",)))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# accuracy vs training cost

def spread_positions(values: Sequence[float], gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Move 1-D label positions apart: the result keeps the order of ``values``, neighbours are at
    least ``gap`` apart, each moves as little as this greedy two-pass rule allows, and all lie in
    ``[lo, hi]`` when ``len(values) * gap <= hi - lo`` (otherwise the column is centred on the range).

    Returns:
        The new positions, in the order of ``values``.
    Raises:
        ValueError: ``gap`` is negative or ``hi < lo``.
    """
    if gap < 0 or hi < lo:
        raise ValueError(f"need gap >= 0 and lo <= hi, got gap={gap}, lo={lo}, hi={hi}")
    order = sorted(range(len(values)), key=lambda i: values[i])
    pos = [min(max(float(values[i]), lo), hi) for i in order]
    for k in range(1, len(pos)):  # push up
        pos[k] = max(pos[k], pos[k - 1] + gap)
    if pos and pos[-1] > hi:  # then pull down from the top
        pos[-1] = hi
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
    if pos and pos[0] < lo:  # too many labels for the range: centre the column on it
        shift = (lo + hi) / 2 - (pos[0] + pos[-1]) / 2
        pos = [p + shift for p in pos]
    out = [0.0] * len(values)
    for k, i in enumerate(order):
        out[i] = pos[k]
    return out


def plot_accuracy_vs_time(df: pd.DataFrame, title: str | None = None, save: str | Path | None = None) -> Figure:
    """Final test top-1 (mean ± std over seeds) against the training time per epoch relative to
    CutMix, one labelled point per row of a :func:`results_table` (SMMix Figure 1 style).

    Rows without a relative time (no CutMix run on the same model and dataset) are left out.
    Dotted lines: CutMix's cost (1×) and accuracy. When the rows span several (model, dataset)
    pairs, the labels name them.

    Returns:
        The Figure; its axes hold one errorbar container per plotted row, labelled by the method.
    Raises:
        ValueError: no row has a finite relative time and accuracy.
    """
    ok = df[np.isfinite(df["rel_time_vs_cutmix"].astype(float)) & np.isfinite(df["top1_mean"].astype(float))]
    if ok.empty:
        raise ValueError("no result row has a time relative to CutMix (train CutMix on the same model and dataset)")
    groups = list(dict.fromkeys(zip(ok["model"], ok["dataset"])))
    fig, ax = plt.subplots(figsize=(7.6, 4.6))
    colours = plt.get_cmap("tab10")
    points: list[tuple[float, float, str, Any]] = []
    for i, row in enumerate(ok.itertuples(index=False)):
        label = str(row.method) if len(groups) == 1 else f"{row.method} ({row.model}, {row.dataset})"
        std = float(row.top1_std)
        x, y = float(row.rel_time_vs_cutmix), float(row.top1_mean)
        ax.errorbar([x], [y], yerr=None if math.isnan(std) else [[std], [std]], fmt="o", ms=6, capsize=3,
                    color=colours(i % 10), label=label)
        points.append((x, y, f"{label} (n={int(row.n_seeds)})", colours(i % 10)))
    ax.axvline(1.0, color="0.6", ls=":", lw=1)
    for model, dataset in groups:
        ref = ok[(ok["model"] == model) & (ok["dataset"] == dataset) & (ok["method"] == REFERENCE_METHOD)]
        if len(ref):
            ax.axhline(float(ref["top1_mean"].iloc[0]), color="0.6", ls=":", lw=1)
    xs = ok["rel_time_vs_cutmix"].astype(float)
    pad = max(0.05, 0.08 * float(xs.max() - xs.min()))
    ax.set_xlim(float(xs.min()) - pad, float(xs.max()) + pad)
    ax.set(xlabel="training time per epoch relative to CutMix (×)",
           ylabel="final test top-1 (%), mean ± std over seeds")
    if title is None:
        title = ("accuracy vs training cost" if len(groups) > 1
                 else f"accuracy vs training cost: {groups[0][0]} on {groups[0][1]}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # Labels in a column right of the axes, in the points' vertical order, pushed apart so that
    # none overlap, each joined to its point by a thin leader line. Placed after the layout is
    # fixed; savefig(bbox_inches="tight") makes room for them.
    fig.canvas.draw()  # fixes the layout and the y limits (the error bars included)
    to_axes = ax.transAxes.inverted().transform
    ys_axes = [float(to_axes(ax.transData.transform((x, y)))[1]) for x, y, _, _ in points]
    gap = 9.0 / (ax.bbox.height * 72.0 / fig.dpi)  # one 7-pt line plus leading, in axes fraction
    for (x, y, text, colour), y_label in zip(points, spread_positions(ys_axes, gap)):
        ax.annotate(text, xy=(x, y), xycoords="data", xytext=(1.03, y_label), textcoords="axes fraction",
                    fontsize=7, va="center", color="0.1", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.6, alpha=0.7, shrinkA=0, shrinkB=4))
    if save is not None:
        save_figure(fig, save)
    return fig


# ---------------------------------------------------------------------------------------------
# gallery

def _gallery_method(label: str, num_classes: int, with_teacher: bool) -> tuple[MixMethod, str]:
    """(method, note) for one gallery row: the method's own mask (its ``display_kwargs``), and its
    ``fallback_kwargs`` when it reads teacher maps that are not there."""
    name, variant, kwargs = parse_label(label)
    cls = methods.method_class(name)
    kw = {**cls.display_kwargs, **_typed(name, kwargs), **({"variant": variant} if variant else {})}
    method = methods.get(name, num_classes=num_classes, **kw)
    if method.needs.teacher_maps and not with_teacher:
        method = methods.get(name, num_classes=num_classes, **{**kw, **cls.fallback_kwargs})
        return method, method.describe() + " (no teacher cache found)"
    return method, method.describe()


def _outline(ax: plt.Axes, mask: np.ndarray, up: int = 8) -> None:
    """Outline the region where ``mask`` (H, W) > 0.5 along pixel edges (the mask is upsampled
    ``up`` times so the contour follows the pixel borders instead of cutting corners)."""
    h, w = mask.shape
    m = np.repeat(np.repeat(mask, up, axis=0), up, axis=1)
    xs = (np.arange(w * up) + 0.5) / up - 0.5
    ys = (np.arange(h * up) + 0.5) / up - 0.5
    ax.contour(xs, ys, m, levels=[0.5], colors="tab:red", linewidths=0.7)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def plot_gallery(images: Tensor | np.ndarray, labels: Tensor | Sequence[int], methods: Sequence[str] = GALLERY_METHODS,
                 n: int = 6, seed: int = 0, num_classes: int = 10, class_names: Sequence[str] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, model: str = "vit_cpu",
                 maps: Any = None, index: Tensor | Sequence[int] | None = None, title: str | None = None,
                 save: str | Path | None = None) -> Figure:
    """Each method's mixed images of the same batch: one row per method, one column per image,
    titled by the soft target's two largest classes and weights; the partner's tokens outlined (red).

    Every method gets a freshly created, untrained ``model`` (``method.prepare_model`` records the
    token grid; SMMix uses it for its saliency) and the same seed before ``mix``. Methods that switch
    with Mixup show their own branch (``switch_prob=1``). TokenMix uses teacher targets when ``maps``
    (the :class:`~tokenmix.methods.teacher_maps.TeacherMaps` of the split the images come from) and ``index``
    (their indices in that split) are given, else the area target. TransMix, TL-Align, SMMix and
    TokenMixup decide (part of) their label in the forward pass; the titles show the target ``mix``
    returns (the area target).

    Args:
        images: (B, C, H, W) normalised images (B >= 2); labels: (B,) classes.
        methods: method labels (``name[variant]{k=v,...}``), one row each.
        n: images shown (the first n; partners are paired within them).
        seed: the torch seed before each model creation and each ``mix``.
        num_classes, class_names: the label space and its names.
        mean, std: the normalisation to undo (None: min-max per image).
        model: the model name for :func:`tokenmix.models.create_model`.
        title, save: figure title; path stem for PNG + SVG.
    Returns:
        The Figure with ``len(methods) * n`` image axes.
    """
    x = _tensor(images)
    y = torch.as_tensor(_tensor(labels)).long()
    n = max(2, min(n, x.shape[0]))
    x, y = x[:n].contiguous(), y[:n]
    if not methods:
        raise ValueError("no methods to show")
    meta = None
    if maps is not None and index is not None:
        idx = torch.as_tensor(index, dtype=torch.long)[:n]
        meta = {"index": idx, "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1),
                "flip": torch.zeros(n, dtype=torch.bool)}
    rows = []
    for label in methods:
        method, note = _gallery_method(label, num_classes, meta is not None)
        torch.manual_seed(seed)
        net = create_model(model, num_classes, int(x.shape[-1]), int(x.shape[1]))
        net = method.prepare_model(net).eval()
        if method.needs.teacher_maps:
            method.maps = maps
        torch.manual_seed(seed)
        with torch.no_grad():
            mixed = method.mix(x, y, meta)
        rows.append((label, note, mixed, method.grid))
    imgs_all = [unnormalize(m.x, mean, std) for _, _, m, _ in rows]
    cell = 1.25
    fig, axes = plt.subplots(len(rows), n, squeeze=False, figsize=(cell * n + 2.2, cell * 1.25 * len(rows) + 0.5))
    for r, ((label, note, mixed, grid), imgs) in enumerate(zip(rows, imgs_all)):
        target = _tensor(mixed.target)
        pmask = token_map_to_pixels(mixed.partner_mask, grid) if grid is not None else None
        for c in range(n):
            ax = axes[r, c]
            _imshow(ax, imgs[c])
            if pmask is not None and mixed.kind != "mixup" and pmask[c].min() < 0.5 < pmask[c].max():
                _outline(ax, pmask[c])
            w, k = target[c].topk(min(2, target.shape[1]))
            ax.set_title("\n".join(f"{_class_name(int(j), class_names)} {float(v):.2f}" for v, j in zip(w, k)),
                         fontsize=6)
        axes[r, 0].set_ylabel(label + "\n" + "\n".join(textwrap.wrap(note, 24)), rotation=0, ha="right",
                              va="center", fontsize=7, labelpad=4)
    fig.suptitle(title or "the same images mixed by each method (seed fixed; titles: the soft target's top 2 "
                          "classes; red: the partner's tokens)", fontsize=9)
    fig.tight_layout()
    if save is not None:
        save_figure(fig, save)
    return fig


def gallery_batch(data_dir: str | Path = "data", n: int = 6) -> tuple[Tensor, Tensor, Tensor, Any] | None:
    """The gallery's images from the local Fashion-MNIST test split: the first test image of each
    of the classes 0 .. n-1, normalised, with their labels, their indices in the split and the
    dataset info; None when the split is not available locally (nothing is downloaded)."""
    try:
        x, y, idx = load_split("fashion_mnist", 28, False, data_dir, download=False)
    except (OSError, RuntimeError, ValueError):
        return None
    info = dataset_info("fashion_mnist")
    pick = []
    for k in range(min(n, info.num_classes)):
        hits = (y == k).nonzero().flatten()
        if len(hits):
            pick.append(int(hits[0]))
    if len(pick) < 2:
        return None
    pick_t = torch.tensor(pick)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    images = (x[pick_t].float() / 255.0 - mean) / std
    return images, y[pick_t], idx[pick_t], info


def gallery_teacher_maps(data_dir: str | Path = "data") -> Any:
    """The teacher cache of the Fashion-MNIST **test** split (TokenMix's targets for the gallery),
    or None when it is missing or stale (never built here: building takes about 30 s)."""
    try:
        return load_teacher_maps("fashion_mnist", 28, "cnn_small", "test", data_dir)
    except Exception:  # noqa: BLE001 - a missing/stale/unreadable cache only means area targets
        return None


# ---------------------------------------------------------------------------------------------
# the report files

def _time_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[np.isfinite(df["rel_time_vs_cutmix"].astype(float))]


def write_study_figures(runs_dir: str | Path, figures_dir: str | Path, data_dir: str | Path = "data") -> list[Path]:
    """Write the study files into ``figures_dir``; returns the paths written or already current.

    - ``accuracy_vs_time.{png,svg}``: when the complete runs under ``runs_dir`` hold at least two
      methods with a time relative to CutMix (CutMix itself included) on one model and dataset.
    - ``gallery.{png,svg}``: when the Fashion-MNIST test split is available locally
      (:func:`gallery_batch`); TokenMix with teacher targets when the test-split cache exists.
    - ``paper_results.md``: always.

    Same records and data -> same bytes (files are rewritten only when they change).
    """
    out = Path(figures_dir)
    paths: list[Path] = []
    runs = [r for r in list_runs(runs_dir) if r.complete]
    if runs:
        df = _time_rows(results_table(runs))
        if len(df) >= 2 and (df["method"] == REFERENCE_METHOD).any():
            fig = plot_accuracy_vs_time(df)
            try:
                paths += save_figure(fig, out / "accuracy_vs_time")
            finally:
                plt.close(fig)
    batch = gallery_batch(data_dir)
    if batch is not None:
        images, labels, index, info = batch
        maps = gallery_teacher_maps(data_dir)
        fig = plot_gallery(images, labels, n=len(labels), class_names=info.classes, mean=info.mean, std=info.std,
                           maps=maps, index=index)
        try:
            paths += save_figure(fig, out / "gallery")
        finally:
            plt.close(fig)
    md = "# Paper-reported results\n\n" + paper_table_markdown()
    write_if_changed(out / "paper_results.md", md.encode())
    paths.append(out / "paper_results.md")
    return paths


# ---------------------------------------------------------------------------------------------
# notebook helpers

def complete_runs(runs_dir: str | Path) -> list[Run]:
    """The complete run records under ``runs_dir``."""
    return [r for r in list_runs(runs_dir) if r.complete]


def load_fidelity(figures_dir: str | Path) -> pd.DataFrame | None:
    """``<figures_dir>/label_fidelity.csv`` (written by ``tokenmix.report.fidelity``) or None."""
    path = Path(figures_dir) / "label_fidelity.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def plot_fidelity_if_available(df: pd.DataFrame) -> Figure | None:
    """``tokenmix.report.fidelity.plot_fidelity(df)``, or None when it cannot plot this table."""
    try:
        return plot_fidelity(df)
    except (KeyError, ValueError, TypeError):
        return None


__all__ = ["GALLERY_METHODS", "MAIN_TABLES", "PAPER_COLUMNS", "PAPER_RESULTS_CSV",
           "PAPER_SOURCE", "PAPER_TOP1", "STUDY_OUTPUTS", "complete_runs", "gallery_batch",
           "gallery_teacher_maps",
           "load_fidelity", "paper_match", "paper_pivot", "paper_results", "paper_table_markdown", "parse_label",
           "plot_accuracy_vs_time", "plot_fidelity_if_available", "plot_gallery", "results_with_paper", "write_study_figures"]
