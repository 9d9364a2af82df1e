"""SMMix: self-motivated image mixing with max-min attention regions and fine-grained labels.

Paper: Chen et al., "SMMix: Self-Motivated Image Mixing for Vision Transformers", ICCV 2023
(https://arxiv.org/abs/2212.12977), Eqs. 6-15. Official code: https://github.com/ChenMnZ/SMMix
(``smmix.py``, ``engine.py``). The paper-vs-code differences are listed below and in the
constructor's ``variant`` argument.

Per batch (flip pairing): with probability ``switch_prob`` an SMMix batch, else Mixup
(lambda ~ Beta(mixup_alpha), soft-target CE only). An SMMix batch:

1. **Extra forward** of the unmixed batch, without grad, in eval mode and fp32 (``official``;
   the model's train/eval mode and the RNG state are restored afterwards): its logits z (kept for
   the consistency loss) and the last block's attention reduced to the attention each patch token
   *receives*, averaged over heads and patch queries (Eq. 6, :func:`~tokenmix.models.attention.
   reduce_attention` ``"query_mean"``). ``paper`` uses the CLS row instead on models with a CLS
   token (the query mean otherwise).
2. **Window**: one square side k per batch, uniform over the integers floor(0.25 s)..floor(0.75 s)
   of the token grid side s (``official``); ``paper``: k = floor(delta s), delta ~ U(0.25, 0.75).
   Sliding k x k sums of the saliency (stride 1, no padding, :func:`window_scores`).
3. **Placement** (``placement``, Table A4): the partner's window is chosen by ``max`` (its most
   salient k x k region) or ``random``; it is pasted onto the own window chosen by ``min`` (least
   salient), ``max`` or ``same`` (the partner window's position). Default ``"max->min"``. Ties
   go to the first position in row-major order. Pixels are copied by whole patches.
4. **Labels and losses**: lam = (N - k^2) / N, the own share. L_cls = soft CE against the smoothed
   area mixture; L_fine = 1/2 [CE(head(mean of own-region tokens), y) + CE(head(mean of pasted-
   region tokens), y_partner)] against the label-smoothed one-hots (the official ``criterion``),
   with a separate token head (``official``; the paper's shared classifier with
   ``shared_head=True``); L_con = KL(teacher || softmax(logits)), batch mean,
   teacher = softmax(lam z + (1 - lam) z_partner) (``official``: logits mixed) or
   lam softmax(z) + (1 - lam) softmax(z_partner) (``paper``: probabilities mixed).
   Total = w_cls L_cls + w_fine L_fine + w_con L_con (weights 1; 0 switches a term off).

Backbones (:class:`~tokenmix.models.backbones.Backbone`): the saliency comes from the last
self-attention site (CaiT: the last patch self-attention block, not a class-attention block; the
``paper`` CLS row there: the last class-attention block). On hierarchical models (Swin, PVT v2)
everything happens on the **last stage's grid**, as the official PVT code does (side 7 at
224 px): the saliency, the window side range, the pasting (whole last-stage cells of
``img / grid`` pixels) and the region heads (on the final tokens). Swin's last stage attends in
windows; its received attention is averaged within each window (at the papers' 224 px the last
window covers the whole 7x7 grid). A last stage whose keys are spatially reduced (PVT v2 with
``sr > 1`` there) is rejected: the saliency would not be on the token grid.

Deviations (deliberate): the window is on the model's token grid (any size, no 14 hard-coding);
torch RNG; the Mixup branch honours ``mix_prob`` (the released code ignores it); flip pairing
as the official code.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tokenmix.methods.base import (MixedBatch, MixMethod, ModelOutputs, Needs, TokenGrid, flip_pairing, mix_targets,
                                    one_hot, soft_target_cross_entropy)
from tokenmix.methods.baselines import draw_switch, mixup_batch
from tokenmix.methods.masks import sample_lam
from tokenmix.models.attention import AttentionCapture
from tokenmix.models.backbones import Backbone

SOURCES = ("max", "random")
DESTINATIONS = ("min", "max", "same")
PLACEMENTS = tuple(f"{s}->{d}" for s in SOURCES for d in DESTINATIONS)


def window_side_range(side: int) -> tuple[int, int]:
    """Window sides of the official rule: floor(0.25 s)..floor(0.75 s), at least 1."""
    return max(1, math.floor(0.25 * side)), max(1, math.floor(0.75 * side))


def sample_window_side(side: int, variant: str = "official") -> int:
    """One window side k for a grid side s (see the module docstring)."""
    lo, hi = window_side_range(side)
    if variant == "official":
        return int(torch.randint(lo, hi + 1, ()))
    delta = 0.25 + 0.5 * float(torch.rand(()))
    return max(1, math.floor(delta * side))


def window_scores(saliency: Tensor, k: int) -> Tensor:
    """Sliding k x k sums: saliency (B, s_r, s_c) -> (B, s_r - k + 1, s_c - k + 1) (stride 1, no padding)."""
    return F.avg_pool2d(saliency.unsqueeze(1).float(), k, stride=1).squeeze(1) * (k * k)


def select_window(scores: Tensor, how: str) -> Tensor:
    """Top-left (row, col) of the max / min / random window per sample: (B, R, C) -> (B, 2) int64.
    Ties go to the first position in row-major order."""
    b, _, c = scores.shape
    flat = scores.reshape(b, -1)
    if how == "max":
        idx = flat.argmax(1)  # torch returns the first maximal index
    elif how == "min":
        idx = flat.argmin(1)
    elif how == "random":
        idx = torch.randint(0, flat.shape[1], (b,), device=scores.device)
    else:
        raise ValueError(f"unknown window selection {how!r}; valid: max, min, random")
    return torch.stack([idx // c, idx % c], dim=1)


def window_mask(pos: Tensor, k: int, grid: TokenGrid) -> Tensor:
    """(B, 2) top-left positions -> (B, N) float 0/1 masks of the k x k token windows."""
    rows = torch.arange(grid.rows, device=pos.device)
    cols = torch.arange(grid.cols, device=pos.device)
    r = (rows[None] >= pos[:, :1]) & (rows[None] < pos[:, :1] + k)  # (B, rows)
    c = (cols[None] >= pos[:, 1:]) & (cols[None] < pos[:, 1:] + k)  # (B, cols)
    return (r[:, :, None] & c[:, None, :]).flatten(1).float()


def window_tokens(pos: Tensor, k: int, grid: TokenGrid) -> Tensor:
    """Row-major token indices of the k x k windows at top-left ``pos`` (B, 2) -> (B, k * k)."""
    ar = torch.arange(k, device=pos.device)
    rows = pos[:, :1, None] + ar[None, :, None]  # (B, k, 1)
    cols = pos[:, 1:, None] + ar[None, None, :]  # (B, 1, k)
    return (rows * grid.cols + cols).reshape(pos.shape[0], -1)


def _patches(x: Tensor, grid: TokenGrid) -> Tensor:
    """(B, C, H, W) -> (B, N, C * ph * pw), row-major tokens."""
    b, c = x.shape[:2]
    return (x.reshape(b, c, grid.rows, grid.patch_h, grid.cols, grid.patch_w)
            .permute(0, 2, 4, 1, 3, 5).reshape(b, grid.num_tokens, -1))


def paste_windows(x: Tensor, x_partner: Tensor, src: Tensor, dst: Tensor, k: int, grid: TokenGrid) -> Tensor:
    """Copy the partner's k x k token window at ``src`` onto the own window at ``dst`` (whole patches).

    x, x_partner: (B, C, H, W) with (H, W) = the grid's image size; src, dst: (B, 2) token positions.
    Returns the mixed images (one gather/scatter for the whole batch)."""
    b, c = x.shape[:2]
    out, part = _patches(x, grid).clone(), _patches(x_partner, grid)  # (B, N, P)
    d = out.shape[-1]
    src_i = window_tokens(src, k, grid)[..., None].expand(-1, -1, d)
    dst_i = window_tokens(dst, k, grid)[..., None].expand(-1, -1, d)
    out.scatter_(1, dst_i, part.gather(1, src_i))
    return (out.reshape(b, grid.rows, grid.cols, c, grid.patch_h, grid.patch_w)
            .permute(0, 3, 1, 4, 2, 5).reshape(x.shape))


def region_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of the patch tokens (B, N, D) where mask (B, N) is 1 -> (B, D)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def fine_loss(own_logits: Tensor, pasted_logits: Tensor, y: Tensor, y_partner: Tensor,
              smoothing: float = 0.0) -> Tensor:
    """L_fine = 1/2 [CE(own-region logits, y~) + CE(pasted-region logits, y~_partner)], where y~ is
    the label-smoothed one-hot (the official ``criterion`` is the soft-target CE against the
    smoothed labels of its mixup target). own_logits, pasted_logits (B, K); y, y_partner (B,)."""
    k = own_logits.shape[-1]
    return 0.5 * (soft_target_cross_entropy(own_logits, one_hot(y, k, smoothing))
                  + soft_target_cross_entropy(pasted_logits, one_hot(y_partner, k, smoothing)))


def consistency_loss(logits: Tensor, z_own: Tensor, z_partner: Tensor, lam: Tensor, variant: str = "official") -> Tensor:
    """L_con = KL(teacher || softmax(logits)), batch mean. lam (B,) own share.

    ``official``: teacher = softmax(lam z_own + (1 - lam) z_partner) (logits mixed);
    ``paper``: teacher = lam softmax(z_own) + (1 - lam) softmax(z_partner) (probabilities mixed)."""
    lam = lam.float().view(-1, 1)
    if variant == "official":
        teacher = F.softmax(lam * z_own.float() + (1 - lam) * z_partner.float(), dim=-1)
    else:
        teacher = lam * F.softmax(z_own.float(), -1) + (1 - lam) * F.softmax(z_partner.float(), -1)
    return F.kl_div(F.log_softmax(logits.float(), -1), teacher, reduction="batchmean")


#: the three loss terms SMMix reports in its ``info`` (Eq. 10: L = L_cls + L_fine + L_con)
LOSS_TERMS: tuple[str, ...] = ("l_cls", "l_fine", "l_con")


class SMMix(MixMethod):
    """SMMix (see the module docstring).

    Args:
        placement: ``"<source>-><destination>"`` with source in max / random and destination in
            min / max / same (Table A4); default ``"max->min"``.
        w_cls, w_fine, w_con: loss weights (0 switches a term off; Table 7).
        mixup_alpha, switch_prob: the Mixup branch (taken with probability 1 - switch_prob).
        shared_head: apply the model's own classifier to the regions (the paper) instead of a
            separate token head (the code).
    """

    name: ClassVar[str] = "smmix"
    colour: ClassVar[str] = "tab:brown"
    paper: ClassVar[str] = "SMMix"
    summary: ClassVar[str] = "max-min attention windows of an untrained model; area target (+ token and consistency losses)"
    gallery: ClassVar[bool] = True
    display_kwargs: ClassVar[dict[str, Any]] = {'switch_prob': 1.0}
    idle_parameters: ClassVar[bool] = True  # the token head is idle on Mixup batches (DDP)

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "official", mix_prob: float = 1.0,
                 placement: str = "max->min", w_cls: float = 1.0, w_fine: float = 1.0, w_con: float = 1.0,
                 mixup_alpha: float = 0.8, switch_prob: float = 0.5, shared_head: bool = False) -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r} for smmix; valid: {', '.join(PLACEMENTS)}")
        if min(w_cls, w_fine, w_con) < 0:
            raise ValueError(f"loss weights must be >= 0, got {w_cls}, {w_fine}, {w_con}")
        if mixup_alpha <= 0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"need mixup_alpha > 0 and switch_prob in [0, 1]; got {mixup_alpha}, {switch_prob}")
        self.source, self.destination = placement.split("->")
        self.placement, self.w_cls, self.w_fine, self.w_con = placement, w_cls, w_fine, w_con
        self.mixup_alpha, self.switch_prob, self.shared_head = mixup_alpha, switch_prob, shared_head
        self.needs = Needs(tokens=True)
        self._model: nn.Module | None = None

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Record the grid (the last stage's, see the module docstring), the saliency site, keep a
        handle on the model (for the extra forward) and attach the token head."""
        bb = Backbone.of(model)
        self.backbone = bb
        if bb.hierarchical:
            (rows, cols), (ch, cw) = bb.final_grid, bb.final_cell
            self.grid = TokenGrid(rows, cols, ch, cw)
        self_attn = [s for s in bb.sites if s.kind != "class"]
        cls_sites = [s for s in bb.sites if s.num_prefix_tokens > 0 and s.kind in ("global", "class")]
        use_cls = self.variant == "paper" and bb.class_token and bool(cls_sites)
        self.saliency_site = (cls_sites if use_cls else self_attn)[-1].index
        self.saliency_reduce = "cls" if use_cls else "query_mean"
        if getattr(bb.sites[self.saliency_site].module, "sr", None) is not None:
            raise ValueError("smmix needs the last stage's attention on its token grid; this PVT v2 reduces the keys "
                             "of its last stage (sr_ratio > 1)")
        if min(self.grid.rows, self.grid.cols) < 2:
            raise ValueError(f"smmix needs a token grid of at least 2x2 for its windows; the saliency grid of "
                             f"{type(model).__name__} is {self.grid.rows}x{self.grid.cols} (use larger images or "
                             "fewer stages)")
        if not self.shared_head:
            dim = int(getattr(model, "num_features", 0) or model.get_classifier().in_features)
            model.smmix_token_head = nn.Linear(dim, self.num_classes)
        self._model = model
        return model

    def release_model(self, model: nn.Module) -> nn.Module:
        """Remove the token head and forget the model."""
        if "smmix_token_head" in model._modules:
            del model.smmix_token_head
        self._model = None
        return super().release_model(model)

    # -- the extra forward ----------------------------------------------------------------------
    @torch.inference_mode()
    def clean_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, K) and token saliency (B, N) of the unmixed batch: eval mode, no grad, fp32
        (outside autocast); the model's mode and the RNG state are restored."""
        if self._model is None:
            raise RuntimeError("smmix needs the model: call method.prepare_model(model) first")
        model = self._model
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        site = self.saliency_site
        try:
            model.eval()
            with (torch.autocast(x.device.type, enabled=False),
                  AttentionCapture(model, (site,), self.saliency_reduce) as cap):
                logits = model(x.float())
            sal = cap[site]
        finally:
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
        return logits.float(), sal.float()

    # -- phase 1 ------------------------------------------------------------------------------
    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        grid = self.grid
        if self._skip():
            return self.unmixed(x, y)
        if not draw_switch(self.switch_prob):
            return mixup_batch(x, y, sample_lam(self.mixup_alpha), grid, self.num_classes, self.smoothing)
        b = x.shape[0]
        idx = flip_pairing(b, x.device)
        z, sal = self.clean_forward(x)  # (B, K), (B, N)
        side = min(grid.rows, grid.cols)
        k = sample_window_side(side, self.variant)
        scores = window_scores(sal.view(b, grid.rows, grid.cols), k)  # (B, R, C)
        src = select_window(scores[idx], self.source)  # on the partner's map
        dst = src.clone() if self.destination == "same" else select_window(scores, self.destination)
        pasted = window_mask(dst, k, grid)  # (B, N) own positions that now hold partner tokens
        lam = torch.full((b,), 1.0 - k * k / grid.num_tokens, device=x.device)
        return MixedBatch(
            x=paste_windows(x, x[idx], src, dst, k, grid), y=y, y_partner=y[idx], partner_index=idx,
            partner_mask=pasted, lam_area=lam, target=mix_targets(y, y[idx], lam, self.num_classes, self.smoothing),
            kind="smmix", extras={"clean_logits": z, "saliency": sal, "src": src, "dst": dst, "k": k,
                                  "partner_source_mask": window_mask(src, k, grid)},
        )

    # -- phase 2 ------------------------------------------------------------------------------
    def region_logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The token head (or the shared classifier) on the mean of the patch tokens in ``mask``."""
        feats = region_mean(self.backbone.final_patch_tokens(tokens), mask)
        head = self._model.get_classifier() if self.shared_head else self._model.smmix_token_head
        return head(feats)

    def forward_extras(self, tokens: Tensor | None, mixed: MixedBatch) -> dict[str, Any]:
        """The token head on the own and the pasted regions (inside the training forward, for DDP)."""
        if mixed.kind != "smmix" or tokens is None:
            return {}
        pasted = mixed.partner_mask
        return {"smmix_region_logits": (self.region_logits(tokens, 1 - pasted), self.region_logits(tokens, pasted))}

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """w_cls L_cls + w_fine L_fine + w_con L_con (the last two on SMMix batches only)."""
        target, info = self.label(outputs, mixed)
        l_cls = soft_target_cross_entropy(outputs.logits, target)
        aux, aux_info = self.auxiliary_loss(outputs, mixed)
        if aux is None:
            return l_cls, info
        info.update(l_cls=float(l_cls.detach()), **aux_info)
        return self.w_cls * l_cls + aux, info

    def auxiliary_loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor | None, dict[str, float]]:
        """``w_fine L_fine + w_con L_con`` of an SMMix batch (None on the others): the terms of
        the max-min region, kept when the region is combined with another label rule."""
        if mixed.kind != "smmix":
            return None, {}
        if outputs.tokens is None:
            raise ValueError("smmix needs the final tokens (needs.tokens); the forward returned none")
        regions = outputs.extras.get("smmix_region_logits") or self.forward_extras(outputs.tokens, mixed)[
            "smmix_region_logits"]  # computed in the forward by MixStep; here for direct callers
        y, y_partner = mixed.y, mixed.y_partner
        b = y.shape[0]
        if b % 2:  # an odd batch's middle sample is its own partner and unmixed: no pasted region
            paired = mixed.partner_index != torch.arange(b, device=y.device)
            regions, y, y_partner = tuple(r[paired] for r in regions), y[paired], y_partner[paired]
        l_fine = fine_loss(*regions, y, y_partner, self.smoothing) if y.numel() else outputs.logits.new_zeros(())
        z = mixed.extras["clean_logits"]
        l_con = consistency_loss(outputs.logits, z, z[mixed.partner_index], mixed.lam_area, self.variant)
        return self.w_fine * l_fine + self.w_con * l_con, {
            "l_fine": float(l_fine.detach()), "l_con": float(l_con.detach()), "window": float(mixed.extras["k"])}

    def __repr__(self) -> str:
        return f"SMMix(variant={self.variant!r}, placement={self.placement!r}, switch_prob={self.switch_prob})"


__all__ = ["DESTINATIONS", "PLACEMENTS", "SMMix", "SOURCES", "consistency_loss", "fine_loss", "paste_windows",
           "region_mean", "sample_window_side", "select_window", "window_mask", "window_scores", "window_side_range",
           "window_tokens"]
