"""MixPro figures (notebook ``06_mixpro``): MaskMix's grid masks at several cell sizes beside a
CutMix box, and PAL's progressive factor over training from run records. Every lambda shown is the
**own** share (the package's convention)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from tokenmix.methods.base import TokenGrid
from tokenmix.methods.baselines import cutmix_batch
from tokenmix.methods.mixpro import maskmix_batch
from tokenmix.report.figures import _finish, _imshow, run_label, unnormalize
from tokenmix.train.runs import Run


def _draw_cells(ax: plt.Axes, grid: TokenGrid, s: int, colour: str = "cyan") -> None:
    """MaskMix's cell boundaries (every s tokens) over an image."""
    h, w = grid.img_size
    for r in range(s, grid.rows, s):
        ax.axhline(r * grid.patch_h - 0.5, color=colour, lw=0.8)
    for c in range(s, grid.cols, s):
        ax.axvline(c * grid.patch_w - 0.5, color=colour, lw=0.8)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def show_maskmix(x: Tensor, grid: TokenGrid, cell_sides: Sequence[int] = (1, 2, 3), lam: float = 0.5,
                 n: int = 4, seed: int = 0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 num_classes: int = 10, save: str | Path | None = None) -> Figure:
    """The first ``n`` samples of a batch mixed by MaskMix at each cell side (in tokens), and by a
    CutMix box of the same lambda for contrast.

    One row per mask: the mixed images with MaskMix's cell boundaries (cyan), titled with the own
    share of the area as the released code counts it (k / T) and as the tokens count it (they
    differ when the last row / column of cells is cut at the border).

    Args:
        x: (B, C, H, W) images (normalised), B >= 2.
        grid: the model's token grid; cell_sides: tokens per cell side, one row each.
        lam: the Beta draw both masks use (own share before rounding); n: samples per row.
        seed: ``torch.manual_seed`` before each row (the same cells order for every row).
        mean, std: to un-normalise; num_classes: for the targets (not shown).
    Returns:
        The Figure: ``(len(cell_sides) + 1) x n`` axes.
    """
    b = x.shape[0]
    n = max(1, min(n, b))
    y = torch.zeros(b, dtype=torch.long)
    rows = len(cell_sides) + 1
    fig, axes = plt.subplots(rows, n, figsize=(1.7 * n, 1.9 * rows), squeeze=False)
    for r, s in enumerate(cell_sides):
        torch.manual_seed(seed)
        mixed = maskmix_batch(x, y, lam, grid, s, num_classes, 0.0, "official")
        tokens = (1.0 - mixed.partner_mask.mean(1)).tolist()
        imgs = unnormalize(mixed.x[:n], mean, std)
        n_h, n_w = mixed.extras["cells"]
        for i in range(n):
            ax = axes[r, i]
            _imshow(ax, imgs[i])
            _draw_cells(ax, grid, s)
            ax.set_title(f"λ k/T {float(mixed.lam_area[i]):.2f} · tokens {tokens[i]:.2f}", fontsize=7)
        axes[r, 0].set_ylabel(f"MaskMix, cell {s}x{s} tok\n({n_h}x{n_w} cells, k={mixed.extras['own_cells']})",
                              fontsize=7)
    torch.manual_seed(seed)
    cm = cutmix_batch(x, y, lam, grid, num_classes, 0.0)
    imgs = unnormalize(cm.x[:n], mean, std)
    for i in range(n):
        _imshow(axes[-1, i], imgs[i])
        axes[-1, i].set_title(f"λ {float(cm.lam_area[i]):.2f}", fontsize=7)
    axes[-1, 0].set_ylabel("CutMix box\n(cuts through tokens)", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"MaskMix at λ ≈ {lam:.2f}: each token comes from one image; partner pixels in the other cells",
                 fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


def pal_history(run: Run) -> dict[str, np.ndarray]:
    """Per-epoch means logged by a MixPro run with PAL: ``epoch``, ``pal_alpha`` (the progressive
    factor), ``lam`` (area own share), ``lam_attn`` and ``lam_pal`` (own shares of the attention and
    PAL labels), each (E,) with NaN where an epoch logged no PAL batch."""
    rows = [m for m in run.metrics if "train_loss" in m]
    keys = ("pal_alpha", "lam", "lam_attn", "lam_pal")
    out = {"epoch": np.array([m["epoch"] for m in rows], dtype=float)}
    for k in keys:
        out[k] = np.array([m.get(k, np.nan) for m in rows], dtype=float)
    return out


def plot_pal_factor(runs: Sequence[Run] | Run, title: str | None = None, save: str | Path | None = None) -> Figure:
    """PAL's progressive factor alpha (mean over each epoch's PAL batches) against the epoch, one
    line per run (left), and the own shares of the area, attention and PAL labels of the first run
    (right): alpha weights the attention share, 1 - alpha the area share.

    Raises:
        ValueError: when no run logged ``pal_alpha`` (MixPro with ``pal=False``, or another method).
    """
    runs = [runs] if isinstance(runs, Run) else list(runs)
    hist = [(r, pal_history(r)) for r in runs]
    hist = [(r, h) for r, h in hist if np.isfinite(h["pal_alpha"]).any()]
    if not hist:
        raise ValueError("none of the runs logged pal_alpha: PAL runs are MixPro runs with pal on "
                         "(variant 'paper', or pal=True)")
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r, h in hist:
        ax_a.plot(h["epoch"], h["pal_alpha"], marker=".", lw=1.2, label=run_label(r))
    ax_a.set(xlabel="epoch", ylabel="α = cos(softmax(z), y_area)", ylim=(0, 1),
             title="progressive factor (epoch mean)")
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=7)
    r0, h0 = hist[0]
    for k, colour, name in (("lam", "0.5", "area"), ("lam_attn", "tab:purple", "attention"),
                            ("lam_pal", "tab:pink", "PAL")):
        ax_l.plot(h0["epoch"], h0[k], lw=1.2, color=colour, label=name)
    ax_l.set(xlabel="epoch", ylabel="λ (own share, epoch mean)", title=run_label(r0))
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=7)
    fig.suptitle(title or "MixPro's PAL: the attention counts more as the prediction fits the mixed label",
                 fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)


__all__ = ["pal_history", "plot_pal_factor", "show_maskmix"]
