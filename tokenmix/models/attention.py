"""Capture post-softmax, pre-dropout attention from chosen blocks of a timm model.

All five official codes use the same map: the softmax of the attention logits, detached, taken
*before* attention dropout. In timm, fused attention (SDPA) never materialises it, so the capture
switches ``fused_attn`` off on the chosen blocks only, registers a forward pre-hook on their
``attn_drop`` (whose input is exactly that map), and restores everything on exit.

Example::

    with AttentionCapture(model, blocks=[-1], reduce="cls") as cap:
        logits = model(x)
    a = cap[-1]          # (B, N): CLS -> patch attention of the last block, head mean
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

Reduce = Literal["none", "head_mean", "cls", "query_mean"]
REDUCTIONS: tuple[str, ...] = ("none", "head_mean", "cls", "query_mean")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of ``model`` in forward order: every submodule with an ``attn_drop``
    module and a ``fused_attn`` flag (timm's convention). Raises if there is none."""
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "attn_drop", None), nn.Module) and hasattr(m, "fused_attn")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no timm-style attention modules "
                         "(with `attn_drop` and `fused_attn`); attention cannot be captured")
    return mods


def reduce_attention(attn: Tensor, reduce: str, num_prefix_tokens: int) -> Tensor:
    """Reduce a (B, H, T, T) attention map (rows = queries, sum to 1).

    Args:
        attn: (B, H, T, T) with ``T = num_prefix_tokens + N``.
        reduce: ``"none"`` -> (B, H, T, T); ``"head_mean"`` -> (B, T, T);
            ``"cls"`` -> (B, N), the head-mean attention of the first prefix (CLS) token on the
            N patch tokens (CLS->CLS dropped, not renormalised, as TransMix);
            ``"query_mean"`` -> (B, N), the head-mean attention *received* by each patch token,
            averaged over the patch queries (SMMix Eq. 6; TokenMixup Eq. 3 for models without CLS).
        num_prefix_tokens: number of CLS/distillation/register tokens before the patches.
    """
    p = num_prefix_tokens
    if reduce == "none":
        return attn
    if reduce == "head_mean":
        return attn.mean(1)
    if reduce == "cls":
        if p < 1:
            raise ValueError("reduce='cls' needs a model with a class token; use 'query_mean'")
        return attn[:, :, 0, p:].mean(1)
    if reduce == "query_mean":
        return attn[:, :, p:, p:].mean(dim=(1, 2))
    raise ValueError(f"unknown attention reduction {reduce!r}; valid: {', '.join(REDUCTIONS)}")


class AttentionCapture:
    """Context manager capturing the attention of ``blocks`` during forwards inside it.

    Args:
        model: a timm model (ViT/DeiT family; see :func:`attention_modules`).
        blocks: indices into :func:`attention_modules` (negative from the end); ``None`` = all.
        reduce: see :func:`reduce_attention`.
        detach: detach the maps (labels must never carry gradient); default True.
        dtype: dtype of the stored maps (float32 by default, also under autocast).

    After a forward, ``cap[i]`` / ``cap.maps`` hold the latest map of each block, keyed by the
    index as given. Accessing a block that produced nothing raises ``RuntimeError``. On exit the
    hooks are removed and every ``fused_attn`` flag is restored.

    Raises:
        ValueError: unknown ``reduce``, or ``reduce="cls"`` on a model without a class token.
        IndexError: a block index out of range.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int] | None = (-1,), reduce: Reduce = "head_mean",
                 detach: bool = True, dtype: torch.dtype = torch.float32) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown attention reduction {reduce!r}; valid: {', '.join(REDUCTIONS)}")
        mods = attention_modules(model)
        idx = list(range(len(mods))) if blocks is None else list(blocks)
        for i in idx:
            if not -len(mods) <= i < len(mods):
                raise IndexError(f"block {i} out of range: {type(model).__name__} has {len(mods)} attention blocks")
        self.model, self.blocks, self.reduce, self.detach, self.dtype = model, idx, reduce, detach, dtype
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        if reduce == "cls" and (self.num_prefix_tokens < 1 or not getattr(model, "has_class_token", True)):
            # without a class token the first prefix token would be a register token (or a patch)
            raise ValueError("reduce='cls' needs a model with a class token; use 'query_mean'")
        self._targets = {i: mods[i] for i in idx}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fused: dict[int, bool] = {}
        self.maps: dict[int, Tensor] = {}

    def _hook(self, key: int):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            a = args[0]
            if self.detach:
                a = a.detach()
            self.maps[key] = reduce_attention(a.to(self.dtype), self.reduce, self.num_prefix_tokens)
        return hook

    def __enter__(self) -> "AttentionCapture":
        self.maps = {}
        # record every flag before switching any off: two indices may name the same block (-1 and L-1)
        self._fused = {key: mod.fused_attn for key, mod in self._targets.items()}
        for key, mod in self._targets.items():
            mod.fused_attn = False
            self._handles.append(mod.attn_drop.register_forward_pre_hook(self._hook(key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for key, mod in self._targets.items():
            mod.fused_attn = self._fused[key]

    def __getitem__(self, block: int) -> Tensor:
        if block not in self.maps:
            raise RuntimeError(f"no attention was captured for block {block} (captured: "
                               f"{sorted(self.maps) or 'nothing'}); was a forward run inside the context?")
        return self.maps[block]

    def all(self) -> dict[int, Tensor]:
        """Every requested block's map; raises if any block captured nothing."""
        return {b: self[b] for b in self.blocks}


