"""The interface shared by every mixing method.

Convention for mixing ratios (used by every module of the package): ``lam`` is the share of the
**own** sample (timm's convention) and a target is ``lam * y_own + (1 - lam) * y_partner``.
``partner_mask`` is always the **partner's** share of each token. Methods whose paper uses the
other convention (TransMix's lambda is the partner share) convert at their boundary.

A method works in two phases because TransMix, SMMix and TL-Align need the forward pass before
the target is known; :class:`tokenmix.methods.MixStep` runs both around the forward::

    model = method.prepare_model(model)       # records the token grid, installs hooks (idempotent)
    mixed = method.mix(x, y, meta)            # before the forward -> MixedBatch
    outputs = forward_outputs(model, method.needs, mixed.x)   # ModelOutputs: logits, captures
    loss, info = method.loss(outputs, mixed)  # label rule (method.label) + criterion

A method object holds only its configuration and what it learnt about the model in
``prepare_model``; everything about one batch travels in the returned ``MixedBatch`` and
``ModelOutputs``, and ``loss`` changes neither.

Pairing: sample i is mixed with sample ``B - 1 - i`` (the official codes' flip pairing). In an
odd batch the middle sample is its own partner: it stays unmixed, with its own label
(:func:`keep_unpaired`), so a loader's last, partial batch (``drop_last=False``) mixes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tokenmix.models.backbones import Backbone


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of a patch-based model: ``rows x cols`` tokens, each covering
    ``patch_h x patch_w`` input pixels (the tokenizer's total stride)."""

    rows: int
    cols: int
    patch_h: int
    patch_w: int

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def img_size(self) -> tuple[int, int]:
        return self.rows * self.patch_h, self.cols * self.patch_w

    @classmethod
    def from_model(cls, model: nn.Module) -> "TokenGrid":
        """The patch-embedding grid of a supported backbone (ViT/DeiT/CCT, CaiT, Swin, PVT v2; see
        :class:`tokenmix.models.backbones.Backbone`)."""
        return cls(*Backbone.of(model).input_grid)

    @classmethod
    def for_image(cls, img_size: int | tuple[int, int], patch_size: int | tuple[int, int]) -> "TokenGrid":
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {(h, w)} is not divisible by the patch size {(ph, pw)}")
        return cls(h // ph, w // pw, ph, pw)


@dataclass
class MixedBatch:
    """A mixed batch, produced by :meth:`MixMethod.mix` before the forward.

    Attributes:
        x: (B, C, H, W) mixed images.
        y: (B,) own class indices (int64).
        y_partner: (B,) partner class indices (``y[partner_index]``).
        partner_index: (B,) index of each sample's partner in the batch.
        partner_mask: (B, N) share of each token (row-major over the token grid) that comes from
            the partner, in [0, 1]; the one structure every label rule consumes.
        lam_area: (B,) own (kept) share of the image area, i.e. ``1 - partner_mask.mean(1)``
            for box and token masks, the Mixup coefficient for Mixup.
        target: (B, K) the target known before the forward: the area-based soft target (label
            smoothing applied per source before mixing), or a method's own (TokenMix's teacher
            target). Methods whose label depends on the forward compute theirs in ``label``.
        kind: what produced the batch: ``"none"``, ``"mixup"``, ``"cutmix"`` or a method's own mask.
        extras: method-specific state (boxes, masks, ...).
    """

    x: Tensor
    y: Tensor
    y_partner: Tensor
    partner_index: Tensor
    partner_mask: Tensor
    lam_area: Tensor
    target: Tensor
    kind: str = "none"
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelOutputs:
    """What the forward returns to :meth:`MixMethod.loss`.

    Attributes:
        logits: (B, K).
        tokens: final normalised tokens (B, T, D) for ViTs (prefix tokens first), or None.
        attention: block index -> captured attention, reduced as the method asked
            (see :class:`tokenmix.models.attention.AttentionCapture`).
        qk: per block ``(q, k, scale)`` with q, k (B, H, T, d) detached, when ``needs.qk``.
        extras: model-side state, e.g. auxiliary logits of model-side methods.
    """

    logits: Tensor
    tokens: Tensor | None = None
    attention: dict[int, Tensor] = field(default_factory=dict)
    qk: list[tuple[Tensor, Tensor, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """What a method needs from the forward pass.

    Attributes:
        attention_blocks: block indices whose attention must be captured (negative = from the end).
        attention_reduce: reduction passed to the capture (``"none"``, ``"head_mean"``, ``"cls"``,
            ``"query_mean"``).
        tokens: whether the final tokens are needed.
        qk: capture queries and keys (fused attention stays on): ``True`` = every block, a tuple =
            those block indices. For rules that need only a few attention rows (TransMix's CLS
            row) or each block's attention applied to small per-token values (TL-Align); they
            arrive in ``ModelOutputs.qk`` as ``[(q, k, scale), ...]`` in block order.
        sample_meta: the method's ``mix`` needs each sample's metadata (``meta`` = dataset index,
            crop box, flip; see :mod:`tokenmix.data`), e.g. to look up TokenMix's teacher maps.
            The training set then yields it (every method takes ``mix(x, y, meta)``; the others ignore it).
        teacher_maps: the method reads a teacher-map cache (:mod:`tokenmix.methods.teacher_maps`,
            built by ``python -m tokenmix teacher``) through its ``maps`` attribute.
    """

    attention_blocks: tuple[int, ...] = ()
    attention_reduce: str = "head_mean"
    tokens: bool = False
    qk: bool | tuple[int, ...] = False
    sample_meta: bool = False
    teacher_maps: bool = False


def one_hot(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Smoothed one-hot targets, timm semantics: ``1 - s + s/K`` on the class, ``s/K`` elsewhere.

    Args:
        y: (B,) class indices.
    Returns:
        (B, K) float32.
    """
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    return out.scatter_(1, y.long().view(-1, 1), on)


def mix_targets(y: Tensor, y_partner: Tensor, lam: Tensor | float, num_classes: int,
                smoothing: float = 0.0) -> Tensor:
    """``lam * onehot(y) + (1 - lam) * onehot(y_partner)``, each smoothed first; lam (B,) or scalar."""
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=y.device).reshape(-1, 1)
    return lam_t * one_hot(y, num_classes, smoothing) + (1 - lam_t) * one_hot(y_partner, num_classes, smoothing)


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_k target_k * log_softmax(logits)_k``; logits, target (B, K)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def flip_pairing(batch_size: int, device: torch.device | None = None) -> Tensor:
    """Partner of sample i is sample ``B - 1 - i`` (the pairing of all five official codes); in an
    odd batch the middle sample is paired with itself (and :func:`keep_unpaired` leaves it unmixed).

    Raises:
        ValueError: for an empty batch.
    """
    if batch_size < 1:
        raise ValueError(f"cannot mix an empty batch (batch size {batch_size})")
    return torch.arange(batch_size - 1, -1, -1, device=device)


def keep_unpaired(mixed: MixedBatch, x: Tensor, num_classes: int, smoothing: float) -> MixedBatch:
    """The batch with every sample that is its own partner restored: its input image ``x`` (B, C,
    H, W), its own (smoothed) label, a zero partner mask and an own share of 1. Even batches with
    flip pairing have no such sample and are returned as they are (no copy)."""
    b = x.shape[0]
    if b % 2 == 0 or mixed.kind == "none":
        return mixed
    own = mixed.partner_index == torch.arange(b, device=mixed.partner_index.device)  # (B,)
    keep = own.view(-1, *([1] * (x.dim() - 1)))
    return replace(
        mixed, x=torch.where(keep, x, mixed.x),
        partner_mask=mixed.partner_mask.masked_fill(own[:, None], 0.0),
        lam_area=mixed.lam_area.masked_fill(own, 1.0),
        target=torch.where(own[:, None], one_hot(mixed.y, num_classes, smoothing), mixed.target))


class MixMethod:
    """Base class: the identity method (``none``), with the shared plumbing.

    A subclass sets ``name`` and overrides what it changes:

    - :meth:`mix_batch` -- the mask and the area target, before the forward;
    - :meth:`label` -- the label rule, when the target depends on the forward (reads
      ``ModelOutputs``, returns a new target; never changes its inputs); :meth:`label_mixed` the
      part of a label rule known before the forward (TokenMix's teacher target);
    - :meth:`loss` -- the criterion, when it is not the soft-target cross-entropy or has more terms
      (:meth:`auxiliary_loss`: the terms that belong to the method's mask, kept when the mask is
      combined with another label rule);
    - :meth:`setup_model` / :meth:`release_model` -- what it installs on the model (hooks,
      wrappers, trainable heads) and how that is removed;
    - :meth:`forward_context` / :meth:`forward_extras` -- computations inside the training forward
      (model-side mixing; trainable heads on the outputs, so that DDP sees them);
    - class attributes ``needs`` (what the forward must capture), ``idle_parameters`` (DDP's
      ``find_unused_parameters``) and ``family`` (how reports group and name it).

    Every constructor argument must be a typed keyword so that the registry can validate
    parameters by name.

    Args:
        num_classes: K.
        smoothing: label smoothing applied to each source label before mixing (timm's
            ``label_smoothing``).
        variant: ``"official"`` (reproduce the released code) or ``"paper"``.
        mix_prob: probability that a batch is mixed at all (timm's ``prob``).
    """

    name: ClassVar[str] = "none"
    variants: ClassVar[tuple[str, ...]] = ("official", "paper")
    needs: Needs = Needs()
    #: the method trains parameters that some batches leave unused (DDP's ``find_unused_parameters``)
    idle_parameters: ClassVar[bool] = False
    #: the paper that proposed the method, as the report's paper tables name it ("" for the baselines)
    paper: ClassVar[str] = ""
    #: one line saying what the method does to a batch, for figure legends (see :meth:`describe`)
    summary: ClassVar[str] = "no mixing"
    #: the method's colour in figures (a matplotlib colour)
    colour: ClassVar[str] = "0.4"
    #: whether the mixed-sample gallery shows the method (False where its images repeat another row's)
    gallery: ClassVar[bool] = False
    #: constructor overrides that show the method's own mask in figures (e.g. ``switch_prob=1``:
    #: its own branch, not the Mixup it switches with)
    display_kwargs: ClassVar[dict[str, Any]] = {}
    #: constructor overrides under which the method runs without external inputs (TokenMix without
    #: a teacher cache: area labels); figures use them when those inputs are missing
    fallback_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if variant not in self.variants:
            raise ValueError(f"unknown variant {variant!r} for method {self.name!r}; "
                             f"valid: {', '.join(self.variants)}")
        if not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mix_prob must be in [0, 1], got {mix_prob}")
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.variant = variant
        self.mix_prob = mix_prob
        self.grid: TokenGrid | None = None

    # -- setup -------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line on what this configured method does to a batch (default: :attr:`summary`)."""
        return self.summary

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Make ``model`` ready for this method and return it: record its token grid, then
        :meth:`setup_model`. Idempotent: a model this method already prepared is returned as it
        is; a model another method prepared is first released (:meth:`release_model`)."""
        owner = model.__dict__.get(_OWNER)
        if owner is self:
            return model
        if owner is not None:
            owner.release_model(model)
        self.grid = TokenGrid.from_model(model)
        model = self.setup_model(model)
        model.__dict__[_OWNER] = self
        return model

    def setup_model(self, model: nn.Module) -> nn.Module:
        """What the method installs on the model, once (called by :meth:`prepare_model` after the
        grid is known): model-side methods (TokenMixup) their hooks and wrappers, methods with
        trainable heads the heads as submodules (so the optimiser, DDP and checkpoints see them)."""
        return model

    def release_model(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`setup_model`: remove the hooks, wrappers and heads the method added."""
        model.__dict__.pop(_OWNER, None)
        return model

    def prepare_training(self) -> None:
        """Called once before the first training step (after :meth:`prepare_model`; not when a
        trained model is merely loaded): open what the labels need, e.g. TokenMix's teacher-map
        cache, so that a missing input fails before training starts."""

    def verify_inputs(self) -> None:
        """Check, before a run starts, that the method's external inputs match the training data
        (TokenMix: its teacher cache was built from the same images). Default: nothing to check."""

    @contextlib.contextmanager
    def forward_context(self, mixed: MixedBatch | None) -> Iterator[dict[str, Any]]:
        """Context of one training forward on ``mixed``: yields a dict that ends up in
        ``ModelOutputs.extras``. Model-side methods (TokenMixup's hooks) read the batch and write
        their per-batch results there; nothing is kept on the method. Default: nothing."""
        yield {}

    def forward_extras(self, tokens: Tensor | None, mixed: MixedBatch) -> dict[str, Any]:
        """Trainable computations of the method on the forward's outputs, run inside the training
        forward (so DDP sees them; ``ModelOutputs.extras``). None by default; SMMix's token head."""
        return {}

    def _require_grid(self, x: Tensor) -> TokenGrid:
        if self.grid is None:
            raise RuntimeError(f"method {self.name!r} does not know the token grid: call "
                               "`method.prepare_model(model)` (or set `method.grid = TokenGrid(...)`) first")
        if tuple(x.shape[-2:]) != self.grid.img_size:
            raise ValueError(f"input of size {tuple(x.shape[-2:])} does not match the token grid "
                             f"{self.grid} (expects {self.grid.img_size})")
        return self.grid

    # -- phase 1 ------------------------------------------------------------------------------
    def unmixed(self, x: Tensor, y: Tensor) -> MixedBatch:
        """The identity mix: own label only, empty partner mask."""
        grid = self._require_grid(x)
        b = x.shape[0]
        idx = torch.arange(b, device=x.device)
        return MixedBatch(
            x=x, y=y, y_partner=y, partner_index=idx,
            partner_mask=x.new_zeros((b, grid.num_tokens), dtype=torch.float32),
            lam_area=x.new_ones(b, dtype=torch.float32),
            target=one_hot(y, self.num_classes, self.smoothing), kind="none",
        )

    def mix(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        """Mix a batch: x (B, C, H, W), y (B,) int64 -> :class:`MixedBatch`.

        ``meta``: each sample's metadata as collated by the loader (dataset index, crop box,
        flip; see :mod:`tokenmix.data`), for methods with ``needs.sample_meta`` (TokenMix's
        teacher labels); ignored by the others. Any batch size >= 1 (see :func:`keep_unpaired`)."""
        self._require_grid(x)
        return keep_unpaired(self.mix_batch(x, y, meta), x, self.num_classes, self.smoothing)

    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None) -> MixedBatch:
        """The method's mixing (override this; :meth:`mix` checks the grid and restores unpaired
        samples around it)."""
        return self.unmixed(x, y)

    def _skip(self) -> bool:
        """True when this batch is left unmixed (probability ``1 - mix_prob``)."""
        return self.mix_prob < 1.0 and float(torch.rand(())) >= self.mix_prob

    def label_mixed(self, mixed: MixedBatch, meta: dict[str, Tensor] | None) -> MixedBatch:
        """The part of the label rule known before the forward, applied to a mixed batch (also one
        another method's mask produced, see :class:`tokenmix.methods.Compose`): TokenMix's teacher
        target. Default: the batch unchanged."""
        return mixed

    # -- phase 2 ------------------------------------------------------------------------------
    def auxiliary_loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor | None, dict[str, float]]:
        """Loss terms the method's *mask* adds beside the classification term, already weighted
        (SMMix's fine-grained and consistency losses), and floats to log. Default: none."""
        return None, {}

    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """The target (B, K) the method trains ``mixed`` towards, given the forward's outputs, and
        floats to log. Default: the area target ``mixed.target``."""
        return mixed.target, {"lam": float(mixed.lam_area.mean())}

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """Soft-target cross-entropy against :meth:`label`. Returns (loss, info)."""
        target, info = self.label(outputs, mixed)
        return soft_target_cross_entropy(outputs.logits, target), info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(variant={self.variant!r}, smoothing={self.smoothing})"


#: attribute of a prepared model naming the method that prepared it (see MixMethod.prepare_model)
_OWNER = "_tokenmix_method"


def entropy(p: Tensor) -> float:
    """Mean entropy (nats) of the rows of a (B, K) distribution, for logging."""
    p = p.clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())
