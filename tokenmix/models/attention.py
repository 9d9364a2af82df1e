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
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from tokenmix.models.backbones import Backbone, Site, SiteMap

Reduce = Literal["none", "head_mean", "cls", "query_mean", "site"]
REDUCTIONS: tuple[str, ...] = ("none", "head_mean", "cls", "query_mean", "site")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of ``model`` in forward order (the :class:`~tokenmix.models.backbones.Backbone`
    sites: timm ViT/DeiT/CCT attention, CaiT's talking-heads and class attention, Swin's window
    attention, PVT v2's spatial-reduction attention). Raises ValueError if there is none."""
    return [site.module for site in _sites(model, Backbone.of(model))]


def _sites(model: nn.Module, backbone: Backbone) -> list[Site]:
    """The backbone's attention sites; ValueError for a model without attention."""
    if not backbone.sites:
        raise ValueError(f"{type(model).__name__} has no timm-style attention modules (with `attn_drop` and "
                         "`fused_attn`); attention cannot be captured")
    return backbone.sites


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
    """Context manager capturing the attention of chosen sites during forwards inside it.

    Works on every :class:`~tokenmix.models.backbones.Backbone` family. The map is taken where
    all official codes take it: post-softmax, pre-dropout (a forward pre-hook on ``attn_drop``, or
    on ``proj_w`` for CaiT's talking heads), with ``fused_attn`` switched off on the chosen sites
    only and restored on exit.

    Args:
        model: a supported backbone.
        blocks: indices into the backbone's attention sites (negative from the end); ``None`` = all.
        reduce: ``"none"`` (B', H, Tq, Tk) and ``"head_mean"`` (B', Tq, Tk), in the site's own
            layout (per window for Swin); ``"cls"`` (B, N) the CLS row and ``"query_mean"`` (B, N)
            the attention received per token on the stage grid (model-independent; see
            :class:`~tokenmix.models.backbones.SiteMap`); ``"site"`` a
            :class:`~tokenmix.models.backbones.SiteMap` (head-mean map + geometry, for TL-Align).
        detach: detach the maps (labels must never carry gradient); default True.
        dtype: dtype of the stored maps (float32 by default, also under autocast).

    After a forward, ``cap[i]`` / ``cap.maps`` hold the latest map of each site, keyed by the
    index as given. Accessing a site that produced nothing raises ``RuntimeError``.

    Raises:
        ValueError: unknown ``reduce``, or ``reduce="cls"`` on a model without a class token.
        IndexError: a site index out of range.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int] | None = (-1,), reduce: Reduce = "head_mean",
                 detach: bool = True, dtype: torch.dtype = torch.float32) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown attention reduction {reduce!r}; valid: {', '.join(REDUCTIONS)}")
        self.backbone = Backbone.of(model)
        _sites(model, self.backbone)  # raises for a model without attention
        idx = list(range(len(self.backbone.sites))) if blocks is None else list(blocks)
        self._targets = {i: self.backbone.site(i) for i in idx}
        no_cls = self.backbone.family == "vit" and not getattr(model, "has_class_token", True)
        if reduce == "cls" and (no_cls or any(t.num_prefix_tokens < 1 or t.kind not in ("global", "class")
                                              for t in self._targets.values())):
            # without a class token the first prefix token would be a register token (or a patch)
            raise ValueError("reduce='cls' needs a model with a class token; use 'query_mean'")
        self.model, self.blocks, self.reduce, self.detach, self.dtype = model, idx, reduce, detach, dtype
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fused: dict[int, bool] = {}
        self._geometry: dict[int, dict[str, tuple[int, int]]] = {}
        self.maps: dict[int, Any] = {}

    def _geometry_hook(self, key: int, site: Site):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if site.kind == "window":  # block input (B, H, W, C)
                h, w = int(args[0].shape[1]), int(args[0].shape[2])
                blk = site.block
                self._geometry[key] = {"grid": (h, w), "window": tuple(blk.window_size),
                                       "shift": tuple(blk.shift_size)}
            else:  # PVT attention input (x, feat_size)
                h, w = (int(v) for v in args[1])
                sr = site.module.sr
                k = int(sr.kernel_size[0]) if sr is not None else 1
                self._geometry[key] = {"grid": (h, w), "key_grid": ((h - k) // k + 1, (w - k) // k + 1)}
        return hook

    def _site_map(self, key: int, site: Site, head_mean: Tensor) -> SiteMap:
        geo = self._geometry.get(key) or {"grid": self.backbone.stage_grids[site.stage]}
        return SiteMap(site, head_mean, **geo)

    def _hook(self, key: int, site: Site):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            a = args[0]
            if self.detach:
                a = a.detach()
            if site.heads_last:
                a = a.permute(0, 3, 1, 2)
            a = a.to(self.dtype)
            if self.reduce == "none":
                self.maps[key] = a
            elif self.reduce == "head_mean":
                self.maps[key] = a.mean(1)
            else:
                sm = self._site_map(key, site, a.mean(1))
                self.maps[key] = {"site": sm, "cls": sm.cls_row, "query_mean": sm.received}[self.reduce]
                if self.reduce != "site":
                    self.maps[key] = self.maps[key]()
        return hook

    def __enter__(self) -> "AttentionCapture":
        self.maps, self._geometry = {}, {}
        # record every flag before switching any off: two indices may name the same site (-1 and L-1)
        self._fused = {key: t.module.fused_attn for key, t in self._targets.items() if hasattr(t.module, "fused_attn")}
        for key, site in self._targets.items():
            if key in self._fused:
                site.module.fused_attn = False
            if site.kind == "window":
                self._handles.append(site.block.register_forward_pre_hook(self._geometry_hook(key, site)))
            elif site.kind == "reduced":
                self._handles.append(site.module.register_forward_pre_hook(self._geometry_hook(key, site)))
            self._handles.append(site.capture.register_forward_pre_hook(self._hook(key, site)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for key, flag in self._fused.items():
            self._targets[key].module.fused_attn = flag

    def __getitem__(self, block: int) -> Any:
        if block not in self.maps:
            raise RuntimeError(f"no attention was captured for block {block} (captured: "
                               f"{sorted(self.maps) or 'nothing'}); was a forward run inside the context?")
        return self.maps[block]

    def all(self) -> dict[int, Any]:
        """Every requested site's map; raises if any site captured nothing."""
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
    under ``torch.no_grad()`` for a saliency pass (TokenMixup's extra attention pass).

    For CaiT's talking-heads attention (``timm.models.cait.TalkingHeadAttn``: ``proj_l`` mixes
    the heads before the softmax, ``proj_w`` after it) the map is the softmax itself,
    ``softmax(proj_l(q * scale @ k^T))``, i.e. the input of ``proj_w`` (the package convention of
    :mod:`tokenmix.models.backbones`: a row-stochastic map), returned heads first.
    """
    b, t, _ = x.shape
    h = int(attn.num_heads)
    proj_l, proj_w = getattr(attn, "proj_l", None), getattr(attn, "proj_w", None)
    if isinstance(proj_l, nn.Linear) and isinstance(proj_w, nn.Linear):  # talking heads (CaiT)
        qkv = attn.qkv(x).reshape(b, t, 3, h, attn.qkv.out_features // (3 * h)).permute(2, 0, 3, 1, 4)
        with torch.autocast(x.device.type, enabled=False):
            logits = (qkv[0].float() * attn.scale) @ qkv[1].float().transpose(-2, -1)    # (B, H, T, T)
            logits = nn.functional.linear(logits.permute(0, 2, 3, 1), proj_l.weight.float(),
                                          None if proj_l.bias is None else proj_l.bias.float())
            return logits.permute(0, 3, 1, 2).softmax(dim=-1)
    qkv = attn.qkv(x).reshape(b, t, 3, h, attn.head_dim).permute(2, 0, 3, 1, 4)
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
