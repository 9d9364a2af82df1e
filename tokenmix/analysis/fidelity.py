"""Label fidelity: how well each mixing method's label matches a pixel-level ground truth.

Why it can be measured at all
-----------------------------
Fashion-MNIST objects lie on a black background (pixel value 0). In a cut-and-paste mixed image
every pixel comes either from the own image a or from the partner b, so the *visible foreground
mass* of each source is known exactly. With raw intensities I (uint8 scale, **not** normalised,
summed over the channels) and M the per-pixel partner share of the mixed image (1 where the pixel
comes from b; every mask used here is 0/1 at the pixel level), the **oracle** partner share is

    oracle = sum_p M_p I_b(p) / ( sum_p (1 - M_p) I_a(p) + sum_p M_p I_b(p) )

(0/0, i.e. nothing visible of either object, falls back to the area share mean(M)). It is the
share of the object evidence in the mixed image that belongs to the partner: a box pasted over
the background of a shirt carries almost all of the partner's shoe and none of the shirt. It is a
*pixel-mass* ground truth (brighter garments weigh more), not a semantic one, and it is only
meaningful on black-background data; on other data (e.g. ``synthetic``) the functions run but the
numbers mean nothing. ``I_b(p)`` is the partner's pixel *as placed in the mixed image*, which
differs from b's pixel at p only for SMMix (its window is moved, see below).

The label rules (every share below is the **partner** share of the target; the package's
``lam`` convention is the own share, converted at the boundary)
---------------------------------------------------------------------------------------------
All rules are evaluated on the *same* fixed images with a trained checkpoint in eval mode (no
dropout), without gradients, with ``torch.manual_seed`` set to the same value before each
method's ``mix``. The first four rules share one CutMix batch (timm's pixel box, Beta(1, 1),
one box per batch as in batch mode), so they differ only in the rule:

- ``CutMix (area)``: 1 - lam_area, the pasted area.
- ``TransMix (official)`` / ``TransMix (paper)``: :meth:`tokenmix.methods.TransMix.partner_share`
  from the last block's CLS attention of the forward on the *mixed* batch (official: mean of
  the area share and the attention share with the nearest token mask; paper: the attention
  share with the area-weighted token mask).
- ``TL-Align``: 1 - beta of :meth:`tokenmix.methods.TLAlign.aligned_target` (the token labels
  propagated through every block's attention of the mixed forward). It is applied to the pixel
  box of the shared batch (``variant="paper"``; straddling tokens start with their fractional
  share) instead of the official token-snapped box, so that it sees the same mixes as CutMix and
  TransMix.

The others use each method's own mixes:

- ``TokenMix (teacher)``: the official block mask (one per batch, 28 of 49 tokens on the 7x7
  grid), labels from the teacher activation maps of the *test* split (the images are not
  augmented: crop box (0, 0, 1, 1), no flip): with the Eq. 2 masses y_own (own map mass left
  visible) and y_partner (partner map mass pasted in), the paper's normalised rule
  y_partner / (y_own + y_partner) (0/0 -> 0.5, as :func:`tokenmix.methods.tokenmix.paper_target`).
  The official target is not normalised (it sums to y_own + y_partner); its normalised partner
  share is this same number. Skipped (reported, not computed) when there is no teacher cache.
- ``SMMix (area)``: SMMix's own max->min windows (the partner's most salient k x k token window,
  from the model's own clean forward, pasted onto the own least salient window), label
  1 - lam = k^2 / N. The oracle uses the partner's pixels from the *source* window, placed where
  they are pasted.
- ``TokenMixup (HTM saliency)`` -- **an adaptation**: HTM swaps tokens in feature space at the
  input of block ``horizontal_layer`` during training, where no pixel ground truth exists. Here
  its rule is applied at the *input*: the saliency is the trained model's attention of block
  ``horizontal_layer`` on the clean images (:func:`tokenmix.analysis.probes.attention_saliency`, the
  CLS row, as TokenMixup's HTM saliency); every sample is treated as easy (the ScoreNet
  difficulty gate is a training-time device and is skipped); partners by the Hungarian matching
  of the saliency gains (:func:`~tokenmix.methods.tokenmixup.match_partners`, over the batch);
  the replaced tokens by :func:`~tokenmix.methods.tokenmixup.htm_mask` (``paper`` rows, ``rho``);
  the images are mixed with whole patches at those tokens, and the label is Eq. 11's partner
  share s_partner / (s_own + s_partner) (:func:`~tokenmix.methods.tokenmixup.htm_label`).
  Samples whose mask comes out empty (nothing gains more than ``rho``) are not mixed and are
  left out, so this rule may have fewer samples.

What the numbers mean
---------------------
Per rule (:func:`summarize`): ``n`` samples, mean absolute error and RMSE of the predicted
partner share against the oracle (in share units: 0.10 = ten points of label mass on the wrong
image), the Pearson correlation over the samples (does the rule rank the mixes right; NaN when
the prediction is constant), the mean predicted and mean oracle shares (a systematic bias shows
as a gap), and ``area MAE``: the error of the plain area share on the *same* mixes, the baseline
each rule has to beat. A small error means the label follows what is visible; it says nothing
directly about accuracy after training.

Models: timm ViT/DeiT-style models with a CLS token (``vit_cpu`` and friends): TransMix and
TL-Align read the captured queries and keys of every block.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from tokenmix.analysis.probes import attention_saliency, pearson
from tokenmix.data import dataset_info, load_split
from tokenmix.methods.base import MixedBatch, ModelOutputs, Needs, TokenGrid
from tokenmix.methods.baselines import CutMix
from tokenmix.methods.masks import token_mask_to_pixels
from tokenmix.methods.smmix import SMMix, paste_windows
from tokenmix.methods.step import forward_outputs
from tokenmix.methods.teacher_maps import TeacherCacheError, load_teacher_maps
from tokenmix.methods.tlalign import TLAlign
from tokenmix.methods.tokenmix import TokenMix
from tokenmix.methods.tokenmixup import htm_label, htm_mask, match_partners, token_gains
from tokenmix.methods.transmix import TransMix
from tokenmix.train.engine import load_model

#: the rules, in table order
RULES: tuple[str, ...] = ("CutMix (area)", "TransMix (official)", "TransMix (paper)", "TL-Align",
                          "TokenMix (teacher)", "SMMix (area)", "TokenMixup (HTM saliency)")
#: the mixes each rule is measured on
RULE_MIXES: dict[str, str] = {
    "CutMix (area)": "CutMix box", "TransMix (official)": "CutMix box", "TransMix (paper)": "CutMix box",
    "TL-Align": "CutMix box", "TokenMix (teacher)": "TokenMix blocks", "SMMix (area)": "SMMix max->min window",
    "TokenMixup (HTM saliency)": "HTM token swap (input level)",
}
#: columns of :func:`summarize`
TABLE_COLUMNS: tuple[str, ...] = ("rule", "mix", "n", "MAE", "RMSE", "pearson", "mean predicted", "mean oracle",
                                  "area MAE", "note")
#: columns of :func:`fidelity_samples`
SAMPLE_COLUMNS: tuple[str, ...] = ("rule", "batch", "sample", "predicted", "oracle", "area")

Shares = dict[str, tuple[Tensor, Tensor]]
Triples = dict[str, tuple[Tensor, Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------
# the oracle and the pixel masks

def oracle_partner_share(own: Tensor, partner: Tensor, pixel_partner_mask: Tensor) -> Tensor:
    """The ground-truth partner share of mixed images from their visible foreground mass.

    Args:
        own: (B, C, H, W) raw intensities (>= 0, e.g. uint8) of each sample's own image.
        partner: (B, C, H, W) raw intensities of the partner's pixels as placed in the mixed image
            (``x_raw[partner_index]`` for masks that paste at the same position); only read where
            the mask is > 0.
        pixel_partner_mask: (B, 1, H, W) or (B, H, W) partner share M of every pixel (0/1 for
            cut-and-paste mixes).
    Returns:
        (B,) float32 sum M I_b / (sum (1 - M) I_a + sum M I_b), summed over channels and pixels;
        0/0 -> the area share mean(M).
    """
    m = pixel_partner_mask.float()
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if own.shape != partner.shape or own.dim() != 4 or m.shape[0] != own.shape[0] or m.shape[-2:] != own.shape[-2:]:
        raise ValueError(f"expected own, partner (B, C, H, W) and a mask (B, 1, H, W); got {tuple(own.shape)}, "
                         f"{tuple(partner.shape)}, {tuple(pixel_partner_mask.shape)}")
    a, b = own.double(), partner.double()
    m = m.double()
    own_mass = ((1 - m) * a).sum(dim=(1, 2, 3))
    par_mass = (m * b).sum(dim=(1, 2, 3))
    total = own_mass + par_mass
    area = m.mean(dim=(1, 2, 3))
    return torch.where(total > 0, par_mass / total.clamp_min(1e-300), area).float()


def box_pixel_mask(box: tuple[int, int, int, int], batch: int, img_size: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) float 0/1 mask of a pixel box (top, bottom, left, right), the same for every sample."""
    top, bottom, left, right = (int(v) for v in box)
    m = torch.zeros(batch, 1, *img_size)
    m[:, :, top:bottom, left:right] = 1.0
    return m


