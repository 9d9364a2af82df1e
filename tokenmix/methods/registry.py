"""The method registry: names -> :class:`~tokenmix.methods.base.MixMethod` classes, and building a
method from its name with ``timm.data.Mixup``'s argument names accepted."""
from __future__ import annotations

import inspect
from typing import Any

from tokenmix.methods.base import MixMethod
from tokenmix.methods.baselines import CutMix, Mixup, MixupCutMix
from tokenmix.methods.mixpro import MixPro
from tokenmix.methods.smmix import SMMix
from tokenmix.methods.tlalign import TLAlign
from tokenmix.methods.tokenmix import TokenMix
from tokenmix.methods.tokenmixup import TokenMixup
from tokenmix.methods.transmix import TransMix

_REGISTRY: dict[str, type[MixMethod]] = {}


def register(cls: type[MixMethod]) -> type[MixMethod]:
    """Class decorator / function adding a method under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MixMethod, Mixup, CutMix, MixupCutMix, TransMix, TLAlign, TokenMix, TokenMixup, SMMix, MixPro):
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


#: ``timm.data.Mixup`` argument names -> this package's (same meaning)
TIMM_NAMES = {"label_smoothing": "smoothing", "prob": "mix_prob"}
#: ``timm.data.Mixup`` arguments accepted with one value only: what every method here does
TIMM_FIXED = {"mode": "batch", "correct_lam": True}


def get(name: str, **params: Any) -> MixMethod:
    """Build method ``name``; unknown parameters raise ValueError naming the valid ones.

    ``timm.data.Mixup``'s names are accepted with timm's meaning: ``label_smoothing`` (=
    ``smoothing``), ``prob`` (= ``mix_prob``), ``mixup_alpha``, ``cutmix_alpha``, ``switch_prob``;
    ``mode`` only as ``"batch"`` and ``correct_lam`` only as True (one lam and one box per batch,
    the box-corrected lam: what all the official codes do). ``num_classes`` is required.
    """
    cls = method_class(name)
    valid = parameters(name)
    for timm_name, value in TIMM_FIXED.items():
        if timm_name in params and timm_name not in valid:
            got = params.pop(timm_name)
            if got != value:
                raise ValueError(f"{timm_name}={got!r} is not supported (timm.data.Mixup's name); valid: {value!r} "
                                 f"(every method here draws one lam and one mask per batch)")
    for timm_name, own in TIMM_NAMES.items():
        if timm_name in params:
            if own in params:
                raise ValueError(f"pass either {timm_name} (timm's name) or {own}, not both")
            params[own] = params.pop(timm_name)
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    return cls(**params)
