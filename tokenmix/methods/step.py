"""The one training step of the package: mix -> forward with the captures the method asks for -> loss.

Every caller (the engine, the overhead benchmark, the label-fidelity benchmark, the notebooks and
your own training loop) goes through :class:`MixStep`, so the sequence exists once::

    step = MixStep(model, "transmix", num_classes=10)   # prepares the model (idempotent)
    out = step(x, y)                                     # mix, forward, loss
    out.loss.backward()                                  # out.info: floats to log

``MixStep`` is an ``nn.Module`` holding the model (and, through it, any trainable part a method
adds, e.g. SMMix's token head or TokenMixup's ScoreNet), so ``step.parameters()`` is what the
optimiser needs and ``DistributedDataParallel(step)`` wraps the whole step: everything trained
runs inside its ``forward``, as DDP requires.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, ModelOutputs, Needs
from tokenmix.methods.registry import get
from tokenmix.models.attention import AttentionCapture, QKCapture


def forward_outputs(model: nn.Module, needs: Needs, x: Tensor) -> ModelOutputs:
    """One forward of ``model`` on ``x`` (B, C, H, W) returning what ``needs`` asks for: the logits
    (B, K), the final tokens (B, T, D) when ``needs.tokens``, the attention of
    ``needs.attention_blocks`` (:class:`~tokenmix.models.attention.AttentionCapture`, detached)
    and each block's ``(q, k, scale)`` when ``needs.qk``
    (:class:`~tokenmix.models.attention.QKCapture`)."""
    with contextlib.ExitStack() as stack:
        cap = (stack.enter_context(AttentionCapture(model, needs.attention_blocks, needs.attention_reduce))
               if needs.attention_blocks else None)
        qk = stack.enter_context(QKCapture(model, None if needs.qk is True else needs.qk)) if needs.qk else None
        if needs.tokens:
            tokens = model.forward_features(x)
            logits = model.forward_head(tokens)
        else:
            tokens, logits = None, model(x)
    return ModelOutputs(logits=logits, tokens=tokens, attention=cap.all() if cap else {},
                        qk=qk.all() if qk else [])


@dataclass
class StepOutput:
    """What one :class:`MixStep` call returns.

    Attributes:
        loss: scalar training loss (with grad).
        info: floats to log (``lam`` and the method's own terms, e.g. ``lam_transmix``).
        mixed: the mixed batch (:class:`~tokenmix.methods.MixedBatch`).
        outputs: the forward's :class:`~tokenmix.methods.ModelOutputs` (with ``extras`` holding
            what the method computed inside the forward, e.g. TokenMixup's HTM results).
        times: seconds spent in ``mix``, ``forward`` and ``loss`` when the step is timed
            (:attr:`MixStep.clock` set), else empty.
    """

    loss: Tensor
    info: dict[str, float]
    mixed: MixedBatch
    outputs: ModelOutputs
    times: dict[str, float] = field(default_factory=dict)


class MixStep(nn.Module):
    """A model and a mixing method, called as ``step(x, y, meta=None) -> StepOutput``.

    Args:
        model: any supported timm / tokenmix model (ViT/DeiT, CCT, CaiT, Swin, PVT v2).
        method: a :class:`~tokenmix.methods.MixMethod` or a registered name
            (:func:`tokenmix.methods.available`); a name is built with ``method_kwargs`` (timm's
            ``timm.data.Mixup`` argument names are accepted, see :func:`tokenmix.methods.get`).
            ``num_classes`` defaults to the model's.
        amp: run the forward and the loss under ``torch.autocast`` (CUDA only; the mixing runs
            outside it).

    The method prepares the model here (records its token grid, installs its hooks, attaches its
    trainable head); preparing the same model twice is a no-op. In ``forward``: the method mixes
    ``x`` (B, C, H, W) and ``y`` (B,) (``meta``: per-sample metadata, for TokenMix's teacher
    labels; other methods ignore it), the model runs once on the mixed images with the captures
    the method needs, the method's trainable extras run on its outputs, and the method's loss
    is returned.
    """

    def __init__(self, model: nn.Module, method: MixMethod | str, amp: bool = False, **method_kwargs: Any) -> None:
        super().__init__()
        if isinstance(method, str):
            method_kwargs.setdefault("num_classes", _num_classes(model))
            method = get(method, **method_kwargs)
        elif method_kwargs:
            raise TypeError(f"method arguments {sorted(method_kwargs)} are only accepted with a method name")
        self.method = method
        self.model = method.prepare_model(model)
        self.amp = amp
        #: set to a function returning the time (e.g. synchronising CUDA first) to time each phase
        self.clock: Callable[[], float] | None = None

    def outputs(self, x: Tensor, mixed: MixedBatch | None = None) -> ModelOutputs:
        """The forward on (already mixed) images ``x`` with the method's captures; given the mixed
        batch, also the method's in-forward computations (:meth:`MixMethod.forward_context`,
        :meth:`MixMethod.forward_extras`) into ``ModelOutputs.extras``."""
        m = self.method
        with m.forward_context(mixed) as extras:
            out = forward_outputs(self.model, m.needs, x)
        out.extras.update(extras)
        if mixed is not None:
            out.extras.update(m.forward_extras(out.tokens, mixed))
        return out

    def forward(self, x: Tensor, y: Tensor, meta: Any = None) -> StepOutput:
        clock = self.clock
        t0 = clock() if clock else 0.0
        mixed = self.method.mix(x, y, meta)
        t1 = clock() if clock else 0.0
        with torch.autocast(x.device.type, enabled=self.amp):
            outputs = self.outputs(mixed.x, mixed)
            t2 = clock() if clock else 0.0
            loss, info = self.method.loss(outputs, mixed)
        times = {"mix": t1 - t0, "forward": t2 - t1, "loss": clock() - t2} if clock else {}
        return StepOutput(loss, info, mixed, outputs, times)

    @property
    def find_unused_parameters(self) -> bool:
        """What ``DistributedDataParallel(step, find_unused_parameters=...)`` needs: True when the
        method trains parameters that some batches leave idle (:attr:`MixMethod.idle_parameters`)."""
        return self.method.idle_parameters


def perf_clock(device: torch.device) -> Callable[[], float]:
    """A clock for :attr:`MixStep.clock`: ``time.perf_counter`` after a CUDA synchronise on CUDA."""
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not n:
        raise ValueError(f"cannot read num_classes from {type(model).__name__}; pass num_classes=...")
    return int(n)


__all__ = ["MixStep", "StepOutput", "forward_outputs", "perf_clock"]
