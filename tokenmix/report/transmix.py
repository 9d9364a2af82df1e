"""TransMix figures (notebook ``01_transmix``): mixed images with their last-block CLS attention
and label assignments (TransMix supplement, Figure 1), area lambda against TransMix lambda per
sample, and the two token masks the variants use. Ratios come from
:func:`tokenmix.analysis.probes.transmix_ratios`; every lambda shown is the **own** share (the package's
convention; TransMix's paper writes the partner's share 1 - lambda).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tokenmix.methods.base import MixedBatch, TokenGrid
from tokenmix.report.figures import (ArrayLike, _class_name, _draw_token_grid, _finish, _grid_axes, _imshow, _tensor,
                                     token_map_to_pixels, unnormalize)

OWN_COLOUR, PARTNER_COLOUR = "tab:blue", "tab:orange"
#: marker colours of the ratio names of :func:`tokenmix.analysis.probes.transmix_ratios`
RATIO_COLOURS = {"area": "0.55", "official": "tab:red", "paper": "tab:green",
                 "attention, nearest mask": "tab:purple", "attention, area mask": "tab:olive",
                 "attention": "tab:purple", "PAL": "tab:pink"}


def _draw_box(ax: plt.Axes, box: Sequence[int] | None, colour: str = "yellow") -> None:
    """Outline a pixel box (top, bottom, left, right)."""
    if box is None:
        return
    top, bottom, left, right = (int(v) for v in box)
    if bottom > top and right > left:
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                               edgecolor=colour, lw=1.2))


def show_transmix_samples(x: ArrayLike, mixed: MixedBatch, attn: ArrayLike, grid: TokenGrid,
                          ratios: Mapping[str, ArrayLike], keys: Sequence[str] = ("area", "official", "paper"),
                          class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None, n: int = 6, title: str | None = None,
                          save: str | Path | None = None) -> Figure:
    """TransMix supplement Figure 1 for the first ``n`` samples of one CutMix batch.

    Five rows per sample: image A (own, ``x[i]``), image B (partner, ``x[partner_index[i]]``),
    the mixed image with the pasted box outlined, the last-block CLS attention over the mixed
    image (bilinear, min-max scaled per image), and the label assignments ``keys`` as stacked
    bars (own share blue, partner share orange).

    Args:
        x: (B, C, H, W) the clean images the batch was mixed from.
        mixed: the CutMix :class:`MixedBatch`; attn: (B, N) CLS attention of the mixed forward.
        grid: the token grid; ratios: this batch's own shares per name, each (B,)
            (:func:`tokenmix.analysis.probes.transmix_ratios`).
        keys: which ratios to show as bars (from top to bottom).
        class_names, mean, std: for titles and un-normalising; n: samples; title, save: as usual.
    Returns:
        The Figure: ``5 * n`` axes.
    """
    b = mixed.x.shape[0]
    n = max(1, min(n, b))
    a = _tensor(attn)[:n]
    if a.dim() != 2 or a.shape[1] != grid.num_tokens:
        raise ValueError(f"expected attention of shape (B, N={grid.num_tokens}), got {tuple(_tensor(attn).shape)}")
    idx = _tensor(mixed.partner_index).long()[:n]
    own = unnormalize(_tensor(x)[:n], mean, std)
    partner = unnormalize(_tensor(x)[idx], mean, std)
    mix = unnormalize(mixed.x[:n], mean, std)
    maps = token_map_to_pixels(a, grid, mode="bilinear")
    lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    maps = (maps - lo) / np.maximum(hi - lo, 1e-12)
    for k in keys:
        if len(_tensor(ratios[k])) != b:
            raise ValueError(f"ratios[{k!r}] has {len(_tensor(ratios[k]))} values for a batch of {b}: pass this "
                             "batch's ratios (tokenmix.analysis.probes.transmix_ratios(mixed, attn, grid, K))")
    vals = {k: _tensor(ratios[k])[:n].numpy() for k in keys}
    y, yp = _tensor(mixed.y).long().tolist(), _tensor(mixed.y_partner).long().tolist()
    box = mixed.extras.get("box")
    fig, axes = _grid_axes(n, n, rows_per_item=5, cell=1.55, height_ratios=(1, 1, 1, 1, 0.25 + 0.22 * len(keys)))
    for i in range(n):
        ax_a, ax_b, ax_m, ax_att, ax_bar = axes[i]
        _imshow(ax_a, own[i])
        ax_a.set_title(f"A (own): {_class_name(y[i], class_names)}", fontsize=7)
        _imshow(ax_b, partner[i])
        ax_b.set_title(f"B (partner): {_class_name(yp[i], class_names)}", fontsize=7)
        _imshow(ax_m, mix[i])
        _draw_box(ax_m, box)
        ax_m.set_title("mixed", fontsize=7)
        _imshow(ax_att, mix[i])
        ax_att.imshow(maps[i], cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
        _draw_box(ax_att, box, "cyan")
        ax_att.set_title("last-block CLS attention", fontsize=7)
        for j, k in enumerate(keys):
            v = float(vals[k][i])
            ax_bar.barh(j, v, color=OWN_COLOUR)
            ax_bar.barh(j, 1 - v, left=v, color=PARTNER_COLOUR)
            ax_bar.text(0.02, j, f"{v:.2f}", va="center", ha="left", fontsize=6, color="white")
        ax_bar.set_yticks(range(len(keys)), list(keys), fontsize=6)
        ax_bar.set_xlim(0, 1)
        ax_bar.invert_yaxis()
        ax_bar.tick_params(axis="x", labelsize=6)
    fig.suptitle(title or "TransMix: images A and B, the CutMix image, its last-block CLS attention, and the "
                          "label assignments (own share blue, partner share orange)", fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


def plot_transmix_lambdas(ratios: Mapping[str, ArrayLike], keys: Sequence[str] = ("official", "paper"),
                          reference: str = "area", n_bars: int = 16, title: str | None = None,
                          ylabel: str = "TransMix λ (own share)", save: str | Path | None = None) -> Figure:
    """Area lambda against TransMix lambda per sample (own shares).

    Left: a scatter of ``ratios[key]`` against ``ratios[reference]`` for every key, with the
    diagonal (where TransMix would equal the area label). Right: grouped bars of the reference and
    every key for ``n_bars`` samples spread evenly over all of them (so over several draws).

    Args:
        ratios: {name: (S,)} own shares of S samples (e.g. from
            :func:`tokenmix.analysis.probes.collect_transmix_ratios`).
        keys: the ratios compared with ``reference``; ylabel: the scatter's y label (other labels
            than TransMix's, e.g. MixPro's PAL, use the same figure).
        n_bars: samples in the bar chart (indices ``linspace(0, S - 1, n_bars)``); title, save: as usual.
    Returns:
        The Figure with two axes (scatter, bars).
    """
    ref = _tensor(ratios[reference]).numpy()
    fig, (ax_sc, ax_bar) = plt.subplots(1, 2, figsize=(11, 4.0), gridspec_kw={"width_ratios": [1, 1.9]})
    ax_sc.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="y = x (area label)")
    for k in keys:
        v = _tensor(ratios[k]).numpy()
        mad = float(np.abs(v - ref).mean())
        ax_sc.scatter(ref, v, s=14, alpha=0.75, color=RATIO_COLOURS.get(k), label=f"{k} (mean |Δ| {mad:.3f})")
    ax_sc.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"{reference} λ (own share)", ylabel=ylabel,
              title="per sample")
    ax_sc.set_aspect("equal")
    ax_sc.grid(alpha=0.3)
    ax_sc.legend(fontsize=7, loc="upper left")
    names = [reference, *keys]
    m = max(1, min(n_bars, len(ref)))
    sel = np.unique(np.linspace(0, len(ref) - 1, m).round().astype(int))  # spread over all draws
    width = 0.8 / len(names)
    pos = np.arange(len(sel))
    for j, k in enumerate(names):
        v = _tensor(ratios[k]).numpy()[sel]
        ax_bar.bar(pos + (j - (len(names) - 1) / 2) * width, v, width, color=RATIO_COLOURS.get(k), label=k)
    ax_bar.set(ylim=(0, 1.15), xlabel="sample", ylabel="λ (own share)",
               title=f"{len(sel)} of the {len(ref)} samples, spread evenly")
    ax_bar.set_xticks(pos, [str(i) for i in sel], fontsize=7)
    ax_bar.grid(alpha=0.3, axis="y")
    ax_bar.set_yticks(np.linspace(0, 1, 6))
    ax_bar.legend(fontsize=7, ncol=len(names), loc="upper center")
    fig.suptitle(title or "CutMix's area λ against TransMix's λ (own share of the target)", fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)


def transmix_ratios_table(ratios: Mapping[str, ArrayLike], n: int = 8, spread: bool = True) -> pd.DataFrame:
    """The ratios of ``n`` samples as a table (one row per sample, one column per ratio, rounded
    to 3 decimals), taken evenly over all samples (``spread``) or the first ``n``."""
    first = _tensor(next(iter(ratios.values())))
    s = len(first)
    m = max(1, min(n, s))
    sel = np.unique(np.linspace(0, s - 1, m).round().astype(int)) if spread else np.arange(m)
    df = pd.DataFrame({k: _tensor(v).numpy()[sel] for k, v in ratios.items()}, index=pd.Index(sel, name="sample"))
    if "draw" in df:
        df["draw"] = df["draw"].astype(int)
    return df.round(3)


def show_token_masks(image: ArrayLike, masks: Mapping[str, ArrayLike], grid: TokenGrid,
                     box: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, title: str | None = None,
                     save: str | Path | None = None) -> Figure:
    """Partner-share token masks over one mixed image, side by side (e.g. TransMix's nearest mask
    against the area-weighted ``partner_mask``), with the pixel box outlined.

    Args:
        image: (C, H, W) or (1, C, H, W) one mixed image.
        masks: {name: (N,) partner share per token}.
        grid: the token grid; box: (top, bottom, left, right) pixel box to outline.
    Returns:
        The Figure: one axes per mask.
    """
    img = unnormalize(image, mean, std)[0]
    fig, axes = plt.subplots(1, len(masks), figsize=(2.6 * len(masks) + 0.6, 3.0), squeeze=False)
    heat = None
    for ax, (name, m) in zip(axes[0], masks.items()):
        mt = _tensor(m).reshape(-1)
        pix = token_map_to_pixels(mt, grid)[0]
        _imshow(ax, img, alpha=0.5)
        heat = ax.imshow(pix, cmap="magma", vmin=0, vmax=1, alpha=0.65, interpolation="nearest")
        _draw_token_grid(ax, grid)
        _draw_box(ax, box, "cyan")
        ax.set_title(f"{name}\nmean {float(mt.mean()):.3f}", fontsize=8)
    if heat is not None:
        fig.colorbar(heat, ax=list(axes[0]), fraction=0.03, pad=0.02).set_label("partner share", fontsize=7)
    fig.suptitle(title or "partner share of each token", fontsize=9)
    return _finish(fig, save)


__all__ = ["plot_transmix_lambdas", "show_token_masks", "show_transmix_samples", "transmix_ratios_table"]
