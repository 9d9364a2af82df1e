"""TransMix: the CutMix label re-weighted by the last block's class attention.

Paper: Chen et al., "TransMix: Attend to Mix for Vision Transformers", CVPR 2022
(https://arxiv.org/abs/2111.09833). Official code: https://github.com/Beckschen/TransMix
(``transmix.py`` + a vendored timm ViT returning the last block's attention).

Rule (after the forward on the *mixed* batch; no extra forward): with a_t the head-mean,
post-softmax, pre-dropout, detached attention of the CLS query on patch token t in the last block
(CLS->CLS dropped, not renormalised) and m_t the partner's share of token t,

    lam_attn = sum_t a_t m_t / sum_t a_t      (the partner's attention share)

and the target is ``(1 - lam_p) y_own + lam_p y_partner`` (each smoothed first) with

- ``variant="official"``: lam_p = (lam_area_partner + lam_attn) / 2, the average the released
  code uses (the authors in https://github.com/Beckschen/TransMix/issues/7: "the mean of both
  methods"), where m_t is the *nearest* downsampling of the
  pixel box: token t counts as pasted iff its top-left pixel lies in the box;
- ``variant="paper"``: lam_p = lam_attn, with the area-weighted ``partner_mask``.

Models without a CLS token use the attention *received* by each patch token averaged over the
patch queries (``reduce="query_mean"``) in place of the CLS row.

Backbones (:class:`~tokenmix.models.backbones.Backbone`; TransMix supplement B: "the attention
from the last Transformer block as default ... compatible for all ViT variants"): ViT/DeiT use
the last block's CLS row (q, k capture below); CaiT the CLS row of its last class-attention
block; Swin and PVT v2 (no class token) the attention received per token in the last block, on
the **last stage's grid** -- the partner mask is then downsampled to that grid by area averaging
(the supplement's "extra downsample step"); for ``official`` the nearest-sampled token mask is
averaged the same way. Swin's last-stage attention is per window (received attention is
averaged within each window); PVT v2's last stage has unreduced keys (sr 1) in every timm config.

Composition: the input mixing is timm's Mixup/CutMix switch (``switch_prob`` = probability of
CutMix; the official DeiT-S recipe's effective value is 0.5, see the reference §3.3); Mixup and
unmixed batches keep their area target. Any other mask works: the rule reads ``partner_mask``
(and, for ``official``, the box in ``extras["box"]`` when there is one; a mask without a box is
taken as already token-aligned and rounded to 0/1).

How the attention is obtained: the last block's queries and keys are captured during the forward
(:class:`~tokenmix.models.attention.QKCapture`; its fused attention stays on) and only the CLS
row softmax(q_CLS K^T * scale) is recomputed, without grad — the same numbers as the map the
official code returns (softmax before dropout), at a cost of one (1 x T) row per head.

Deviations from the official code: no vendored model file (timm's own blocks); the RNG is torch's.
Note lam here is converted at the boundary: the package's ``lam`` is the own share.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, ModelOutputs, Needs, TokenGrid, mix_targets
from tokenmix.methods.baselines import MixupCutMix
from tokenmix.models.attention import attention_from_qk
from tokenmix.models.backbones import Backbone


def attention_partner_share(attn: Tensor, partner_mask: Tensor, eps: float = 1e-12) -> Tensor:
    """lam_attn = sum_t a_t m_t / sum_t a_t. attn, partner_mask (B, N) -> (B,)."""
    a = attn.float()
    return (a * partner_mask.float()).sum(1) / a.sum(1).clamp_min(eps)


def nearest_partner_mask(mixed: MixedBatch, grid: TokenGrid) -> Tensor:
    """The official nearest downsampling: token (r, c) is pasted iff pixel (r*ph, c*pw) lies in the
    box. Without a box (token-aligned masks) the partner mask rounded to {0, 1}. -> (B, N)."""
    box = mixed.extras.get("box")
    if box is None:
        return (mixed.partner_mask >= 0.5).float()
    top, bottom, left, right = box
    ys = torch.arange(grid.rows, device=mixed.partner_mask.device) * grid.patch_h
    xs = torch.arange(grid.cols, device=mixed.partner_mask.device) * grid.patch_w
    inside = ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
    return inside.reshape(1, -1).float().expand_as(mixed.partner_mask)


class TransMix(MixMethod):
    """TransMix on top of the Mixup/CutMix switch (see the module docstring)."""

    name: ClassVar[str] = "transmix"
    colour: ClassVar[str] = "tab:blue"
    paper: ClassVar[str] = "TransMix"
    summary: ClassVar[str] = "CutMix box; area target shown (TransMix re-weights it by attention in the loss)"
    gallery: ClassVar[bool] = True
    display_kwargs: ClassVar[dict[str, Any]] = {'switch_prob': 1.0}

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, cutmix_snap: str = "pixel") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        self.mixer = MixupCutMix(num_classes, smoothing, variant, mix_prob, mixup_alpha, cutmix_alpha,
                                 switch_prob, cutmix_snap)
        self.needs = Needs(qk=(-1,))
        self.num_prefix_tokens, self.has_cls = 1, True

    def setup_model(self, model: nn.Module) -> nn.Module:
        self.mixer.grid = self.grid
        bb = self.backbone = Backbone.of(model)
        last = bb.sites[-1]
        self.num_prefix_tokens = last.num_prefix_tokens
        self.has_cls = bb.class_token and last.num_prefix_tokens > 0
        qk_ok = bb.family == "vit" and isinstance(getattr(last.module, "q_norm", None), nn.Module)
        self.needs = (Needs(qk=(-1,)) if qk_ok
                      else Needs(attention_blocks=(-1,), attention_reduce="site"))
        return model

    @torch.no_grad()
    def last_block_attention(self, qk: list[tuple[Tensor, Tensor, float]]) -> Tensor:
        """(B, N) patch attention of the last block from its captured q, k: the head-mean CLS row
        (CLS->CLS dropped) or, without a CLS token, the head- and query-mean attention received.
        Computed without grad: the label must never carry gradient, even for q, k not detached."""
        q, k, scale = qk[-1]
        p = self.num_prefix_tokens
        if self.has_cls:
            return attention_from_qk(q[:, :, :1], k, scale)[:, :, 0, p:].mean(1)
        return attention_from_qk(q[:, :, p:], k, scale)[:, :, :, p:].mean(dim=(1, 2))

    def attention(self, outputs: ModelOutputs) -> tuple[Tensor, tuple[int, int] | None]:
        """The last block's patch attention (B, N') and its grid (None = the input grid)."""
        if self.needs.qk:
            return self.last_block_attention(outputs.qk), None
        sm = outputs.attention[-1]
        if self.has_cls:
            return sm.cls_row(), sm.grid
        return sm.received(), (sm.key_grid if sm.site.kind == "reduced" else sm.grid)

    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        self.mixer.grid = self.grid  # also when the grid was set directly, not by prepare_model
        return self.mixer.mix_batch(x, y)

    def partner_share(self, attn: Tensor, mixed: MixedBatch, grid: tuple[int, int] | None = None) -> Tensor:
        """The partner's share of the target, (B,), for a box/mask batch and attention (B, N') on
        ``grid`` (None: the input grid; else the partner mask is area-averaged onto it)."""
        assert self.grid is not None
        mask = mixed.partner_mask if self.variant == "paper" else nearest_partner_mask(mixed, self.grid)
        if grid is not None and tuple(grid) != (self.grid.rows, self.grid.cols):
            mask = self.backbone.downsample_mask(mask, grid)
        lam_attn = attention_partner_share(attn, mask)
        if self.variant == "paper":
            return lam_attn
        return 0.5 * ((1.0 - mixed.lam_area) + lam_attn)

    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """The TransMix target of a box/mask batch; Mixup and unmixed batches keep their area target."""
        if mixed.kind in ("none", "mixup"):
            # report the own share of the target used (the area one) on every batch, so that the
            # engine's per-epoch mean of lam_transmix is not diluted by batches without the key
            lam = float(mixed.lam_area.mean())
            return mixed.target, {"lam": lam, "lam_transmix": lam}
        attn, grid = self.attention(outputs)
        lam_p = self.partner_share(attn, mixed, grid)  # (B,)
        target = mix_targets(mixed.y, mixed.y_partner, 1.0 - lam_p, self.num_classes, self.smoothing)
        return target, {"lam": float(mixed.lam_area.mean()), "lam_transmix": float(1.0 - lam_p.mean())}