def pixel_mask(mixed: MixedBatch, grid: TokenGrid, img_size: tuple[int, int] | int | None = None) -> Tensor:
    """Partner share of every pixel of a mixed batch: (B, 1, H, W) float32.

    Box mixes (``extras["box"]``, CutMix): the pixel box itself (exact, also where it cuts tokens).
    Token mixes (TokenMix blocks, SMMix windows, token-snapped boxes, any ``partner_mask``):
    ``partner_mask`` (B, N) expanded to each token's patch
    (:func:`~tokenmix.methods.masks.token_mask_to_pixels`).

    Args:
        mixed: the batch; grid: the token grid of ``partner_mask``.
        img_size: (H, W) (an int for square images); default the grid's image size.
    """
    size = grid.img_size if img_size is None else ((img_size, img_size) if isinstance(img_size, int)
                                                    else tuple(img_size))
    b = mixed.partner_mask.shape[0]
    box = mixed.extras.get("box")
    if box is not None:
        return box_pixel_mask(box, b, size).to(mixed.partner_mask.device)
    if tuple(size) != grid.img_size:
        raise ValueError(f"a token mask on {grid} covers {grid.img_size} pixels, not {tuple(size)}")
    return token_mask_to_pixels(mixed.partner_mask.float(), grid)


# ---------------------------------------------------------------------------------------------
# per-batch rules

