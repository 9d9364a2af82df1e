"""Figures: image grids, mixed batches, attention maps and training curves.

Every function builds a matplotlib Figure through pyplot (so notebooks show it with
``plt.show()``), returns it, never shows it, and saves it as PNG + SVG when ``save`` is given
(a path without suffix). Saved files are reproducible: same inputs -> same bytes
(fixed ``svg.hashsalt``, no date in the metadata, fixed dpi).
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from tokenmix.methods.base import MixedBatch, TokenGrid
from tokenmix.train.runs import Run, atomic_write_bytes

ArrayLike = Tensor | np.ndarray
SAVE_DPI = 150
SVG_HASHSALT = "tokenmix"


# ---------------------------------------------------------------------------------------------
# saving

def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes (keeps mtimes
    stable for make). Returns True when the file was written."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """Render ``fig`` as ``"png"`` or ``"svg"`` reproducibly (no date, fixed hash salt and dpi)."""
    buf = io.BytesIO()
    metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {}
    with matplotlib.rc_context({"svg.hashsalt": SVG_HASHSALT}):
        fig.savefig(buf, format=fmt, dpi=SAVE_DPI, metadata=metadata, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (folders created). Returns the paths."""
    stem = Path(stem)
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".svg")]
    for p in paths:
        write_if_changed(p, figure_bytes(fig, p.suffix[1:]))
    return paths


def save_and_close(fig: Figure, stem: str | Path) -> list[Path]:
    """:func:`save_figure`, then close the figure (also when saving fails)."""
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def write_csv(path: str | Path, df: pd.DataFrame, float_format: str = "%.4f") -> Path:
    """``df`` as CSV (no index, ``\n`` line ends) through :func:`write_if_changed`; returns ``path``."""
    write_if_changed(path, df.to_csv(index=False, float_format=float_format, lineterminator="\n").encode())
    return Path(path)


def _finish(fig: Figure, save: str | Path | None) -> Figure:
    if save is not None:
        save_figure(fig, save)
    return fig


# ---------------------------------------------------------------------------------------------
# helpers

def _tensor(a: ArrayLike) -> Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).detach().cpu().float()


