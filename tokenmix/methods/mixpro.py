"""MixPro: MaskMix (a patch-aligned grid mask) and Progressive Attention Labeling (PAL).

Paper: Zhao et al., "MixPro: Data Augmentation with MaskMix and Progressive Attention Labeling for
Vision Transformer", ICLR 2023 (https://arxiv.org/abs/2304.12043,
https://openreview.net/forum?id=dRjWsd3gwsm). Official code: https://github.com/fistyee/MixPro
(``main.py`` ``train_one_epoch``, ``utils.py`` ``MaskMix``, ``models/vit.py``; read at commit
``53a229e``).

What could be checked: the paper's abstract and its Fig. 1 caption; the equations, the
implementation section and the tables could not be read here. The rules below are therefore the
released code's, and the ``paper`` variant is the reading of the abstract that stays closest to it
(each choice is listed under *Ambiguities*).

MaskMix (per batch, flip pairing as everywhere in the package)
--------------------------------------------------------------
The image is cut into cells of ``mask_patch`` x ``mask_patch`` pixels, a multiple s of the model's
patch (token) size, so that each token comes from one image only ("the size of each mask patch is
adjustable and is a multiple of the image patch size" -- abstract). With n_h = ceil(rows / s) by
n_w = ceil(cols / s) cells (T in all; the last row / column of cells is cut at the border when s
does not divide the token grid), one lambda ~ Beta(maskmix_alpha, maskmix_alpha) is drawn per batch
and k = ceil(T lambda) cells (at least one) keep the own image; which k is drawn per sample (a
random permutation of the cells). The partner's image fills the other cells. The own share of the
area (``lam_area``) is k / T (``official``: every cell counts as 1 / T, also a cut border cell) or the
own share of the tokens (``paper``; the two agree when s divides the grid).

Progressive Attention Labeling (on MaskMix batches and any other cut-and-paste mask; the forward is
the training forward on the *mixed* images, no extra forward)
----------------------------------------------------------------------------------------------
With a_t the last block's attention from the CLS token to patch token t (head mean, post-softmax,
pre-dropout, no gradient -- exactly TransMix's map, read through
:class:`~tokenmix.methods.transmix.TransMix`, so every backbone TransMix supports works: ViT/DeiT,
CCT, CaiT, Swin and PVT v2 with their TransMix reductions) and m_t the partner's share of token t:

    lam_attn = sum_t a_t m_t / sum_t a_t                         (partner's attention share)
    alpha    = cos(softmax(z), y_area)   in [0, 1], per sample   (the progressive factor)
    lam_p    = alpha lam_attn + (1 - alpha) (1 - lam_area)       (partner share of the label)

where z are the logits of the same forward and y_area the smoothed area-mixed label. Early in
training the prediction is far from the mixed label, alpha is small and the label stays near the
area label; as the model fits, alpha grows and the attention counts more. alpha = 0 gives the area
label, alpha = 1 TransMix's attention-only label.

Variants
--------
- ``paper`` (default): MaskMix + PAL on every batch (``switch_prob=1``); the PAL target is the
  smoothed one-hots mixed with lam_p, trained with the soft-target cross-entropy; alpha is detached
  (a label carries no gradient, as every other label rule of the package).
- ``official``: the released recipe at the commit read (``53a229e``): PAL **off** (its DeiT configs
  set ``PAL_ATTN: False`` since 2023-09-04, ``True`` before; ``config.py``'s default and the Swin
  configs are off); MaskMix on half of the batches (``switch_prob=0.5``, ``MASKMIX_PROB``), timm's
  Mixup/CutMix switch (0.8 / 1.0, switch 0.5) on the others; area target k / T. With ``pal=True``
  the released PAL branch (the DeiT configs before 2023-09-04): on MaskMix batches only (the
  Mixup/CutMix batches of the switch keep their area target, as the code's ``maskmix and ATTN``),
  hard-label cross-entropy weighted per sample, ``lam CE(z, y_own) + (1 - lam) CE(z, y_partner)``
  (smoothing dropped), and alpha **not** detached (the gradient reaches z through alpha too).

Defaults: ``mask_patch=0`` picks s = ceil(grid side / 4), i.e. a 4 x 4 grid of cells as in the
released DeiT and Swin configs (DeiT: patch 14, cell 56 at 224 px; on the CPU preset's 7 x 7 tokens
s = 2: cells of 8 px, 4 x 4 cells, the last one token wide). ``maskmix_alpha=1`` (Beta(1, 1)).

Deviations from the released code (deliberate): flip pairing instead of ``randperm`` (which pairs
about one sample per batch with itself); rectangular images and grids (the code assumes square
ones); a mask size that is not a multiple of the patch is refused (the code builds a token mask of
the wrong size and fails only inside PAL); torch's RNG; the ``math`` import the released
``main.py`` lacks. Used as a label rule on another method's mask (:class:`~tokenmix.methods.Compose`),
PAL labels every cut-and-paste batch (CutMix boxes, TokenMix blocks, SMMix windows); Mixup batches
keep their area target (every token is a blend: the attention share equals the area share).

Ambiguities of the paper and the reading taken (``paper``): the cell count is rounded up and one
lambda is drawn per batch (as the code; a third-party reproduction rounds down and draws per
sample); the attention is the last block's CLS row on the mixed image (TransMix's, which Fig. 1
contrasts PAL with); alpha has no epoch schedule (the code computes it from the prediction; a
schedule ``1 - (epoch / 300)^2`` is only left in a comment there); the PAL loss is the soft-target
cross-entropy on smoothed labels (the code's hard CE is the ``official`` PAL).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tokenmix.methods.base import (MixedBatch, MixMethod, ModelOutputs, TokenGrid, flip_pairing, mix_targets,
                                    soft_target_cross_entropy)
from tokenmix.methods.baselines import MixupCutMix, draw_switch
from tokenmix.methods.masks import paste_token_mask, sample_lam
from tokenmix.methods.transmix import TransMix

#: cells per side of the default MaskMix grid (the released DeiT / Swin configs: 4 x 4)
DEFAULT_CELLS_PER_SIDE = 4


def cell_tokens(grid: TokenGrid, mask_patch: int = 0) -> int:
    """Tokens per cell side s for a mask patch of ``mask_patch`` pixels (0: a 4 x 4 grid of cells,
    s = ceil(max(rows, cols) / 4)).

    Raises:
        ValueError: when ``mask_patch`` is not a positive multiple of the model's patch size.
    """
    if mask_patch < 0:
        raise ValueError(f"mask_patch must be >= 0 (0 = a {DEFAULT_CELLS_PER_SIDE}x{DEFAULT_CELLS_PER_SIDE} grid), "
                         f"got {mask_patch}")
    if mask_patch == 0:
        return max(1, math.ceil(max(grid.rows, grid.cols) / DEFAULT_CELLS_PER_SIDE))
    if grid.patch_h != grid.patch_w:
        raise ValueError(f"MaskMix needs square patches, the model's are {grid.patch_h}x{grid.patch_w}")
    p = grid.patch_h
    if mask_patch % p:
        valid = ", ".join(str(p * s) for s in range(1, max(2, max(grid.rows, grid.cols))))
        raise ValueError(f"mask_patch {mask_patch} px is not a multiple of the model's patch size {p} px "
                         f"(a cell must hold whole tokens); valid: 0 (auto) or {valid}")
    s = mask_patch // p
    largest = max(1, max(grid.rows, grid.cols) - 1)  # the largest side that still cuts the image into 2+ cells
    if s > largest:
        raise ValueError(f"mask_patch {mask_patch} px leaves a single cell on the {grid.img_size} px image (MaskMix "
                         f"would never mix); use at most {p * largest}")
    return s


def cell_grid(grid: TokenGrid, s: int) -> tuple[int, int]:
    """Cells per column and per row, (ceil(rows / s), ceil(cols / s))."""
    return math.ceil(grid.rows / s), math.ceil(grid.cols / s)


def own_cell_count(num_cells: int, lam: float) -> int:
    """k = ceil(T lam) own cells, clipped to 1..T (the released rule: at least one own cell)."""
    return min(num_cells, max(1, math.ceil(num_cells * lam)))


def cells_to_tokens(cells: Tensor, grid: TokenGrid, s: int) -> Tensor:
    """Cell values (B, n_h, n_w) -> token values (B, rows * cols): each cell repeated over s x s
    tokens, cut to the token grid at the bottom and right border."""
    t = cells.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)[:, :grid.rows, :grid.cols]
    return t.reshape(cells.shape[0], -1)


def maskmix_partner_mask(batch: int, grid: TokenGrid, s: int, own_cells: int,
                         device: torch.device | None = None) -> Tensor:
    """MaskMix's per-sample token masks: for each sample a random set of ``own_cells`` of the
    n_h x n_w cells keeps the own image (a random permutation per sample), the rest are the
    partner's. Returns the partner mask (B, N) float 0/1."""
    n_h, n_w = cell_grid(grid, s)
    order = torch.rand(batch, n_h * n_w, device=device).argsort(dim=1)  # (B, T) a permutation per sample
    partner = (order >= own_cells).float().view(batch, n_h, n_w)  # the first k ranks are own
    return cells_to_tokens(partner, grid, s)


