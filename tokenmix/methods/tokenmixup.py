"""TokenMixup: attention-guided token-level mixing inside the network (HTM + VTM).

Paper: Choi et al., "TokenMixup: Efficient Attention-guided Token-level Data Augmentation for
Transformers", NeurIPS 2022 (https://arxiv.org/abs/2210.07562), Sec. 3, Algorithm 1, Eqs. 1-13.
Official code: https://github.com/mlvlab/TokenMixup (``experiments/cct/src/utils/*.py``,
``experiments/vit/{models/modeling,utils/utils}.py``; the reference is the experiment code).

This module holds the pure functions of the method and the method itself (:class:`TokenMixup`:
HTM as a forward pre-hook on one block, VTM as a cross-attention wrapper); shapes use N patch tokens, T = P + N tokens
with P prefix (CLS / distillation / register) tokens first, D channels, K classes, B samples and
M easy samples.

**Horizontal TokenMixup (HTM)**, acting on the input tokens of one block:

1. *Difficulty* (Eq. 1): d_i = CE_soft(ScoreNet(X_i), y_i), the ScoreNet logits detached
   (:func:`difficulty`, :class:`ScoreNet`). Sample i is *easy*, hence mixed
   (:func:`easy_samples`), iff d_i < tau (``paper``, Eq. 8) or d_i / 10 <= tau (``official``).
   The method's ``gate`` picks the rule, ``official`` by default in both variants (the paper's gate
   never fires under label smoothing 0.1 with tau = 0.2: the soft CE is at least the target's
   entropy, 0.50 for K = 10).
2. *Saliency* (Eq. 3, 1-step rollout): a_{i,t} from the head-mean, post-softmax, detached
   attention map of the block (:func:`saliency_from_attention`).
3. *Gains* (Eqs. 4-6): for every easy sample m and **every** batch sample j,
   S[m, j, t] = max(a_{j,t} - a_{m,t} - rho, 0) and G[m, j] = sum_t S[m, j, t]
   (:func:`token_gains`).
4. *Matching* (Eq. 7): Hungarian assignment maximising sum_m G[m, j*_m] over one-to-one
   assignments of the M easy rows to the B columns (:func:`match_partners`).
5. *Mask* (Eq. 9, polarity flipped): mask[m, t] = 1 iff token t of sample m is **replaced** by
   token t of its partner j*_m (same position). ``paper``: S[m, j*_m, t] > 0; ``official``:
   S[0, j*_m, t] > 0 for every m (the released code's row-0 gather; reference 1.3)
   (:func:`htm_mask`). Prefix tokens are never mixed.
6. *Label* (Eq. 11): s_own = sum_t a_{m,t} (1 - mask), s_partner = sum_t a_{j*,t} mask,
   y' = (s_own y_m + s_partner y_{j*}) / (s_own + s_partner), on the targets as they enter the
   block (already mixed / smoothed by input Mixup/CutMix) (:func:`htm_label`).

:func:`horizontal_mix` runs steps 3-6 on a batch.

**Vertical TokenMixup (VTM)** (Eq. 13): the kappa most salient tokens of earlier layers
(:func:`top_salient_tokens`) are concatenated to the keys/values of one block's attention, which
runs as cross-attention with the block's own weights (:func:`cross_attention`); the output keeps
the T query tokens.

Variants (``variant``, default ``paper``; the gate is the separate ``gate`` parameter):

==================  ==================================  ======================================
                    ``paper``                           ``official``
==================  ==================================  ======================================
mask row            S[m, j*_m] (own saliency)           S[0, j*_m] for every m (row-0 bug)
VTM store (CLS)     the kappa most salient patches      the token before each of them (CLS for
                                                        patch 0): patch indices gathered from the
                                                        full sequence (released ViT code)
difficulty gate     CE < tau (``gate="paper"``)          CE / 10 <= tau (``gate="official"``,
                                                        the default of both variants)
==================  ==================================  ======================================

The VTM store differs only on models with a CLS token (ViT/DeiT; CCT built with one); CCT
without one (the CIFAR models) and CaiT's patch blocks (P = 0) store the same tokens in both.

Backbones (timm): ViT/DeiT, CCT and CaiT.

- **CaiT** (``timm.models.cait.Cait``): HTM and VTM act on the patch self-attention blocks,
  ``model.blocks`` (``LayerScaleBlock`` with talking-heads attention); ``horizontal_layer`` and
  ``vertical_layer`` count those blocks. Their token sequence has no prefix token (P = 0, although
  ``model.num_prefix_tokens`` is 1: the CLS token only enters the class-attention blocks,
  ``model.blocks_token_only``, which TokenMixup leaves untouched), so the saliency is
  ``"query_mean"`` and ScoreNet cannot use ``"cls"`` pooling. P is read per attention site from
  :class:`~tokenmix.models.backbones.Backbone` (``sites[i].num_prefix_tokens``).
- **Talking-heads attention map.** CaiT mixes the heads before (``proj_l``) and after
  (``proj_w``) the softmax, so the map that multiplies the values is not row-stochastic. As
  everywhere in the package (:mod:`tokenmix.models.backbones`), the saliency map is the softmax
  itself, ``softmax(proj_l(q * scale @ k^T))`` = the input of ``proj_w``, a distribution per row
  (:func:`~tokenmix.models.attention.self_attention_map` for HTM, a pre-hook on ``proj_w`` for
  VTM's earlier layers); :func:`cross_attention` reproduces the full talking-heads forward.
- **Swin and PVT v2 are not supported** (:meth:`TokenMixup.prepare_model` raises ValueError):
  TokenMixup needs global self-attention blocks over one fixed token sequence. Swin's (shifted)
  window attention and PVT v2's spatial-reduction attention, and the changes of the token grid
  between their stages, break HTM's position-wise token swap (driven by a global saliency map)
  and VTM's cross-attention to tokens stored from earlier layers.

Saliency on models with a CLS token (``mode`` of :func:`saliency_from_attention`): ``"cls"`` is
the ViT experiment code (CLS query row, CLS->CLS dropped, not renormalised); ``"query_mean"`` is
Eq. 3 and the CCT code (attention received by each patch token, averaged over heads and over
the patch queries, as :func:`tokenmix.models.attention.reduce_attention`'s ``"query_mean"``; for
models without prefix tokens these are all the queries).

Deviations from the official code (deliberate):

- **No batch reordering.** The released code moves the mixed samples to the front of the batch
  (tokens and targets); here every sample keeps its position, so the logits, the ScoreNet output
  and the returned targets stay in the input order.
- Partners are searched among the whole batch (as the experiment code; Algorithm 1 is ambiguous
  between the easy set and the batch). Self-matches have zero gain and replace nothing.
- One easy sample (M = 1) and none (M = 0) are supported (the released code's trailing squeeze is
  reported to fail at M = 1; see reference section 12).
- The mask here is 1 where the partner's token is taken (the paper's M of Eq. 9 has the opposite
  polarity); Eq. 11 is written accordingly.
- The Hungarian matching runs on a CPU float64 copy of G (scipy), one device sync per call, as the
  official code (which also copies to the CPU).
- :class:`ScoreNet` offers ``"avg"`` and ``"cls"`` pooling besides the CCT code's attention
  pooling (the ViT code's ScoreNet is a linear head on the CLS token, i.e. ``"cls"``).
- :func:`cross_attention` reuses the block's attention weights (the official VTM module is a
  separate q/k/v attention that is plain self-attention in eval mode); normalising the queries and
  the concatenated keys/values (LN(x), LN(concat(x, V)) in the experiment code) is the caller's
  job.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, ModelOutputs, soft_target_cross_entropy
from tokenmix.methods.baselines import MixupCutMix
from tokenmix.models.attention import reduce_attention, self_attention_map
from tokenmix.models.backbones import Backbone

SALIENCY_MODES: tuple[str, ...] = ("auto", "cls", "query_mean")
VARIANTS: tuple[str, ...] = ("official", "paper")
POOLINGS: tuple[str, ...] = ("attention", "avg", "cls")
#: the released code divides the ScoreNet cross-entropy by this before comparing with tau
OFFICIAL_DIFFICULTY_SCALE = 10.0


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown TokenMixup variant {variant!r}; valid: {', '.join(VARIANTS)}")


def _float(t: Tensor) -> Tensor:
    """``t`` promoted to at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# HTM: saliency, gains, matching, mask, label