def unnormalize(images: ArrayLike, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> np.ndarray:
    """Undo per-channel normalisation for display.

    Args:
        images: (B, C, H, W) or (C, H, W) with C = 1 or 3, normalised as ``(x - mean) / std``.
        mean, std: per-channel statistics (in [0, 1] units). When either is None, each image is
            min-max scaled instead.
    Returns:
        (B, H, W, C) float array in [0, 1].
    """
    x = _tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if mean is None or std is None:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    else:
        m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if m.shape[1] not in (1, x.shape[1]) or s.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} channels, images have {x.shape[1]}")
        x = x * s + m
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _imshow(ax: plt.Axes, img: np.ndarray, **kw: Any) -> None:
    """Show one (H, W, C) image in [0, 1]; grey images with a grey colour map."""
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kw)
    else:
        ax.imshow(img, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def _class_name(k: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[k]) if class_names is not None and 0 <= k < len(class_names) else str(k)


def _grid_axes(n: int, ncols: int, rows_per_item: int = 1, cell: float = 1.6,
               height_ratios: Sequence[float] | None = None) -> tuple[Figure, np.ndarray]:
    """A figure with ``ceil(n / ncols) * rows_per_item`` x ``ncols`` axes; returns the figure and
    an (n, rows_per_item) array of the axes in use (the rest are removed)."""
    if n < 1:
        raise ValueError("nothing to plot: got 0 images")
    ncols = max(1, min(ncols, n))
    nblocks = math.ceil(n / ncols)
    ratios = list(height_ratios or [1.0] * rows_per_item) * nblocks
    fig, axes = plt.subplots(nblocks * rows_per_item, ncols, squeeze=False,
                             figsize=(cell * ncols, cell * sum(ratios) + 0.4),
                             gridspec_kw={"height_ratios": ratios})
    used = np.empty((n, rows_per_item), dtype=object)
    for i in range(nblocks * ncols):
        block, col = divmod(i, ncols)
        for r in range(rows_per_item):
            ax = axes[block * rows_per_item + r, col]
            if i < n:
                used[i, r] = ax
            else:
                fig.delaxes(ax)
    return fig, used


# ---------------------------------------------------------------------------------------------
# image grids

def show_images(images: ArrayLike, labels: ArrayLike | Sequence[int] | None = None,
                class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, ncols: int = 8, title: str | None = None,
                save: str | Path | None = None) -> Figure:
    """A grid of images, each titled by its class.

    Args:
        images: (B, C, H, W), C = 1 or 3, normalised with ``mean`` / ``std``.
        labels: (B,) class indices for the titles (optional).
        class_names: names indexed by class (else the index is shown).
        mean, std: normalisation to undo (None: min-max per image).
        ncols: images per row.
        title: figure title.
        save: path stem; writes ``<save>.png`` and ``<save>.svg``.
    Returns:
        The Figure, with one axes (holding one image) per input image.
    """
    imgs = unnormalize(images, mean, std)
    labs = None if labels is None else [int(v) for v in _tensor(labels).long().tolist()]
    fig, axes = _grid_axes(len(imgs), ncols)
    for i, img in enumerate(imgs):
        ax = axes[i, 0]
        _imshow(ax, img)
        if labs is not None:
            ax.set_title(_class_name(labs[i], class_names), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, save)


def token_map_to_pixels(token_map: ArrayLike, grid: TokenGrid, mode: str = "nearest") -> np.ndarray:
    """Upsample per-token values (B, N) to pixels (B, H, W) of ``grid.img_size``.

    ``mode="nearest"`` keeps each token a flat ``patch_h x patch_w`` cell (masks);
    ``"bilinear"`` smooths (attention maps).
    """
    t = _tensor(token_map)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape[-1] != grid.num_tokens:
        raise ValueError(f"a token map of {t.shape[-1]} values does not fit the token grid "
                         f"{grid.rows}x{grid.cols} ({grid.num_tokens} tokens)")
    m = t.reshape(-1, 1, grid.rows, grid.cols)
    if mode == "nearest":
        m = m.repeat_interleave(grid.patch_h, dim=2).repeat_interleave(grid.patch_w, dim=3)
    else:
        m = F.interpolate(m, size=grid.img_size, mode=mode, align_corners=False)
    return m[:, 0].numpy()


def _draw_token_grid(ax: plt.Axes, grid: TokenGrid) -> None:
    h, w = grid.img_size
    for r in range(1, grid.rows):
        ax.axhline(r * grid.patch_h - 0.5, color="white", lw=0.3, alpha=0.6)
    for c in range(1, grid.cols):
        ax.axvline(c * grid.patch_w - 0.5, color="white", lw=0.3, alpha=0.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def show_mixed_batch(mixed: MixedBatch, grid: TokenGrid, class_names: Sequence[str] | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None, n: int = 8,
                     num_classes: int | None = None, title: str | None = None,
                     save: str | Path | None = None) -> Figure:
    """What a mixing method did to the first ``n`` samples of a batch.

    Three rows per sample: the mixed image (titled own / partner class); the ``partner_mask``
    as a token heatmap (the partner's share of each token, 0..1) over the dimmed image, titled
    with ``lam_area`` (the own share of the area); and the soft target's two largest classes
    as bars with their weights.

    Args:
        mixed: the :class:`~tokenmix.methods.MixedBatch` from ``method.mix``.
        grid: the model's token grid (``TokenGrid.from_model(model)``).
        class_names: names indexed by class (else indices).
        mean, std: the dataset normalisation, to un-normalise ``mixed.x``.
        n: samples to show (at most the batch size).
        num_classes: check against the target width (optional).
        title: figure title (default: the batch kind and the conventions).
        save: path stem for PNG + SVG.
    Returns:
        The Figure: ``3 * n`` sample axes and one colour-bar axes.
    """
    b = mixed.x.shape[0]
    n = max(1, min(n, b))
    target = _tensor(mixed.target)[:n]  # (n, K)
    if num_classes is not None and target.shape[1] != num_classes:
        raise ValueError(f"the soft target has {target.shape[1]} classes, expected num_classes={num_classes}")
    imgs = unnormalize(mixed.x[:n], mean, std)  # (n, H, W, C)
    masks = token_map_to_pixels(mixed.partner_mask[:n], grid)  # (n, H, W)
    if masks.shape[1:] != imgs.shape[1:3]:
        raise ValueError(f"token grid {grid} covers {grid.img_size} pixels but the images are {imgs.shape[1:3]}")
    y, yp = _tensor(mixed.y).long().tolist(), _tensor(mixed.y_partner).long().tolist()
    lam = _tensor(mixed.lam_area).tolist()
    fig, axes = _grid_axes(n, n, rows_per_item=3, cell=1.5, height_ratios=(1.0, 1.0, 0.55))
    heat = None
    for i in range(n):
        ax_img, ax_mask, ax_bar = axes[i]
        _imshow(ax_img, imgs[i])
        ax_img.set_title(f"own: {_class_name(y[i], class_names)}\npartner: {_class_name(yp[i], class_names)}",
                         fontsize=7)
        _imshow(ax_mask, imgs[i], alpha=0.45)
        heat = ax_mask.imshow(masks[i], cmap="magma", vmin=0.0, vmax=1.0, alpha=0.7, interpolation="nearest")
        _draw_token_grid(ax_mask, grid)
        ax_mask.set_title(f"λ = {lam[i]:.2f}", fontsize=7)
        w, k = target[i].topk(min(2, target.shape[1]))
        names = [_class_name(int(c), class_names) for c in k]
        ax_bar.barh(range(len(names)), w.numpy(), color=["tab:blue", "tab:orange"][:len(names)])
        ax_bar.set_yticks(range(len(names)), names, fontsize=6)
        ax_bar.invert_yaxis()
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=6)
        for j, v in enumerate(w.tolist()):
            ax_bar.text(min(v + 0.03, 0.97), j, f"{v:.2f}", va="center", ha="left" if v < 0.75 else "right",
                        fontsize=6)
    fig.suptitle(title or f"{mixed.kind}: mixed images; partner's share of each token (partner_mask) "
                          f"with λ = own share of the area; soft target (top 2 classes)", fontsize=9)
    fig.tight_layout()
    if heat is not None:  # a colour bar right of the mask row
        fig.subplots_adjust(right=0.92)
        box = axes[-1, 1].get_position()
        cax = fig.add_axes((0.935, box.y0, 0.01, box.height))
        cbar = fig.colorbar(heat, cax=cax)
        cbar.ax.tick_params(labelsize=6)
        cbar.set_label("partner share", fontsize=7)
    return _finish(fig, save)


def show_attention(images: ArrayLike, attn: ArrayLike, grid: TokenGrid, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, labels: ArrayLike | Sequence[int] | None = None,
                   preds: ArrayLike | Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                   ncols: int = 8, alpha: float = 0.55, cmap: str = "inferno", title: str | None = None,
                   save: str | Path | None = None) -> Figure:
    """Images (top row) and their per-token attention upsampled over them (bottom row).

    Args:
        images: (B, C, H, W) normalised images.
        attn: (B, N) one value per patch token (e.g. the CLS row of the last block from
            ``AttentionCapture(model, blocks=[-1], reduce="cls")``); each map is min-max scaled
            for display.
        grid: the model's token grid (N = rows * cols).
        mean, std: the dataset normalisation.
        labels, preds: (B,) true / predicted classes for the titles (optional).
        class_names: names indexed by class.
        ncols: images per row; alpha, cmap: overlay style.
        title: figure title; save: path stem for PNG + SVG.
    Returns:
        The Figure: ``2 * B`` axes (image; image + attention overlay).
    """
    imgs = unnormalize(images, mean, std)
    a = _tensor(attn)
    if a.dim() != 2 or a.shape[0] != len(imgs):
        raise ValueError(f"expected attention of shape (B={len(imgs)}, N), got {tuple(a.shape)}")
    maps = token_map_to_pixels(a, grid, mode="bilinear")  # (B, H, W)
    lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    maps = (maps - lo) / np.maximum(hi - lo, 1e-12)
    labs = None if labels is None else _tensor(labels).long().tolist()
    prd = None if preds is None else _tensor(preds).long().tolist()
    fig, axes = _grid_axes(len(imgs), ncols, rows_per_item=2)
    for i, img in enumerate(imgs):
        ax_img, ax_att = axes[i]
        _imshow(ax_img, img)
        parts = []
        if labs is not None:
            parts.append(_class_name(labs[i], class_names))
        if prd is not None:
            parts.append(f"pred: {_class_name(prd[i], class_names)}")
        if parts:
            ax_img.set_title("\n".join(parts), fontsize=7)
        _imshow(ax_att, img)
        ax_att.imshow(maps[i], cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle(title or "attention over the patch tokens (min-max scaled per image)", fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


# ---------------------------------------------------------------------------------------------
# curves

def run_label(run: Run) -> str:
    """``method/run_id`` (with the variant when it is not the official one)."""
    method = str(run.config.get("method", "?"))
    variant = run.config.get("variant", "official")
    if variant and variant != "official":
        method = f"{method}[{variant}]"
    return f"{method}/{run.run_id}"


def plot_curves(runs: Sequence[Run] | Run, title: str | None = None, save: str | Path | None = None) -> Figure:
    """Training loss and test top-1 per epoch, one line per run (colour by method).

    Args:
        runs: one run record or several (``tokenmix.train.runs.load_run`` / ``list_runs``).
        title: figure title; save: path stem for PNG + SVG.
    Returns:
        The Figure with two axes: train loss, test top-1 (%).
    """
    runs = [runs] if isinstance(runs, Run) else list(runs)
    methods = sorted({str(r.config.get("method", "?")) for r in runs})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        method = str(run.config.get("method", "?"))
        style = styles[seen.get(method, 0) % len(styles)]
        seen[method] = seen.get(method, 0) + 1
        kw = {"color": colours[method], "ls": style, "marker": "o", "ms": 3, "label": run_label(run)}
        loss = [(r["epoch"], r["train_loss"]) for r in run.metrics if "train_loss" in r]
        acc = [(r["epoch"], r["top1"]) for r in run.metrics if "top1" in r]
        if loss:
            ax_loss.plot(*zip(*loss), **kw)
        if acc:
            ax_acc.plot(*zip(*acc), **kw)
    ax_loss.set(xlabel="epoch", ylabel="train loss (mixed targets)", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    handles, labels = ax_loss.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_acc.get_legend_handles_labels()
    if handles:  # below the axes; saving uses bbox_inches="tight", so it is kept
        fig.legend(handles, labels, loc="upper center", ncol=min(3, len(labels)), fontsize=7,
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
    return _finish(fig, save)


def find_root(start: str | Path | None = None) -> Path:
    """The repository root: the first folder from ``start`` (default: the working directory)
    upwards holding ``pyproject.toml`` and ``tokenmix/__init__.py``; else the folder above the
    installed package. Lets the notebook find ``runs/`` and ``data/`` from the repository root
    (papermill ``--cwd``) and from ``notebooks/`` (nbval)."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "tokenmix" / "__init__.py").is_file():
            return d
    return Path(__file__).resolve().parents[2]