def normalise(x_raw: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Raw intensities (0..255) -> the model's input ((x / 255 - mean) / std), float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=x_raw.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x_raw.device).view(1, -1, 1, 1)
    return (x_raw.float() / 255.0 - m) / s


def _forward_qk(model: nn.Module, x: Tensor) -> ModelOutputs:
    return forward_outputs(model, Needs(qk=True), x)


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    return int(model.get_classifier().out_features)


def _box_rules(model: nn.Module, x: Tensor, xr: Tensor, y: Tensor, grid: TokenGrid, k: int,
               seed: int) -> Triples:
    torch.manual_seed(seed)
    cm = CutMix(k)
    cm.grid = grid
    mixed = cm.mix(x, y)
    idx = mixed.partner_index
    oracle = oracle_partner_share(xr, xr[idx], pixel_mask(mixed, grid))
    outputs = _forward_qk(model, mixed.x)
    area = 1.0 - mixed.lam_area.float()
    out: Triples = {"CutMix (area)": (area, oracle, area)}
    for variant in ("official", "paper"):
        tm = TransMix(k, variant=variant)
        tm.prepare_model(model)
        if not tm.needs.qk:
            raise ValueError(f"the fidelity benchmark needs a timm ViT/DeiT with a CLS token, "
                             f"got {type(model).__name__}")
        attn, g = tm.attention(outputs)
        out[f"TransMix ({variant})"] = (tm.partner_share(attn, mixed, g).float(), oracle, area)
    tla = TLAlign(k, variant="paper", cutmix_snap="pixel", source="qk")
    tla.prepare_model(model)
    _, beta = tla.aligned_target(mixed, tla.attention_inputs(outputs))
    out["TL-Align"] = (1.0 - beta.float(), oracle, area)
    return out


def _tokenmix_rule(x: Tensor, xr: Tensor, y: Tensor, index: Tensor, grid: TokenGrid, k: int, maps: Any,
                   seed: int) -> tuple[Tensor, Tensor, Tensor]:
    tmx = TokenMix(k, variant="official", mask="block", labels="teacher", switch_prob=1.0)
    tmx.grid, tmx.maps = grid, maps
    b = x.shape[0]
    meta = {"index": index.long().cpu(), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4).contiguous(),
            "flip": torch.zeros(b, dtype=torch.bool)}
    torch.manual_seed(seed)
    mixed = tmx.mix(x, y, meta=meta)
    y_own, y_par = mixed.extras["y_own"].float(), mixed.extras["y_partner"].float()
    s = y_own + y_par
    pred = torch.where(s > 0, y_par / s.clamp_min(1e-12), torch.full_like(s, 0.5))
    oracle = oracle_partner_share(xr, xr[mixed.partner_index], pixel_mask(mixed, grid))
    return pred, oracle, 1.0 - mixed.lam_area.float()


