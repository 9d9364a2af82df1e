"""Any mask with any label rule: the papers' ablations as one method, ``compose``.

Every paper of this family argues with ablations that keep one half of a method and swap the
other: TransMix's label on other masks, TokenMix's masks with area vs teacher labels, SMMix's
region with TransMix's or TokenMix's label, TL-Align on several mixes, MixPro's MaskMix with
TransMix's label vs PAL. :class:`Compose` runs any of them::

    m = methods.get("compose", num_classes=10, mask="maskmix", label="transmix")
    step = MixStep(model, m)                       # or MixStep(model, "compose", mask=..., label=...)

How it works: a *mask* is a registered method used only for its mixing (:meth:`MixMethod.mix_batch`,
configured to produce area targets); a *label rule* is a registered method used only for its
label and criterion (:meth:`MixMethod.label_mixed`, :meth:`MixMethod.label`, :meth:`MixMethod.loss`).
They meet in the :class:`~tokenmix.methods.MixedBatch`: the per-token partner share
``partner_mask`` is the one structure every rule reads (and, for masks that move the partner's
tokens, ``extras["partner_source_mask"]``, where they came from). Terms that belong to a mask stay
with it (SMMix's fine-grained and consistency losses, :meth:`MixMethod.auxiliary_loss`), so
``mask="smmix", label="transmix"`` is SMMix with TransMix's label, as SMMix's Table 6 runs it.

Masks (:data:`MASKS`; each on every batch, ``mask_kwargs`` adjust it, e.g. ``{"switch_prob": 0.5}``
to alternate with Mixup as the methods' own recipes do): ``mixup``, ``cutmix`` (timm's pixel box),
``cutmix_token`` (the box snapped to tokens, TL-Align's), ``mixup_cutmix`` (timm's switch),
``tokenmix_block`` / ``tokenmix_random`` (TokenMix's masks), ``smmix`` (the max-min attention
windows, with SMMix's extra losses; ``mask_kwargs={"w_fine": 0, "w_con": 0}`` drops them), ``maskmix``
(MixPro's grid).

Label rules (:data:`LABELS`): ``area`` (the mask's own area target), ``transmix``, ``tl_align``,
``teacher`` (TokenMix's activation maps; needs the teacher cache), ``pal`` (MixPro's progressive
attention label). Every rule leaves Mixup and unmixed batches with their area target (every token
is a blend there).

Validity: every mask works with every rule on ViT/DeiT-style models (CLS token or not: the rules
have their readings, see each module). Invalid combinations fail when the method is built or the
model is prepared, with the reason: an unknown name, a mask keyword that would change its labels,
a label rule that needs attention or a token grid on a model without them, SMMix's mask on a
hierarchical model (its windows live on the last stage's grid, every rule reads the input grid).

The ``variant`` is passed to both halves (``official`` / ``paper`` of each; MixPro's ``official``
switches PAL off, so ``label="pal"`` forces ``pal=True``).

The papers' ablation rows, by name (:data:`PAPER_ABLATIONS`; ImageNet numbers in the papers):

- TokenMix Table 7 ("refinement" on CutMix): ``cutmix`` x ``area`` / ``teacher``.
- TokenMix Table 8 (mask sampling, area targets): ``cutmix`` (region), ``tokenmix_random``,
  ``tokenmix_block`` x ``area``; Table 9 (with refinement): ``tokenmix_random`` / ``tokenmix_block``
  x ``area`` / ``teacher``.
- TL-Align Table 7 (TL-Align on other mixes): ``cutmix``, ``mixup_cutmix``, ``tokenmix_random``,
  ``tokenmix_block`` x ``area`` / ``tl_align``.
- SMMix Table 6 (label reconstruction on SMMix): ``smmix`` x ``area`` (SMMix itself) /
  ``transmix`` / ``teacher``.
- MixPro (MaskMix with TransMix's label vs PAL, the paper's ablation as the abstract describes it;
  its table could not be read here): ``maskmix`` x ``area`` / ``transmix`` / ``pal``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch.nn as nn
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, ModelOutputs, Needs
from tokenmix.methods.registry import get, method_class, parameters, register

#: mask name -> (registered method, its fixed keywords: the mask alone, with area targets)
MASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixup": ("mixup", {}),
    "cutmix": ("cutmix", {}),
    "cutmix_token": ("cutmix", {"cutmix_snap": "token"}),
    "mixup_cutmix": ("mixup_cutmix", {}),
    "tokenmix_block": ("tokenmix", {"mask": "block", "labels": "area", "switch_prob": 1.0, "loss": "ce"}),
    "tokenmix_random": ("tokenmix", {"mask": "random", "labels": "area", "switch_prob": 1.0, "loss": "ce"}),
    "smmix": ("smmix", {"switch_prob": 1.0}),
    "maskmix": ("mixpro", {"pal": False, "switch_prob": 1.0}),
}
#: mask keywords a user may not override (they would change the mask's labels, not its mixing)
_MASK_FIXED = {"labels", "loss", "pal"}
#: label rule name -> (registered method, its fixed keywords)
LABELS: dict[str, tuple[str, dict[str, Any]]] = {
    "area": ("none", {}),
    "transmix": ("transmix", {}),
    "tl_align": ("tl_align", {}),
    "teacher": ("tokenmix", {"labels": "teacher"}),
    "pal": ("mixpro", {"pal": True}),
}

#: the papers' ablation rows: name -> (mask, label)
PAPER_ABLATIONS: dict[str, tuple[str, str]] = {
    "TokenMix T7 CutMix": ("cutmix", "area"),
    "TokenMix T7 CutMix + refinement": ("cutmix", "teacher"),
    "TokenMix T8 region": ("cutmix", "area"),
    "TokenMix T8 random": ("tokenmix_random", "area"),
    "TokenMix T8 block": ("tokenmix_block", "area"),
    "TokenMix T9 random + refinement": ("tokenmix_random", "teacher"),
    "TokenMix T9 block + refinement": ("tokenmix_block", "teacher"),
    "TL-Align T7 CutMix": ("cutmix", "area"),
    "TL-Align T7 CutMix + TL-Align": ("cutmix", "tl_align"),
    "TL-Align T7 MixUp+CutMix": ("mixup_cutmix", "area"),
    "TL-Align T7 MixUp+CutMix + TL-Align": ("mixup_cutmix", "tl_align"),
    "TL-Align T7 Random": ("tokenmix_random", "area"),
    "TL-Align T7 Random + TL-Align": ("tokenmix_random", "tl_align"),
    "TL-Align T7 Block-wise": ("tokenmix_block", "area"),
    "TL-Align T7 Block-wise + TL-Align": ("tokenmix_block", "tl_align"),
    "SMMix T6 w/o": ("smmix", "area"),
    "SMMix T6 + TransMix": ("smmix", "transmix"),
    "SMMix T6 + TokenMix": ("smmix", "teacher"),
    "MixPro MaskMix": ("maskmix", "area"),
    "MixPro MaskMix + TransMix label": ("maskmix", "transmix"),
    "MixPro MaskMix + PAL": ("maskmix", "pal"),
}


def _merge_needs(a: Needs, b: Needs) -> Needs:
    """What both halves need from the forward (captures united)."""
    if a.attention_blocks and b.attention_blocks and a.attention_reduce != b.attention_reduce:
        raise ValueError(f"the mask and the label rule need the attention reduced differently "
                         f"({a.attention_reduce!r} vs {b.attention_reduce!r})")
    if a.qk is True or b.qk is True:
        qk: bool | tuple[int, ...] = True
    else:
        qk = tuple(sorted(set(a.qk or ()) | set(b.qk or ()))) or False
    return Needs(attention_blocks=tuple(sorted(set(a.attention_blocks) | set(b.attention_blocks))),
                 attention_reduce=a.attention_reduce if a.attention_blocks else b.attention_reduce,
                 tokens=a.tokens or b.tokens, qk=qk, sample_meta=a.sample_meta or b.sample_meta,
                 teacher_maps=a.teacher_maps or b.teacher_maps)


class Compose(MixMethod):
    """A mask of one method with the label rule of another (see the module docstring).

    Args:
        mask: a name of :data:`MASKS`.
        label: a name of :data:`LABELS`.
        mask_kwargs: keywords of the mask's method (e.g. ``{"cutmix_alpha": 0.5}``,
            ``{"mask_patch": 8}``, ``{"switch_prob": 0.5}``, ``{"variant": "paper"}`` for this half
            alone); not ``labels``, ``loss``, ``pal``.
        label_kwargs: keywords of the rule's method (e.g. ``{"teacher": "cnn_small"}`` for
            ``teacher``, ``{"source": "qk"}`` for ``tl_align``).
        dataset, img_size, data_dir: the training data (``RunConfig`` fills them), passed to the
            halves that take them (TokenMix's teacher cache is looked up with them).
    """

    name: ClassVar[str] = "compose"
    colour: ClassVar[str] = "tab:gray"
    summary: ClassVar[str] = "a mask of one method with the label rule of another"

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official", mix_prob: float = 1.0,
                 mask: str = "cutmix", label: str = "area", mask_kwargs: dict[str, Any] | None = None,
                 label_kwargs: dict[str, Any] | None = None, dataset: str = "fashion_mnist", img_size: int = 28,
                 data_dir: str = "data") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        for what, value, valid in (("mask", mask, MASKS), ("label", label, LABELS)):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r} for compose; valid: {', '.join(valid)}")
        mask_kwargs, label_kwargs = dict(mask_kwargs or {}), dict(label_kwargs or {})
        fixed = sorted(set(mask_kwargs) & _MASK_FIXED)
        if fixed:
            raise ValueError(f"mask_kwargs may not set {', '.join(fixed)} (they choose labels, not the mask): "
                             f"pick the label rule with label= ({', '.join(LABELS)})")
        clash = sorted(k for k, v in LABELS[label][1].items() if k in label_kwargs and label_kwargs[k] != v)
        if clash:
            raise ValueError(f"label_kwargs may not change {', '.join(clash)}: they make {label!r} the rule it is")
        self.mask_name, self.label_name = mask, label
        common = {"smoothing": smoothing, "variant": variant,  # and where the data lives (the teacher cache)
                  "context": {"dataset": dataset, "img_size": img_size, "data_dir": data_dir}}
        mask_method, mask_fixed = MASKS[mask]
        # each half: the shared settings, then its fixed keywords, then the user's (``variant`` and
        # ``smoothing`` in mask_kwargs / label_kwargs set that half alone)
        self.masker = get(mask_method, **{"num_classes": num_classes, "mix_prob": mix_prob,
                                          **_variant(mask_method, common), **mask_fixed, **mask_kwargs})
        label_method, label_fixed = LABELS[label]
        self.labeller = get(label_method, **{"num_classes": num_classes, **_variant(label_method, common),
                                             **label_kwargs, **label_fixed})
        self.needs = _merge_needs(self.masker.needs, self.labeller.needs)
        self.idle_parameters = self.masker.idle_parameters or self.labeller.idle_parameters  # type: ignore[misc]

    @property
    def maps(self) -> Any:
        """The teacher-map cache of a ``teacher`` rule (None otherwise)."""
        return getattr(self.labeller, "maps", None)

    @maps.setter
    def maps(self, value: Any) -> None:
        if hasattr(self.labeller, "maps"):
            self.labeller.maps = value

    def describe(self) -> str:
        return f"{self.mask_name} mask; {self.label_name} label"

    # -- setup -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> nn.Module:
        """Set both halves up on the model (neither becomes its owner: the composition is)."""
        done: list[MixMethod] = []
        for part, role in ((self.masker, f"mask {self.mask_name!r}"), (self.labeller, f"label rule {self.label_name!r}")):
            part.grid = self.grid
            try:
                model = part.setup_model(model)
            except (ValueError, TypeError) as e:
                for other in done:  # nothing stays on the model of a failed preparation (e.g. SMMix's head)
                    other.release_model(model)
                raise ValueError(f"compose: the {role} cannot run on {type(model).__name__}: {e}") from e
            done.append(part)
        if self.masker.grid != self.grid:
            self.masker.release_model(model)
            raise ValueError(f"compose: the mask {self.mask_name!r} mixes on the last stage's grid of "
                             f"{type(model).__name__} ({self.masker.grid.rows}x{self.masker.grid.cols}), the label "
                             f"rules read the input token grid ({self.grid.rows}x{self.grid.cols}); use it on "
                             "ViT/DeiT, CaiT or CCT")
        self.needs = _merge_needs(self.masker.needs, self.labeller.needs)
        return model

    def release_model(self, model: nn.Module) -> nn.Module:
        for part in (self.masker, self.labeller):
            part.release_model(model)
        return super().release_model(model)

    def prepare_training(self) -> None:
        self.masker.prepare_training()
        self.labeller.prepare_training()

    def verify_inputs(self) -> None:
        self.masker.verify_inputs()
        self.labeller.verify_inputs()

    @contextlib.contextmanager
    def forward_context(self, mixed: MixedBatch | None) -> Iterator[dict[str, Any]]:
        with self.masker.forward_context(mixed) as a, self.labeller.forward_context(mixed) as b:
            extras: dict[str, Any] = {}
            yield extras
        extras.update(a)
        extras.update(b)

    def forward_extras(self, tokens: Tensor | None, mixed: MixedBatch) -> dict[str, Any]:
        return {**self.masker.forward_extras(tokens, mixed), **self.labeller.forward_extras(tokens, mixed)}

    # -- the two phases ------------------------------------------------------------------------
    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        """The mask's mixing, then the part of the label rule known before the forward."""
        self.masker.grid = self.labeller.grid = self.grid  # also when the grid was set directly
        return self.labeller.label_mixed(self.masker.mix_batch(x, y, meta), meta)

    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        return self.labeller.label(outputs, mixed)

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """The label rule's loss, plus the mask's own terms (SMMix: ``w_cls`` scales the rule's)."""
        loss, info = self.labeller.loss(outputs, mixed)
        aux, aux_info = self.masker.auxiliary_loss(outputs, mixed)
        if aux is None:
            return loss, info
        info.update(l_cls=float(loss.detach()), **aux_info)
        return getattr(self.masker, "w_cls", 1.0) * loss + aux, info

    def __repr__(self) -> str:
        return f"Compose(mask={self.mask_name!r}, label={self.label_name!r}, variant={self.variant!r})"


def _variant(method: str, common: dict[str, Any]) -> dict[str, Any]:
    """``smoothing``, ``variant`` (when the method has it) and the data context (``dataset``,
    ``img_size``, ``data_dir``: the parameters the method takes) for a registered method."""
    out: dict[str, Any] = {"smoothing": common["smoothing"]}
    if common["variant"] in method_class(method).variants:
        out["variant"] = common["variant"]
    params = parameters(method)
    out.update({k: v for k, v in common["context"].items() if k in params})
    return out


register(Compose)  # here, not in the registry: Compose builds its halves through the registry

__all__ = ["Compose", "LABELS", "MASKS", "PAPER_ABLATIONS"]
