"""TokenMix: multi-block token masks, with targets from a teacher's activation maps.

Paper: Liu et al., "TokenMix: Rethinking Image Mixing for Data Augmentation in Vision
Transformers", ECCV 2022 (https://arxiv.org/abs/2207.08409), Sec. 3.2, Eq. 2.
Official code: https://github.com/Sense-X/TokenMix (``tokenmix.py``, ``relabel/``).
Teacher maps (build, cache, align with the crop): :mod:`tokenmix.train.teacher`.

Per batch (flip pairing; one mask for the whole batch, as in the official code): with
probability ``switch_prob`` a TokenMix batch, else a Mixup batch (lam ~ Beta(mixup_alpha)).
A TokenMix batch pastes the partner's tokens where the token mask M is 1:
``x = x (1 - M) + x_partner M`` (M upsampled to patches).

Masks (``mask``): ``"block"`` (BEiT-style blocks: area ~ U(min_block, remaining), aspect ratio
log-uniform in [0.3, 1/0.3], up to 10 attempts per block, until the count is reached or a round
adds nothing), ``"random"`` (the same count of uniformly random tokens), ``"cutmix"`` (timm's
CutMix box, lam ~ Beta(cutmix_alpha): the paper's Table 7 "refinement" of CutMix labels).

Labels (``labels="teacher"``, Eq. 2): with m_own / m_par the sample's and the partner's
ground-truth-class maps on the token grid, each normalised over space,
``y_own = sum_t m_own(t) (1 - M_t)`` (own mass left visible) and
``y_partner = sum_t m_par(t) M_t`` (partner mass pasted in). ``labels="area"`` keeps CutMix's area
target (the mask-only ablation).

Variants (what the released code does, and what the paper says):

=================  =====================================  ==================================
                   ``official`` (default)                 ``paper``
=================  =====================================  ==================================
partner tokens     min(N, floor(0.5 N) + m) always        floor(lam N), lam = ``mask_ratio``
                   (the Beta lam is discarded)            or ~ Beta(``tokenmix_alpha``)
block floor        1 token per block; m added to total    m tokens per block
target             eps/K + (y_own - eps/2) on own class   normalised mixture
                   + (y_partner - eps/2) on partner's     (y_own t_own + y_partner t_par)
                   (sums to y_own + y_partner, may be <0)  / (y_own + y_partner)
loss               BCE with logits, mean over B x K       soft-target cross-entropy
=================  =====================================  ==================================

``m`` is the official 14 tokens of a 14x14 grid scaled to the grid: ``round(14 N / 196)``
(4 on 7x7). ``t_own`` / ``t_par`` are smoothed one-hots. ``lam`` is the partner share here (the
paper's "mask-out ratio"); the returned ``lam_area`` is the own share (package convention).

Backbones: masks live on the model's patch-embedding grid (any patch size; Swin's 4x4 px
patches, PVT v2's stride-4 stem cells, CaiT/DeiT patches; see
:class:`~tokenmix.models.backbones.Backbone`), and the teacher maps are integrated onto that grid
(:meth:`~tokenmix.methods.teacher_maps.TeacherMaps.token_maps`), so the rule needs nothing else from the model.

Deviations (deliberate): the grid is the model's (no 14x14 hard-coding); randomness comes from
torch's RNG; the count uses floor (the paper does not say how lambda N is rounded);
``clamp_negative`` (default on in both variants) clamps the teacher's logit maps at zero before
normalising. The released ``m / (sum m + 1e-8)`` on raw logits is kept behind
``clamp_negative=False``: with the default Fashion-MNIST teacher it gives normalised maps with
entries up to +-74 on 0.16 % of the training images (sum of the ground-truth logits <= 1;
measured on the cache built by ``make teacher``). See :mod:`tokenmix.train.teacher` for the map
alignment.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmix.methods.base import (MixedBatch, MixMethod, ModelOutputs, Needs, TokenGrid, flip_pairing, mix_targets,
                                    one_hot, soft_target_cross_entropy)
from tokenmix.methods.baselines import cutmix_batch, draw_switch, mixup_batch
from tokenmix.methods.masks import paste_token_mask, sample_lam
from tokenmix.methods.teacher_maps import load_teacher_maps, verify_cache_data

MASKS = ("block", "random", "cutmix")
LABELS = ("teacher", "area")
LOSSES = ("auto", "bce", "ce")
#: the official minimum-token offset and its grid (14 of 196 tokens)
OFFICIAL_MIN_TOKENS, OFFICIAL_GRID_TOKENS = 14, 196
ASPECT_MIN = 0.3


def scaled_min_tokens(num_tokens: int, min_tokens: int = OFFICIAL_MIN_TOKENS) -> int:
    """``min_tokens`` of a 196-token grid scaled to ``num_tokens``: round(min_tokens N / 196), >= 1."""
    return max(1, math.floor(min_tokens * num_tokens / OFFICIAL_GRID_TOKENS + 0.5))


def official_token_count(num_tokens: int, mask_ratio: float = 0.5, min_tokens: int = OFFICIAL_MIN_TOKENS) -> int:
    """Partner tokens of the released rule: min(N, floor(mask_ratio N) + scaled min_tokens) (112 of 196)."""
    return min(num_tokens, math.floor(mask_ratio * num_tokens) + scaled_min_tokens(num_tokens, min_tokens))


def paper_token_count(num_tokens: int, mask_ratio: float) -> int:
    """Partner tokens of the paper: floor(lambda N) (98 of 196 at lambda = 0.5)."""
    return min(num_tokens, math.floor(mask_ratio * num_tokens))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def block_mask(rows: int, cols: int, count: int, min_block: int = 1, attempts: int = 10) -> Tensor:
    """BEiT-style multi-block mask with about ``count`` ones on a ``rows x cols`` grid.

    Blocks are added until ``count`` tokens are covered or a round of ``attempts`` tries adds
    nothing. Each try: area ~ U(min_block, remaining), aspect ratio r log-uniform in
    [0.3, 1/0.3], h = round(sqrt(area r)), w = round(sqrt(area / r)), accepted only if
    h < rows, w < cols and it adds between 1 and ``remaining`` new tokens.

    ``min_block`` (1 officially, the scaled 14 in the paper variant) is a floor on the *drawn*
    area, as BEiT's ``min_num_patches``: rounding, and the last blocks once fewer than
    ``min_block`` tokens remain, may be smaller, so that the count can be reached (the paper masks
    "until the total number of masked tokens reaches" lambda N).

    Returns:
        (rows * cols,) float32 0/1 mask, row-major; at most ``count`` ones.
    """
    mask = torch.zeros(rows, cols)
    covered, log_lo, log_hi = 0, math.log(ASPECT_MIN), math.log(1 / ASPECT_MIN)
    while covered < count:
        remaining = count - covered
        added = 0
        for _ in range(attempts):
            area = _uniform(min_block, remaining)
            r = math.exp(_uniform(log_lo, log_hi))
            h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < h < rows and 0 < w < cols:
                top = int(torch.randint(0, rows - h + 1, ()))
                left = int(torch.randint(0, cols - w + 1, ()))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= remaining:
                    mask[top:top + h, left:left + w] = 1
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        covered += added
    return mask.flatten()


def random_mask(num_tokens: int, count: int) -> Tensor:
    """``count`` uniformly random tokens: (N,) float32 0/1."""
    mask = torch.zeros(num_tokens)
    mask[torch.randperm(num_tokens)[:count]] = 1
    return mask


def teacher_masses(own_maps: Tensor, partner_mask: Tensor, partner_index: Tensor,
                   partner_source_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 2's masses: own map mass left visible and partner map mass pasted in.

    Args:
        own_maps: (B, N) each sample's normalised map on the token grid (sums to 1).
        partner_mask: (B, N) partner share of each token of the mixed image.
        partner_index: (B,).
        partner_source_mask: (B, N) where the pasted tokens were taken from, in the partner's own
            image, when the mask moves them (SMMix's windows); default ``partner_mask``.
    Returns:
        y_own (B,) = sum_t own(t) (1 - M_t); y_partner (B,) = sum_t own[partner](t) S_t, with S the
        source mask (= M for masks that paste at the same position).
    """
    src = partner_mask if partner_source_mask is None else partner_source_mask
    y_own = (own_maps * (1 - partner_mask)).sum(1)
    y_partner = (own_maps[partner_index] * src).sum(1)
    return y_own, y_partner


