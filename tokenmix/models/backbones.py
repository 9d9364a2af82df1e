"""One model-independent view of the papers' backbones: plain ViTs (ViT/DeiT, CCT), CaiT, Swin and PVT v2.

The label rules need the same few things from every model; this module provides them in one
form, so that no method and no training loop special-cases a model:

* :attr:`Backbone.input_grid` -- the token grid at patch-embedding resolution (where inputs are
  mixed: CutMix boxes, TokenMix masks, TL-Align's initial token labels);
* :attr:`Backbone.stage_grids` -- the token grid of each stage (hierarchical models halve it);
* :attr:`Backbone.sites` -- every attention module in forward order, of one of four kinds:

  ============  ==========================================  =========================================
  kind          where                                       captured map (head mean)
  ============  ==========================================  =========================================
  ``global``    ViT/DeiT/CCT blocks; CaiT's talking-heads   (B, T, T), T = P + N (P prefix tokens)
                self-attention blocks (P = 0)
  ``class``     CaiT's class-attention blocks               (B, 1, 1 + N): the CLS query only
  ``window``    Swin's (shifted) window attention           (B * nW, w*w, w*w), one map per window
  ``reduced``   PVT v2's spatial-reduction attention        (B, N, N_k), keys on the grid reduced by sr
  ============  ==========================================  =========================================

* :class:`SiteMap` -- a captured map with its geometry, read in model-independent ways:
  :meth:`SiteMap.received` (attention received per token on the stage grid, head and query mean:
  SMMix Eq. 6, TokenMixup Eq. 3 and TransMix without a CLS token), :meth:`SiteMap.cls_row`
  (TransMix) and :meth:`SiteMap.apply` (``A @ V`` on the site's layout: TL-Align's propagation,
  :func:`tokenmix.methods.tlalign.align_site`);
* :meth:`Backbone.merge_labels` -- token labels across a stage transition (TL-Align Table 10:
  the sum of the merged tokens' labels, normalised, i.e. their mean): Swin's patch merging
  averages 2x2 cells; PVT v2's overlapping 3x3 / stride-2 embedding averages its 3x3 footprint;
* :meth:`Backbone.final_patch_tokens` -- the last stage's patch tokens (B, N_last, D), whatever
  the layout of ``forward_features`` (tokens, NHWC or NCHW).

Choices (documented because the papers leave them open):

* **CaiT talking heads.** Its self-attention mixes heads after the softmax (``proj_w``), so the
  map that multiplies the values is not row-stochastic. The captured map is the softmax itself
  (the input of ``proj_w``), a proper distribution per row; the class-attention blocks are plain.
* **PVT** in timm is PVT v2 (the papers used v1, which timm does not ship). Its MLP contains a
  3x3 depthwise convolution; label rules treat the MLP as token-wise (TL-Align's assumption).
  ``linear`` PVT v2 (pooled keys) is not supported. The stem is a 7x7 / stride-4 convolution; its
  token cells are the 4x4 stride cells.
* **Swin**: maps are per window; grids must be multiples of the window size (timm shrinks the
  window to the grid when the grid is smaller, so this holds at the papers' sizes and ours).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Kind = Literal["global", "class", "window", "reduced"]
FAMILIES: tuple[str, ...] = ("vit", "cait", "swin", "pvt_v2")


@dataclass(frozen=True, eq=False)
class Site:
    """One attention module of a backbone.

    Attributes:
        index: position in forward order.
        kind: ``"global"``, ``"class"``, ``"window"`` or ``"reduced"`` (see the module docstring).
        module: the attention module; ``block`` the block that calls it.
        stage: stage index (0 for plain models; CaiT's class-attention blocks are stage 1).
        num_prefix_tokens: prefix (CLS) tokens in the sequence this module attends over.
        capture: the submodule whose forward pre-hook sees the map (``attn_drop``, or ``proj_w``
            for CaiT's talking heads); ``heads_last`` when that input is (B, T, T, H).
    """

    index: int
    kind: Kind
    module: nn.Module
    block: nn.Module
    stage: int
    num_prefix_tokens: int
    capture: nn.Module
    heads_last: bool = False


@dataclass
class SiteMap:
    """A captured head-mean attention map of one site, with the geometry needed to read it.

    Attributes:
        site: the site.
        attn: detached float32 head-mean map, shaped as in the module docstring's table.
        grid: (rows, cols) of the site's query tokens (the stage grid).
        window, shift: Swin's window and cyclic shift at this call (``window`` sites).
        key_grid: (rows, cols) of the keys (``reduced`` sites: the grid reduced by ``sr``).
    """

    site: Site
    attn: Tensor
    grid: tuple[int, int]
    window: tuple[int, int] = (0, 0)
    shift: tuple[int, int] = (0, 0)
    key_grid: tuple[int, int] = (0, 0)

    @property
    def num_prefix_tokens(self) -> int:
        return self.site.num_prefix_tokens

    # -- windows -------------------------------------------------------------------------------
    def _to_windows(self, y: Tensor) -> Tensor:
        """(B, N, C) on the grid -> (B * nW, w*w, C) in the order of the captured windows."""
        (h, w), (wh, ww), (sh, sw) = self.grid, self.window, self.shift
        if h % wh or w % ww:
            raise ValueError(f"stage grid {self.grid} is not a multiple of the Swin window {self.window}; "
                             "choose an image size whose stage grids the window divides")
        b, _, c = y.shape
        y = y.reshape(b, h, w, c)
        if sh or sw:
            y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        y = y.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(-1, wh * ww, c)

    def _from_windows(self, yw: Tensor) -> Tensor:
        """Inverse of :meth:`_to_windows`: (B * nW, w*w, C) -> (B, N, C)."""
        (h, w), (wh, ww), (sh, sw) = self.grid, self.window, self.shift
        c = yw.shape[-1]
        y = yw.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)
        if sh or sw:
            y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
        return y.reshape(y.shape[0], h * w, c)

    def _reduce_keys(self, y: Tensor) -> Tensor:
        """Token labels (B, N, C) on the grid -> (B, N_k, C) on the reduced key grid (mean over
        each sr x sr cell: the labels of the tokens the reduction convolution merges)."""
        (h, w), (kh, kw) = self.grid, self.key_grid
        if (kh, kw) == (h, w):
            return y
        b, _, c = y.shape
        img = y.transpose(1, 2).reshape(b, c, h, w)
        return F.adaptive_avg_pool2d(img, (kh, kw)).reshape(b, c, kh * kw).transpose(1, 2)

    # -- readings ------------------------------------------------------------------------------
    def received(self) -> Tensor:
        """Attention received by each patch token, averaged over heads and (patch) queries:
        (B, N) on the stage grid (``reduced`` sites: on the key grid). Window sites average
        within each window, so each window's values sum to 1."""
        p, kind = self.num_prefix_tokens, self.site.kind
        if kind == "class":
            return self.cls_row()
        if kind == "window":
            return self._from_windows(self.attn.mean(1).unsqueeze(-1)).squeeze(-1)
        return self.attn[:, p:, p:].mean(1) if kind == "global" else self.attn.mean(1)

    def cls_row(self) -> Tensor:
        """The CLS query's attention on the patch tokens (CLS->CLS dropped, not renormalised): (B, N)."""
        p = self.num_prefix_tokens
        if p < 1 or self.site.kind not in ("global", "class"):
            raise ValueError(f"attention site {self.site.index} ({self.site.kind}, {p} prefix tokens) has no "
                             "class-token query; use received() (attention received per token)")
        return self.attn[:, 0, p:]

    def apply(self, values: Tensor) -> Tensor:
        """The captured attention applied to per-token values on the site's layout: ``A @ V``.

        Args:
            values: (B, P + N, C) per-token values (prefix rows first, then the stage grid row-major).
        Returns:
            (B, P + N, C) for ``global`` / ``window`` / ``reduced`` sites (windows and reduced keys
            handled); (B, 1, C), the CLS row only, for ``class`` sites.
        """
        y, kind = values.float(), self.site.kind
        if kind in ("global", "class"):
            return torch.bmm(self.attn, y)
        if kind == "window":
            return self._from_windows(torch.bmm(self.attn, self._to_windows(y)))
        return torch.bmm(self.attn, self._reduce_keys(y))


@dataclass
class Backbone:
    """What the methods need to know about a model (build it with :meth:`of`).

    Attributes:
        family: ``"vit"`` (ViT/DeiT/CCT and the presets), ``"cait"``, ``"swin"`` or ``"pvt_v2"``.
        model: the model.
        input_grid: patch-embedding grid as a :class:`~tokenmix.methods.base.TokenGrid`-like
            tuple ``(rows, cols, patch_h, patch_w)``.
        stage_grids: (rows, cols) per stage (CaiT's class stage repeats the patch grid).
        sites: the attention modules in forward order.
        class_token: whether the head reads a class token (else it averages the final patch tokens).
    """

    family: str
    model: nn.Module
    input_grid: tuple[int, int, int, int]
    stage_grids: list[tuple[int, int]]
    sites: list[Site] = field(default_factory=list)
    class_token: bool = False

    @property
    def hierarchical(self) -> bool:
        return len(set(self.stage_grids)) > 1

    @property
    def final_grid(self) -> tuple[int, int]:
        return self.stage_grids[-1]

    @property
    def final_cell(self) -> tuple[int, int]:
        """Pixels per token of the last stage."""
        rows, cols, ph, pw = self.input_grid
        fr, fc = self.final_grid
        return rows * ph // fr, cols * pw // fc

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0)) if self.family == "vit" else 0

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def of(cls, model: nn.Module) -> "Backbone":
        """Describe ``model`` (recomputed on every call: model-side methods may wrap modules).

        Raises:
            ValueError: a model of none of :data:`FAMILIES`, a PVT v2 without a known image size
                or with linear (pooled) attention.
        """
        name = type(model).__name__
        if name == "Cait":
            return cls._cait(model)
        if name == "SwinTransformer":
            return cls._swin(model)
        if name == "PyramidVisionTransformerV2":
            return cls._pvt(model)
        return cls._vit(model)

    @staticmethod
    def _patch_grid(model: nn.Module, attention: bool = True) -> tuple[int, int, int, int]:
        pe = getattr(model, "patch_embed", None)
        if pe is None or not hasattr(pe, "grid_size") or not hasattr(pe, "patch_size"):
            extra = "" if attention else " and no timm-style attention modules (with `attn_drop` and `fused_attn`)"
            raise ValueError(
                f"cannot read a token grid from {type(model).__name__}: it has no `patch_embed.grid_size` / "
                f"`patch_embed.patch_size`{extra}; supported backbones: {', '.join(FAMILIES)} (timm) and the presets")
        (gh, gw), (ph, pw) = tuple(pe.grid_size), tuple(pe.patch_size)
        return int(gh), int(gw), int(ph), int(pw)

    @classmethod
    def _vit(cls, model: nn.Module) -> "Backbone":
        mods = [m for m in model.modules()
                if isinstance(getattr(m, "attn_drop", None), nn.Module) and hasattr(m, "fused_attn")]
        grid = cls._patch_grid(model, attention=bool(mods))  # a grid-only model has no sites
        p = int(getattr(model, "num_prefix_tokens", 0))
        sites = [Site(i, "global", m, m, 0, p, m.attn_drop) for i, m in enumerate(mods)]
        cls_tok = (p > 0 and bool(getattr(model, "has_class_token", True))
                   and getattr(model, "global_pool", "token") == "token")
        return cls("vit", model, grid, [grid[:2]], sites, cls_tok)

    @classmethod
    def _cait(cls, model: nn.Module) -> "Backbone":
        grid = cls._patch_grid(model)
        sites = [Site(i, "global", b.attn, b, 0, 0, b.attn.proj_w, heads_last=True)
                 for i, b in enumerate(model.blocks)]
        sites += [Site(len(sites) + j, "class", b.attn, b, 1, 1, b.attn.attn_drop)
                  for j, b in enumerate(model.blocks_token_only)]
        return cls("cait", model, grid, [grid[:2], grid[:2]], sites, True)

    @classmethod
    def _swin(cls, model: nn.Module) -> "Backbone":
        grid = cls._patch_grid(model)
        sites, grids = [], []
        for s, stage in enumerate(model.layers):
            grids.append(tuple(int(v) for v in stage.blocks[0].input_resolution))
            for blk in stage.blocks:
                sites.append(Site(len(sites), "window", blk.attn, blk, s, 0, blk.attn.attn_drop))
        return cls("swin", model, grid, grids, sites, False)

    @classmethod
    def _pvt(cls, model: nn.Module) -> "Backbone":
        size = getattr(model, "tokenmix_img_size", None)
        if size is None:
            raise ValueError("PVT v2 has no image size attribute: build it with tokenmix.models.create_model, or set "
                             "`model.tokenmix_img_size = (H, W)`")
        proj = model.patch_embed.proj
        (sh, sw), (kh, kw), (ph_, pw_) = proj.stride, proj.kernel_size, proj.padding
        h = (size[0] + 2 * ph_ - kh) // sh + 1
        w = (size[1] + 2 * pw_ - kw) // sw + 1
        if size[0] % sh or size[1] % sw:
            raise ValueError(f"image size {tuple(size)} is not divisible by PVT v2's stem stride {(sh, sw)}")
        sites, grids = [], []
        for s, stage in enumerate(model.stages):
            if stage.downsample is not None:
                h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 conv, stride 2, padding 1
            grids.append((h, w))
            sr = getattr(stage.blocks[0].attn, "sr", None)
            k = int(sr.kernel_size[0]) if sr is not None else 1
            if min(h, w) < k:
                raise ValueError(f"image size {tuple(size)} is too small for {type(model).__name__}: stage {s} has a "
                                 f"{h}x{w} token grid but reduces its keys by {k}x{k} (sr_ratio); use an image size "
                                 f">= {4 * k * 2 ** s}")
            for blk in stage.blocks:
                if getattr(blk.attn, "pool", None) is not None:
                    raise ValueError("linear PVT v2 (pvt_v2_*_li, pooled keys) is not supported")
                sites.append(Site(len(sites), "reduced", blk.attn, blk, s, 0, blk.attn.attn_drop))
        return cls("pvt_v2", model, (grids[0][0], grids[0][1], sh, sw), grids, sites, False)

    # -- token layouts -------------------------------------------------------------------------
    def final_patch_tokens(self, features: Tensor) -> Tensor:
        """``forward_features`` output -> the last stage's patch tokens (B, N_last, D), prefix dropped."""
        if self.family == "swin":  # NHWC
            return features.flatten(1, 2)
        if self.family == "pvt_v2":  # NCHW
            return features.flatten(2).transpose(1, 2)
        return features[:, (1 if self.family == "cait" else self.num_prefix_tokens):]

    def merge_labels(self, labels: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
        """Token labels (B, N_src, C) on grid ``src`` -> (B, N_dst, C) on the next stage's grid
        (the mean of the labels of the tokens each new token merges)."""
        if src == dst:
            return labels
        b, _, c = labels.shape
        img = labels.transpose(1, 2).reshape(b, c, *src)
        if self.family == "pvt_v2":
            out = F.avg_pool2d(img, 3, 2, 1, count_include_pad=False)
        else:
            out = F.avg_pool2d(img, 2, 2, ceil_mode=True)
        if tuple(out.shape[-2:]) != tuple(dst):
            raise ValueError(f"cannot merge labels from grid {src} to {dst} in {self.family}")
        return out.reshape(b, c, -1).transpose(1, 2)

    def downsample_mask(self, mask: Tensor, dst: tuple[int, int]) -> Tensor:
        """A per-token share (B, N_in) on the input grid -> (B, N_dst) on grid ``dst`` by area averaging
        (TransMix supplement B: the "extra downsample step" for a later stage's attention)."""
        rows, cols = self.input_grid[:2]
        if (rows, cols) == tuple(dst):
            return mask
        b = mask.shape[0]
        return F.adaptive_avg_pool2d(mask.float().reshape(b, 1, rows, cols), dst).reshape(b, -1)

    def site(self, index: int) -> Site:
        """The site at ``index`` (negative from the end). Raises IndexError naming the valid range."""
        n = len(self.sites)
        if not -n <= index < n:
            raise IndexError(f"attention site {index} out of range: {type(self.model).__name__} has {n} attention "
                             f"modules (valid: {-n}..{n - 1})")
        return self.sites[index]


__all__ = ["Backbone", "FAMILIES", "Site", "SiteMap"]
