"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

from typing import Any

from tokenmix import methods
from tokenmix.methods import MixMethod, TokenGrid


def make_method(name: str, cls: type[MixMethod], num_classes: int, variant: str = "official",
                grid: TokenGrid | None = None, **kw: Any) -> Any:
    """``methods.get(name, ...)``, checked to be a ``cls``, with its token grid set directly when given."""
    m = methods.get(name, num_classes=num_classes, variant=variant, **kw)
    assert isinstance(m, cls)
    if grid is not None:
        m.grid = grid
    return m
