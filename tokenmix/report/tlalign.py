"""TL-Align figures (notebook ``05_tl_align``): the token fluctuation phenomenon.

- :func:`plot_layerwise_ratios` - the paper's Figure 4: per layer, the similarity-based
  "ground-truth" mixing ratio (Appendix B, Eq. 13) of the CLS token against the ratios CutMix,
  TransMix and TL-Align assign, plus how well each follows it over many samples and tokens;
- :func:`show_label_alignment` - the paper's Figure 5: images, mixed image, the original label
  embedding of every token and the label embedding after the last block (red = image A, blue =
  image B);
- :func:`plot_token_presence` - Eq. 2: how much every token is present in each block's output.

All take a :class:`tokenmix.analysis.probes.LayerwiseRatios`; every ratio is the own share (image A).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from tokenmix.analysis.probes import LayerwiseRatios
from tokenmix.methods.base import MixedBatch, TokenGrid
from tokenmix.report.figures import (ArrayLike, _class_name, _draw_token_grid, _finish, _imshow, _tensor,
                                     token_map_to_pixels, unnormalize)
from tokenmix.report.transmix import _draw_box

#: line styles of the curves of :meth:`LayerwiseRatios.token`
CURVE_STYLES = {"similarity (Eq. 13)": dict(color="k", marker="o", lw=2),
                "TL-Align": dict(color="tab:red", marker="s"),
                "CutMix (area)": dict(color="0.55", ls="--"),
                "TransMix": dict(color="tab:green", ls=":")}
LABEL_CMAP = "RdBu_r"  # own share 1 -> red (image A), 0 -> blue (image B), as in the paper's Figure 5


def _style(name: str) -> dict:
    return next((v for k, v in CURVE_STYLES.items() if name.startswith(k)), {})


def plot_layerwise_ratios(ratios: LayerwiseRatios, n: int = 4, token: int = 0, title: str | None = None,
                          save: str | Path | None = None) -> Figure:
    """TL-Align Figure 4: the mixing ratio of one token across the layers.

    Top row, one panel per sample (the first ``n``): the Eq. 13 similarity ratio of token
    ``token`` (0 = CLS) after each block (layer 0 = the tokens entering block 1) with TL-Align's
    propagated ratio, CutMix's area ratio and TransMix's ratio (flat: they do not depend on the
    layer). Bottom row: the Pearson correlation with the Eq. 13 ratio per layer, over all samples
    for that token (left) and over all samples and patch tokens for TL-Align's labels against the
    initial (fixed) token labels (right).

    Returns:
        The Figure with ``n + 2`` axes (n sample panels, then the two correlation panels).
    """
    curves = ratios.token(token)
    nl = ratios.num_layers
    layers = np.arange(nl + 1)
    b = curves["similarity (Eq. 13)"].shape[1]
    n = max(1, min(n, b))
    fig = plt.figure(figsize=(max(2.6 * n, 8.0), 6.2))
    gs = fig.add_gridspec(2, 2 * n)
    sample_axes = [fig.add_subplot(gs[0, 2 * i:2 * i + 2]) for i in range(n)]
    ax_tok, ax_patch = fig.add_subplot(gs[1, :n]), fig.add_subplot(gs[1, n:])
    for i, ax in enumerate(sample_axes):
        for name, v in curves.items():
            ax.plot(layers, v[:, i].numpy(), label=name, **_style(name))
        ax.set(ylim=(0, 1), xlabel="layer (block output)", title=f"sample {i}")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel(f"own share λ of token {token}" + (" (CLS)" if token < ratios.num_prefix_tokens else ""))
    sample_axes[0].legend(fontsize=7, loc="lower left")
    for name, v in ratios.agreement(token).items():
        ax_tok.plot(layers, v.numpy(), label=name, **_style(name))
    ax_tok.set(ylim=(-1.05, 1.05), xlabel="layer", ylabel="correlation with Eq. 13",
               title=f"token {token}: over {b} samples")
    for name, v in ratios.patch_agreement().items():
        ax_patch.plot(layers, v.numpy(), label=name, marker="o",
                      **({"color": "tab:red"} if name.startswith("TL") else {"color": "0.55", "ls": "--"}))
    n_patch = ratios.similarity.shape[2] - ratios.num_prefix_tokens
    ax_patch.set(ylim=(-1.05, 1.05), xlabel="layer", ylabel="correlation with Eq. 13",
                 title=f"patch tokens: over {b} samples x {n_patch} tokens")
    for ax in (ax_tok, ax_patch):
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title or f"mixing ratio per layer (Eq. 13 softmax temperature {ratios.temperature:g})", fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)


def _draw_slice(ratios: LayerwiseRatios, draw: int, batch: int) -> slice:
    lo = draw * batch
    if lo + batch > ratios.similarity.shape[1]:
        raise ValueError(f"draw {draw} of batches of {batch} is out of range for {ratios.similarity.shape[1]} samples")
    return slice(lo, lo + batch)


def show_label_alignment(x: ArrayLike, mixed: MixedBatch | Sequence[MixedBatch], ratios: LayerwiseRatios,
                         grid: TokenGrid, draw: int = 0, n: int = 6, show_similarity: bool = True,
                         class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, title: str | None = None,
                         save: str | Path | None = None) -> Figure:
    """TL-Align Figure 5: the label embedding of every token before and after alignment.

    Rows per sample: image A (own), image B (partner), the mixed image, the original label
    embedding (the own share of every patch token's label, beta^0: 1 = from A, 0 = from B), the
    aligned label embedding after the last block (beta^L), and (``show_similarity``) the Eq. 13
    ratio of every token after the last block for comparison. Red = image A, blue = image B. The
    titles give the CLS (image-level) label: the area lambda before and the aligned lambda after.

    Args:
        x: (B, C, H, W) clean images; mixed: the batch (or the list of draws ``ratios`` was computed
            from, of which ``draw`` is shown); ratios: from :func:`~tokenmix.analysis.probes.layerwise_mixing_ratios`.
        grid: the token grid; n: samples; class_names, mean, std, title, save: as usual.
    Returns:
        The Figure: ``(5 or 6) * n`` axes plus one colour-bar axes.
    """
    batches = [mixed] if isinstance(mixed, MixedBatch) else list(mixed)
    draw = 0 if isinstance(mixed, MixedBatch) else draw
    if not 0 <= draw < len(batches):
        raise ValueError(f"draw {draw} is out of range for {len(batches)} mixed batches")
    m = batches[draw]
    b = m.x.shape[0]
    sl = _draw_slice(ratios, draw, b)
    n = max(1, min(n, b))
    p = ratios.num_prefix_tokens
    before, after = ratios.tl_align[0, sl][:n], ratios.tl_align[-1, sl][:n]  # (n, T)
    sim = ratios.similarity[-1, sl][:n]
    idx = _tensor(m.partner_index).long()[:n]
    own, partner = unnormalize(_tensor(x)[:n], mean, std), unnormalize(_tensor(x)[idx], mean, std)
    mix = unnormalize(m.x[:n], mean, std)
    y, yp = _tensor(m.y).long().tolist(), _tensor(m.y_partner).long().tolist()
    rows = [("A (own)", own), ("B (partner)", partner), ("mixed", mix),
            ("original labels", before), ("aligned labels", after)]
    if show_similarity:
        rows.append((f"Eq. 13, block {ratios.num_layers}", sim))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 0.8, 1.6 * len(rows) + 0.5), squeeze=False)
    heat = None
    for r, (name, data) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            if r < 3:
                _imshow(ax, data[i])
                if r == 0:
                    ax.set_title(f"A: {_class_name(y[i], class_names)}\nB: {_class_name(yp[i], class_names)}",
                                 fontsize=7)
                if r == 2:
                    _draw_box(ax, m.extras.get("box"), "yellow")
            else:
                pix = token_map_to_pixels(data[i, p:], grid)[0]
                heat = ax.imshow(pix, cmap=LABEL_CMAP, vmin=0, vmax=1, interpolation="nearest")
                _draw_token_grid(ax, grid)
                ax.set_xticks([])
                ax.set_yticks([])
                if p:
                    ax.set_title(f"CLS λ {float(data[i, 0]):.2f}", fontsize=7)
            if i == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(title or "label embedding per token: own share (red = image A, blue = image B)", fontsize=9)
    fig.tight_layout()
    if heat is not None:
        fig.subplots_adjust(right=0.9)
        top, bot = axes[3, -1].get_position(), axes[-1, -1].get_position()
        cax = fig.add_axes((0.92, bot.y0, 0.015, top.y1 - bot.y0))
        cb = fig.colorbar(heat, cax=cax)
        cb.set_label("own share (A)", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    return _finish(fig, save)


def plot_token_presence(ratios: LayerwiseRatios, grid: TokenGrid, sample: int = 0,
                        box: Sequence[int] | None = None, title: str | None = None,
                        save: str | Path | None = None) -> Figure:
    """TL-Align Eq. 2: the presence p(z_i) = sum_j Ā[j, i] of every patch token in each block.

    Top: one map per block for sample ``sample`` on a blue-white-red scale centred on p = 1 (p = 1
    everywhere would mean every token is passed on as much as it came in, like a convolution; the
    pasted box outlined in black). Bottom: the
    distribution of the patch tokens' presence per block over all samples (box plots; the CLS token
    is left out).

    Returns:
        The Figure with ``L + 1`` axes plus one colour-bar axes.
    """
    p = ratios.num_prefix_tokens
    pres = ratios.presence[:, :, p:]  # (L, B, N)
    nl = pres.shape[0]
    fig = plt.figure(figsize=(max(2.2 * nl, 7.0), 5.6))
    gs = fig.add_gridspec(2, nl, height_ratios=(1, 0.9))
    # diverging around p = 1: blue = passed on less than it came in, red = more
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(float(pres[:, sample].max()), 1.01))
    heat = None
    for l in range(nl):
        ax = fig.add_subplot(gs[0, l])
        heat = ax.imshow(token_map_to_pixels(pres[l, sample], grid)[0], cmap="RdBu_r", norm=norm,
                         interpolation="nearest")
        _draw_token_grid(ax, grid)
        _draw_box(ax, box, "black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"block {l + 1}", fontsize=8)
    ax_box = fig.add_subplot(gs[1, :])
    data = [pres[l].reshape(-1).numpy() for l in range(nl)]
    ax_box.boxplot(data, showfliers=False)
    ax_box.set_xticks(range(1, nl + 1), [f"block {l + 1}" for l in range(nl)])
    ax_box.axhline(1.0, color="tab:red", lw=1, ls="--", label="p = 1 (no fluctuation)")
    ax_box.set(ylabel="presence p(z) of patch tokens")
    ax_box.grid(alpha=0.3, axis="y")
    ax_box.legend(fontsize=7)
    fig.suptitle(title or f"token presence (Eq. 2) per block: maps for sample {sample}, spread over all samples",
                 fontsize=10)
    fig.tight_layout()
    if heat is not None:  # a colour bar right of the maps
        fig.subplots_adjust(right=0.9)
        pos = fig.axes[nl - 1].get_position()
        cax = fig.add_axes((0.92, pos.y0, 0.012, pos.height))
        cb = fig.colorbar(heat, cax=cax)
        cb.set_label("p(z)", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    return _finish(fig, save)


__all__ = ["plot_layerwise_ratios", "plot_token_presence", "show_label_alignment"]
