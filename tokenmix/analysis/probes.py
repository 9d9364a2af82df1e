"""Analysis computations behind the method notebooks (no plotting; figures: ``tokenmix.report``).

TransMix (Chen et al., CVPR 2022):
    :func:`transmix_ratios` - per sample, the own share of the area target and of the TransMix
    target in both variants (supplement Figure 1 compares the area and TransMix assignments).

TL-Align (Xiao et al., ICCV 2023, https://arxiv.org/abs/2210.06455), the token fluctuation
phenomenon:
    :func:`token_presence` - Eq. 2, the presence of each input token in a block's outputs;
    :func:`similarity_mixing_ratio` - Appendix B, Eq. 13, the similarity-based "ground-truth"
    mixing ratio of each token of a mixed image;
    :func:`layerwise_mixing_ratios` - Figure 4: per layer, the Eq. 13 ratio against CutMix's
    area ratio, TransMix's ratio and TL-Align's propagated ratio (plus the presence of Eq. 2 and
    a check that TL-Align's K-dimensional path gives the scalar path's numbers).

TokenMix (Liu et al., ECCV 2022, https://arxiv.org/abs/2207.08409):
    :func:`occlusion_accuracy` - Figure 5: top-1 accuracy when a growing share of the patches is
    dropped (their pixels set to a constant), the same random patches for every model.

TokenMixup (Choi et al., NeurIPS 2022, https://arxiv.org/abs/2210.07562), saliency detectors:
    :func:`attention_saliency` - TokenMixup's detector (Eq. 3, 1-step rollout of one block's
    attention); :func:`attention_rollout` - Abnar & Zuidema's rollout over the blocks;
    :func:`gradient_saliency` - the input-gradient saliency of Co-Mixup / PuzzleMix, pooled to the
    token grid; :func:`random_saliency`; :func:`saliency_latency` - their cost per batch (Table 3).

Convention (the package's): every ratio here is the **own** share, i.e. the share of image X1 =
the image the box is pasted into (``mixed.y``); the partner X2 is ``x[mixed.partner_index]``.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tokenmix.methods.base import MixedBatch, MixMethod, TokenGrid, one_hot
from tokenmix.methods.tlalign import TLAlign, initial_own_share, propagate_kdim, propagate_scalar
from tokenmix.methods.tokenmixup import saliency_from_attention
from tokenmix.methods.transmix import TransMix, attention_partner_share, nearest_partner_mask
from tokenmix.models.attention import AttentionCapture, QKCapture, attention_from_qk, self_attention_map

QK = tuple[Tensor, Tensor, float]


# ---------------------------------------------------------------------------------------------
# capturing what a forward computes

@dataclass
class BlockCapture:
    """What one no-grad forward of a ViT computed.

    Attributes:
        logits: (B, K).
        features: L + 1 token tensors (B, T, D): ``features[0]`` enters ``model.blocks[0]``
            (patch embedding + position embedding + CLS), ``features[l]`` leaves block l.
        qk: per block ``(q, k, scale)`` with q, k (B, H, T, d) (see :class:`QKCapture`).
    """

    logits: Tensor
    features: list[Tensor]
    qk: list[QK]


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `blocks` sequence of transformer blocks "
                         "(a timm VisionTransformer-style model is expected)")
    return blocks


@torch.no_grad()
def capture_blocks(model: nn.Module, x: Tensor) -> BlockCapture:
    """Run ``model(x)`` once with forward hooks on every ``model.blocks[i]`` (features entering
    block 0 and leaving each block, detached, float32) and :class:`QKCapture` (queries and keys of
    every block). The model's train/eval mode is left as it is (use eval mode for analysis)."""
    blocks = _blocks(model)
    feats: dict[int, Tensor] = {}

    def pre_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        feats[0] = args[0].detach().float()

    def out_hook(i: int):
        def hook(_m: nn.Module, _a: tuple, out: Tensor) -> None:
            feats[i + 1] = out.detach().float()
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook)]
    handles += [b.register_forward_hook(out_hook(i)) for i, b in enumerate(blocks)]
    try:
        with QKCapture(model) as cap:
            logits = model(x)
        qk = cap.all()
    finally:
        for h in handles:
            h.remove()
    if len(feats) != len(blocks) + 1:
        raise RuntimeError(f"captured features of {len(feats)} layers, expected {len(blocks) + 1}")
    return BlockCapture(logits=logits.detach(), features=[feats[i] for i in range(len(blocks) + 1)], qk=qk)