class QKCapture:
    """Context manager capturing the queries and keys of ``blocks`` (after timm's ``q_norm`` /
    ``k_norm``), with fused attention left **on**.

    For label rules that need only a few attention rows (TransMix's CLS row) or ``A @ v`` for a
    small ``v`` (TL-Align's ``source="qk"``), the maps are then recomputed without grad from the
    stored q, k (:func:`attention_from_qk`, :func:`attention_apply`) while the forward keeps the
    fused kernel (which matters on GPUs; on CPUs at small sizes capturing the unfused maps with
    :class:`AttentionCapture` is as cheap). Forward hooks on ``attn.q_norm`` / ``attn.k_norm``
    (modules timm calls on both the fused and the unfused path) see exactly the q, k of the
    forward, shaped (B, H, T, d).

    After a forward, ``cap.qk[i] = (q, k)`` (detached) and ``cap.scale[i]`` hold block i's data.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int] | None = None) -> None:
        mods = attention_modules(model)
        for m in mods:
            if not (isinstance(getattr(m, "q_norm", None), nn.Module) and isinstance(getattr(m, "k_norm", None), nn.Module)):
                raise ValueError(f"{type(m).__name__} has no q_norm/k_norm modules; queries and keys cannot be captured")
        for i in [] if blocks is None else blocks:
            if not -len(mods) <= i < len(mods):
                raise IndexError(f"block {i} out of range: {type(model).__name__} has {len(mods)} attention blocks")
        idx = list(range(len(mods))) if blocks is None else [b % len(mods) for b in blocks]
        self.blocks, self.num_prefix_tokens = idx, int(getattr(model, "num_prefix_tokens", 0))
        self._targets = {i: mods[i] for i in idx}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.qk: dict[int, tuple[Tensor, Tensor]] = {}
        self.scale: dict[int, float] = {i: float(getattr(m, "scale", m.head_dim ** -0.5)) for i, m in self._targets.items()}
        self._q: dict[int, Tensor] = {}

    def __enter__(self) -> "QKCapture":
        self.qk, self._q = {}, {}

        def q_hook(i: int):
            def hook(_m: nn.Module, _a: tuple, out: Tensor) -> None:
                self._q[i] = out.detach()
            return hook

        def k_hook(i: int):
            def hook(_m: nn.Module, _a: tuple, out: Tensor) -> None:
                self.qk[i] = (self._q.pop(i), out.detach())
            return hook

        for i, mod in self._targets.items():
            self._handles.append(mod.q_norm.register_forward_hook(q_hook(i)))
            self._handles.append(mod.k_norm.register_forward_hook(k_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def all(self) -> list[tuple[Tensor, Tensor, float]]:
        """``[(q, k, scale), ...]`` in block order; raises if a block captured nothing."""
        missing = [i for i in self.blocks if i not in self.qk]
        if missing:
            raise RuntimeError(f"no queries/keys were captured for blocks {missing}; was a forward run inside the context?")
        return [(*self.qk[i], self.scale[i]) for i in self.blocks]


def attention_from_qk(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale): (B, H, T, d) x2 -> (B, H, T, T), in float32 (also under autocast)."""
    with torch.autocast(q.device.type, enabled=False):
        return ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(-1)


def self_attention_map(attn: nn.Module, x: Tensor) -> Tensor:
    """Post-softmax attention of a timm ``Attention`` module on its (normalised) input, recomputed
    from the module's own ``qkv`` and q/k norms: x (B, T, D) -> (B, H, T, T) float32. Call it
    under ``torch.no_grad()`` for a saliency pass (TokenMixup's extra attention pass)."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attention_from_qk(attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), attn.scale)


def attention_apply(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Head-mean attention applied to per-token values: mean_h softmax(q_h k_h^T * scale) @ v.

    Args:
        q: (B, H, Tq, d) queries (Tq may be a subset of rows, e.g. the CLS query only).
        k: (B, H, T, d) keys.
        v: (B, T, C) values shared by all heads (e.g. token labels), C small.
    Returns:
        (B, Tq, C) in float32. The map is built in place (one (B, H, Tq, T) buffer) and averaged
        over heads before the product with v, which on CPUs beats SDPA for C << d.
    """
    with torch.autocast(q.device.type, enabled=False):  # float32 also under autocast
        a = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(scale)
        torch.softmax(a, dim=-1, out=a)
        return a.mean(1) @ v.float()