def maskmix_batch(x: Tensor, y: Tensor, lam: float, grid: TokenGrid, s: int, num_classes: int,
                  smoothing: float, variant: str = "paper") -> MixedBatch:
    """MaskMix with flip pairing: k = ceil(T lam) own cells per sample, the partner's patches in
    the others. ``lam_area`` = k / T (``official``) or the own token share (``paper``).
    ``extras``: ``cell_tokens`` s, ``cells`` (n_h, n_w), ``own_cells`` k."""
    b = x.shape[0]
    idx = flip_pairing(b, x.device)
    n_h, n_w = cell_grid(grid, s)
    k = own_cell_count(n_h * n_w, lam)
    pm = maskmix_partner_mask(b, grid, s, k, x.device)
    if variant == "official":
        lam_area = torch.full((b,), k / (n_h * n_w), dtype=torch.float32, device=x.device)
    else:
        lam_area = 1.0 - pm.mean(1)
    return MixedBatch(x=paste_token_mask(x, x[idx], pm, grid), y=y, y_partner=y[idx], partner_index=idx,
                      partner_mask=pm, lam_area=lam_area,
                      target=mix_targets(y, y[idx], lam_area, num_classes, smoothing), kind="maskmix",
                      extras={"cell_tokens": s, "cells": (n_h, n_w), "own_cells": k})


