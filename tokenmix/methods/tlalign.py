"""TL-Align: token-label alignment, propagating token labels through every block's attention.

Paper: Xiao et al., "Token-Label Alignment for Vision Transformers", ICCV 2023
(https://arxiv.org/abs/2210.06455). Official code: https://github.com/Euphoria16/TL-Align
(``tla.py`` + a vendored timm ViT).

Rule (paper Eqs. 9-12; reference §5): token labels Y^0 (T, K) per image: the CLS row is the
area-mixed label, each patch row the label of the image that owns the token (a partly covered
token gets its partner share, e.g. 0.25 -> 0.75 y_own + 0.25 y_partner), smoothed per source. At
every block, with Ā the head-mean, post-softmax, pre-dropout, detached attention:

    Y <- (Ā Y + Y) / 2        (MLP, norms and the second residual leave Y unchanged)

and the target is the CLS row after the last block (the mean of the token rows for models
without a CLS token).

Two implementations that agree (exactly for two-image mixes, reference §5.3): every row stays a
convex combination ``beta y_own + (1 - beta) y_partner``, and both Ā and the half-residual
preserve that, so propagating the scalar own-share beta (T,) gives the same target as the
K-dimensional rows. ``path="scalar"`` (default, used for training) applies each block's attention
to beta with one no-grad SDPA from the captured queries and keys (fused attention stays on, no
map is materialised); ``path="kdim"`` materialises Ā and propagates (T, K) rows, as the paper
writes it (slower: N^2 K per block).

Variants: ``official`` = token-grid CutMix on every batch (``cutmix_snap="token"``; the released
code cannot run Mixup); ``paper`` = the Mixup/CutMix switch with any mask or snap (Mixup batches
are unchanged by the propagation: every row equals the mixed label, so the target is the area
target).

Deviations from the official code: attention from timm's blocks via
:class:`~tokenmix.models.attention.QKCapture` instead of a vendored model; the scalar fast path.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from .base import MixedBatch, MixMethod, ModelOutputs, Needs, mix_targets, one_hot, soft_target_cross_entropy
from .baselines import CutMix, MixupCutMix
from ..models.attention import attention_apply, attention_from_qk

PATHS: tuple[str, ...] = ("scalar", "kdim")


def initial_own_share(mixed: MixedBatch, num_prefix_tokens: int) -> Tensor:
    """beta^0 (B, T): prefix tokens carry the area share lam_area, patch t carries 1 - m_t."""
    b = mixed.partner_mask.shape[0]
    prefix = mixed.lam_area.float().view(b, 1).expand(b, num_prefix_tokens)
    return torch.cat([prefix, 1.0 - mixed.partner_mask.float()], dim=1)


def propagate_scalar(beta: Tensor, qk: list[tuple[Tensor, Tensor, float]], cls_only_last: bool = False) -> Tensor:
    """beta (B, T) through every block: beta <- (mean_h A_h beta + beta) / 2.

    With ``cls_only_last`` the last block updates only row 0 (the CLS row, all a CLS target needs),
    which skips T - 1 of its T query rows; the other rows of the result are then left as they were.
    """
    for i, (q, k, scale) in enumerate(qk):
        if cls_only_last and i == len(qk) - 1:
            row = attention_apply(q[:, :, :1], k, beta.unsqueeze(-1), scale)[:, 0, 0]  # (B,)
            return torch.cat([(0.5 * (row + beta[:, 0])).unsqueeze(1), beta[:, 1:]], dim=1)
        beta = 0.5 * (attention_apply(q, k, beta.unsqueeze(-1), scale).squeeze(-1) + beta)
    return beta


def propagate_kdim(labels: Tensor, attentions: list[Tensor]) -> Tensor:
    """Token labels (B, T, K) through head-mean attentions [(B, T, T), ...]: Y <- (Ā Y + Y) / 2."""
    for a in attentions:
        labels = 0.5 * (a.float() @ labels + labels)
    return labels


def final_label(rows: Tensor, num_prefix_tokens: int) -> Tensor:
    """The CLS row (B, ...) of propagated rows (B, T, ...), or the mean of the token rows without CLS."""
    return rows[:, 0] if num_prefix_tokens > 0 else rows.mean(1)


class TLAlign(MixMethod):
    """TL-Align on CutMix (official) or on the Mixup/CutMix switch (paper); see the module docstring."""

    name: ClassVar[str] = "tl_align"

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, cutmix_snap: str = "token", path: str = "scalar") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if path not in PATHS:
            raise ValueError(f"unknown TL-Align path {path!r}; valid: {', '.join(PATHS)}")
        self.path = path
        self.mixer: MixMethod
        if variant == "official":
            self.mixer = CutMix(num_classes, smoothing, variant, mix_prob, cutmix_alpha, "token")
        else:
            self.mixer = MixupCutMix(num_classes, smoothing, variant, mix_prob, mixup_alpha, cutmix_alpha,
                                     switch_prob, cutmix_snap)
        self.needs = Needs(qk=True)
        self.num_prefix_tokens = 1

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        self.mixer.grid = self.grid
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        return model

    def mix(self, x: Tensor, y: Tensor) -> MixedBatch:
        self._require_grid(x)
        return self.mixer.mix(x, y)

    @torch.no_grad()
    def aligned_target(self, mixed: MixedBatch, qk: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
        """(target (B, K), own share beta of the final label (B,)) from the captured q, k."""
        p = self.num_prefix_tokens
        if self.path == "scalar":
            beta = final_label(propagate_scalar(initial_own_share(mixed, p), qk, cls_only_last=p > 0), p)
            return mix_targets(mixed.y, mixed.y_partner, beta, self.num_classes, self.smoothing), beta
        beta0 = initial_own_share(mixed, p).unsqueeze(-1)  # (B, T, 1)
        y1 = one_hot(mixed.y, self.num_classes, self.smoothing).unsqueeze(1)  # (B, 1, K)
        y2 = one_hot(mixed.y_partner, self.num_classes, self.smoothing).unsqueeze(1)
        rows = beta0 * y1 + (1 - beta0) * y2  # (B, T, K)
        attns = [attention_from_qk(q, k, s).mean(1) for q, k, s in qk]
        target = final_label(propagate_kdim(rows, attns), p)
        own = final_label(propagate_scalar(initial_own_share(mixed, p), qk), p)  # for logging only
        return target, own

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        if mixed.kind in ("none", "mixup"):
            return super().loss(outputs, mixed)
        target, beta = self.aligned_target(mixed, outputs.qk)
        mixed.target = target
        loss = soft_target_cross_entropy(outputs.logits, target)
        return loss, {"lam": float(mixed.lam_area.mean()), "lam_aligned": float(beta.mean())}