def _smmix_rule(model: nn.Module, x: Tensor, xr: Tensor, y: Tensor, k: int,
                seed: int) -> tuple[Tensor, Tensor, Tensor]:
    sm = SMMix(k, switch_prob=1.0, shared_head=True)  # shared head: no new module attached to the model
    sm.prepare_model(model)
    grid = sm.grid
    torch.manual_seed(seed)
    mixed = sm.mix(x, y)
    e = mixed.extras
    placed = paste_windows(xr, xr[mixed.partner_index], e["src"], e["dst"], e["k"], grid)  # raw mixed images
    oracle = oracle_partner_share(xr, placed, pixel_mask(mixed, grid))
    area = 1.0 - mixed.lam_area.float()  # SMMix's label is its area share
    return area, oracle, area


def htm_input_mix(saliency: Tensor, rho: float = 0.005, variant: str = "paper") -> tuple[Tensor, Tensor, Tensor]:
    """HTM's pairing, token mask and label applied to a batch of images (every sample easy).

    Args:
        saliency: (B, N) token saliency of the clean images.
        rho: minimum per-token gain; variant: mask rows of :func:`~tokenmix.methods.tokenmixup.htm_mask`.
    Returns:
        partners (B,) int64 (Hungarian matching of the gains over the batch), mask (B, N) bool
        (tokens replaced by the partner's), predicted partner share (B,) = Eq. 11's
        s_partner / (s_own + s_partner) (0 where the mask is empty).
    """
    sal = saliency.float()
    gains = token_gains(sal, sal, rho)  # (B, B, N)
    partners = match_partners(gains.sum(-1))
    mask = htm_mask(gains, partners, variant)
    b = sal.shape[0]
    t_own = torch.tensor([[1.0, 0.0]]).expand(b, 2).to(sal.device)
    t_par = torch.tensor([[0.0, 1.0]]).expand(b, 2).to(sal.device)
    share = htm_label(t_own, t_par, sal, sal[partners], mask)[:, 1].float()
    return partners, mask, share


def _htm_rule(model: nn.Module, x: Tensor, xr: Tensor, grid: TokenGrid, layer: int,
              rho: float) -> tuple[Tensor, Tensor, Tensor]:
    depth = len(model.blocks)
    sal = attention_saliency(model, x, min(layer, depth - 1))  # (B, N)
    partners, mask, share = htm_input_mix(sal, rho)
    keep = mask.any(1)
    oracle = oracle_partner_share(xr, xr[partners], token_mask_to_pixels(mask.float(), grid))
    return share[keep], oracle[keep], mask.float().mean(1)[keep]


@torch.no_grad()
def rule_triples(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                 index: Tensor | None = None, teacher_maps: Any = None, seed: int = 0,
                 rules: Sequence[str] = RULES, htm_layer: int = 2, htm_rho: float = 0.005) -> Triples:
    """:func:`rule_shares` plus the pasted area share of each rule's mixes:
    {rule: (predicted, oracle, area)}, each (B,) (HTM: (M,))."""
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; valid: {', '.join(RULES)}")
    if x_raw.dim() != 4 or len(x_raw) != len(y) or len(y) < 2 or len(y) % 2:
        raise ValueError(f"expected an even batch of images (B, C, H, W) and B labels, got {tuple(x_raw.shape)} "
                         f"and {len(y)}")
    grid = TokenGrid.from_model(model)
    k = _num_classes(model)
    device = next(model.parameters()).device
    xr = x_raw.float().to(device)
    y = y.long().to(device)
    x = normalise(xr, mean, std)
    was_training = model.training
    model.eval()
    out: Triples = {}
    rng = torch.get_rng_state()
    try:
        if any(RULE_MIXES[r] == "CutMix box" for r in rules):
            out.update({r: v for r, v in _box_rules(model, x, xr, y, grid, k, seed).items() if r in rules})
        if "TokenMix (teacher)" in rules and teacher_maps is not None:
            if index is None:
                raise ValueError("TokenMix (teacher) needs the images' dataset indices (index=...)")
            out["TokenMix (teacher)"] = _tokenmix_rule(x, xr, y, index, grid, k, teacher_maps, seed)
        if "SMMix (area)" in rules:
            out["SMMix (area)"] = _smmix_rule(model, x, xr, y, k, seed)
        if "TokenMixup (HTM saliency)" in rules:
            out["TokenMixup (HTM saliency)"] = _htm_rule(model, x, xr, grid, htm_layer, htm_rho)
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    return {r: tuple(t.detach().cpu().float() for t in out[r]) for r in rules if r in out}  # type: ignore[misc]


