"""Mixing methods behind one two-phase interface, and their registry.

>>> from tokenmix import methods
>>> methods.available()
['cutmix', 'mixup', 'mixup_cutmix', 'none', 'smmix', 'tl_align', 'tokenmix', 'tokenmixup', 'transmix']
>>> m = methods.get("cutmix", num_classes=10, cutmix_alpha=1.0)
"""
from __future__ import annotations

import inspect
from typing import Any

from .base import MixedBatch, MixMethod, ModelOutputs, Needs, TokenGrid, one_hot, soft_target_cross_entropy
from .baselines import CutMix, Mixup, MixupCutMix
from .tlalign import TLAlign
from .tokenmix import TokenMix
from .tokenmixup import TokenMixup
from .smmix import SMMix
from .transmix import TransMix

_REGISTRY: dict[str, type[MixMethod]] = {}


def register(cls: type[MixMethod]) -> type[MixMethod]:
    """Class decorator / function adding a method under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MixMethod, Mixup, CutMix, MixupCutMix, TransMix, TLAlign, TokenMix, TokenMixup, SMMix):
    register(_cls)


def available() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[MixMethod]:
    """The class registered as ``name``; raises ValueError naming the valid choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available())}") from None


def parameters(name: str) -> dict[str, Any]:
    """Constructor parameters of a method and their defaults (``num_classes`` has none)."""
    sig = inspect.signature(method_class(name).__init__)
    return {k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items() if k != "self"}


def get(name: str, **params: Any) -> MixMethod:
    """Build method ``name``; unknown parameters raise ValueError naming the valid ones."""
    cls = method_class(name)
    valid = parameters(name)
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    return cls(**params)


__all__ = ["MixMethod", "MixedBatch", "ModelOutputs", "Needs", "TokenGrid", "Mixup", "CutMix",
           "MixupCutMix", "SMMix", "TLAlign", "TokenMix", "TokenMixup", "TransMix", "available", "get", "method_class", "parameters", "register", "one_hot",
           "soft_target_cross_entropy"]
