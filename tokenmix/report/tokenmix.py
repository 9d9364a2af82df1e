"""TokenMix figures (notebook ``02_tokenmix``) and the occlusion-robustness report figure.

- :func:`plot_masks` - block vs random vs CutMix masks on the token grid and the mixed images;
- :func:`show_map_alignment` - a teacher map carried through the crop and flip of an augmented image;
- :func:`plot_teacher_targets` - the paper's Figure 6: images, their ground-truth-class teacher
  maps on the token grid (the part Eq. 2 counts highlighted), the mixed image, and the TokenMix
  target against CutMix's area target;
- :func:`plot_count_statistics` - partner-token counts of the ``official`` and ``paper`` masks;
- :func:`plot_occlusion` - the paper's Figure 5: top-1 accuracy against the share of dropped patches;
- :func:`write_tokenmix_occlusion` - ``figures/tokenmix_occlusion.{png,svg,csv}`` from complete
  CutMix and TokenMix runs (called by ``python -m tokenmix report``).

Plus :func:`occlusion_test_set`; the notebook's teacher cache and runs come from
:func:`tokenmix.analysis.experiments.open_teacher_maps` and
:func:`~tokenmix.analysis.experiments.occlusion_runs` (the report trains nothing). Every lambda here is the **own** share (the package's convention).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from tokenmix import methods
from tokenmix.analysis.probes import OCCLUSION_RATIOS, black_level, occlusion_accuracy
from tokenmix.analysis.records import cached_measurement
from tokenmix.data import dataset_info, load_split
from tokenmix.methods.base import MixedBatch, TokenGrid
from tokenmix.methods.tokenmix import TokenMix, official_token_count, paper_token_count
from tokenmix.report.figures import (ArrayLike, _class_name, _draw_token_grid, _finish, _imshow, _tensor, save_figure,
                                     token_map_to_pixels, unnormalize, write_if_changed)
from tokenmix.report.tables import method_label
from tokenmix.report.transmix import OWN_COLOUR, PARTNER_COLOUR, _draw_box
from tokenmix.train.engine import load_model
from tokenmix.train.runs import CHECKPOINT, Run, list_runs

#: line colours of the methods (the paper's Figures 4-6: TokenMix red, CutMix green)
#: the official 14x14 grid (224 px, patch 16) and the CPU preset's 7x7 grid (28 px, patch 4)
GRID_14, GRID_7 = TokenGrid(14, 14, 16, 16), TokenGrid(7, 7, 4, 4)
#: TokenMix settings compared by :func:`mask_count_statistics` (keyword arguments of TokenMix)
COUNT_VARIANTS: dict[str, dict[str, Any]] = {
    "official": {"variant": "official"},
    "paper, λ = 0.5": {"variant": "paper"},
    "paper, λ ~ Beta(1, 1)": {"variant": "paper", "tokenmix_alpha": 1.0},
}
COUNT_COLOURS = {"official": "tab:red", "paper, λ = 0.5": "tab:green", "paper, λ ~ Beta(1, 1)": "0.6"}
#: files written by :func:`write_tokenmix_occlusion`
OCCLUSION_OUTPUTS: tuple[str, ...] = ("tokenmix_occlusion.png", "tokenmix_occlusion.svg", "tokenmix_occlusion.csv")
OCCLUSION_METHODS: tuple[str, ...] = ("cutmix", "tokenmix")


# ---------------------------------------------------------------------------------------------
# plumbing for the notebook and the report


def occlusion_test_set(dataset: str = "fashion_mnist", img_size: int = 28, n_images: int = 2000,
                       data_dir: str | Path = "data", download: bool = True) -> tuple[Tensor, Tensor, Any]:
    """A fixed random subset of the test split (:func:`tokenmix.data.subset_indices`, seed 0),
    normalised as the test transform does: ((B, C, H, W) float32, (B,) labels, DatasetInfo)."""
    info = dataset_info(dataset)
    x, y, _ = load_split(dataset, img_size, False, data_dir, download, subset=n_images)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (x.float() - mean) / std, y, info


def occlusion_curves(models: Mapping[str, nn.Module | str | Path], images: Tensor, labels: Tensor,
                     ratios: Sequence[float] = OCCLUSION_RATIOS, fill: Tensor | float = 0.0, seed: int = 0,
                     batch_size: int = 256, grid: TokenGrid | None = None) -> dict[str, dict[float, float]]:
    """:func:`tokenmix.analysis.probes.occlusion_accuracy` of every model (or run folder, loaded with
    :func:`tokenmix.train.engine.load_model`) on the same occlusions: {name: {ratio: top-1 %}}. The patches are
    those of ``grid`` (default: each model's own token grid)."""
    out = {}
    for name, m in models.items():
        model = m if isinstance(m, nn.Module) else load_model(m)[0]
        out[name] = occlusion_accuracy(model, images, labels, grid or TokenGrid.from_model(model), ratios, fill,
                                       seed, batch_size)
    return out


def teacher_mix(x: Tensor, y: Tensor, meta: Mapping[str, Tensor], maps: Any, grid: TokenGrid,
                num_classes: int = 10, **tokenmix_kwargs: Any) -> MixedBatch:
    """One TokenMix batch (never the Mixup branch) with teacher targets, from a batch of the
    training set built with ``train_meta=True``. ``maps``: the training split's
    :class:`~tokenmix.methods.teacher_maps.TeacherMaps`; ``tokenmix_kwargs``: e.g. ``variant``, ``mask``."""
    method = TokenMix(num_classes, switch_prob=1.0, **tokenmix_kwargs)
    method.grid, method.maps = grid, maps
    return method.mix(x, y, dict(meta))


def alignment_views(dataset: Any, maps: Any, y: Tensor, meta: Mapping[str, Tensor], grid: TokenGrid,
                    clamp_negative: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs of :func:`show_map_alignment` for a batch ``(x, y, meta)`` of an in-memory
    training set built with ``train_meta=True``: the stored (un-augmented) images, normalised as
    the dataset's transform does, (B, C, H, W); their stored ground-truth-class maps (B, h, w);
    and the maps aligned to the batch's crops and flips on ``grid``, normalised (B, N)."""
    idx = meta["index"].long()
    src_index = dataset.source_index
    pos = torch.searchsorted(src_index, idx)
    if bool((pos >= len(src_index)).any()) or not bool((src_index[pos.clamp_max(len(src_index) - 1)] == idx).all()):
        raise ValueError("the batch's sample indices are not in this dataset")
    tf = dataset.transform
    source = (dataset.images[pos].float() - tf.mean) / tf.std
    stored = maps.ground_truth_maps(idx, y)
    aligned = maps.token_maps(idx, y, meta["box"], meta["flip"], grid.rows, grid.cols, clamp_negative)
    return source, stored, aligned


def mask_examples(x: Tensor, y: Tensor, grid: TokenGrid, seed: int = 0, num_classes: int = 10,
                  variant: str = "official") -> dict[str, MixedBatch]:
    """The same batch mixed with TokenMix's block mask, its random mask (area labels) and
    CutMix's box, each from ``torch.manual_seed(seed)``: {"block": ..., "random": ..., "cutmix": ...}."""
    out = {}
    for mask in ("block", "random"):
        torch.manual_seed(seed)
        m = TokenMix(num_classes, variant=variant, mask=mask, labels="area", switch_prob=1.0)
        m.grid = grid
        out[mask] = m.mix(x, y)
    torch.manual_seed(seed)
    cm = methods.get("cutmix", num_classes=num_classes)
    cm.grid = grid
    out["cutmix"] = cm.mix(x, y)
    return out


# ---------------------------------------------------------------------------------------------
# figures: masks and teacher targets

def plot_masks(x: ArrayLike, mixed: Mapping[str, MixedBatch], grid: TokenGrid, sample: int = 0,
               class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, title: str | None = None,
               save: str | Path | None = None) -> Figure:
    """Masks side by side for one pair of images.

    Column 0: image A (own, ``x[sample]``) above image B (its partner). Then one column per entry
    of ``mixed`` (e.g. :func:`mask_examples`): the partner share of each token over the grid
    (titled with the count of pasted tokens), and the mixed image (titled with the own share of
    the area, λ).

    Args:
        x: (B, C, H, W) the clean batch; mixed: {name: MixedBatch of that batch}.
        grid: the token grid; sample: which sample; class_names, mean, std, title, save: as usual.
    Returns:
        The Figure: ``2 * (1 + len(mixed))`` axes plus a colour bar.
    """
    batches = list(mixed.items())
    if not batches:
        raise ValueError("nothing to plot: no mixed batches")
    first = batches[0][1]
    partner = int(_tensor(first.partner_index).long()[sample])
    xa = unnormalize(_tensor(x)[[sample, partner]], mean, std)
    y = _tensor(first.y).long().tolist()
    fig, axes = plt.subplots(2, 1 + len(batches), figsize=(2.1 * (1 + len(batches)) + 0.6, 4.6), squeeze=False)
    _imshow(axes[0, 0], xa[0])
    axes[0, 0].set_title(f"A (own): {_class_name(y[sample], class_names)}", fontsize=8)
    _imshow(axes[1, 0], xa[1])
    axes[1, 0].set_title(f"B (partner): {_class_name(y[partner], class_names)}", fontsize=8)
    heat = None
    for j, (name, m) in enumerate(batches, start=1):
        pm = _tensor(m.partner_mask)[sample]
        heat = axes[0, j].imshow(token_map_to_pixels(pm, grid)[0], cmap="magma", vmin=0, vmax=1,
                                 interpolation="nearest")
        _draw_token_grid(axes[0, j], grid)
        axes[0, j].set_xticks([])
        axes[0, j].set_yticks([])
        whole = int((pm >= 1 - 1e-6).sum())
        part = int(((pm > 1e-6) & (pm < 1 - 1e-6)).sum())
        axes[0, j].set_title(f"{name}\n{whole}" + (f" + {part} partly" if part else "")
                             + f" of {grid.num_tokens} tokens pasted", fontsize=7)
        _imshow(axes[1, j], unnormalize(m.x[sample], mean, std)[0])
        _draw_box(axes[1, j], m.extras.get("box"))
        axes[1, j].set_title(f"mixed, λ = {float(_tensor(m.lam_area)[sample]):.2f}", fontsize=8)
    if heat is not None:
        fig.colorbar(heat, ax=list(axes[0, 1:]), fraction=0.03, pad=0.02).set_label("partner share", fontsize=7)
    fig.suptitle(title or "partner tokens (top) and the mixed image (bottom); λ = own share of the area",
                 fontsize=9)
    return _finish(fig, save)


def _excluded_overlay(ax: plt.Axes, share: Tensor, grid: TokenGrid, alpha: float = 0.7) -> None:
    """Darken and hatch the tokens Eq. 2 does not count (``share`` (N,) in [0, 1]: how much of
    each token is not counted; partly counted tokens are darkened in proportion)."""
    v = _tensor(share).reshape(grid.rows, grid.cols)
    for r in range(grid.rows):
        for c in range(grid.cols):
            a = float(v[r, c])
            if a <= 1e-6:
                continue
            ax.add_patch(Rectangle((c * grid.patch_w - 0.5, r * grid.patch_h - 0.5), grid.patch_w, grid.patch_h,
                                   facecolor=(0, 0, 0, alpha * a), edgecolor=(0.8, 0.8, 0.8, a), lw=0,
                                   hatch="////" if a >= 0.5 else None))


def _show_map(ax: plt.Axes, m: Tensor, grid: TokenGrid, cmap: str = "inferno"):
    pix = token_map_to_pixels(m, grid)[0]
    im = ax.imshow(pix, cmap=cmap, vmin=0, vmax=max(float(pix.max()), 1e-12), interpolation="nearest")
    _draw_token_grid(ax, grid)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_teacher_targets(x: ArrayLike, mixed: MixedBatch, grid: TokenGrid, n: int = 4,
                         class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, title: str | None = None,
                         save: str | Path | None = None) -> Figure:
    """TokenMix Figure 6: teacher-map targets against CutMix's area targets, one column per sample.

    Rows: image A (own, the augmented crop), A's ground-truth-class teacher map on the token grid
    (aligned with the crop and flip, normalised to sum 1) with the pasted-over tokens darkened and
    hatched, so the mass left open is y_own; the same for the partner B with the tokens *not*
    pasted hatched (the mass left open is y_partner); the mixed image; and two bars: CutMix's area target (own λ blue,
    partner 1 - λ orange) and TokenMix's Eq. 2 masses (y_own blue, y_partner orange).

    Args:
        x: (B, C, H, W) the clean (augmented) batch; mixed: a TokenMix batch with teacher labels
            (``extras`` holds ``own_maps``, ``y_own``, ``y_partner``; see :func:`teacher_mix`).
        grid: the token grid; n: samples; class_names, mean, std, title, save: as usual.
    Returns:
        The Figure: ``6 * n`` axes.
    """
    for k in ("own_maps", "y_own", "y_partner"):
        if k not in mixed.extras:
            raise ValueError(f"mixed.extras has no {k!r}: pass a TokenMix batch with labels='teacher' "
                             "(tokenmix.report.teacher_mix)")
    b = mixed.x.shape[0]
    n = max(1, min(n, b))
    idx = _tensor(mixed.partner_index).long()
    maps = _tensor(mixed.extras["own_maps"])
    pm = _tensor(mixed.partner_mask)
    y_own, y_par = _tensor(mixed.extras["y_own"]), _tensor(mixed.extras["y_partner"])
    lam = _tensor(mixed.lam_area)
    xs = _tensor(x)
    y = _tensor(mixed.y).long().tolist()
    fig, axes = plt.subplots(6, n, figsize=(1.75 * n + 0.4, 9.4), squeeze=False,
                             gridspec_kw={"height_ratios": (1, 1, 1, 1, 1, 0.55)})
    for i in range(n):
        j = int(idx[i])
        col = axes[:, i]
        _imshow(col[0], unnormalize(xs[i], mean, std)[0])
        col[0].set_title(f"A: {_class_name(y[i], class_names)}", fontsize=7)
        _show_map(col[1], maps[i], grid)
        _excluded_overlay(col[1], pm[i], grid)
        col[1].set_title(f"A's map, kept: y_own = {float(y_own[i]):.2f}", fontsize=6.5)
        _imshow(col[2], unnormalize(xs[j], mean, std)[0])
        col[2].set_title(f"B: {_class_name(y[j], class_names)}", fontsize=7)
        _show_map(col[3], maps[j], grid)
        _excluded_overlay(col[3], 1 - pm[i], grid)
        col[3].set_title(f"B's map, pasted: y_par = {float(y_par[i]):.2f}", fontsize=6.5)
        _imshow(col[4], unnormalize(mixed.x[i], mean, std)[0])
        _draw_box(col[4], mixed.extras.get("box"))
        col[4].set_title(f"mixed ({mixed.kind})", fontsize=7)
        ax = col[5]
        rows = (("CutMix area", float(lam[i]), 1 - float(lam[i])),
                ("TokenMix Eq. 2", float(y_own[i]), float(y_par[i])))
        for r, (_, own, par) in enumerate(rows):
            ax.barh(r, own, color=OWN_COLOUR)
            ax.barh(r, par, left=own, color=PARTNER_COLOUR)
            ax.text(0.02, r, f"{own:.2f} | {par:.2f}", va="center", ha="left", fontsize=6, color="white")
        ax.set_yticks(range(len(rows)), [r[0] for r in rows] if i == 0 else [], fontsize=6)
        ax.set_xlim(0, max(1.0, max(r[1] + r[2] for r in rows)))
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=6)
        if i == 0:
            for r, name in enumerate(("A", "A's teacher map", "B", "B's teacher map", "mixed")):
                axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title or "TokenMix targets from teacher maps (Eq. 2) vs CutMix's area target: own share "
                          "blue, partner share orange; hatched tokens are not counted", fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


def show_map_alignment(source: ArrayLike, stored: ArrayLike, augmented: ArrayLike, aligned: ArrayLike,
                       grid: TokenGrid, flip: ArrayLike | None = None, labels: ArrayLike | None = None,
                       class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, n: int = 4, title: str | None = None,
                       save: str | Path | None = None) -> Figure:
    """A teacher map follows the augmentation: per sample (column), the stored image, its stored
    ground-truth-class map (the cache's h x w logits, clamped at 0), the augmented crop the model
    sees, and the map aligned to that crop on the token grid
    (:meth:`~tokenmix.methods.teacher_maps.TeacherMaps.token_maps`).

    Args:
        source: (B, C, H, W) the stored images (normalised); stored: (B, h, w) their maps;
        augmented: (B, C, H, W) the augmented images; aligned: (B, N) the aligned token maps.
        flip: (B,) flags for the titles; labels: (B,) classes for the titles.
    Returns:
        The Figure: ``4 * n`` axes.
    """
    n = max(1, min(n, len(_tensor(source))))
    src, aug = unnormalize(_tensor(source)[:n], mean, std), unnormalize(_tensor(augmented)[:n], mean, std)
    st, al = _tensor(stored)[:n].clamp_min(0), _tensor(aligned)[:n]
    flips = None if flip is None else _tensor(flip).bool().tolist()
    labs = None if labels is None else _tensor(labels).long().tolist()
    fig, axes = plt.subplots(4, n, figsize=(1.7 * n + 0.4, 7.0), squeeze=False)
    h, w = src.shape[1:3]
    for i in range(n):
        _imshow(axes[0, i], src[i])
        if labs is not None:
            axes[0, i].set_title(_class_name(labs[i], class_names), fontsize=7)
        axes[1, i].imshow(st[i].numpy(), cmap="inferno", interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
        _imshow(axes[2, i], aug[i])
        if flips is not None:
            axes[2, i].set_title("cropped, flipped" if flips[i] else "cropped", fontsize=7)
        _show_map(axes[3, i], al[i], grid)
    for r, name in enumerate(("stored image", "stored map", "augmented", "aligned map")):
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title or "teacher maps follow the crop and the flip", fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


# ---------------------------------------------------------------------------------------------
# mask-count statistics

def sample_mask_counts(grid: TokenGrid, n_draws: int = 1000, seed: int = 0, **tokenmix_kwargs: Any) -> np.ndarray:
    """Partner tokens of ``n_draws`` TokenMix masks (:meth:`TokenMix.sample_mask`) on ``grid``:
    (n_draws,) int. ``tokenmix_kwargs``: e.g. ``variant``, ``mask``, ``tokenmix_alpha``."""
    m = TokenMix(10, labels="area", **tokenmix_kwargs)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return np.array([int(m.sample_mask(grid).sum()) for _ in range(n_draws)])
    finally:
        torch.random.set_rng_state(gen_state)


def mask_count_statistics(grids: Sequence[TokenGrid] = (GRID_14, GRID_7),
                          variants: Mapping[str, Mapping[str, Any]] = COUNT_VARIANTS, n_draws: int = 1000,
                          seed: int = 0) -> dict[TokenGrid, dict[str, np.ndarray]]:
    """:func:`sample_mask_counts` of every variant on every grid: {grid: {variant: counts}}."""
    return {g: {name: sample_mask_counts(g, n_draws, seed, **kw) for name, kw in variants.items()} for g in grids}


def _grid_label(g: TokenGrid) -> str:
    return f"{g.rows}x{g.cols}"


def mask_count_table(counts: Mapping[TokenGrid, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """One row per grid and variant: the mean / min / max partner-token count, the share of draws
    at the most frequent count, and the mean partner share of the tokens."""
    rows = []
    for g, per in counts.items():
        for name, c in per.items():
            vals, freq = np.unique(c, return_counts=True)
            rows.append({"grid": _grid_label(g), "variant": name, "tokens": g.num_tokens, "mean": c.mean(),
                         "min": int(c.min()), "max": int(c.max()), "mode": int(vals[freq.argmax()]),
                         "share at mode": freq.max() / len(c), "partner share": c.mean() / g.num_tokens})
    return pd.DataFrame(rows).round(3)


def plot_count_statistics(counts: Mapping[TokenGrid, Mapping[str, np.ndarray]], mask_ratio: float = 0.5,
                          title: str | None = None, save: str | Path | None = None) -> Figure:
    """Histograms of partner-token counts, one panel per grid, one colour per variant, with the
    official formula min(N, floor(0.5 N) + m) (red dashed) and the paper's floor(λ N) at
    λ = ``mask_ratio`` (green dotted) marked.

    Args:
        counts: from :func:`mask_count_statistics`.
    Returns:
        The Figure: one axes per grid.
    """
    fig, axes = plt.subplots(1, len(counts), figsize=(5.2 * len(counts), 3.6), squeeze=False)
    for ax, (g, per) in zip(axes[0], counts.items()):
        n = g.num_tokens
        bins = np.arange(-0.5, n + 1.5, 1 if n <= 64 else 2)
        for name, c in per.items():
            ax.hist(c, bins=bins, alpha=0.55, color=COUNT_COLOURS.get(name), label=f"{name} (mean {c.mean():.1f})")
        off, pap = official_token_count(n, mask_ratio), paper_token_count(n, mask_ratio)
        ax.axvline(off, color="tab:red", ls="--", lw=1.2, label=f"official formula: {off}")
        ax.axvline(pap, color="tab:green", ls=":", lw=1.5, label=f"paper floor(λN), λ = {mask_ratio:g}: {pap}")
        ax.set(xlabel=f"partner tokens of {n}", ylabel="draws", title=f"{_grid_label(g)} grid", xlim=(-0.5, n + 0.5))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "TokenMix block masks: how many partner tokens a batch gets", fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)


# ---------------------------------------------------------------------------------------------
# occlusion robustness (Figure 5)

#: colours of curves that are not a plain method (variants, method_kwargs), in order of appearance
OTHER_COLOURS = ("tab:blue", "tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:cyan")


def _colour(name: str, names: Sequence[str] = ()) -> str:
    """The method's colour (:attr:`~tokenmix.methods.MixMethod.colour`) for a registered method name;
    otherwise the next colour of OTHER_COLOURS by the name's position among the other names (so
    variants of one method stay distinguishable)."""
    if name in methods.available():
        return methods.method_class(name).colour
    others = [n for n in names if n not in methods.available()] or [name]
    return OTHER_COLOURS[others.index(name) % len(OTHER_COLOURS)] if name in others else OTHER_COLOURS[0]


def plot_occlusion(curves: Mapping[str, Mapping[float, float]], reference: str | None = None,
                   title: str | None = None, save: str | Path | None = None) -> Figure:
    """TokenMix Figure 5: top-1 accuracy against the share of dropped patches, one line per model;
    with two or more curves a second panel shows each curve minus ``reference`` (default: the
    first curve).

    Args:
        curves: {name: {drop ratio: top-1 %}} (:func:`occlusion_curves`).
    Returns:
        The Figure: one axes, or two with a difference panel.
    """
    if not curves:
        raise ValueError("nothing to plot: no curves")
    names = list(curves)
    ref = reference if reference is not None else names[0]
    diff = len(names) > 1
    fig, axes = plt.subplots(1, 2 if diff else 1, figsize=(10.5 if diff else 5.5, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1.4, 1] if diff else [1]})
    ax = axes[0, 0]
    for name, c in curves.items():
        r = sorted(c)
        ax.plot([100 * v for v in r], [c[v] for v in r], marker="o", label=name, color=_colour(name, list(curves)))
    ax.set(xlabel="dropped patches (%)", ylabel="top-1 accuracy (%)", title="accuracy under occlusion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if diff:
        ax2 = axes[0, 1]
        for name in names:
            if name == ref:
                continue
            r = sorted(set(curves[name]) & set(curves[ref]))
            ax2.plot([100 * v for v in r], [curves[name][v] - curves[ref][v] for v in r], marker="o", label=name,
                     color=_colour(name, list(curves)))
        ax2.axhline(0, color="0.6", lw=1)
        ax2.set(xlabel="dropped patches (%)", ylabel=f"top-1 minus {ref} (points)", title=f"difference to {ref}")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle(title or "occlusion robustness: random patches set to black (same patches for every model)",
                 fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)


def occlusion_table(curves: Mapping[str, Mapping[float, float]]) -> pd.DataFrame:
    """The curves as a table: one row per model, one column per drop ratio (top-1 %, 2 decimals)."""
    ratios = sorted({r for c in curves.values() for r in c})
    return pd.DataFrame([[c.get(r, np.nan) for r in ratios] for c in curves.values()], index=list(curves),
                        columns=[f"{round(100 * r)} %" for r in ratios]).round(2)


def find_occlusion_runs(runs_dir: str | Path, dataset: str = "fashion_mnist",
                        methods: Sequence[str] = OCCLUSION_METHODS) -> list[Run]:
    """The complete runs of ``methods`` on ``dataset`` for one model and image size that have a
    complete run of every one of ``methods`` (the first such set by name); [] if none. Their
    checkpoints need not be on disk (the stored measurement is used then)."""
    runs = [r for r in list_runs(runs_dir) if r.complete and r.config.get("dataset") == dataset
            and r.config.get("method") in methods]
    key = lambda r: (str(r.config.get("model")), int(r.config.get("img_size", 0)))  # noqa: E731
    for k in sorted({key(r) for r in runs}):
        sel = [r for r in runs if key(r) == k]
        if {r.config.get("method") for r in sel} >= set(methods):
            return sel
    return []


def write_tokenmix_occlusion(runs_dir: str | Path, figures_dir: str | Path, n_images: int = 2000,
                             ratios: Sequence[float] = OCCLUSION_RATIOS, seed: int = 0, batch_size: int = 500,
                             dataset: str = "fashion_mnist") -> list[Path]:
    """``tokenmix_occlusion.{png,svg,csv}`` in ``figures_dir`` from the complete CutMix and
    TokenMix runs on ``dataset`` under ``runs_dir`` (:func:`find_occlusion_runs`).

    Each run's model is evaluated on the same fixed ``n_images`` test images
    (:func:`occlusion_test_set`) with the same random patches set to black
    (:func:`~tokenmix.analysis.probes.black_level`); runs of one method and variant (seeds) are
    averaged in the figure; the CSV has one row per run. Returns the paths written, or [] (writing
    nothing) when there is no such pair of runs.
    """
    runs = find_occlusion_runs(runs_dir, dataset)
    if not runs:
        return []
    first = runs[0].config

    def measure() -> pd.DataFrame:
        images, labels, info = occlusion_test_set(dataset, int(first.get("img_size", 28)), n_images,
                                                  first.get("data_dir", "data"))
        per_run = occlusion_curves({r.run_id: r.path for r in runs}, images, labels, ratios, black_level(info), seed,
                                   batch_size)
        return pd.DataFrame([{"run_id": r.run_id, "method": r.config.get("method"), "label": method_label(r),
                              "model": r.config.get("model"), "seed": r.config.get("seed"), "n_images": len(images),
                              **{f"drop_{q:.1f}": per_run[r.run_id][float(q)] for q in ratios}} for r in runs])

    df = cached_measurement(runs_dir, "tokenmix_occlusion", [r.path / CHECKPOINT for r in runs],
                            {"n_images": n_images, "ratios": list(map(float, ratios)), "seed": seed}, measure,
                            float_format="%.2f")
    if df is None:
        return []
    groups: dict[str, list[dict[float, float]]] = {}
    order = df.assign(_m=df["method"].map(OCCLUSION_METHODS.index)).sort_values(["_m", "run_id"])
    for _, row in order.iterrows():
        groups.setdefault(str(row["label"]), []).append({float(q): float(row[f"drop_{q:.1f}"]) for q in ratios})
    curves = {(k if len(v) == 1 else f"{k} (mean of {len(v)} runs)"): {q: float(np.mean([c[q] for c in v]))
                                                                       for q in v[0]} for k, v in groups.items()}
    out = Path(figures_dir)
    fig = plot_occlusion(curves, title=f"occlusion robustness ({first.get('model')}, {int(df['n_images'].iloc[0])} "
                                       f"{first.get('dataset')} test images): random patches set to black")
    try:
        paths = save_figure(fig, out / "tokenmix_occlusion")
    finally:
        plt.close(fig)
    write_if_changed(out / "tokenmix_occlusion.csv", df.to_csv(index=False, float_format="%.2f",
                                                               lineterminator="\n").encode())
    return paths + [out / "tokenmix_occlusion.csv"]


__all__ = ["COUNT_VARIANTS", "GRID_14", "GRID_7", "OCCLUSION_OUTPUTS", "alignment_views",
           "find_occlusion_runs", "mask_count_statistics", "mask_count_table", "mask_examples",
           "occlusion_curves", "occlusion_table", "occlusion_test_set",
           "plot_count_statistics", "plot_masks", "plot_occlusion", "plot_teacher_targets", "sample_mask_counts",
           "show_map_alignment", "teacher_mix", "write_tokenmix_occlusion"]