def rule_shares(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                index: Tensor | None = None, teacher_maps: Any = None, seed: int = 0,
                rules: Sequence[str] = RULES, htm_layer: int = 2, htm_rho: float = 0.005) -> Shares:
    """Predicted and oracle partner shares of every rule on one batch.

    Args:
        model: a trained ViT with a CLS token (put in eval mode here; its mode and the global torch
            RNG state are restored afterwards).
        x_raw: (B, C, H, W) raw images (uint8 or float in 0..255, not normalised); B even.
        y: (B,) labels.
        mean, std: the dataset's normalisation (0..1 scale, :func:`tokenmix.data.dataset_info`).
        index: (B,) dataset indices of the images in the split the teacher maps cover
            (needed for ``TokenMix (teacher)``).
        teacher_maps: an object with ``token_maps(index, labels, box, flip, rows, cols,
            clamp_negative) -> (B, rows * cols)`` (:class:`tokenmix.methods.teacher_maps.TeacherMaps`); None
            skips ``TokenMix (teacher)``.
        seed: ``torch.manual_seed(seed)`` before each method's ``mix``.
        rules: which of :data:`RULES` to compute.
        htm_layer, htm_rho: TokenMixup's ``horizontal_layer`` (clipped to the depth) and ``rho``.
    Returns:
        {rule: (predicted partner share, oracle partner share)}, each (B,) float32 in [0, 1]
        (``TokenMixup (HTM saliency)``: (M,) with M <= B, the samples HTM mixes), in ``rules``
        order. Rules that cannot be computed (TokenMix without maps) are absent.
    """
    return {r: (p, o) for r, (p, o, _) in rule_triples(model, x_raw, y, mean, std, index, teacher_maps, seed, rules,
                                                         htm_layer, htm_rho).items()}


# ---------------------------------------------------------------------------------------------
# over several batches

