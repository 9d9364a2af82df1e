"""TokenMixup figures and tables (notebook ``03_tokenmixup``).

- :func:`plot_saliency_comparison` - the paper's Figure 3: images with the maps of several
  saliency detectors (1-step attention, rollout, input gradient, ...) over the token grid;
- :func:`htm_example` / :func:`plot_htm_example` - one Horizontal TokenMixup forward: each mixed
  sample, its partner, their saliency, the replaced tokens and the relabelled target (Eq. 11);
- :func:`mask_variant_table` - the ``paper`` mask against the ``official`` (row-0) mask on the same
  gains and partners;
- :func:`tokenmix.analysis.experiments.curriculum` / :func:`plot_curriculum` - the paper's Figure 4: how many samples HTM mixes
  per batch as a small model trains (the difficulty gate is a curriculum);
- :func:`latency_table` - the paper's Table 3 from :func:`tokenmix.analysis.probes.saliency_latency`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch import Tensor

from tokenmix.analysis.experiments import CurriculumRun
from tokenmix.analysis.probes import attention_saliency, pearson
from tokenmix.methods import MixStep
from tokenmix.methods.base import TokenGrid
from tokenmix.methods.tokenmixup import TokenMixup, difficulty, easy_samples, htm_mask, match_partners, token_gains
from tokenmix.report.figures import (ArrayLike, _class_name, _draw_token_grid, _finish, _imshow, _tensor,
                                     token_map_to_pixels, unnormalize)
from tokenmix.report.transmix import OWN_COLOUR, PARTNER_COLOUR

#: display names of the detectors of :func:`tokenmix.analysis.probes.saliency_latency`
DETECTOR_LABELS: dict[str, str] = {
    "gradient": "gradient (Co-Mixup / PuzzleMix)",
    "attention": "attention (TokenMixup, given the block input)",
    "attention_with_forward": "attention incl. the forward up to the block",
    "random": "random",
}


# ---------------------------------------------------------------------------------------------
# Figure 3: saliency maps

def _scaled(maps: np.ndarray) -> np.ndarray:
    lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


def plot_saliency_comparison(x: ArrayLike, maps: Mapping[str, ArrayLike], grid: TokenGrid, n: int = 4,
                             labels: ArrayLike | None = None, class_names: Sequence[str] | None = None,
                             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                             alpha: float = 0.6, cmap: str = "inferno", title: str | None = None,
                             save: str | Path | None = None) -> Figure:
    """Images (first column) and each detector's token map over them (one column per detector),
    one row per image; every map is min-max scaled per image and shown per token (flat cells).

    Args:
        x: (B, C, H, W) normalised images.
        maps: detector name -> (B, N) saliency on ``grid``.
        n: rows (the first ``n`` images).
    Returns:
        The Figure: ``n x (1 + len(maps))`` axes.
    """
    imgs = unnormalize(x, mean, std)
    n = min(n, len(imgs))
    if n < 1 or not maps:
        raise ValueError("nothing to plot: need at least one image and one map")
    pix = {}
    for name, m in maps.items():
        t = _tensor(m)
        if t.dim() != 2 or t.shape[0] < n:
            raise ValueError(f"map {name!r} must be (B >= {n}, N), got {tuple(t.shape)}")
        pix[name] = _scaled(token_map_to_pixels(t[:n], grid, mode="nearest"))
    labs = None if labels is None else _tensor(labels).long().tolist()
    ncols = 1 + len(maps)
    fig, axes = plt.subplots(n, ncols, squeeze=False, figsize=(1.7 * ncols, 1.7 * n + 0.5))
    for i in range(n):
        _imshow(axes[i, 0], imgs[i])
        if labs is not None:
            axes[i, 0].set_ylabel(_class_name(labs[i], class_names), fontsize=8)
        for c, (name, m) in enumerate(pix.items(), start=1):
            ax = axes[i, c]
            _imshow(ax, imgs[i])
            ax.imshow(m[i], cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
            _draw_token_grid(ax, grid)
            if i == 0:
                ax.set_title(name, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle(title or "token saliency by detector (min-max scaled per image)", fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


# ---------------------------------------------------------------------------------------------
# one HTM forward

@dataclass
class HTMExample:
    """What one Horizontal TokenMixup training forward did (see :func:`htm_example`).

    Attributes:
        x: (B, C, H, W) the input images (``input_mix="none"`` keeps them as given).
        y: (B,) labels.
        saliency: (B, N) the attention saliency HTM used (block ``layer``'s input).
        difficulty: (B,) the gate's score (the ScoreNet CE, /10 for ``official``).
        easy: (B,) bool, the mixed samples.
        partners: (B,) partner index, -1 for unmixed samples.
        mask: (B, N) bool, the replaced tokens.
        target_pre: (B, K) the target entering the block; target: (B, K) after HTM (Eq. 11).
        tau, variant, layer: the settings.
    """

    x: Tensor
    y: Tensor
    saliency: Tensor
    difficulty: Tensor
    easy: Tensor
    partners: Tensor
    mask: Tensor
    target_pre: Tensor
    target: Tensor
    tau: float
    variant: str
    layer: int

    @property
    def mixed(self) -> list[int]:
        """Indices of the mixed samples."""
        return self.easy.nonzero().squeeze(1).tolist()


def htm_example(model: nn.Module, method: TokenMixup, x: Tensor, y: Tensor, tau: float | None = None) -> HTMExample:
    """Run one training-mode forward of ``model`` (prepared by ``method``, HTM on) on ``x, y``
    without gradients and return what HTM did; ``tau`` temporarily overrides the method's gate
    (e.g. a large value to see mixing on an untrained model). The model's mode is restored."""
    if not method.horizontal:
        raise ValueError(f"htm_example needs a TokenMixup method with HTM on, got mode {method.mode!r}")
    old_tau, was_training = method.tau, model.training
    if tau is not None:
        method.tau = tau
    try:
        model.train()
        with torch.no_grad():
            res = MixStep(model, method)(x, y)
            mixed, state = res.mixed, res.outputs.extras["htm"]
            sal = attention_saliency(model, mixed.x, method.horizontal_layer, method.saliency)
        gate = method.gate
        diff = difficulty(state["scorenet_logits"], state["target_pre"], gate)
        info = state["info"]
        return HTMExample(x=mixed.x.detach(), y=y.detach(), saliency=sal, difficulty=diff,
                          easy=easy_samples(diff, method.tau, gate), partners=info["partners"].detach(),
                          mask=info["mask"].detach(), target_pre=state["target_pre"].detach(),
                          target=state["target"].detach(), tau=float(method.tau), variant=method.variant,
                          layer=method.horizontal_layer)
    finally:
        method.tau = old_tau
        model.train(was_training)


def _hatch_tokens(ax: plt.Axes, mask: np.ndarray, grid: TokenGrid, colour: str) -> None:
    for t in np.flatnonzero(mask):
        r, c = divmod(int(t), grid.cols)
        ax.add_patch(plt.Rectangle((c * grid.patch_w - 0.5, r * grid.patch_h - 0.5), grid.patch_w, grid.patch_h,
                                   fill=False, edgecolor=colour, lw=1.2))


def plot_htm_example(example: HTMExample, grid: TokenGrid, samples: Sequence[int] | None = None, n: int = 3,
                     class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, title: str | None = None,
                     save: str | Path | None = None) -> Figure:
    """For each of ``samples`` (default: the first ``n`` mixed samples with a non-empty mask) one
    row: sample i with its saliency (replaced tokens outlined), its partner j with its saliency
    (the tokens taken outlined), the mixed token set drawn in pixel space (i's cells, j's cells
    where the mask is set; HTM mixes the tokens at block ``layer``, not the pixels), and the
    target entering the block against the relabelled target (Eq. 11) on the two classes.

    Returns:
        The Figure: ``rows x 4`` axes.
    """
    ex = example
    if samples is None:
        samples = [i for i in ex.mixed if bool(ex.mask[i].any())][:n]
    samples = list(samples)
    if not samples:
        raise ValueError("no mixed sample with replaced tokens to show (raise tau, or train longer)")
    imgs = unnormalize(ex.x, mean, std)
    sal = _scaled(token_map_to_pixels(ex.saliency, grid, mode="nearest"))
    pix_mask = token_map_to_pixels(ex.mask.float(), grid, mode="nearest") > 0.5
    fig, axes = plt.subplots(len(samples), 4, squeeze=False, figsize=(9.0, 2.1 * len(samples) + 0.5),
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for row, i in enumerate(samples):
        j = int(ex.partners[i])
        if j < 0:
            raise ValueError(f"sample {i} was not mixed")
        yi, yj = int(ex.y[i]), int(ex.y[j])
        m = ex.mask[i].cpu().numpy()
        a_own, a_par, a_mix, a_bar = axes[row]
        for ax, k, lab, colour in ((a_own, i, yi, OWN_COLOUR), (a_par, j, yj, PARTNER_COLOUR)):
            _imshow(ax, imgs[k])
            ax.imshow(sal[k], cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
            _hatch_tokens(ax, m, grid, colour)
            _draw_token_grid(ax, grid)
            ax.set_title(f"{'sample' if k == i else 'partner'} {k}: {_class_name(lab, class_names)}", fontsize=7)
        mixed_img = np.where(pix_mask[i][..., None], imgs[j], imgs[i])
        _imshow(a_mix, mixed_img)
        _hatch_tokens(a_mix, m, grid, PARTNER_COLOUR)
        _draw_token_grid(a_mix, grid)
        a_mix.set_title(f"{int(m.sum())} of {grid.num_tokens} tokens from {j}", fontsize=7)
        classes = [yi] if yi == yj else [yi, yj]
        pos = np.arange(len(classes))
        pre = ex.target_pre[i, classes].cpu().numpy()
        post = ex.target[i, classes].cpu().numpy()
        a_bar.barh(pos - 0.2, pre, height=0.38, color="0.7", label="target in")
        a_bar.barh(pos + 0.2, post, height=0.38, color=[OWN_COLOUR, PARTNER_COLOUR][:len(classes)],
                   label="HTM target")
        for p, v in zip(pos, post):
            a_bar.text(v + 0.02, p + 0.2, f"{v:.2f}", va="center", fontsize=7)
        a_bar.set_yticks(pos, [_class_name(c, class_names) for c in classes], fontsize=7)
        a_bar.set_xlim(0, 1.15)
        a_bar.invert_yaxis()
        a_bar.tick_params(axis="x", labelsize=7)
        a_bar.set_title(f"difficulty {float(ex.difficulty[i]):.3f} (tau {ex.tau:g})", fontsize=7)
        if row == 0:
            a_bar.legend(fontsize=6, loc="lower right")
    fig.suptitle(title or f"Horizontal TokenMixup at block {ex.layer} ({ex.variant}): outlined = replaced tokens",
                 fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


def mask_variant_table(saliency: Tensor, easy: Tensor, rho: float) -> pd.DataFrame:
    """The ``paper`` and ``official`` HTM masks on the same gains and partners (Eq. 9; the
    official code gathers row 0 of the gains for every sample). One row per easy sample:
    its partner, the tokens each mask replaces and how many tokens the two masks disagree on.

    Args:
        saliency: (B, N); easy: (B,) bool; rho: the gain margin.
    """
    idx = easy.nonzero().squeeze(1)
    gains = token_gains(saliency[idx], saliency, rho)
    partners = match_partners(gains.sum(-1))
    paper, official = htm_mask(gains, partners, "paper"), htm_mask(gains, partners, "official")
    return pd.DataFrame({
        "sample": idx.tolist(), "partner": partners.tolist(),
        "tokens (paper)": paper.sum(1).tolist(), "tokens (official)": official.sum(1).tolist(),
        "tokens differing": (paper ^ official).sum(1).tolist(),
    })


# ---------------------------------------------------------------------------------------------
# Figure 4: the curriculum


def plot_curriculum(run: CurriculumRun, window: int = 10, title: str | None = None,
                    save: str | Path | None = None) -> Figure:
    """The paper's Figure 4 for a :class:`~tokenmix.analysis.experiments.CurriculumRun`: mixed samples per batch against the step
    (raw and a ``window``-step moving average), and the gate's median difficulty against tau."""
    h = run.history
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    ax.plot(h["step"], h["n_mixed"], color="0.75", lw=0.8, label="per batch")
    ax.plot(h["step"], h["n_mixed"].rolling(window, min_periods=1).mean(), color="tab:red",
            label=f"{window}-step mean")
    ax.set_ylim(-0.5, run.batch_size + 0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"mixed samples (of {run.batch_size})")
    ax.legend(fontsize=7)
    ax.set_title("HTM's difficulty gate as a curriculum", fontsize=9)
    ax2.plot(h["step"], h["difficulty_median"], color="tab:blue", label="median difficulty")
    ax2.axhline(run.tau, color="k", ls="--", lw=0.8, label=f"tau = {run.tau:g}")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("CE / 10" if run.gate == "official" else "CE")
    ax2.legend(fontsize=7)
    ax2.set_title(f"ScoreNet difficulty ({run.gate} gate, smoothing {run.smoothing:g})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


# ---------------------------------------------------------------------------------------------
# Table 3: detector cost

def latency_table(results: Mapping[str, float]) -> pd.DataFrame:
    """Per detector (seconds per call, from :func:`tokenmix.analysis.probes.saliency_latency`): the time
    in ms and the speed-up over the gradient detector (gradient time / its time)."""
    if "gradient" not in results:
        raise ValueError(f"latency results need a 'gradient' entry, got {sorted(results)}")
    g = float(results["gradient"])
    rows = [{"detector": DETECTOR_LABELS.get(k, k), "ms per batch": 1e3 * float(v),
             "speed-up vs gradient": g / float(v) if v > 0 else float("inf")} for k, v in results.items()]
    return pd.DataFrame(rows).set_index("detector")


def stack_dataset(dataset: Any, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` items of a ``(image, label, ...)`` dataset as tensors (n, C, H, W), (n,)."""
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


__all__ = [ "DETECTOR_LABELS", "HTMExample", "htm_example", "latency_table",
           "mask_variant_table", "plot_curriculum", "plot_htm_example", "plot_saliency_comparison", "stack_dataset"]


def saliency_agreement(maps: Mapping[str, Tensor]) -> pd.DataFrame:
    """Mean over the images of the per-image Pearson correlation between every two detectors'
    token maps (a square DataFrame; 1 on the diagonal)."""

    names = list(maps)
    out = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            ma, mb = _tensor(maps[a]), _tensor(maps[b])
            out.loc[a, b] = float(torch.stack([pearson(u, v) for u, v in zip(ma, mb)]).nanmean())
    return out


__all__ += ["saliency_agreement"]
