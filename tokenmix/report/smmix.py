"""SMMix figures and tables (notebook ``04_smmix``).

- :func:`plot_smmix_vs_cutmix` - the paper's Figure 4: per pair, the own image with its saliency
  and the least salient window (where the partner goes), the partner with its most salient window,
  the SMMix mixed image and the CutMix mixed image of the same pair;
- :func:`tokenmix.analysis.experiments.short_run` / :func:`plot_loss_terms` - a short SMMix training run recording the three
  loss terms L_cls, L_fine and L_con per step;
- :func:`mixed_topk_accuracy` - the paper's Figure 5a: how often a model's top-1 on a mixed image
  is the own or the partner class, and how often its top-2 holds both.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from tokenmix.methods.base import MixedBatch, TokenGrid
from tokenmix.methods.smmix import LOSS_TERMS
from tokenmix.report.figures import (ArrayLike, _class_name, _draw_token_grid, _finish, _imshow, _tensor,
                                     token_map_to_pixels, unnormalize)
from tokenmix.report.transmix import OWN_COLOUR, PARTNER_COLOUR, _draw_box


def _window_box(pos: Sequence[int], k: int, grid: TokenGrid) -> tuple[int, int, int, int]:
    """Token window (row, col) top-left, side k -> pixel box (top, bottom, left, right)."""
    r, c = int(pos[0]), int(pos[1])
    return r * grid.patch_h, (r + k) * grid.patch_h, c * grid.patch_w, (c + k) * grid.patch_w


def plot_smmix_vs_cutmix(x: ArrayLike, smmix_batch: MixedBatch, cutmix_batch: MixedBatch, grid: TokenGrid,
                         n: int = 4, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         class_names: Sequence[str] | None = None, alpha: float = 0.5, cmap: str = "inferno",
                         title: str | None = None, save: str | Path | None = None) -> Figure:
    """SMMix Figure 4 for the first ``n`` samples: one row per sample, four columns.

    1. the own image ``x[i]`` with its saliency (``extras["saliency"]``, min-max scaled, per token)
       and the min window ``dst`` outlined (blue);
    2. the partner ``x[partner_index[i]]`` with its saliency and the max window ``src`` outlined
       (orange);
    3. the SMMix mixed image with the pasted window outlined;
    4. the CutMix mixed image of the same pair (both use flip pairing) with its box outlined.

    Args:
        x: (B, C, H, W) the clean images both batches were mixed from.
        smmix_batch: an SMMix batch (``kind == "smmix"``); cutmix_batch: a CutMix batch of ``x``.
        grid: the token grid; mean, std: for un-normalising; class_names: for titles.
    Returns:
        The Figure (``4 * n`` axes).
    """
    if smmix_batch.kind != "smmix":
        raise ValueError(f"smmix_batch is a {smmix_batch.kind!r} batch; draw with switch_prob=1.0")
    ex = smmix_batch.extras
    b = smmix_batch.x.shape[0]
    n = min(n, b)
    idx = smmix_batch.partner_index.cpu()
    if not torch.equal(idx, cutmix_batch.partner_index.cpu()):
        raise ValueError("the SMMix and CutMix batches pair the samples differently")
    sal = _tensor(ex["saliency"]).view(b, grid.rows, grid.cols)
    lo, hi = sal.amin((1, 2), keepdim=True), sal.amax((1, 2), keepdim=True)
    sal = ((sal - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    clean = unnormalize(x, mean, std)
    smm = unnormalize(smmix_batch.x, mean, std)
    cut = unnormalize(cutmix_batch.x, mean, std)
    k = int(ex["k"])
    src, dst = ex["src"].cpu(), ex["dst"].cpu()
    fig, axes = plt.subplots(n, 4, figsize=(4 * 1.9, n * 1.9 + 0.3), squeeze=False)
    for i in range(n):
        j = int(idx[i])
        y, yp = int(smmix_batch.y[i]), int(smmix_batch.y_partner[i])
        lam = float(smmix_batch.lam_area[i])
        for col, (img, s, box, colour, label) in enumerate((
                (clean[i], sal[i], _window_box(dst[i], k, grid), OWN_COLOUR,
                 f"own: {_class_name(y, class_names)}\nmin window"),
                (clean[j], sal[j], _window_box(src[i], k, grid), PARTNER_COLOUR,
                 f"partner: {_class_name(yp, class_names)}\nmax window"))):
            ax = axes[i, col]
            _imshow(ax, img)
            ax.imshow(token_map_to_pixels(s.reshape(-1), grid)[0], cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                      interpolation="nearest")
            _draw_token_grid(ax, grid)
            _draw_box(ax, box, colour)
            ax.set_title(label, fontsize=7)
        ax = axes[i, 2]
        _imshow(ax, smm[i])
        _draw_box(ax, _window_box(dst[i], k, grid), PARTNER_COLOUR)
        ax.set_title(f"SMMix, k = {k}\nlam = {lam:.2f}", fontsize=7)
        ax = axes[i, 3]
        _imshow(ax, cut[i])
        _draw_box(ax, cutmix_batch.extras.get("box"), PARTNER_COLOUR)
        ax.set_title(f"CutMix\nlam = {float(cutmix_batch.lam_area[i]):.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


def plot_loss_terms(df: pd.DataFrame, window: int = 5, title: str | None = None,
                    save: str | Path | None = None) -> Figure:
    """The loss terms of a :func:`tokenmix.analysis.experiments.short_run` against the step (raw, faint, and a ``window``-step mean)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for term, colour in zip(("loss",) + LOSS_TERMS, ("k", "tab:blue", "tab:orange", "tab:green")):
        if term not in df:
            continue
        ax.plot(df["step"], df[term], color=colour, lw=0.6, alpha=0.3)
        ax.plot(df["step"], df[term].rolling(window, min_periods=1).mean(), color=colour,
                label="total" if term == "loss" else term.replace("l_", "L_"))
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title(title or "SMMix loss terms", fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


@torch.no_grad()
def mixed_topk_accuracy(model: nn.Module, batches: Mapping[str, MixedBatch]) -> pd.DataFrame:
    """SMMix Figure 5a: for each mixing kind, the share (%) of mixed images whose top-1 prediction is
    the own class, the partner class, and whose top-2 contains both classes.

    Pairs of the same class are left out (own and partner could not be told apart); ``n`` counts
    the images used. The model runs in eval mode (its mode is restored).
    """
    was_training = model.training
    model.eval()
    rows = []
    try:
        for name, mb in batches.items():
            logits = model(mb.x)
            y, yp = mb.y.to(logits.device), mb.y_partner.to(logits.device)
            keep = y != yp
            top2 = logits.topk(2, dim=1).indices[keep]
            y, yp = y[keep], yp[keep]
            m = max(int(keep.sum()), 1)
            top1 = top2[:, 0]
            both = ((top2 == y[:, None]).any(1) & (top2 == yp[:, None]).any(1))
            rows.append({"mixing": name, "n": int(keep.sum()),
                         "top-1 = own (%)": 100.0 * float((top1 == y).sum()) / m,
                         "top-1 = partner (%)": 100.0 * float((top1 == yp).sum()) / m,
                         "top-2 = both (%)": 100.0 * float(both.sum()) / m})
    finally:
        model.train(was_training)
    return pd.DataFrame(rows).set_index("mixing")


__all__ = ["mixed_topk_accuracy", "plot_loss_terms", "plot_smmix_vs_cutmix"]