def progressive_factor(logits: Tensor, area_target: Tensor) -> Tensor:
    """PAL's alpha = cos(softmax(logits), area_target) per sample, (B, K), (B, K) -> (B,) in [0, 1]
    (both vectors are non-negative). Carries gradient through the logits; detach for a label."""
    return F.cosine_similarity(F.softmax(logits.float(), dim=-1), area_target.float(), dim=-1).clamp(0.0, 1.0)


def pal_partner_share(alpha: Tensor, lam_attn: Tensor, lam_area_partner: Tensor) -> Tensor:
    """PAL's partner share ``alpha lam_attn + (1 - alpha) lam_area_partner``, each (B,) -> (B,)."""
    return alpha * lam_attn + (1.0 - alpha) * lam_area_partner


def weighted_hard_cross_entropy(logits: Tensor, y: Tensor, y_partner: Tensor, lam_own: Tensor) -> Tensor:
    """The released PAL loss: mean_b [lam_b CE(z_b, y_b) + (1 - lam_b) CE(z_b, y'_b)], hard labels."""
    ce_own = F.cross_entropy(logits.float(), y, reduction="none")
    ce_par = F.cross_entropy(logits.float(), y_partner, reduction="none")
    return (lam_own * ce_own + (1.0 - lam_own) * ce_par).mean()


