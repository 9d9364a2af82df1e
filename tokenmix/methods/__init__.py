"""Mixing methods behind one interface, their registry, and the training step.

>>> from tokenmix import methods
>>> methods.available()
['compose', 'cutmix', 'mixpro', 'mixup', 'mixup_cutmix', 'none', 'smmix', 'tl_align', 'tokenmix', 'tokenmixup', 'transmix']
>>> m = methods.get("cutmix", num_classes=10, cutmix_alpha=1.0)
>>> m = methods.get("mixup_cutmix", num_classes=10, label_smoothing=0.1, prob=1.0, mode="batch")  # timm names

Adding a method: a module with a :class:`MixMethod` subclass, one line in the registry below, and
a notebook; the tests iterate over :func:`available` and pick it up.
"""
from __future__ import annotations

from tokenmix.methods.base import (MixedBatch, MixMethod, ModelOutputs, Needs, TokenGrid, keep_unpaired, one_hot,
                                    soft_target_cross_entropy)
from tokenmix.methods.baselines import CutMix, Mixup, MixupCutMix
from tokenmix.methods.compose import Compose
from tokenmix.methods.mixpro import MixPro
from tokenmix.methods.registry import available, get, method_class, parameters, register
from tokenmix.methods.smmix import SMMix
from tokenmix.methods.step import MixStep, StepOutput, forward_outputs
from tokenmix.methods.tlalign import TLAlign
from tokenmix.methods.tokenmix import TokenMix
from tokenmix.methods.tokenmixup import TokenMixup
from tokenmix.methods.transmix import TransMix

__all__ = ["MixMethod", "MixStep", "MixedBatch", "ModelOutputs", "Needs", "StepOutput", "TokenGrid", "Mixup", "CutMix", "Compose",
           "MixupCutMix", "MixPro", "SMMix", "TLAlign", "TokenMix", "TokenMixup", "TransMix", "available", "forward_outputs", "get",
           "keep_unpaired", "method_class", "one_hot", "parameters", "register", "soft_target_cross_entropy"]
