"""Baselines: no mixing, Mixup, CutMix and timm's Mixup/CutMix switch.

Mixup: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
CutMix: Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
Features", ICCV 2019. Semantics follow timm's ``timm.data.Mixup`` in batch mode (flip pairing,
lam ~ Beta(alpha, alpha), timm's ``rand_bbox`` with the area-corrected lam, label smoothing applied
to each source label before mixing, ``switch_prob`` = probability of CutMix when both are on).

Deviations from timm (deliberate): random numbers come from torch's RNG instead of numpy's, so
``torch.manual_seed`` makes runs repeatable; and the mixer also returns the pairing, box,
per-token partner shares and lam that later label rules consume (timm returns only the target).
``cutmix_snap="token"`` samples the box on the token grid (TL-Align's ``rand_token_bbox``), so
every token is wholly own or wholly partner.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, TokenGrid, flip_pairing, mix_targets
from tokenmix.methods.masks import box_lam, box_token_share, paste_box, rand_bbox, sample_lam

SNAPS = ("pixel", "token")


def draw_switch(switch_prob: float) -> bool:
    """The per-batch switch of every "method mask or Mixup" recipe (timm's ``switch_prob``):
    True (the method's own mask: CutMix, TokenMix's blocks, SMMix's windows) with probability
    ``switch_prob``, else Mixup. One draw from torch's RNG."""
    return float(torch.rand(())) < switch_prob


def mixup_batch(x: Tensor, y: Tensor, lam: float, grid: TokenGrid, num_classes: int,
                smoothing: float) -> MixedBatch:
    """Mixup with flip pairing: ``x' = lam x + (1 - lam) x[partner]``; every token is a blend, so
    the partner share of each token is ``1 - lam``."""
    b = x.shape[0]
    idx = flip_pairing(b, x.device)
    lam_t = torch.full((b,), lam, dtype=torch.float32, device=x.device)
    return MixedBatch(
        x=x * lam + x[idx] * (1.0 - lam), y=y, y_partner=y[idx], partner_index=idx,
        partner_mask=torch.full((b, grid.num_tokens), 1.0 - lam, dtype=torch.float32, device=x.device),
        lam_area=lam_t, target=mix_targets(y, y[idx], lam_t, num_classes, smoothing), kind="mixup",
    )


def cutmix_batch(x: Tensor, y: Tensor, lam: float, grid: TokenGrid, num_classes: int,
                 smoothing: float, snap: str = "pixel") -> MixedBatch:
    """CutMix with flip pairing: paste the partner's box; lam corrected to the kept area.

    ``snap="pixel"``: timm's pixel box, tokens straddling its edge get fractional partner shares.
    ``snap="token"``: the same rule on the token grid, scaled to pixels (binary partner mask).
    ``extras["box"]`` holds the pixel box (top, bottom, left, right).
    """
    if snap not in SNAPS:
        raise ValueError(f"unknown cutmix_snap {snap!r}; valid: {', '.join(SNAPS)}")
    b = x.shape[0]
    idx = flip_pairing(b, x.device)
    h, w = x.shape[-2:]
    if snap == "pixel":
        box = rand_bbox(h, w, lam)
    else:
        t, bo, le, r = rand_bbox(grid.rows, grid.cols, lam)
        box = (t * grid.patch_h, bo * grid.patch_h, le * grid.patch_w, r * grid.patch_w)
    lam_c = box_lam(box, h, w)
    share = box_token_share(box, grid).to(x.device)  # (N,)
    lam_t = torch.full((b,), lam_c, dtype=torch.float32, device=x.device)
    return MixedBatch(
        x=paste_box(x, x[idx], box), y=y, y_partner=y[idx], partner_index=idx,
        partner_mask=share.unsqueeze(0).expand(b, -1).contiguous(), lam_area=lam_t,
        target=mix_targets(y, y[idx], lam_t, num_classes, smoothing), kind="cutmix",
        extras={"box": box},
    )


class Mixup(MixMethod):
    """Mixup on every batch (with probability ``mix_prob``); lam ~ Beta(mixup_alpha)."""

    name: ClassVar[str] = "mixup"
    colour: ClassVar[str] = "tab:orange"
    summary: ClassVar[str] = "Mixup: λ·x + (1−λ)·x' for the whole image"
    gallery: ClassVar[bool] = True

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0, mixup_alpha: float = 0.8) -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if mixup_alpha <= 0:
            raise ValueError(f"mixup_alpha must be > 0, got {mixup_alpha}")
        self.mixup_alpha = mixup_alpha

    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        if self._skip():
            return self.unmixed(x, y)
        return mixup_batch(x, y, sample_lam(self.mixup_alpha), self.grid, self.num_classes, self.smoothing)


class CutMix(MixMethod):
    """CutMix on every batch (with probability ``mix_prob``); lam ~ Beta(cutmix_alpha)."""

    name: ClassVar[str] = "cutmix"
    colour: ClassVar[str] = "tab:green"
    summary: ClassVar[str] = "CutMix: a box; area target"
    gallery: ClassVar[bool] = True

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0, cutmix_alpha: float = 1.0, cutmix_snap: str = "pixel") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if cutmix_alpha <= 0:
            raise ValueError(f"cutmix_alpha must be > 0, got {cutmix_alpha}")
        if cutmix_snap not in SNAPS:
            raise ValueError(f"unknown cutmix_snap {cutmix_snap!r}; valid: {', '.join(SNAPS)}")
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_snap = cutmix_snap

    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        if self._skip():
            return self.unmixed(x, y)
        return cutmix_batch(x, y, sample_lam(self.cutmix_alpha), self.grid, self.num_classes,
                            self.smoothing, self.cutmix_snap)


class MixupCutMix(MixMethod):
    """timm's switch: per batch, CutMix with probability ``switch_prob``, else Mixup
    (DeiT recipe: mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5)."""

    name: ClassVar[str] = "mixup_cutmix"
    colour: ClassVar[str] = "tab:olive"
    summary: ClassVar[str] = "Mixup or CutMix (p=0.5); area target"

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, cutmix_snap: str = "pixel") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if mixup_alpha <= 0 or cutmix_alpha <= 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be > 0, got {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        if cutmix_snap not in SNAPS:
            raise ValueError(f"unknown cutmix_snap {cutmix_snap!r}; valid: {', '.join(SNAPS)}")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.cutmix_snap = switch_prob, cutmix_snap

    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        if self._skip():
            return self.unmixed(x, y)
        if draw_switch(self.switch_prob):
            return cutmix_batch(x, y, sample_lam(self.cutmix_alpha), self.grid, self.num_classes,
                                self.smoothing, self.cutmix_snap)
        return mixup_batch(x, y, sample_lam(self.mixup_alpha), self.grid, self.num_classes, self.smoothing)