# ---------------------------------------------------------------------------------------------
def saliency_from_attention(attn: Tensor, num_prefix_tokens: int, mode: str = "auto") -> Tensor:
    """Token saliency from one block's attention map (head mean; 1-step rollout, Eq. 3).

    Args:
        attn: (B, H, T, T) post-softmax attention (rows = queries), T = num_prefix_tokens + N.
        num_prefix_tokens: P, the number of prefix tokens before the patches (CLS first).
        mode: ``"cls"``: the CLS query's row (row 0) on the patch keys, CLS->CLS dropped, not
            renormalised (ViT experiment code); ``"query_mean"``: the attention each patch token
            receives, averaged over the N patch queries and the heads (paper Eq. 3, CCT code;
            the package's :func:`~tokenmix.models.attention.reduce_attention` convention);
            ``"auto"``: ``"cls"`` if ``num_prefix_tokens > 0`` else ``"query_mean"``.

    Returns:
        (B, N) detached float saliency (float32, or float64 for float64 input).

    Raises:
        ValueError: unknown ``mode``, ``"cls"`` without prefix tokens, or a malformed ``attn``.
    """
    if mode not in SALIENCY_MODES:
        raise ValueError(f"unknown saliency mode {mode!r}; valid: {', '.join(SALIENCY_MODES)}")
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (B, H, T, T), got {tuple(attn.shape)}")
    p = int(num_prefix_tokens)
    if not 0 <= p < attn.shape[-1]:
        raise ValueError(f"num_prefix_tokens={p} leaves no patch token in T={attn.shape[-1]}")
    if mode == "auto":
        mode = "cls" if p > 0 else "query_mean"
    if mode == "cls" and p < 1:
        raise ValueError("saliency mode 'cls' needs a prefix (CLS) token; use 'query_mean'")
    return reduce_attention(_float(attn.detach()), mode, p)


def token_gains(sal_easy: Tensor, sal_all: Tensor, rho: float) -> Tensor:
    """Per-token saliency gains S[m, j, t] = max(a_{j,t} - a_{m,t} - rho, 0) (Eqs. 4-6).

    Args:
        sal_easy: (M, N) saliency of the easy (to-be-mixed) samples.
        sal_all: (B, N) saliency of every candidate partner (the whole batch).
        rho: minimum gain for a token to be replaced.

    Returns:
        (M, B, N) non-negative gains; ``G = S.sum(-1)`` is the matching score (M, B).
    """
    if sal_easy.dim() != 2 or sal_all.dim() != 2 or sal_easy.shape[1] != sal_all.shape[1]:
        raise ValueError(f"saliencies must be (M, N) and (B, N), got {tuple(sal_easy.shape)} "
                         f"and {tuple(sal_all.shape)}")
    return torch.clamp(sal_all[None] - sal_easy[:, None] - rho, min=0)


