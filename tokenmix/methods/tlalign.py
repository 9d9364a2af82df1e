"""TL-Align: token-label alignment, propagating token labels through every block's attention.

Paper: Xiao et al., "Token-Label Alignment for Vision Transformers", ICCV 2023
(https://arxiv.org/abs/2210.06455). Official code: https://github.com/Euphoria16/TL-Align
(``tla.py`` + a vendored timm ViT).

Rule (paper Eqs. 9-12; reference §5): token labels Y^0 (T, K) per image: the CLS row is the
area-mixed label, each patch row the label of the image that owns the token (a partly covered
token gets its partner share, e.g. 0.25 -> 0.75 y_own + 0.25 y_partner), smoothed per source. At
every block, with Ā the head-mean, post-softmax, pre-dropout, detached attention:

    Y <- (Ā Y + Y) / 2        (MLP, norms and the second residual leave Y unchanged)

and the target is the CLS row after the last block, or the mean of the patch-token rows when the
head does not read the CLS token (no class token, or ``global_pool != "token"``; paper: "y_cls or
the mean of the y_i depending on the model").

Two implementations that agree (exactly for two-image mixes, reference §5.3): every row stays a
convex combination ``beta y_own + (1 - beta) y_partner``, and both Ā and the half-residual
preserve that, so propagating the scalar own-share beta (T,) gives the same target as the
K-dimensional rows. ``path="scalar"`` (default, used for training) propagates beta (T, 1) and
needs only the CLS row of the last block; ``path="kdim"`` propagates (T, K) rows, as the paper
writes it (N^2 K per block).

Where the attention comes from (``source``): ``"maps"`` switches every block to unfused attention
and captures the head-mean maps the forward computes anyway (cheapest on CPUs: +3 % per training
step on the CPU preset, against +7 % for recomputing them); ``"qk"`` keeps the fused attention
(SDPA/flash kernels, memory-lean on GPUs) and recomputes the maps from the captured queries and
keys without grad; ``"auto"`` (default) picks ``"qk"`` for a model on CUDA, else ``"maps"``.

Variants: ``official`` = token-grid CutMix on every batch (``cutmix_snap="token"``; the released
code cannot run Mixup); ``paper`` = the Mixup/CutMix switch with any mask or snap (Mixup batches
are unchanged by the propagation: every row equals the mixed label, so the target is the area
target).

Backbones (:class:`~tokenmix.models.backbones.Backbone`; paper Sec. 3.3 and Table 10): ViT/DeiT
and CCT use the fast paths above. CaiT, Swin and PVT v2 go through
:func:`align_labels`, which applies ``Y <- (Ā Y + Y) / 2`` at every
attention site in its own layout: CaiT's talking-heads self-attention blocks over the patch
tokens (with their softmax map, see the backbones module), then its class-attention blocks,
where the CLS token enters with the area label and only its row is updated; Swin's window
attention within each (shifted) window; PVT v2's spatial-reduction attention against the key
labels averaged over each reduced cell. At a stage transition (Swin's patch merging, PVT v2's
overlapping stride-2 embedding) a merged token's label is the normalised sum (= mean) of the
labels it merges (Table 10 "spatial aggregation"). The target is the CLS row (CaiT) or the mean
of the final token labels (Swin, PVT v2: global average pooling). Both ``path`` values work
there (the scalar own share is a 1-channel label); ``source="qk"`` needs timm ``Attention``
(ViT/DeiT) and is rejected elsewhere.

Deviations from the official code: attention from timm's blocks via
:class:`~tokenmix.models.attention.QKCapture` instead of a vendored model; the scalar fast path.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, ModelOutputs, Needs, mix_targets, one_hot
from tokenmix.methods.baselines import CutMix, MixupCutMix
from tokenmix.models.attention import attention_from_qk, attention_modules
from tokenmix.models.backbones import Backbone, SiteMap

PATHS: tuple[str, ...] = ("scalar", "kdim")
SOURCES: tuple[str, ...] = ("auto", "maps", "qk")


def initial_own_share(mixed: MixedBatch, num_prefix_tokens: int) -> Tensor:
    """beta^0 (B, T): prefix tokens carry the area share lam_area, patch t carries 1 - m_t."""
    b = mixed.partner_mask.shape[0]
    prefix = mixed.lam_area.float().view(b, 1).expand(b, num_prefix_tokens)
    return torch.cat([prefix, 1.0 - mixed.partner_mask.float()], dim=1)


def propagate_scalar(beta: Tensor, qk: list[tuple[Tensor, Tensor, float]], cls_only_last: bool = False) -> Tensor:
    """beta (B, T) through every block, from captured ``(q, k, scale)``: beta <- (Ā beta + beta) / 2.

    The head-mean maps are recomputed from q, k and handed to :func:`propagate_scalar_maps`. With
    ``cls_only_last`` the last block updates only row 0 (the CLS row, all a CLS target needs), so
    only its CLS query row is computed; the other rows of the result are then left as they were.
    """
    last = len(qk) - 1
    maps = [attention_from_qk(q[:, :, :1] if cls_only_last and i == last else q, k, scale).mean(1)
            for i, (q, k, scale) in enumerate(qk)]
    return propagate_scalar_maps(beta, maps, cls_only_last)


def propagate_scalar_maps(beta: Tensor, attentions: list[Tensor], cls_only_last: bool = False) -> Tensor:
    """beta (B, T) through head-mean attention maps [(B, T, T), ...]: beta <- (Ā beta + beta) / 2.

    With ``cls_only_last`` the last map is read only at row 0 (it may be (B, 1, T)) and only the
    CLS entry of beta is updated there."""
    b = beta.float().unsqueeze(-1)  # (B, T, 1)
    for i, a in enumerate(attentions):
        if cls_only_last and i == len(attentions) - 1:
            row = torch.bmm(a[:, :1].float(), b)  # (B, 1, 1)
            return torch.cat([0.5 * (row[:, :, 0] + b[:, :1, 0]), b[:, 1:, 0]], dim=1)
        b = 0.5 * (torch.bmm(a.float(), b) + b)
    return b.squeeze(-1)


def propagate_kdim(labels: Tensor, attentions: list[Tensor]) -> Tensor:
    """Token labels (B, T, K) through head-mean attentions [(B, T, T), ...]: Y <- (Ā Y + Y) / 2."""
    with torch.autocast(labels.device.type, enabled=False):  # float32 also under autocast
        for a in attentions:
            labels = 0.5 * (a.float() @ labels.float() + labels.float())
    return labels


def final_label(rows: Tensor, num_prefix_tokens: int, cls: bool | None = None) -> Tensor:
    """The label the head reads from propagated rows (B, T, ...): the CLS row when ``cls`` (default:
    whenever there are prefix tokens), else the mean of the patch rows (prefix rows excluded, as
    timm's average pooling excludes them)."""
    if cls is None:
        cls = num_prefix_tokens > 0
    return rows[:, 0] if cls else rows[:, num_prefix_tokens:].mean(1)


def align_site(site_map: SiteMap, labels: Tensor) -> Tensor:
    """TL-Align's update ``Y <- (A Y + Y) / 2`` at one attention site, on its token layout.

    Args:
        site_map: the site's captured map (:class:`~tokenmix.models.backbones.SiteMap`).
        labels: (B, P + N, C) token labels (prefix rows first, then the stage grid row-major);
            C = K for label rows or 1 for the scalar own share.
    Returns:
        (B, P + N, C). Class-attention sites (CaiT) update only the CLS row; the patch tokens pass by.
    """
    y = labels.float()
    if site_map.site.kind == "class":
        return torch.cat([0.5 * (site_map.apply(y) + y[:, :1]), y[:, 1:]], dim=1)
    return 0.5 * (site_map.apply(y) + y)


def align_labels(backbone: Backbone, maps: list[SiteMap], patch_labels: Tensor, prefix_label: Tensor) -> Tensor:
    """TL-Align through every captured site, across stage transitions, to the label the head reads.

    Args:
        backbone: the model's :class:`Backbone`.
        maps: the captured maps of **every** site, in forward order.
        patch_labels: (B, N_in, C) initial labels of the input-grid tokens.
        prefix_label: (B, C) the label of prefix (CLS) tokens when they enter (the area label).
    Returns:
        (B, C): the CLS row after the last site when the head reads a class token, else the mean
        of the final patch rows (paper: "y_cls or the mean of the y_i depending on the model").
    """
    y, grid, prefix = patch_labels.float(), tuple(backbone.input_grid[:2]), 0
    for sm in maps:
        if sm.grid != grid:
            y = torch.cat([y[:, :prefix], backbone.merge_labels(y[:, prefix:], grid, sm.grid)], dim=1)
            grid = sm.grid
        if sm.num_prefix_tokens > prefix:
            extra = prefix_label.float().unsqueeze(1).expand(-1, sm.num_prefix_tokens - prefix, -1)
            y, prefix = torch.cat([extra, y], dim=1), sm.num_prefix_tokens
        y = align_site(sm, y)
    return y[:, 0] if backbone.class_token and prefix > 0 else y[:, prefix:].mean(1)


class TLAlign(MixMethod):
    """TL-Align on CutMix (official) or on the Mixup/CutMix switch (paper); see the module docstring."""

    name: ClassVar[str] = "tl_align"
    colour: ClassVar[str] = "tab:cyan"
    paper: ClassVar[str] = "TL-Align"
    summary: ClassVar[str] = "CutMix box on tokens; area target shown (TL-Align aligns it through the blocks in the loss)"
    gallery: ClassVar[bool] = True
    display_kwargs: ClassVar[dict[str, Any]] = {'switch_prob': 1.0}

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official",
                 mix_prob: float = 1.0, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, cutmix_snap: str = "token", path: str = "scalar",
                 source: str = "auto") -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if path not in PATHS:
            raise ValueError(f"unknown TL-Align path {path!r}; valid: {', '.join(PATHS)}")
        if source not in SOURCES:
            raise ValueError(f"unknown TL-Align attention source {source!r}; valid: {', '.join(SOURCES)}")
        self.path, self.source = path, source
        self.mixer: MixMethod
        if variant == "official":
            self.mixer = CutMix(num_classes, smoothing, variant, mix_prob, cutmix_alpha, "token")
        else:
            self.mixer = MixupCutMix(num_classes, smoothing, variant, mix_prob, mixup_alpha, cutmix_alpha,
                                     switch_prob, cutmix_snap)
        self.needs = Needs(qk=True)
        self.num_prefix_tokens = 1
        self.cls_label = True  # the target is the CLS row (else the mean of the patch rows)

    def setup_model(self, model: nn.Module) -> nn.Module:
        self.mixer.grid = self.grid
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        # the label follows the representation the head reads: the CLS token or the pooled patches
        self.cls_label = (self.num_prefix_tokens > 0 and bool(getattr(model, "has_class_token", True))
                          and getattr(model, "global_pool", "token") == "token")
        bb = self.backbone = Backbone.of(model)
        if bb.family != "vit":
            if self.source == "qk":
                raise ValueError(f"tl_align source='qk' needs timm ViT/DeiT attention (q_norm/k_norm); "
                                 f"{type(model).__name__} ({bb.family}) supports source 'auto' or 'maps'")
            self.needs = Needs(attention_blocks=tuple(range(len(bb.sites))), attention_reduce="site")
            return model
        source = self.source
        if source == "auto":
            on_cuda = any(p.is_cuda for p in model.parameters())
            source = "qk" if on_cuda else "maps"
        n_blocks = len(attention_modules(model))
        self.needs = (Needs(qk=True) if source == "qk"
                      else Needs(attention_blocks=tuple(range(n_blocks)), attention_reduce="head_mean"))
        return model

    def attention_inputs(self, outputs: ModelOutputs) -> list:
        """What :meth:`aligned_target` takes from a forward: the head-mean maps [(B, T, T), ...] or
        the captured ``(q, k, scale)`` per block, whichever ``needs`` asked for."""
        return ([outputs.attention[i] for i in self.needs.attention_blocks] if self.needs.attention_blocks
                else outputs.qk)

    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        self.mixer.grid = self.grid  # also when the grid was set directly, not by prepare_model
        return self.mixer.mix_batch(x, y)

    @torch.no_grad()
    def aligned_target(self, mixed: MixedBatch, attention: list) -> tuple[Tensor, Tensor]:
        """(target (B, K), own share beta of the final label (B,)).

        Args:
            attention: per block, either the head-mean map (B, T, T) or the captured
                ``(q, k, scale)`` (see :meth:`attention_inputs`).
        """
        if self.needs.attention_reduce == "site":
            return self._aligned_target_sites(mixed, attention)
        p = self.num_prefix_tokens
        cls = self.cls_label and p > 0
        from_qk = bool(attention) and isinstance(attention[0], tuple)
        beta0 = initial_own_share(mixed, p)  # (B, T)
        if self.path == "scalar":
            out = (propagate_scalar(beta0, attention, cls_only_last=cls) if from_qk
                   else propagate_scalar_maps(beta0, attention, cls_only_last=cls))
            beta = final_label(out, p, cls)
            return mix_targets(mixed.y, mixed.y_partner, beta, self.num_classes, self.smoothing), beta
        y1 = one_hot(mixed.y, self.num_classes, self.smoothing).unsqueeze(1)  # (B, 1, K)
        y2 = one_hot(mixed.y_partner, self.num_classes, self.smoothing).unsqueeze(1)
        rows = beta0.unsqueeze(-1) * y1 + (1 - beta0.unsqueeze(-1)) * y2  # (B, T, K)
        maps = [attention_from_qk(q, k, s).mean(1) for q, k, s in attention] if from_qk else attention
        target = final_label(propagate_kdim(rows, maps), p, cls)
        own = final_label(propagate_scalar_maps(beta0, maps), p, cls)  # for logging only
        return target, own

    def _aligned_target_sites(self, mixed: MixedBatch, maps: list) -> tuple[Tensor, Tensor]:
        """:meth:`aligned_target` through :func:`align_labels` (CaiT, Swin, PVT v2)."""
        own = 1.0 - mixed.partner_mask.float().unsqueeze(-1)  # (B, N, 1)
        beta = align_labels(self.backbone, maps, own, mixed.lam_area.float().view(-1, 1))[:, 0]
        if self.path == "scalar":
            return mix_targets(mixed.y, mixed.y_partner, beta, self.num_classes, self.smoothing), beta
        y1 = one_hot(mixed.y, self.num_classes, self.smoothing).unsqueeze(1)  # (B, 1, K)
        y2 = one_hot(mixed.y_partner, self.num_classes, self.smoothing).unsqueeze(1)
        rows = own * y1 + (1 - own) * y2  # (B, N, K)
        return align_labels(self.backbone, maps, rows, mixed.target), beta

    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """The aligned target of a box/mask batch; Mixup and unmixed batches keep their area target."""
        if mixed.kind in ("none", "mixup"):
            # the propagation leaves these targets unchanged: report their own share on every batch,
            # so that the engine's per-epoch mean of lam_aligned is not diluted by missing keys
            lam = float(mixed.lam_area.mean())
            return mixed.target, {"lam": lam, "lam_aligned": lam}
        target, beta = self.aligned_target(mixed, self.attention_inputs(outputs))
        return target, {"lam": float(mixed.lam_area.mean()), "lam_aligned": float(beta.mean())}