def head_mean_attention(qk: Sequence[QK]) -> list[Tensor]:
    """Head-mean post-softmax attention Ā (B, T, T) of every block from its captured q, k."""
    return [attention_from_qk(q, k, s).mean(1) for q, k, s in qk]


# ---------------------------------------------------------------------------------------------
# TransMix

def transmix_ratios(mixed: MixedBatch, attn: Tensor, grid: TokenGrid, num_classes: int) -> dict[str, Tensor]:
    """Per-sample **own** shares of the targets TransMix compares (each (B,), in [0, 1]).

    Args:
        mixed: a CutMix :class:`MixedBatch` (box in ``extras["box"]``, or a token-aligned mask).
        attn: (B, N) last-block CLS attention on the patch tokens of the *mixed* forward
            (``AttentionCapture(model, [-1], reduce="cls")``).
        grid: the model's token grid.
        num_classes: K (only to build the method objects).

    Returns (keys in this order):
        ``"area"``: CutMix's lam = 1 - box area share (``mixed.lam_area``);
        ``"attention, nearest mask"``: 1 - lam_attn with the official nearest token mask m_t
        (token pasted iff its top-left pixel is in the box);
        ``"attention, area mask"``: 1 - lam_attn with the area-weighted ``partner_mask``;
        ``"official"``: 1 - (lam_area_partner + lam_attn_nearest) / 2, TransMix(variant="official");
        ``"paper"``: 1 - lam_attn with the area mask, TransMix(variant="paper").
    where lam_attn = sum_t a_t m_t / sum_t a_t is the partner's attention share.
    """
    out = {"area": mixed.lam_area.float(),
           "attention, nearest mask": 1.0 - attention_partner_share(attn, nearest_partner_mask(mixed, grid)),
           "attention, area mask": 1.0 - attention_partner_share(attn, mixed.partner_mask)}
    for variant in ("official", "paper"):
        tm = TransMix(num_classes, variant=variant)
        tm.grid = grid
        out[variant] = 1.0 - tm.partner_share(attn, mixed)
    return out


@torch.no_grad()
def collect_transmix_ratios(model: nn.Module, method: MixMethod, x: Tensor, y: Tensor, n_draws: int,
                            num_classes: int) -> tuple[dict[str, Tensor], list[tuple[MixedBatch, Tensor]]]:
    """Mix the same images ``n_draws`` times (one CutMix lam and box per draw, as in batch mode),
    run the model on each mixed batch and collect :func:`transmix_ratios`.

    Args:
        model: a ViT with a CLS token, in eval mode; method: prepared with ``method.prepare_model``
            (e.g. ``methods.get("transmix", ..., switch_prob=1.0)`` for CutMix on every draw).
        x, y: (B, C, H, W) images and (B,) labels.
    Returns:
        (ratios, draws): every entry of :func:`transmix_ratios` concatenated over the draws
        ((n_draws * B,)), plus ``"draw"`` (the draw index of each sample); and the list of
        ``(mixed, attn)`` of every draw. Mixup draws (when the method switches) are skipped.
    """
    grid = TokenGrid.from_model(model)
    parts: list[dict[str, Tensor]] = []
    draws: list[tuple[MixedBatch, Tensor]] = []
    for d in range(n_draws):
        mixed = method.mix(x, y)
        if mixed.kind != "cutmix":
            continue
        with AttentionCapture(model, blocks=[-1], reduce="cls") as cap:
            model(mixed.x)
        attn = cap[-1]
        r = transmix_ratios(mixed, attn, grid, num_classes)
        r["draw"] = torch.full_like(r["area"], float(d))
        parts.append(r)
        draws.append((mixed, attn))
    if not parts:
        raise ValueError(f"none of the {n_draws} draws was a CutMix batch; use switch_prob=1.0")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, draws


# ---------------------------------------------------------------------------------------------
# TL-Align: token fluctuation