class MixPro(MixMethod):
    """MixPro (see the module docstring).

    Args:
        mask_patch: MaskMix cell side in pixels, a multiple of the model's patch size (0: a 4 x 4
            grid of cells, see :func:`cell_tokens`); validated when the model is prepared.
        maskmix_alpha: lambda ~ Beta(maskmix_alpha, maskmix_alpha), one draw per batch.
        pal: Progressive Attention Labeling on MaskMix batches; None = the variant's (``paper``
            on, ``official`` off, as the released configs).
        switch_prob: probability of a MaskMix batch, else timm's Mixup/CutMix switch; None = the
            variant's (``paper`` 1.0, ``official`` 0.5, the released ``MASKMIX_PROB``).
        mixup_alpha, cutmix_alpha, cutmix_switch_prob: the Mixup/CutMix switch of the other batches.
    """

    name: ClassVar[str] = "mixpro"
    variants: ClassVar[tuple[str, ...]] = ("paper", "official")
    colour: ClassVar[str] = "tab:pink"
    paper: ClassVar[str] = "MixPro"
    summary: ClassVar[str] = "MaskMix: a grid of token-aligned cells; PAL re-weights area and attention in the loss"
    gallery: ClassVar[bool] = True
    display_kwargs: ClassVar[dict[str, Any]] = {"switch_prob": 1.0}

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "paper", mix_prob: float = 1.0,
                 mask_patch: int = 0, maskmix_alpha: float = 1.0, pal: bool | None = None,
                 switch_prob: float | None = None, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_switch_prob: float = 0.5) -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if mask_patch < 0:
            raise ValueError(f"mask_patch must be >= 0 (0 = a 4x4 grid of cells), got {mask_patch}")
        if maskmix_alpha <= 0:
            raise ValueError(f"maskmix_alpha must be > 0, got {maskmix_alpha}")
        self.pal = (variant == "paper") if pal is None else bool(pal)
        self.switch_prob = (1.0 if variant == "paper" else 0.5) if switch_prob is None else float(switch_prob)
        if not 0.0 <= self.switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        self.mask_patch, self.maskmix_alpha = mask_patch, maskmix_alpha
        self.mixer = MixupCutMix(num_classes, smoothing, "official", 1.0, mixup_alpha, cutmix_alpha, cutmix_switch_prob)
        #: reads the last block's attention the way TransMix does, on every supported backbone
        self.attention_reader = TransMix(num_classes, smoothing, "paper")
        self.needs = self.attention_reader.needs if self.pal else self.needs
        self.cell_side: int | None = None

    def describe(self) -> str:
        s = f"MaskMix cells of {self.cell_side} token(s)" if self.cell_side else "MaskMix"
        label = "PAL target" if self.pal else "area target"
        other = "" if self.switch_prob >= 1.0 else f", Mixup/CutMix on {1 - self.switch_prob:.0%} of batches"
        return f"{s}; {label}{other}"

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Validate the mask size against the token grid; set up the attention reader for PAL."""
        self.cell_side = cell_tokens(self.grid, self.mask_patch)
        self.mixer.grid = self.grid
        if self.pal:  # the reader only records the backbone's attention site (it installs nothing)
            self.attention_reader.grid = self.grid
            self.attention_reader.setup_model(model)
            self.needs = self.attention_reader.needs
        return model

    # -- phase 1 ------------------------------------------------------------------------------
    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        if self._skip():
            return self.unmixed(x, y)
        if not draw_switch(self.switch_prob):
            self.mixer.grid = self.grid
            mixed = self.mixer.mix_batch(x, y)
            if self.variant == "official":  # the released code runs PAL on MaskMix batches only
                mixed.extras["area_label_only"] = True
            return mixed
        s = self.cell_side or cell_tokens(self.grid, self.mask_patch)
        return maskmix_batch(x, y, sample_lam(self.maskmix_alpha), self.grid, s, self.num_classes, self.smoothing,
                             self.variant)

    # -- phase 2 ------------------------------------------------------------------------------
    def pal_shares(self, outputs: ModelOutputs, mixed: MixedBatch, detach: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha, lam_attn, lam_p), each (B,), of a MaskMix batch: the progressive factor, the
        partner's attention share and the PAL partner share."""
        self.attention_reader.grid = self.grid  # also when the grid was set directly, not by prepare_model
        attn, grid = self.attention_reader.attention(outputs)
        lam_attn = self.attention_reader.partner_share(attn, mixed, grid)
        alpha = progressive_factor(outputs.logits, mixed.target)
        if detach:
            alpha = alpha.detach()
        return alpha, lam_attn, pal_partner_share(alpha, lam_attn, 1.0 - mixed.lam_area)

    def _pal_applies(self, mixed: MixedBatch) -> bool:
        """PAL on: a cut-and-paste batch, not one of the ``official`` switch's Mixup/CutMix batches."""
        return self.pal and mixed.kind not in ("none", "mixup") and not mixed.extras.get("area_label_only")

    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """The PAL target of a cut-and-paste batch (MaskMix's, or another mask's, see
        :class:`~tokenmix.methods.Compose`); Mixup and unmixed batches, the ``official`` switch's
        Mixup/CutMix batches and every batch with ``pal=False`` keep their area target."""
        info = {"lam": float(mixed.lam_area.mean())}
        if not self._pal_applies(mixed):
            return mixed.target, info
        alpha, lam_attn, lam_p = self.pal_shares(outputs, mixed)
        target = mix_targets(mixed.y, mixed.y_partner, 1.0 - lam_p, self.num_classes, self.smoothing)
        info.update(pal_alpha=float(alpha.mean()), lam_pal=float(1.0 - lam_p.mean()),
                    lam_attn=float(1.0 - lam_attn.mean()))
        return target, info

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """Soft-target CE against :meth:`label`; the released PAL branch (``official`` with
        ``pal=True``): hard CE weighted per sample, alpha with gradient."""
        if self.variant == "official" and self._pal_applies(mixed):
            alpha, lam_attn, lam_p = self.pal_shares(outputs, mixed, detach=False)
            info = {"lam": float(mixed.lam_area.mean()), "pal_alpha": float(alpha.detach().mean()),
                    "lam_pal": float(1.0 - lam_p.detach().mean()), "lam_attn": float(1.0 - lam_attn.mean())}
            return weighted_hard_cross_entropy(outputs.logits, mixed.y, mixed.y_partner, 1.0 - lam_p), info
        target, info = self.label(outputs, mixed)
        return soft_target_cross_entropy(outputs.logits, target), info

    def __repr__(self) -> str:
        return (f"MixPro(variant={self.variant!r}, mask_patch={self.mask_patch}, pal={self.pal}, "
                f"switch_prob={self.switch_prob})")


__all__ = ["MixPro", "cell_grid", "cell_tokens", "cells_to_tokens", "maskmix_batch", "maskmix_partner_mask",
           "own_cell_count", "pal_partner_share", "progressive_factor", "weighted_hard_cross_entropy"]