def fidelity_samples(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                     index: Tensor | None = None, teacher_maps: Any = None, n_batches: int = 16,
                     batch_size: int = 32, seed: int = 0, rules: Sequence[str] = RULES, **kwargs: Any) -> pd.DataFrame:
    """Per-sample shares of :func:`rule_shares` over consecutive batches of the given images.

    Batch i takes images ``[i * batch_size, (i + 1) * batch_size)`` and seed ``seed + i``.

    Args:
        x_raw, y, index: (n, C, H, W) raw images, (n,) labels, (n,) dataset indices, with
            n >= n_batches * batch_size.
        kwargs: ``htm_layer``, ``htm_rho`` of :func:`rule_shares`.
    Returns:
        Long table with :data:`SAMPLE_COLUMNS`: rule, batch, sample (running number within the
        batch; for HTM among the mixed samples), predicted and oracle partner shares, and ``area`` (the
        pasted area share of that mix).
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size must be even and >= 2, got {batch_size}")
    if n_batches * batch_size > len(x_raw):
        raise ValueError(f"{n_batches} batches of {batch_size} need {n_batches * batch_size} images, got {len(x_raw)}")
    rows: list[pd.DataFrame] = []
    for i in range(n_batches):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        triples = rule_triples(model, x_raw[sl], y[sl], mean, std, None if index is None else index[sl],
                               teacher_maps, seed + i, rules, **kwargs)
        for r, (p, o, a) in triples.items():
            rows.append(pd.DataFrame({"rule": r, "batch": i, "sample": np.arange(len(p)), "predicted": p.numpy(),
                                      "oracle": o.numpy(), "area": a.numpy()}))
    if not rows:
        return pd.DataFrame(columns=list(SAMPLE_COLUMNS))
    return pd.concat(rows, ignore_index=True)[list(SAMPLE_COLUMNS)]


def summarize(samples: pd.DataFrame, rules: Sequence[str] = RULES,
              skipped: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The fidelity table: one row per rule (in ``rules`` order) with :data:`TABLE_COLUMNS`.

    Rules without samples get n = 0, NaN metrics and ``note`` = ``skipped[rule]`` (or
    ``"no samples"``).
    """
    skipped = dict(skipped or {})
    rows = []
    for r in rules:
        d = samples[samples["rule"] == r] if len(samples) else samples
        row: dict[str, Any] = {"rule": r, "mix": RULE_MIXES.get(r, ""), "n": int(len(d))}
        if len(d):
            p = torch.tensor(d["predicted"].to_numpy(np.float64))
            o = torch.tensor(d["oracle"].to_numpy(np.float64))
            a = torch.tensor(d["area"].to_numpy(np.float64))
            err = p - o
            row.update({"MAE": float(err.abs().mean()), "RMSE": float(err.pow(2).mean().sqrt()),
                        "pearson": float(pearson(p, o)), "mean predicted": float(p.mean()),
                        "mean oracle": float(o.mean()), "area MAE": float((a - o).abs().mean()),
                        "note": skipped.get(r, "")})
        else:
            row.update({c: float("nan") for c in ("MAE", "RMSE", "pearson", "mean predicted", "mean oracle",
                                                   "area MAE")})
            row["note"] = skipped.get(r, "no samples")
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def fidelity_table(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                   index: Tensor | None = None, teacher_maps: Any = None, n_batches: int = 16,
                   batch_size: int = 32, seed: int = 0, rules: Sequence[str] = RULES,
                   return_samples: bool = False, **kwargs: Any) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`summarize` of :func:`fidelity_samples` (default 16 batches of 32 images: 512 mixes per
    rule, 16 CutMix boxes and TokenMix masks; about 10 s for ``vit_cpu`` at 28 px on 2 CPU cores).
    ``TokenMix (teacher)`` is marked skipped when ``teacher_maps`` is None.

    Returns:
        The table, or (table, samples) with ``return_samples``.
    """
    samples = fidelity_samples(model, x_raw, y, mean, std, index, teacher_maps, n_batches, batch_size, seed, rules,
                               **kwargs)
    skipped = {"TokenMix (teacher)": "skipped: no teacher maps"} if teacher_maps is None else {}
    table = summarize(samples, rules, skipped)
    return (table, samples) if return_samples else table


def measure_run(run_dir: str | Path, data_dir: str | Path = "data", n_batches: int = 16, batch_size: int = 32,
                seed: int = 0, teacher: str = "cnn_small", teacher_maps: Any = "auto",
                download: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fidelity table of a run folder's checkpoint on its dataset's test split.

    The images are the fixed subset of ``n_batches * batch_size`` test images of
    :func:`tokenmix.data.load_split` (``subset``, seed 0). ``teacher_maps="auto"`` opens the
    test split of the run's dataset's teacher cache under ``data_dir`` (None when missing or
    stale: TokenMix is then marked skipped); or pass maps / None.

    Returns:
        (table, samples).
    """
    model, cfg = load_model(run_dir)
    info = dataset_info(cfg.dataset)
    x, y, idx = load_split(cfg.dataset, cfg.img_size, False, data_dir, download, subset=n_batches * batch_size)
    if isinstance(teacher_maps, str) and teacher_maps == "auto":
        try:
            teacher_maps = load_teacher_maps(cfg.dataset, cfg.img_size, teacher, "test", data_dir)
        except TeacherCacheError:
            teacher_maps = None
    table, samples = fidelity_table(model, x, y, info.mean, info.std, idx, teacher_maps, n_batches, batch_size, seed,
                                    return_samples=True)
    return table, samples


__all__ = ["RULES", "RULE_MIXES", "SAMPLE_COLUMNS", "TABLE_COLUMNS", "box_pixel_mask", "fidelity_samples",
           "fidelity_table", "htm_input_mix", "measure_run", "normalise", "oracle_partner_share", "pixel_mask",
           "rule_shares", "rule_triples", "summarize"]