def official_target(y: Tensor, y_partner: Tensor, y_own_mass: Tensor, y_partner_mass: Tensor, num_classes: int,
                    smoothing: float) -> Tensor:
    """The released target: eps/K everywhere, + (y_own - eps/2) on the own class and
    + (y_partner - eps/2) on the partner's (added when they coincide). Not a distribution:
    it sums to y_own + y_partner. (B, K)."""
    t = torch.full((y.shape[0], num_classes), smoothing / num_classes, device=y.device, dtype=torch.float32)
    t.scatter_add_(1, y.view(-1, 1), (y_own_mass - smoothing / 2).float().view(-1, 1))
    t.scatter_add_(1, y_partner.view(-1, 1), (y_partner_mass - smoothing / 2).float().view(-1, 1))
    return t


def paper_target(y: Tensor, y_partner: Tensor, y_own_mass: Tensor, y_partner_mass: Tensor, num_classes: int,
                 smoothing: float, normalize: bool = True) -> Tensor:
    """Eq. 2 with smoothed one-hots: y_own t_own + y_partner t_par, divided by y_own + y_partner
    when ``normalize`` (so it is a distribution; an all-zero pair falls back to equal weights). (B, K)."""
    a, b = y_own_mass.float().view(-1, 1), y_partner_mass.float().view(-1, 1)
    t = a * one_hot(y, num_classes, smoothing) + b * one_hot(y_partner, num_classes, smoothing)
    if not normalize:
        return t
    s = a + b
    fallback = 0.5 * (one_hot(y, num_classes, smoothing) + one_hot(y_partner, num_classes, smoothing))
    return torch.where(s > 0, t / s.clamp_min(1e-12), fallback)


def binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """timm's ``BinaryCrossEntropy`` on a dense target: BCE with logits averaged over B x K."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class TokenMix(MixMethod):
    """TokenMix (see the module docstring for the rules and the two variants).

    Args:
        mask: ``"block"``, ``"random"`` or ``"cutmix"`` (Table 7: teacher labels on CutMix boxes).
        labels: ``"teacher"`` (activation-map masses) or ``"area"`` (CutMix's area target).
        mask_ratio: partner share of the tokens (the paper's lambda; official: fixed 0.5 + offset).
        tokenmix_alpha: ``paper`` only: if > 0, lambda ~ Beta(alpha, alpha) per batch (the paper uses
            Beta(1, 1) for DeiT-T / PVT-T / CaiT-XXS) instead of ``mask_ratio``.
        min_tokens: the official 14 (of 196); scaled to the grid. Official: added to the count;
            paper: the minimum block size.
        mixup_alpha, switch_prob: the Mixup branch (taken with probability 1 - switch_prob).
        cutmix_alpha: Beta of the ``mask="cutmix"`` box.
        loss: ``"auto"`` (official: BCE, paper: CE), ``"bce"`` or ``"ce"``.
        normalize: ``paper`` only: normalise the Eq. 2 masses to sum 1 (keep True with CE).
        clamp_negative: clamp teacher logits at 0 before normalising (see the module docstring).
        teacher, dataset, img_size, data_dir: locate the teacher cache
            (``<data_dir>/teacher_maps/<dataset>-<img_size>px-<teacher>``); ``teacher_cache``
            overrides the folder. Opened by :meth:`prepare_training` (or at the first teacher-labelled batch).
    """

    name: ClassVar[str] = "tokenmix"
    colour: ClassVar[str] = "tab:red"
    paper: ClassVar[str] = "TokenMix"
    summary: ClassVar[str] = "token blocks; teacher target"
    gallery: ClassVar[bool] = True
    display_kwargs: ClassVar[dict[str, Any]] = {'switch_prob': 1.0}
    fallback_kwargs: ClassVar[dict[str, Any]] = {"labels": "area"}

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official", mix_prob: float = 1.0,
                 mask: str = "block", labels: str = "teacher", mask_ratio: float = 0.5, tokenmix_alpha: float = 0.0,
                 min_tokens: int = OFFICIAL_MIN_TOKENS, mixup_alpha: float = 0.8, switch_prob: float = 0.5,
                 cutmix_alpha: float = 1.0, loss: str = "auto", normalize: bool = True, clamp_negative: bool = True,
                 teacher: str = "cnn_small", teacher_cache: str = "", dataset: str = "fashion_mnist",
                 img_size: int = 28, data_dir: str = "data") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        for what, value, valid in (("mask", mask, MASKS), ("labels", labels, LABELS), ("loss", loss, LOSSES)):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r} for tokenmix; valid: {', '.join(valid)}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio (partner share) must be in (0, 1), got {mask_ratio}")
        if tokenmix_alpha < 0 or mixup_alpha <= 0 or cutmix_alpha <= 0:
            raise ValueError(f"tokenmix_alpha must be >= 0 and mixup_alpha, cutmix_alpha > 0; got "
                             f"{tokenmix_alpha}, {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self.mask, self.labels, self.mask_ratio, self.tokenmix_alpha = mask, labels, mask_ratio, tokenmix_alpha
        self.min_tokens, self.mixup_alpha, self.switch_prob, self.cutmix_alpha = min_tokens, mixup_alpha, switch_prob, cutmix_alpha
        self.loss_kind = ("bce" if variant == "official" else "ce") if loss == "auto" else loss
        self.normalize, self.clamp_negative = normalize, clamp_negative
        self.teacher, self.teacher_cache = teacher, teacher_cache
        self.dataset, self.img_size, self.data_dir = dataset, img_size, data_dir
        self.maps: Any = None  # tokenmix.methods.teacher_maps.TeacherMaps, opened by prepare_training (or set by hand)
        self.needs = Needs(sample_meta=labels == "teacher", teacher_maps=labels == "teacher")

    # -- setup -------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"token blocks; {self.labels} target"

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Check the token grid; raises ValueError when it is too small for the masks (a block
        must be smaller than the grid in both directions, so a grid below 2x2 would never mix)."""
        g = self.grid
        if g is not None and (g.rows < 2 or g.cols < 2):
            raise ValueError(f"tokenmix needs a token grid of at least 2x2 for its {self.mask} masks; got "
                             f"{g.rows}x{g.cols} ({g}); use a larger img_size or a smaller patch_size")
        return model

    def prepare_training(self) -> None:
        """For teacher labels, open the teacher cache (raises
        :class:`tokenmix.methods.teacher_maps.TeacherCacheError` naming the build command when missing/stale)."""
        if self.labels == "teacher" and self.maps is None:
            self.maps = load_teacher_maps(self.dataset, self.img_size, self.teacher, "train", self.data_dir,
                                          self.teacher_cache or None)

    def verify_inputs(self) -> None:
        """Check that the teacher cache was built from the training images this run reads (same
        count and pixels; not for the ImageNet image folder). Raises TeacherCacheError."""
        if self.labels == "teacher" and self.dataset != "imagenet":
            self.prepare_training()
            verify_cache_data(self.maps, self.dataset, self.img_size, self.data_dir, download=False)

    # -- masks -------------------------------------------------------------------------------
    def token_count(self, grid: TokenGrid) -> int:
        """Partner tokens for this batch (draws lambda when ``paper`` with ``tokenmix_alpha > 0``)."""
        n = grid.num_tokens
        if self.variant == "official":
            return official_token_count(n, self.mask_ratio, self.min_tokens)
        lam = sample_lam(self.tokenmix_alpha) if self.tokenmix_alpha > 0 else self.mask_ratio
        return paper_token_count(n, lam)

    def sample_mask(self, grid: TokenGrid) -> Tensor:
        """One token mask (N,) of partner tokens for ``mask`` in block / random."""
        count = self.token_count(grid)
        if self.mask == "random":
            return random_mask(grid.num_tokens, count)
        min_block = 1 if self.variant == "official" else scaled_min_tokens(grid.num_tokens, self.min_tokens)
        return block_mask(grid.rows, grid.cols, count, min_block)

    # -- phase 1 ------------------------------------------------------------------------------
    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        """Mix a batch. x (B, C, H, W), y (B,); ``meta`` (index, box, flip) for teacher labels."""
        grid = self.grid
        if self._skip():
            return self.unmixed(x, y)
        if not draw_switch(self.switch_prob):
            return mixup_batch(x, y, sample_lam(self.mixup_alpha), grid, self.num_classes, self.smoothing)
        if self.mask == "cutmix":
            mixed = cutmix_batch(x, y, sample_lam(self.cutmix_alpha), grid, self.num_classes, self.smoothing)
        else:
            b = x.shape[0]
            idx = flip_pairing(b, x.device)
            m = self.sample_mask(grid).to(x.device).unsqueeze(0).expand(b, -1).contiguous()  # (B, N)
            lam = 1.0 - m.mean(1)
            mixed = MixedBatch(x=paste_token_mask(x, x[idx], m, grid), y=y, y_partner=y[idx], partner_index=idx,
                               partner_mask=m, lam_area=lam,
                               target=mix_targets(y, y[idx], lam, self.num_classes, self.smoothing))
        mixed.kind = "tokenmix" if self.mask != "cutmix" else "cutmix"
        return self.label_mixed(mixed, meta)

    def label_mixed(self, mixed: MixedBatch, meta: dict[str, Tensor] | None) -> MixedBatch:
        """With teacher labels, the teacher target of a cut-and-paste batch (any mask: the pasted
        partner tokens are read where they came from, ``extras["partner_source_mask"]``, when the
        mask moves them); Mixup and unmixed batches keep their area target."""
        if self.labels == "teacher" and mixed.kind not in ("none", "mixup"):
            self._teacher_target(mixed, self.grid, meta)
        return mixed

    def _teacher_target(self, mixed: MixedBatch, grid: TokenGrid, meta: dict[str, Tensor] | None) -> None:
        if meta is None:
            raise ValueError("tokenmix with labels='teacher' needs each sample's metadata (meta = index, crop box, "
                             "flip): build the training set with build_datasets(..., train_meta=True) and call "
                             "mix(x, y, meta=meta) (the engine does both), or use labels='area'")
        if self.maps is None:
            self.prepare_training()
        own = self.maps.token_maps(meta["index"], mixed.y, meta["box"], meta["flip"], grid.rows, grid.cols,
                                   self.clamp_negative)  # (B, N)
        y_own, y_par = teacher_masses(own, mixed.partner_mask, mixed.partner_index,
                                      mixed.extras.get("partner_source_mask"))
        if self.variant == "official":
            mixed.target = official_target(mixed.y, mixed.y_partner, y_own, y_par, self.num_classes, self.smoothing)
        else:
            mixed.target = paper_target(mixed.y, mixed.y_partner, y_own, y_par, self.num_classes, self.smoothing,
                                        self.normalize)
        mixed.extras.update(own_maps=own, y_own=y_own, y_partner=y_par)

    # -- phase 2 ------------------------------------------------------------------------------
    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """``mixed.target`` (the teacher target is known before the forward), with the masses."""
        info = {"lam": float(mixed.lam_area.mean())}
        if "y_own" in mixed.extras:
            info.update(y_own=float(mixed.extras["y_own"].mean()), y_partner=float(mixed.extras["y_partner"].mean()))
        return mixed.target, info

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """BCE (official) or soft-target CE (paper) against ``mixed.target``."""
        target, info = self.label(outputs, mixed)
        if self.loss_kind == "bce":
            return binary_cross_entropy(outputs.logits, target), info
        return soft_target_cross_entropy(outputs.logits, target), info

    def __repr__(self) -> str:
        return (f"TokenMix(variant={self.variant!r}, mask={self.mask!r}, labels={self.labels!r}, "
                f"loss={self.loss_kind!r}, switch_prob={self.switch_prob})")