def match_partners(gain: Tensor) -> Tensor:
    """Hungarian matching (Eq. 7): one distinct partner per row, maximising the total gain.

    Solved with ``scipy.optimize.linear_sum_assignment(maximize=True)`` on a CPU float64 copy.

    Args:
        gain: (M, B) matching scores G[m, j], M <= B.

    Returns:
        (M,) int64 partner index (a column of ``gain``) per row, on ``gain.device``; all distinct.

    Raises:
        ValueError: if ``gain`` is not 2-D, has more rows than columns, or is not finite.
    """
    if gain.dim() != 2:
        raise ValueError(f"gain must be (M, B), got {tuple(gain.shape)}")
    m, b = gain.shape
    if m > b:
        raise ValueError(f"cannot assign {m} rows to {b} distinct partners (M must be <= B)")
    if m == 0:
        return torch.empty(0, dtype=torch.int64, device=gain.device)
    g = gain.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("gain contains non-finite values")

    rows, cols = linear_sum_assignment(g.numpy(), maximize=True)
    out = torch.empty(m, dtype=torch.int64)
    out[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    return out.to(gain.device)


def htm_mask(gains: Tensor, partners: Tensor, variant: str = "paper") -> Tensor:
    """Replacement mask (Eq. 9, polarity flipped): True where the partner's token is taken.

    Args:
        gains: (M, B, N) S from :func:`token_gains`.
        partners: (M,) partner column per row (:func:`match_partners`).
        variant: ``"paper"``: mask[m] = S[m, partners[m]] > 0 (each sample's own row);
            ``"official"``: mask[m] = S[0, partners[m]] > 0 for every m (the released code's
            row-0 gather).

    Returns:
        (M, N) bool.
    """
    _check_variant(variant)
    if gains.dim() != 3 or partners.shape != (gains.shape[0],):
        raise ValueError(f"gains must be (M, B, N) and partners (M,), got {tuple(gains.shape)} "
                         f"and {tuple(partners.shape)}")
    m = gains.shape[0]
    if m == 0:
        return torch.zeros(0, gains.shape[2], dtype=torch.bool, device=gains.device)
    partners = partners.long().to(gains.device)
    if variant == "official":
        return gains[0, partners] > 0
    return gains[torch.arange(m, device=gains.device), partners] > 0


def htm_label(target_own: Tensor, target_partner: Tensor, sal_own: Tensor, sal_partner: Tensor,
              mask: Tensor) -> Tensor:
    """Saliency-weighted label of a mixed sample (Eq. 11).

    With s_own = sum_t sal_own (1 - mask) (own saliency kept) and
    s_partner = sum_t sal_partner mask (partner saliency brought in):
    ``y' = (s_own y_own + s_partner y_partner) / (s_own + s_partner)``; rows with
    ``s_own + s_partner == 0`` keep ``y_own``.

    Args:
        target_own, target_partner: (M, K) soft targets.
        sal_own, sal_partner: (M, N) saliency of the sample and of its partner.
        mask: (M, N) True / 1 where the partner's token is taken.

    Returns:
        (M, K) targets (float32, or float64 if any input is float64).
    """
    if target_own.shape != target_partner.shape or not (sal_own.shape == sal_partner.shape == mask.shape):
        raise ValueError(f"shapes must be (M, K) x2 and (M, N) x3, got {tuple(target_own.shape)}, "
                         f"{tuple(target_partner.shape)}, {tuple(sal_own.shape)}, {tuple(sal_partner.shape)}, "
                         f"{tuple(mask.shape)}")
    dtype = torch.promote_types(torch.promote_types(target_own.dtype, sal_own.dtype), torch.float32)
    m = mask.to(dtype)
    s_own = (sal_own.detach().to(dtype) * (1 - m)).sum(1, keepdim=True)
    s_par = (sal_partner.detach().to(dtype) * m).sum(1, keepdim=True)
    den = s_own + s_par
    y_own, y_par = target_own.to(dtype), target_partner.to(dtype)
    ok = den > 0
    safe = torch.where(ok, den, torch.ones_like(den))
    mixed = (s_own * y_own + s_par * y_par) / safe
    return torch.where(ok, mixed, y_own)


# ---------------------------------------------------------------------------------------------
# HTM: difficulty gate and ScoreNet
# ---------------------------------------------------------------------------------------------
def difficulty(scorenet_logits: Tensor, target: Tensor, variant: str = "paper") -> Tensor:
    """Per-sample difficulty (Eq. 1): soft-target cross-entropy of the **detached** ScoreNet
    logits against ``target``; ``"official"`` divides it by 10 (the released code).

    Args:
        scorenet_logits: (B, K).
        target: (B, K) soft targets.

    Returns:
        (B,) float32 (no gradient).
    """
    _check_variant(variant)
    logp = F.log_softmax(scorenet_logits.detach().float(), dim=-1)
    ce = -(target.detach().float() * logp).sum(-1)
    return ce / OFFICIAL_DIFFICULTY_SCALE if variant == "official" else ce


def easy_samples(diff: Tensor, tau: float, variant: str) -> Tensor:
    """Which samples are mixed: ``diff < tau`` (``"paper"``, Eq. 8) or ``diff <= tau``
    (``"official"``). diff (B,) from :func:`difficulty` -> (B,) bool."""
    _check_variant(variant)
    return diff <= tau if variant == "official" else diff < tau


class ScoreNet(nn.Module):
    """Difficulty classifier on a block's input tokens: pooling, then a linear head d -> K.

    Args:
        dim: D, the token width.
        num_classes: K.
        pooling: ``"attention"`` (linear d -> 1, softmax over the patch tokens, weighted sum; the
            CCT code), ``"avg"`` (mean of the patch tokens) or ``"cls"`` (token 0; the ViT code;
            needs ``num_prefix_tokens > 0``).
        num_prefix_tokens: P; prefix tokens are excluded from attention and average pooling.
    """

    def __init__(self, dim: int, num_classes: int, pooling: str = "attention", num_prefix_tokens: int = 0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown ScoreNet pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if pooling == "cls" and num_prefix_tokens < 1:
            raise ValueError("ScoreNet pooling 'cls' needs a prefix (CLS) token (num_prefix_tokens > 0); "
                             "use 'attention' or 'avg'")
        self.pooling = pooling
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.attn_pool = nn.Linear(dim, 1) if pooling == "attention" else None
        self.head = nn.Linear(dim, num_classes)

    def pooling_weights(self, tokens: Tensor) -> Tensor:
        """Attention-pooling weights over the patch tokens: tokens (B, T, D) -> (B, N), rows sum
        to 1. Only for ``pooling="attention"``."""
        if self.attn_pool is None:
            raise RuntimeError(f"pooling_weights needs pooling='attention', not {self.pooling!r}")
        patches = tokens[:, self.num_prefix_tokens:]
        return self.attn_pool(patches).squeeze(-1).softmax(dim=1)

    def pool(self, tokens: Tensor) -> Tensor:
        """Pooled feature: tokens (B, T, D) -> (B, D)."""
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        if self.pooling == "avg":
            return patches.mean(1)
        w = self.pooling_weights(tokens)
        return (w.unsqueeze(-1) * patches).sum(1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T, D) -> logits (B, K)."""
        return self.head(self.pool(tokens))


# ---------------------------------------------------------------------------------------------
# HTM on a batch
# ---------------------------------------------------------------------------------------------
def horizontal_mix(tokens: Tensor, saliency: Tensor, target: Tensor, easy: Tensor, rho: float,
                   num_prefix_tokens: int = 0, variant: str = "paper",
                   ) -> tuple[Tensor, Tensor, dict[str, float | Tensor]]:
    """Horizontal TokenMixup of a batch (Algorithm 1, steps 3-8), out of place, order kept.

    The easy samples (in batch order) are matched to partners among **all** B samples by
    :func:`match_partners` on G = :func:`token_gains`(...).sum(-1); patch token t of each easy
    sample is replaced by its partner's patch token t where :func:`htm_mask` is set (prefix tokens
    are never mixed) and its target becomes :func:`htm_label` of its own and the partner's input
    targets. Hard samples are returned unchanged. The output is differentiable w.r.t. ``tokens``
    (gradients reach both the kept and the borrowed tokens); labels carry no gradient.

    Args:
        tokens: (B, T, D) block input, T = num_prefix_tokens + N.
        saliency: (B, N) token saliency (:func:`saliency_from_attention`).
        target: (B, K) soft targets entering the block (already mixed / smoothed).
        easy: (B,) bool, True for the samples to mix (:func:`easy_samples`).
        rho: minimum per-token gain.
        num_prefix_tokens: P.
        variant: mask variant of :func:`htm_mask`.

    Returns:
        ``(new_tokens, new_target, info)``: (B, T, D), (B, K) and

        - ``"n_mixed"``: number M of easy samples (float); every easy sample counts as mixed,
          even when its mask comes out empty (e.g. a zero-gain self-match);
        - ``"tokens_replaced"``: mean number of replaced tokens per mixed sample (0 if M = 0);
        - ``"saliency_gain"``: mean matched total gain G[m, j*_m] over the mixed samples
          (0 if M = 0);
        - ``"partners"``: (B,) int64, the partner index of each mixed sample, -1 elsewhere;
        - ``"mask"``: (B, N) bool, the replaced tokens (all False for unmixed samples).
    """
    _check_variant(variant)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, T, D), got {tuple(tokens.shape)}")
    b, t, _ = tokens.shape
    p = int(num_prefix_tokens)
    n = t - p
    if not 0 <= p < t:
        raise ValueError(f"num_prefix_tokens={p} leaves no patch token in T={t}")
    if saliency.shape != (b, n):
        raise ValueError(f"saliency must be (B, N) = {(b, n)}, got {tuple(saliency.shape)}")
    if target.dim() != 2 or target.shape[0] != b:
        raise ValueError(f"target must be (B, K) with B = {b}, got {tuple(target.shape)}")
    if easy.shape != (b,) or easy.dtype != torch.bool:
        raise ValueError(f"easy must be a (B,) bool tensor, got {tuple(easy.shape)} {easy.dtype}")

    device = tokens.device
    sal = _float(saliency.detach()).to(device)
    idx = easy.to(device).nonzero().squeeze(1)                        # (M,) easy samples, batch order
    m = idx.numel()

    gains = token_gains(sal[idx], sal, rho)                           # (M, B, N)
    total = gains.sum(-1)                                             # (M, B)
    partners = match_partners(total)                                  # (M,)
    mask = htm_mask(gains, partners, variant)                         # (M, N)

    partners_full = torch.full((b,), -1, dtype=torch.int64, device=device)
    partners_full[idx] = partners
    mask_full = torch.zeros(b, n, dtype=torch.bool, device=device)
    mask_full[idx] = mask
    source = torch.arange(b, device=device)                           # whose tokens each row reads
    source[idx] = partners

    patches = tokens[:, p:]
    new_patches = torch.where(mask_full.unsqueeze(-1), patches[source], patches)
    new_tokens = torch.cat([tokens[:, :p], new_patches], dim=1)

    new_rows = htm_label(target[idx], target[partners], sal[idx], sal[partners], mask)
    new_target = target.index_put((idx,), new_rows.to(target.dtype))

    if m:
        gain_m = total[torch.arange(m, device=device), partners]
        replaced = float(mask.sum(1).double().mean())
        sal_gain = float(gain_m.mean())
    else:
        replaced, sal_gain = 0.0, 0.0
    info: dict[str, float | Tensor] = {
        "n_mixed": float(m),
        "tokens_replaced": replaced,
        "saliency_gain": sal_gain,
        "partners": partners_full,
        "mask": mask_full,
    }
    return new_tokens, new_target, info


# ---------------------------------------------------------------------------------------------
# VTM
# ---------------------------------------------------------------------------------------------
def top_salient_tokens(tokens: Tensor, saliency: Tensor, kappa: int, num_prefix_tokens: int = 0,
                       variant: str = "paper") -> Tensor:
    """The kappa most salient patch tokens of each sample, most salient first (VTM's store).

    Args:
        tokens: (B, T, D), T = num_prefix_tokens + N.
        saliency: (B, N), over the patch tokens.
        kappa: tokens kept per sample, 0 <= kappa <= N.
        variant: ``"paper"`` stores the kappa most salient patches (token ``P + i`` for patch
            ``i``); ``"official"`` reproduces the released ViT code, which takes the patch indices
            ``i`` of the top-kappa saliencies but gathers them from the full sequence, CLS
            included: it stores token ``i``, the token *before* each salient patch (the CLS token
            for patch 0) when P = 1. Without prefix tokens (P = 0) both are the same.

    Returns:
        (B, kappa, D), differentiable w.r.t. ``tokens`` (the official ``vertical_stopgrad`` is
        False; detach at the call site otherwise).
    """
    _check_variant(variant)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, T, D), got {tuple(tokens.shape)}")
    b, t, d = tokens.shape
    p = int(num_prefix_tokens)
    n = t - p
    if saliency.shape != (b, n):
        raise ValueError(f"saliency must be (B, N) = {(b, n)}, got {tuple(saliency.shape)}")
    if not 0 <= kappa <= n:
        raise ValueError(f"kappa must be in [0, N={n}], got {kappa}")
    order = saliency.detach().topk(kappa, dim=1, largest=True, sorted=True).indices  # (B, kappa), patch indices
    source = tokens if variant == "official" else tokens[:, p:]  # official: indices into the full sequence
    return torch.gather(source, 1, order.unsqueeze(-1).expand(b, kappa, d))


def _talking_heads(attn: nn.Module) -> bool:
    """Whether ``attn`` is CaiT's talking-heads attention (``proj_l`` / ``proj_w`` head mixing)."""
    return isinstance(getattr(attn, "proj_l", None), nn.Linear) and isinstance(getattr(attn, "proj_w", None), nn.Linear)


def _mix_heads(linear: nn.Module, a: Tensor) -> Tensor:
    """Talking heads: ``linear`` over the head axis of a (B, H, Tq, Tk) map, as timm's CaiT."""
    return linear(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def cross_attention(attn: nn.Module, x: Tensor, kv: Tensor) -> Tensor:
    """Cross-attention with a timm attention module's own weights (VTM, Eq. 13).

    Queries come from ``x``, keys and values from ``kv``, through the rows of the module's fused
    ``qkv`` projection (q = rows [0, A), k = [A, 2A), v = [2A, 3A), A = heads x head_dim, bias
    sliced likewise; with ``kv is x`` the fused projection itself). Then, for a timm
    ``Attention``: ``q_norm`` / ``k_norm``, scaled softmax attention (SDPA when the module's
    ``fused_attn`` is set, else the explicit softmax and ``attn_drop``), ``norm``, the optional
    ``gate`` (computed from ``x``), ``proj`` and ``proj_drop``. For CaiT's talking-heads
    attention (``TalkingHeadAttn``): logits ``(q * scale) @ k^T`` over the T2 keys, ``proj_l``
    (over the heads), softmax, ``proj_w``, ``attn_drop``, ``@ v``, ``proj`` and ``proj_drop``.
    No parameter is created; with ``kv is x`` the result equals ``attn(x)``.

    Args:
        attn: a ``timm.models.vision_transformer.Attention`` (``timm.layers.Attention``) or a
            ``timm.models.cait.TalkingHeadAttn``.
        x: (B, T, D) queries (already normalised by the caller).
        kv: (B, T2, D) keys/values, e.g. LN(concat(x, stored tokens)).

    Returns:
        (B, T, D_out).
    """
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        raise TypeError(f"cross_attention needs an attention module with a fused `qkv` Linear, "
                        f"got {type(attn).__name__}")
    if x.dim() != 3 or kv.dim() != 3 or x.shape[0] != kv.shape[0] or x.shape[2] != kv.shape[2]:
        raise ValueError(f"x and kv must be (B, T, D) and (B, T2, D), got {tuple(x.shape)} and {tuple(kv.shape)}")
    h = int(attn.num_heads)
    if qkv.out_features % (3 * h):
        raise ValueError(f"qkv has {qkv.out_features} outputs, not 3 x heads ({h}) x head_dim")
    hd = int(getattr(attn, "head_dim", qkv.out_features // (3 * h)))  # TalkingHeadAttn: C // num_heads
    a = int(getattr(attn, "attn_dim", h * hd))
    if qkv.out_features != 3 * a:
        raise ValueError(f"qkv has {qkv.out_features} outputs, expected 3 x {a}")
    b, t, _ = x.shape
    t2 = kv.shape[1]
    if kv is x:  # plain self-attention: the module's own fused projection (bit-identical to attn(x))
        q, k, v = qkv(x).reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        w, bias = qkv.weight, qkv.bias

        def project(inp: Tensor, i: int, length: int) -> Tensor:
            out = F.linear(inp, w[i * a:(i + 1) * a], None if bias is None else bias[i * a:(i + 1) * a])
            return out.reshape(b, length, h, hd).transpose(1, 2)          # (B, H, L, hd)

        q, k, v = project(x, 0, t), project(kv, 1, t2), project(kv, 2, t2)
    if _talking_heads(attn):
        logits = _mix_heads(attn.proj_l, (q * attn.scale) @ k.transpose(-2, -1))   # (B, H, T, T2)
        weights = _mix_heads(attn.proj_w, logits.softmax(dim=-1))
        out = attn.attn_drop(weights) @ v
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, t, a)))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if getattr(attn, "fused_attn", False):
        drop = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(b, t, a)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


# ---------------------------------------------------------------------------------------------
# the method: HTM as a forward pre-hook on one block, VTM as a cross-attention wrapper

HTM_MODES = ("htm", "vtm", "hvtm")
INPUT_MIXES = ("mixup_cutmix", "none")
SUPPORTED_FAMILIES = "ViT/DeiT, CCT, CaiT (timm; CaiT on its self-attention blocks)"
#: families of :class:`~tokenmix.models.backbones.Backbone` TokenMixup refuses, and why
UNSUPPORTED_FAMILIES = {"swin": "Swin", "pvt_v2": "PVT v2"}
UNSUPPORTED_REASONS = {
    "swin": "attends within (shifted) local windows and merges patches between stages",
    "pvt_v2": "attends to spatially reduced keys/values and changes the token grid between stages",
}
_UNSUPPORTED_CLASSES = {"SwinTransformer": "swin", "PyramidVisionTransformerV2": "pvt_v2"}


def _backbone_family(model: nn.Module) -> str | None:
    """:attr:`Backbone.family` of ``model``; for a model Backbone cannot describe, the family its
    class names if it is one TokenMixup refuses (e.g. a PVT v2 without an image size), else None."""
    try:
        return Backbone.of(model).family
    except ValueError:
        return _UNSUPPORTED_CLASSES.get(type(model).__name__)


def _inner(attn: nn.Module) -> nn.Module:
    """The attention module inside a :class:`VerticalAttention` wrapper (else ``attn``)."""
    return attn.attn if isinstance(attn, VerticalAttention) else attn


class VerticalAttention(nn.Module):
    """Wraps a block's timm ``Attention`` (or CaiT's ``TalkingHeadAttn``): in training, keys and
    values also include the salient tokens of earlier layers stored during the current forward
    (``store()`` returns them, normalised here with the block's ``norm1``); in eval mode, and when
    nothing is stored, plain self-attention. No parameters of its own."""

    def __init__(self, attn: nn.Module, norm: nn.Module, store: Callable[[], list[Tensor]]) -> None:
        super().__init__()
        self.attn, self.store = attn, store
        self._norm = [norm]  # not a submodule: the block owns it (no duplicate parameters)

    @property
    def proj_w(self) -> nn.Module:
        """The wrapped talking-heads attention's ``proj_w`` (where
        :class:`~tokenmix.models.backbones.Backbone` captures CaiT's map, as ``block.attn.proj_w``);
        AttributeError for other attention modules."""
        if not _talking_heads(self.attn):
            raise AttributeError(f"{type(self.attn).__name__} has no talking-heads `proj_w`")
        return self.attn.proj_w

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        stored = self.store() if self.training else []
        if not stored:
            return self.attn(x, *args, **kwargs)
        extra = self._norm[0](torch.cat(stored, dim=1))  # (B, L * kappa, D)
        return cross_attention(self.attn, x, torch.cat([x, extra], dim=1))


@dataclass
class _Forward:
    """What the hooks share during one training forward (see :meth:`TokenMixup.forward_context`):
    the input target (read by HTM), HTM's results and VTM's stored tokens (written by the hooks)."""

    target: Tensor
    out: dict[str, Any] = field(default_factory=dict)
    store: list[Tensor] = field(default_factory=list)
    pending: Tensor | None = None


class TokenMixup(MixMethod):
    """TokenMixup: Horizontal (HTM) and Vertical (VTM) token-level mixing inside the model.

    The input batch is first mixed by the Mixup/CutMix switch (``input_mix="mixup_cutmix"``, the
    paper's CIFAR recipe) or left alone (``"none"``, its ImageNet recipe). Then, in training:

    - **HTM** (``tokenmixup_mode`` "htm" or "hvtm"), at the input of block ``horizontal_layer``: ScoreNet
      predicts the class from the block input; easy samples (difficulty vs ``tau``) swap the
      tokens where a partner's attention saliency exceeds theirs by more than ``rho``; partners
      by the Hungarian algorithm; labels re-weighted by saliency (Eq. 11). The saliency comes
      from the block's own attention on the detached, unmixed input (no grad).
    - **VTM** (``tokenmixup_mode`` "vtm" or "hvtm"): every block before ``vertical_layer`` stores the
      ``kappa`` most salient tokens of its input; block ``vertical_layer`` attends over its own
      tokens plus the stored ones (cross-attention with its own weights; no new parameters).

    Loss: soft-target CE against the HTM target + ``scorenet_lambda`` x soft-target CE of the
    ScoreNet logits against the pre-HTM target. Evaluation is plain self-attention.

    Backbones: timm ViT/DeiT, CCT and CaiT. Layer indices count ``model.blocks``; on CaiT these
    are its patch self-attention blocks (no prefix token: P = 0, ``"query_mean"`` saliency), and
    the class-attention blocks (``blocks_token_only``) are untouched. For CaiT's talking-heads
    attention the saliency map is the softmax, i.e. the input of ``proj_w`` (row-stochastic; the
    package convention). Swin and PVT v2 raise ValueError in :meth:`prepare_model`: their window /
    spatial-reduction attention and per-stage token grids break the token swap and the
    stored-token cross-attention, which need global self-attention over a fixed token sequence.

    Args:
        variant: ``"paper"`` (default: each sample's own mask row) or ``"official"`` (the
            released row-0 mask).
        gate: the difficulty gate, ``"official"`` (default, both variants: CE / 10 <= tau, the
            rule of the released code) or ``"paper"`` (Eq. 8: CE < tau). Under label
            smoothing 0.1 the soft CE never falls below the target's entropy (0.50 for K = 10), so
            the paper gate with tau = 0.2 never mixes anything.
        saliency: ``"auto"`` (CLS row for models with a CLS token, mean over queries otherwise),
            ``"cls"`` or ``"query_mean"``.
    """

    name: ClassVar[str] = "tokenmixup"
    colour: ClassVar[str] = "tab:purple"
    paper: ClassVar[str] = "TokenMixup"
    summary: ClassVar[str] = "input Mixup/CutMix only; area target (HTM/VTM mix tokens inside the model)"
    gallery: ClassVar[bool] = True
    display_kwargs: ClassVar[dict[str, Any]] = {'switch_prob': 1.0}

    def __init__(self, num_classes: int, smoothing: float = 0.1, variant: str = "paper", mix_prob: float = 1.0,
                 tokenmixup_mode: str = "htm", horizontal_layer: int = 2, tau: float = 0.2, rho: float = 0.005,
                 scorenet_lambda: float = 0.001, scorenet_stopgrad: bool = False, scorenet_pooling: str = "attention",
                 saliency: str = "auto", gate: str = "official", vertical_layer: int = 2, kappa: int = 3,
                 input_mix: str = "mixup_cutmix", mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5) -> None:
        super().__init__(num_classes, smoothing, variant, mix_prob)
        for what, value, valid in (("tokenmixup_mode", tokenmixup_mode, HTM_MODES), ("input_mix", input_mix, INPUT_MIXES),
                                   ("saliency", saliency, SALIENCY_MODES), ("gate", gate, VARIANTS)):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r} for tokenmixup; valid: {', '.join(valid)}")
        if rho < 0 or tau < 0 or scorenet_lambda < 0 or kappa < 1:
            raise ValueError(f"need rho, tau, scorenet_lambda >= 0 and kappa >= 1; got {rho}, {tau}, "
                             f"{scorenet_lambda}, {kappa}")
        self.mode, self.horizontal_layer, self.tau, self.rho = tokenmixup_mode, horizontal_layer, tau, rho
        self.scorenet_lambda, self.scorenet_stopgrad, self.scorenet_pooling = scorenet_lambda, scorenet_stopgrad, scorenet_pooling
        self.saliency, self.gate, self.vertical_layer, self.kappa = saliency, gate, vertical_layer, kappa
        self.input_mix = input_mix
        self.switch = MixupCutMix(num_classes, smoothing, "official", mix_prob, mixup_alpha, cutmix_alpha, switch_prob)
        self._active: _Forward | None = None  # set only inside forward_context (one training forward)
        self._handles: list[Any] = []  # the hooks setup_model registered (removed by release_model)
        self._wrapped: list[tuple[nn.Module, nn.Module]] = []  # (block, its original attention)
        self._unfused: list[nn.Module] = []  # attention modules switched to unfused attention

    @property
    def horizontal(self) -> bool:
        return self.mode in ("htm", "hvtm")

    @property
    def vertical(self) -> bool:
        return self.mode in ("vtm", "hvtm")

    # -- setup -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Check the backbone, then install HTM's hook, ScoreNet and VTM's wrappers (idempotent;
        :meth:`release_model` removes them)."""
        family = _backbone_family(model)
        if family in UNSUPPORTED_FAMILIES:
            raise ValueError(
                f"tokenmixup does not support {UNSUPPORTED_FAMILIES[family]} ({type(model).__name__}): it needs "
                "global self-attention blocks over a fixed token sequence, while "
                f"{UNSUPPORTED_FAMILIES[family]} {UNSUPPORTED_REASONS[family]}, which breaks HTM's token swap and "
                f"VTM's cross-attention to stored tokens; supported: {SUPPORTED_FAMILIES}")
        return super().prepare_model(model)

    def setup_model(self, model: nn.Module) -> nn.Module:
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError(f"tokenmixup needs a model with `blocks` ({SUPPORTED_FAMILIES}), "
                             f"got {type(model).__name__}")
        depth = len(blocks)
        for what, layer in (("horizontal_layer", self.horizontal_layer), ("vertical_layer", self.vertical_layer)):
            if not 0 <= layer < depth:
                raise ValueError(f"{what} {layer} is outside the model's {depth} blocks (valid: 0..{depth - 1})")
        # prefix tokens of the sequence the blocks attend over: the model's CLS/distillation/register
        # tokens for plain ViTs, none for CaiT's self-attention blocks (its CLS token only enters the
        # class-attention blocks, which are not in `model.blocks`)
        sites = Backbone.of(model).sites
        if len(sites) < depth or any(sites[i].module is not _inner(blocks[i].attn) for i in range(depth)):
            raise ValueError(f"tokenmixup cannot map the attention modules of {type(model).__name__} onto its "
                             f"`blocks`; supported: {SUPPORTED_FAMILIES}")
        prefixes = {int(sites[i].num_prefix_tokens) for i in range(depth)}
        if len(prefixes) != 1:
            raise ValueError(f"the blocks of {type(model).__name__} attend over different prefix token counts "
                             f"{sorted(prefixes)}; tokenmixup needs one token sequence")
        prefix = self.num_prefix_tokens = prefixes.pop()
        if self.saliency == "cls" and prefix == 0:
            raise ValueError("saliency='cls' needs a model with a CLS token; use 'query_mean' or 'auto'")
        if self.horizontal:
            dim = int(getattr(model, "embed_dim", blocks[0].norm1.normalized_shape[0]))
            model.tokenmixup_scorenet = ScoreNet(dim, self.num_classes, self.scorenet_pooling, prefix)
            self._scorenet = model.tokenmixup_scorenet
            self._handles.append(blocks[self.horizontal_layer].register_forward_pre_hook(self._htm_hook))
        if self.vertical:
            if self.vertical_layer == 0:
                raise ValueError("vertical_layer 0 has no earlier layers to take tokens from; use >= 1")
            for i in range(self.vertical_layer):
                # the saliency of an earlier layer comes from its own forward: its attention map is
                # captured at attn_drop (so those blocks run unfused attention), or at proj_w for
                # talking heads (its input is the softmax, (B, T, T, H))
                site = sites[i]
                if getattr(site.module, "fused_attn", False):
                    site.module.fused_attn = False
                    self._unfused.append(site.module)
                self._handles.append(blocks[i].register_forward_pre_hook(self._vtm_input_hook(i == 0)))
                self._handles.append(site.capture.register_forward_pre_hook(self._vtm_attn_hook(site.heads_last)))
            blk = blocks[self.vertical_layer]
            self._wrapped.append((blk, blk.attn))
            blk.attn = VerticalAttention(blk.attn, blk.norm1, self._stored)
        return model

    def release_model(self, model: nn.Module) -> nn.Module:
        """Remove the hooks, the ScoreNet and the VTM wrapper; restore fused attention."""
        for h in self._handles:
            h.remove()
        for blk, attn in self._wrapped:
            blk.attn = attn
        for module in self._unfused:
            module.fused_attn = True
        self._handles, self._wrapped, self._unfused = [], [], []
        if "tokenmixup_scorenet" in model._modules:
            del model.tokenmixup_scorenet
        return super().release_model(model)

    def _stored(self) -> list[Tensor]:
        return self._active.store if self._active is not None else []

    @contextmanager
    def forward_context(self, mixed: MixedBatch | None) -> Iterator[dict[str, Any]]:
        """One training forward on ``mixed``: HTM reads ``mixed.target`` and writes its results to
        the yielded dict (``ModelOutputs.extras["htm"]``: new target, ScoreNet logits, input target,
        info); VTM stores its tokens for this forward only (``extras["vtm_store"]``: per earlier
        layer, (B, kappa, D)). Without a batch, a plain forward."""
        if mixed is None:
            yield {}
            return
        if self._active is not None:
            raise RuntimeError("tokenmixup: nested training forwards are not supported")
        self._active = state = _Forward(mixed.target)
        try:
            yield state.out
        finally:
            self._active = None
            if state.store:
                state.out["vtm_store"] = list(state.store)

    # -- hooks (training only) ----------------------------------------------------------------
    def _saliency(self, block: nn.Module, x: Tensor) -> Tensor:
        with torch.no_grad():
            attn = self_attention_map(_inner(block.attn), block.norm1(x.detach()))
        return saliency_from_attention(attn, self.num_prefix_tokens, self.saliency)

    def _htm_hook(self, block: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        state = self._active
        if not block.training or state is None:
            return None
        x = args[0]
        target = state.target
        logits = self._scorenet(x.detach() if self.scorenet_stopgrad else x)
        easy = easy_samples(difficulty(logits, target, self.gate), self.tau, self.gate)
        sal = self._saliency(block, x)
        new_x, new_target, info = horizontal_mix(x, sal, target, easy, self.rho, self.num_prefix_tokens, self.variant)
        state.out["htm"] = {"target": new_target, "scorenet_logits": logits, "target_pre": target, "info": info}
        return (new_x,) + tuple(args[1:])

    def _vtm_input_hook(self, first: bool):
        def hook(block: nn.Module, args: tuple[Tensor, ...]) -> None:
            state = self._active
            if state is None:
                return
            if first:
                state.store.clear()  # a new forward
            state.pending = args[0] if block.training else None
        return hook

    def _vtm_attn_hook(self, heads_last: bool):
        def hook(_capture: nn.Module, args: tuple[Tensor, ...]) -> None:
            state = self._active
            if state is not None and state.pending is not None:
                a = args[0].detach()
                if heads_last:  # talking heads: proj_w's input (B, T, T, H) -> (B, H, T, T)
                    a = a.permute(0, 3, 1, 2)
                sal = saliency_from_attention(a, self.num_prefix_tokens, self.saliency)
                state.store.append(top_salient_tokens(state.pending, sal, self.kappa, self.num_prefix_tokens,
                                                      self.variant))
                state.pending = None
        return hook

    # -- phases -------------------------------------------------------------------------------
    def mix_batch(self, x: Tensor, y: Tensor, meta: dict[str, Tensor] | None = None) -> MixedBatch:
        self.switch.grid = self.grid
        return self.switch.mix_batch(x, y) if self.input_mix == "mixup_cutmix" else self.unmixed(x, y)

    def label(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """HTM's target (``outputs.extras["htm"]``) when HTM ran in the forward, else ``mixed.target``."""
        htm = outputs.extras.get("htm")
        info: dict[str, float] = {"lam": float(mixed.lam_area.mean())}
        if htm is None:
            return mixed.target, info
        i = htm["info"]
        info.update(n_mixed=float(i["n_mixed"]), tokens_replaced=float(i["tokens_replaced"]),
                    saliency_gain=float(i["saliency_gain"]))
        return htm["target"], info

    def loss(self, outputs: ModelOutputs, mixed: MixedBatch) -> tuple[Tensor, dict[str, float]]:
        """Soft-target CE against :meth:`label` + ``scorenet_lambda`` x ScoreNet's soft-target CE
        against the pre-HTM target."""
        target, info = self.label(outputs, mixed)
        loss = soft_target_cross_entropy(outputs.logits, target)
        htm = outputs.extras.get("htm")
        if htm is not None:
            sn = soft_target_cross_entropy(htm["scorenet_logits"], htm["target_pre"])
            loss = loss + self.scorenet_lambda * sn
            info = {"lam": info["lam"], "scorenet_loss": float(sn.detach()),
                    **{k: v for k, v in info.items() if k != "lam"}}
        return loss, info

    def __repr__(self) -> str:
        return (f"TokenMixup(mode={self.mode!r}, variant={self.variant!r}, horizontal_layer={self.horizontal_layer}, "
                f"tau={self.tau}, rho={self.rho}, vertical_layer={self.vertical_layer}, kappa={self.kappa})")

__all__ = [
    "OFFICIAL_DIFFICULTY_SCALE", "POOLINGS", "SALIENCY_MODES", "VARIANTS", "ScoreNet", "cross_attention",
    "difficulty", "easy_samples", "horizontal_mix", "htm_label", "htm_mask", "match_partners",
    "saliency_from_attention", "token_gains", "top_salient_tokens", "TokenMixup", "VerticalAttention",
]