def token_presence(attn: Tensor) -> Tensor:
    """Presence p(z_i) of every input token in a block's outputs (TL-Align Eq. 2).

    Eq. 2 defines p(z_i) = sum_j c(z_i, ẑ_j), the contributions of input token z_i to every
    output ẑ_j = sum_i w_{j,i} z_i normalised per output. We read w as the head-mean attention
    (output j = query row, input i = key column); its rows sum to 1, so
    c(z_i, ẑ_j) = Ā[j, i] and p(z_i) = sum_j Ā[j, i], the attention token i *receives*. Under a
    translation-invariant mixing (a depth-wise convolution away from the border) every p = 1
    (Eq. 3); attention lets p drift far from 1 (token fluctuation); it sums to T over the tokens.

    Args:
        attn: (B, T, T) head-mean attention (rows = queries, each sums to 1).
    Returns:
        (B, T) presence of every token (prefix tokens included).
    """
    return attn.float().sum(1)


def similarity_scores(z_mixed: Tensor, z_own: Tensor, z_partner: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """s_1, s_2 of TL-Align Eq. 13: for every token of the mixed image, its maximum cosine
    similarity with all tokens of the unmixed own image X1 and of the unmixed partner X2 at the
    same layer. z_* (B, T, D) (candidates may have another length T') -> two (B, T)."""
    zm = F.normalize(z_mixed.float(), dim=-1, eps=eps)
    s1 = (zm @ F.normalize(z_own.float(), dim=-1, eps=eps).transpose(1, 2)).amax(-1)
    s2 = (zm @ F.normalize(z_partner.float(), dim=-1, eps=eps).transpose(1, 2)).amax(-1)
    return s1, s2


def similarity_mixing_ratio(z_mixed: Tensor, z_own: Tensor, z_partner: Tensor, temperature: float = 1.0,
                            eps: float = 1e-8) -> Tensor:
    """The similarity-based "ground-truth" mixing ratio of TL-Align, Appendix B, Eq. 13.

    Given the tokens Z̃^l of the mixed image and Z_1^l, Z_2^l of the two unmixed images after
    the same block l (all from the same model), each mixed token z̃_i gets

        s_1 = max_j cos(z̃_i, z_1j),   s_2 = max_k cos(z̃_i, z_2k)                 (Eq. 13)
        lam_i = softmax(s_1, s_2)_1 = exp(s_1) / (exp(s_1) + exp(s_2)) = sigmoid(s_1 - s_2),

    the contribution of X1 to that token. The paper applies the softmax to the raw cosines
    (``temperature=1``, the default); since cosines lie in [-1, 1], lam then lies in
    [sigmoid(-2), sigmoid(2)] = [0.119, 0.881] and is only 0.5 when s_1 = s_2. A
    ``temperature`` tau < 1 (our addition, softmax((s_1, s_2) / tau)) sharpens it towards 0/1.
    Nothing is clipped (the paper does not clip).

    Args:
        z_mixed: (B, T, D) tokens of the mixed images; z_own, z_partner: (B, T', D) tokens of the
            unmixed own / partner images (all of their tokens are candidates, CLS included).
        temperature: tau > 0 (1 = Eq. 13 as written).
    Returns:
        (B, T) own share lam of every mixed token, in (0, 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s1, s2 = similarity_scores(z_mixed, z_own, z_partner, eps)
    return torch.sigmoid((s1 - s2) / temperature)


@dataclass
class LayerwiseRatios:
    """Own shares per layer l = 0 (the tokens entering block 1) ... L (leaving the last block).

    Attributes:
        similarity: (L + 1, B, T) Eq. 13 ratio of every token (TL-Align Appendix B).
        tl_align: (L + 1, B, T) TL-Align's own share beta of every token's label after l blocks
            (scalar path; l = 0 is the initial assignment).
        cutmix: (B,) the area ratio lam_area (CutMix's label, the same at every layer).
        transmix: (B,) the own share of TransMix's target (last-block CLS attention; one value).
        presence: (L, B, T) Eq. 2 presence of every token in block l's attention (l = 1..L).
        kdim_max_abs_diff: max |Y_kdim - (beta y1 + (1 - beta) y2)| over layers, samples, tokens
            and classes: the K-dimensional path against the scalar path.
        num_prefix_tokens: CLS/prefix tokens at the start of T.
        transmix_variant, temperature: the settings used.
    """

    similarity: Tensor
    tl_align: Tensor
    cutmix: Tensor
    transmix: Tensor
    presence: Tensor
    kdim_max_abs_diff: float
    num_prefix_tokens: int
    transmix_variant: str = "official"
    temperature: float = 1.0

    @property
    def num_layers(self) -> int:
        return self.similarity.shape[0] - 1

    def token(self, t: int = 0) -> dict[str, Tensor]:
        """Per-layer curves of token ``t`` (0 = CLS): {name: (L + 1, B)}, the flat ratios repeated."""
        n = self.num_layers + 1
        return {"similarity (Eq. 13)": self.similarity[:, :, t], "TL-Align": self.tl_align[:, :, t],
                "CutMix (area)": self.cutmix.expand(n, -1), f"TransMix ({self.transmix_variant})":
                self.transmix.expand(n, -1)}

    def errors(self, t: int = 0) -> dict[str, Tensor]:
        """Mean absolute difference from the Eq. 13 ratio per layer, {name: (L + 1,)}."""
        curves = self.token(t)
        ref = curves.pop("similarity (Eq. 13)")
        return {k: (v - ref).abs().mean(1) for k, v in curves.items()}

    def agreement(self, t: int = 0) -> dict[str, Tensor]:
        """Pearson correlation over the samples between each rule's ratio of token ``t`` and the
        Eq. 13 ratio, per layer: {name: (L + 1,)} (NaN where either is constant, e.g. the CLS
        token entering block 1, identical in every image). Scale-free, so it is not affected by
        Eq. 13's softmax squeezing the ratio into [0.12, 0.88]."""
        curves = self.token(t)
        ref = curves.pop("similarity (Eq. 13)")
        return {k: torch.stack([pearson(v[l], ref[l]) for l in range(ref.shape[0])]) for k, v in curves.items()}

    def patch_agreement(self) -> dict[str, Tensor]:
        """Pearson correlation over all samples and patch tokens between the Eq. 13 ratio at layer
        l and (a) TL-Align's labels after l blocks, (b) the initial token labels (what CutMix and
        TransMix assume every layer keeps): {name: (L + 1,)}."""
        p = self.num_prefix_tokens
        sim, tla = self.similarity[:, :, p:], self.tl_align[:, :, p:]
        n = sim.shape[0]
        return {"TL-Align (propagated labels)": torch.stack([pearson(tla[l], sim[l]) for l in range(n)]),
                "initial labels (fixed)": torch.stack([pearson(tla[0], sim[l]) for l in range(n)])}


def pearson(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson correlation of two equally sized tensors (flattened); NaN if either is constant."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    if float(den) <= eps:
        return torch.tensor(float("nan"))
    return (a @ b / den).float()


def _cat(parts: Sequence[LayerwiseRatios]) -> LayerwiseRatios:
    p0 = parts[0]
    return LayerwiseRatios(
        similarity=torch.cat([p.similarity for p in parts], 1), tl_align=torch.cat([p.tl_align for p in parts], 1),
        cutmix=torch.cat([p.cutmix for p in parts]), transmix=torch.cat([p.transmix for p in parts]),
        presence=torch.cat([p.presence for p in parts], 1),
        kdim_max_abs_diff=max(p.kdim_max_abs_diff for p in parts), num_prefix_tokens=p0.num_prefix_tokens,
        transmix_variant=p0.transmix_variant, temperature=p0.temperature)


@torch.no_grad()
def layerwise_mixing_ratios(model: nn.Module, mixed: MixedBatch | Sequence[MixedBatch], x: Tensor,
                            num_classes: int, smoothing: float = 0.1, transmix_variant: str = "official",
                            temperature: float = 1.0) -> LayerwiseRatios:
    """TL-Align Figure 4: at every layer, the similarity-based "ground-truth" ratio against the
    ratios CutMix, TransMix and TL-Align assign (for all tokens; the paper plots the CLS token).

    Two forwards per mixed batch, with hooks on every ``model.blocks[l]``: the mixed images
    (features Z̃^l, queries and keys) and the clean images ``x`` (features Z^l; the partner's are
    ``Z^l[mixed.partner_index]``). Then, per layer l:

    - similarity: :func:`similarity_mixing_ratio` (Eq. 13) of Z̃^l against Z^l and its partner;
    - TL-Align: beta^l = (Ā^l beta^{l-1} + beta^{l-1}) / 2 from ``initial_own_share`` (Eqs. 9-11,
      scalar path, ``propagate_scalar`` one block at a time); the K-dim path
      (``propagate_kdim`` on Ā^l = head mean of softmax(q k^T * scale)) is run alongside and its
      largest deviation from beta y1 + (1 - beta) y2 is recorded;
    - CutMix: ``mixed.lam_area``; TransMix: ``TransMix(variant).partner_share`` of the last
      block's CLS attention (both constant over layers);
    - presence: :func:`token_presence` of Ā^l.

    Args:
        model: a timm ViT (``model.blocks``) in eval mode.
        mixed: one CutMix :class:`MixedBatch` of ``x`` or a list of them (concatenated along B).
        x: (B, C, H, W) the clean images the batches were mixed from.
        num_classes, smoothing: for the K-dim rows (y1, y2 smoothed one-hots).
        transmix_variant: ``"official"`` or ``"paper"``; temperature: see Eq. 13.
    """
    if not isinstance(mixed, MixedBatch):
        return _cat([layerwise_mixing_ratios(model, m, x, num_classes, smoothing, transmix_variant, temperature)
                     for m in mixed])
    p = int(getattr(model, "num_prefix_tokens", 0))
    grid = TokenGrid.from_model(model)
    mix_cap, clean_cap = capture_blocks(model, mixed.x), capture_blocks(model, x)
    idx = mixed.partner_index
    sim = torch.stack([similarity_mixing_ratio(zm, zc, zc[idx], temperature)
                       for zm, zc in zip(mix_cap.features, clean_cap.features)])  # (L+1, B, T)

    attns = head_mean_attention(mix_cap.qk)  # L x (B, T, T)
    beta = initial_own_share(mixed, p)  # (B, T)
    y1 = one_hot(mixed.y, num_classes, smoothing).unsqueeze(1)  # (B, 1, K)
    y2 = one_hot(mixed.y_partner, num_classes, smoothing).unsqueeze(1)
    rows = beta.unsqueeze(-1) * y1 + (1 - beta.unsqueeze(-1)) * y2  # (B, T, K)
    betas, diff = [beta], 0.0
    for qk_l, a_l in zip(mix_cap.qk, attns):
        beta = propagate_scalar(beta, [qk_l])
        rows = propagate_kdim(rows, [a_l])
        b3 = beta.unsqueeze(-1)
        diff = max(diff, float((rows - (b3 * y1 + (1 - b3) * y2)).abs().max()))
        betas.append(beta)

    if p > 0:
        cls_attn = attns[-1][:, 0, p:]  # (B, N): CLS row of the last block, head mean
    else:
        cls_attn = attns[-1][:, p:, p:].mean(1)  # TransMix's query-mean fallback
    tm = TransMix(num_classes, smoothing, variant=transmix_variant)
    tm.grid = grid
    return LayerwiseRatios(
        similarity=sim, tl_align=torch.stack(betas), cutmix=mixed.lam_area.float(),
        transmix=1.0 - tm.partner_share(cls_attn, mixed),
        presence=torch.stack([token_presence(a) for a in attns]), kdim_max_abs_diff=diff,
        num_prefix_tokens=p, transmix_variant=transmix_variant, temperature=temperature)


@torch.no_grad()
def tlalign_path_difference(model: nn.Module, mixed: MixedBatch, num_classes: int, smoothing: float = 0.1) -> float:
    """max |target_scalar - target_kdim| of :class:`~tokenmix.methods.TLAlign` on one forward of
    ``mixed.x``: the method's own ``aligned_target`` with ``path="scalar"`` and ``path="kdim"``."""
    qk = capture_blocks(model, mixed.x).qk
    targets = []
    for path in ("scalar", "kdim"):
        m = TLAlign(num_classes, smoothing, path=path)
        m.prepare_model(model)
        targets.append(m.aligned_target(mixed, qk)[0])
    return float((targets[0] - targets[1]).abs().max())


def mix_draws(method: MixMethod, x: Tensor, y: Tensor, n_draws: int) -> list[MixedBatch]:
    """``n_draws`` independent ``method.mix(x, y)`` draws (each its own lam and box)."""
    return [method.mix(x, y) for _ in range(n_draws)]


# ---------------------------------------------------------------------------------------------
# TokenMix: occlusion robustness (Figure 5)

#: the drop ratios of TokenMix's Figure 5
OCCLUSION_RATIOS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))


def occlusion_count(num_tokens: int, ratio: float) -> int:
    """Patches dropped at ``ratio``: floor(ratio N) (ratio in [0, 1]; a 1e-9 tolerance keeps
    0.7 * 10 at 7 despite binary rounding)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"drop ratio must be in [0, 1], got {ratio}")
    return min(num_tokens, math.floor(ratio * num_tokens + 1e-9))


def occlusion_ranks(batch: int, num_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """A random drop order per image: (B, N) int64, each row a permutation of 0..N-1 (the rank
    at which each patch is dropped). Thresholding one order at growing counts gives nested
    occlusions: the patches dropped at 10 % stay dropped at 20 %."""
    return torch.rand(batch, num_tokens, generator=generator).argsort(1).argsort(1)


def occlusion_mask(batch: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None,
                   ranks: Tensor | None = None) -> Tensor:
    """Which patches to drop: (B, N) bool with exactly :func:`occlusion_count` ``(N, ratio)`` True
    per row, uniformly random (from ``generator``, or the given drop order ``ranks``)."""
    r = occlusion_ranks(batch, num_tokens, generator) if ranks is None else ranks
    if r.shape != (batch, num_tokens):
        raise ValueError(f"ranks of shape {tuple(r.shape)} do not fit ({batch}, {num_tokens})")
    return r < occlusion_count(num_tokens, ratio)


def black_level(info) -> Tensor:
    """The normalised value of a black pixel per channel, -mean / std: (C,) float32. Pass it as
    ``fill`` to set dropped pixels to zero in image space (the paper's "set the pixels inside to
    zero"). ``info``: a :class:`tokenmix.data.DatasetInfo` (anything with ``mean`` and ``std``)."""
    mean = torch.tensor(info.mean, dtype=torch.float32)
    std = torch.tensor(info.std, dtype=torch.float32)
    return -mean / std


def occlude(images: Tensor, mask: Tensor, grid: TokenGrid, fill: Tensor | float = 0.0) -> Tensor:
    """Set the pixels of the patches where ``mask`` (B, N) is True to ``fill``.

    Args:
        images: (B, C, H, W) normalised images covered by ``grid``.
        fill: a float or a per-channel (C,) tensor, in the images' (normalised) units.
    Returns:
        A new (B, C, H, W) tensor.
    """
    b, c, h, w = images.shape
    if (h, w) != grid.img_size or mask.shape != (b, grid.num_tokens):
        raise ValueError(f"images {tuple(images.shape)} / mask {tuple(mask.shape)} do not fit the token grid "
                         f"{grid.rows}x{grid.cols} of {grid.img_size} pixels")
    pix = mask.view(b, 1, grid.rows, grid.cols).repeat_interleave(grid.patch_h, 2).repeat_interleave(grid.patch_w, 3)
    f = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    f = f.view(1, -1, 1, 1) if f.dim() == 1 else f
    return torch.where(pix.to(images.device), f, images)


@torch.no_grad()
def occlusion_accuracy(model: nn.Module, images: Tensor, labels: Tensor, grid: TokenGrid,
                       ratios: Sequence[float] = OCCLUSION_RATIOS, fill: Tensor | float = 0.0, seed: int = 0,
                       batch_size: int = 256) -> dict[float, float]:
    """Top-1 accuracy (%) under random patch occlusion (TokenMix, Figure 5).

    For every image, one random drop order of its N patches is drawn from ``seed``; at drop ratio
    r the first floor(r N) patches of that order get their pixels set to ``fill``. The occlusions
    depend only on ``seed``, the number of images and the grid, so every model evaluated with the
    same arguments sees identical occluded images, and they are nested across ratios (the paper
    "gradually drop[s] 10 % more patches").

    Args:
        model: a classifier; evaluated in eval mode (its mode is restored afterwards), no grad.
        images: (B, C, H, W) float images, already normalised as the model expects; labels: (B,).
        grid: the token grid the patches are taken from (usually ``TokenGrid.from_model(model)``).
        ratios: drop ratios in [0, 1].
        fill: the value written into dropped pixels, in normalised units: a float (0.0 = the
            dataset mean) or a per-channel (C,) tensor, e.g. :func:`black_level` for black pixels.
        seed: seed of the drop orders; batch_size: images per forward (does not change the result).
    Returns:
        {ratio: top-1 %} in the order of ``ratios``.
    """
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"expected images (B, C, H, W) and B labels, got {tuple(images.shape)} and {len(labels)}")
    for r in ratios:
        occlusion_count(grid.num_tokens, float(r))  # validates
    device = next(model.parameters()).device
    ranks = occlusion_ranks(len(images), grid.num_tokens, torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    correct = {float(r): 0 for r in ratios}
    try:
        for lo in range(0, len(images), batch_size):
            x = images[lo:lo + batch_size].to(device)
            y = labels[lo:lo + batch_size].to(device)
            rk = ranks[lo:lo + batch_size]
            for r in correct:
                mask = occlusion_mask(len(x), grid.num_tokens, r, ranks=rk)
                pred = model(occlude(x, mask, grid, fill)).argmax(1)
                correct[r] += int((pred == y).sum())
    finally:
        model.train(was_training)
    n = max(len(images), 1)
    return {r: 100.0 * c / n for r, c in correct.items()}


# ---------------------------------------------------------------------------------------------
# TokenMixup: saliency detectors (Figure 3) and their cost (Table 3)

class _StopForward(Exception):
    """Raised by :func:`block_input`'s hook to stop the forward at the chosen block."""


def block_input(model: nn.Module, x: Tensor, layer: int) -> Tensor:
    """The tokens (B, T, D) entering ``model.blocks[layer]`` for input ``x``, detached.

    The forward runs only up to that block: a forward pre-hook (registered first, so it sees the
    input before other pre-hooks, e.g. TokenMixup's HTM hook, change it) stores the input and
    stops the forward with a private exception. Generic for timm ViTs and the CCT model (whatever
    the model does before its blocks: patch embedding, position embedding, prefix tokens,
    ``patch_drop``, ``norm_pre``). Runs without grad; the model's mode is left as it is.
    """
    blocks = _blocks(model)
    if not -len(blocks) <= layer < len(blocks):
        raise IndexError(f"layer {layer} out of range: {type(model).__name__} has {len(blocks)} blocks")
    got: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        got.append(args[0].detach())
        raise _StopForward

    handle = blocks[layer].register_forward_pre_hook(hook, prepend=True)
    try:
        with torch.no_grad():
            model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"the forward of {type(model).__name__} never reached block {layer}")
    return got[0]


def _block_attention(block: nn.Module) -> nn.Module:
    """The block's timm ``Attention`` (unwrapping TokenMixup's ``VerticalAttention``)."""
    attn = block.attn
    return attn if hasattr(attn, "qkv") else attn.attn


def attention_saliency(model: nn.Module, x: Tensor, layer: int, saliency: str = "auto") -> Tensor:
    """TokenMixup's saliency detector (Eq. 3): the attention of ``model.blocks[layer]`` on its
    (detached) input, recomputed without grad from the block's own weights
    (:func:`~tokenmix.models.attention.self_attention_map` of ``norm1(input)``), reduced by
    :func:`~tokenmix.methods.tokenmixup.saliency_from_attention` (1-step rollout: CLS row for
    models with a CLS token, mean over the queries otherwise; ``saliency`` as there).

    Returns:
        (B, N) float32 saliency of the patch tokens.
    """

    block = _blocks(model)[layer]
    tokens = block_input(model, x, layer)
    with torch.no_grad():
        attn = self_attention_map(_block_attention(block), block.norm1(tokens))
    return saliency_from_attention(attn, int(getattr(model, "num_prefix_tokens", 0)), saliency)


def rollout(attn: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of head-mean maps: ``R = Â_L ... Â_1`` with
    ``Â = (A + I) / 2`` (A + I renormalised; rows of A sum to 1). attn: per block (B, T, T) ->
    (B, T, T) float32, rows summing to 1."""
    if not attn:
        raise ValueError("rollout needs at least one attention map")
    eye = torch.eye(attn[0].shape[-1], dtype=torch.float32, device=attn[0].device)
    out = None
    for a in attn:
        a_hat = a.float() + eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        out = a_hat if out is None else a_hat @ out
    return out


def attention_rollout(model: nn.Module, x: Tensor, upto: int | None = None, saliency: str = "auto") -> Tensor:
    """Attention rollout over ``model.blocks[:upto]`` (all blocks when None), reduced to the patch
    tokens like :func:`attention_saliency` (``saliency``: ``"auto"`` = the CLS row for models with a
    CLS token, the mean over the patch queries otherwise). One no-grad forward
    (:func:`capture_blocks`); the maps are head means.

    Returns:
        (B, N) float32.
    """

    n_blocks = len(_blocks(model))
    upto = n_blocks if upto is None else upto
    if not 1 <= upto <= n_blocks:
        raise ValueError(f"upto must be in 1..{n_blocks}, got {upto}")
    maps = head_mean_attention(capture_blocks(model, x).qk[:upto])
    return saliency_from_attention(rollout(maps).unsqueeze(1), int(getattr(model, "num_prefix_tokens", 0)),
                                   saliency)


def pool_to_tokens(pixel_map: Tensor, grid: TokenGrid) -> Tensor:
    """Sum-pool a per-pixel map (B, H, W) over each token's ``patch_h x patch_w`` cell -> (B, N),
    row-major over the grid."""
    b, h, w = pixel_map.shape
    if (h, w) != grid.img_size:
        raise ValueError(f"map of size {(h, w)} does not match the token grid {grid} ({grid.img_size})")
    cells = pixel_map.reshape(b, grid.rows, grid.patch_h, grid.cols, grid.patch_w)
    return cells.sum(dim=(2, 4)).reshape(b, grid.num_tokens)


def gradient_saliency(model: nn.Module, x: Tensor, y: Tensor, grid: TokenGrid | None = None) -> Tensor:
    """Input-gradient saliency (Co-Mixup / PuzzleMix): ``|d loss / d x|``, the L2 norm over the
    channels, sum-pooled to the token grid (:func:`pool_to_tokens`).

    The loss is the cross-entropy of the logits against ``y`` summed over the batch (so each
    sample's map does not depend on the batch size). One forward and one backward to the input;
    the parameters get no ``.grad``. Co-Mixup / PuzzleMix take the RMS over the channels instead
    of the norm (a constant factor sqrt(C)) and pool by averaging (a constant factor, the cell size).

    Args:
        y: (B,) class indices.
        grid: the token grid (default: ``TokenGrid.from_model(model)``).

    Returns:
        (B, N) float32, non-negative.
    """
    grid = TokenGrid.from_model(model) if grid is None else grid
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xi).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xi)
    return pool_to_tokens(g.float().pow(2).sum(1).sqrt(), grid)


def random_saliency(x: Tensor, grid: TokenGrid, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random saliency (B, N) in [0, 1) (Table 3's "random" detector)."""
    return torch.rand(x.shape[0], grid.num_tokens, generator=generator).to(x.device)


def saliency_latency(model: nn.Module, x: Tensor, y: Tensor, layer: int, repeats: int = 10,
                     warmup: int = 2) -> dict[str, float]:
    """Median wall-clock seconds per call of the saliency detectors on one batch (Table 3).

    Measured interleaved (gradient, attention, random, gradient, ...) in one process, after
    ``warmup`` untimed rounds:

    - ``"gradient"``: :func:`gradient_saliency` (one forward + one backward to the input; the
      extra cost Co-Mixup / PuzzleMix pay per iteration);
    - ``"attention"``: TokenMixup's extra cost: the attention of ``blocks[layer]`` recomputed on
      its input and reduced (the block input itself comes for free from the training forward);
    - ``"attention_with_forward"``: :func:`attention_saliency` as a standalone call, i.e.
      including the forward up to ``blocks[layer]`` (an upper bound of the attention detector);
    - ``"random"``: :func:`random_saliency`.
    """


    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    grid = TokenGrid.from_model(model)
    block = _blocks(model)[layer]
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    tokens = block_input(model, x, layer)

    def attention_only() -> Tensor:
        with torch.no_grad():
            return saliency_from_attention(self_attention_map(_block_attention(block), block.norm1(tokens)), prefix)

    detectors = {
        "gradient": lambda: gradient_saliency(model, x, y, grid),
        "attention": attention_only,
        "attention_with_forward": lambda: attention_saliency(model, x, layer),
        "random": lambda: random_saliency(x, grid),
    }
    times: dict[str, list[float]] = {k: [] for k in detectors}
    for r in range(warmup + repeats):
        for k, fn in detectors.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


__all__ = ["BlockCapture", "LayerwiseRatios", "OCCLUSION_RATIOS", "black_level", "capture_blocks",
           "collect_transmix_ratios", "head_mean_attention", "layerwise_mixing_ratios", "mix_draws", "occlude",
           "occlusion_accuracy", "occlusion_count", "occlusion_mask", "occlusion_ranks", "pearson",
           "similarity_mixing_ratio", "similarity_scores", "tlalign_path_difference", "token_presence",
           "transmix_ratios"]
__all__ += ["attention_rollout", "attention_saliency", "block_input", "gradient_saliency", "pool_to_tokens",
            "random_saliency", "rollout", "saliency_latency"]
