"""Label fidelity: how well each label rule's partner share matches pixel-level ground truth,
every rule scored on the *same* mixes, with two oracles, on checkpoints over training.

Why it can be measured at all
-----------------------------
Fashion-MNIST objects lie on a black background (pixel value 0). In a cut-and-paste mixed image
every pixel comes either from the own image a or from the partner b, so what is visible of each
source is known exactly. With raw intensities I (uint8 scale, **not** normalised, summed over the
channels) and M the per-pixel partner share of the mixed image (0/1 for every mask used here),
two ground truths of the **partner share** of the label:

- ``mass`` oracle: the share of the visible foreground mass that belongs to the partner,
  ``sum M I_b / (sum (1 - M) I_a + sum M I_b)``. A box pasted over the background of a shirt
  carries almost all of the partner's shoe and none of the shirt. It is dominated by which
  garment is brighter or larger (a sandal weighs less than a coat).
- ``own share`` oracle: each source's own *surviving share* of its foreground, normalised per
  image, ``v_a = sum (1 - M) I_a / sum I_a``, ``v_b = sum M I_b / sum I_b``, partner share
  ``v_b / (v_a + v_b)``. How much of each object is still there, whatever its size: what
  TokenMix's Eq. 2 (teacher map mass per image) and the attention rules (each image's attention
  mass) estimate.

0/0 (nothing visible of either) falls back to the area share mean(M). Both are *pixel-mass*
ground truths (not semantic ones), meaningful only on black-background data; on other data (e.g.
``synthetic``) the functions run but the numbers mean nothing. ``I_b`` is the partner's pixel *as
placed in the mixed image* (SMMix moves its window, see below).

The masks (:data:`MASKS`) and the label rules (:data:`RULES`)
--------------------------------------------------------------
Every rule is scored on every mask it applies to, so that rows are comparable. For each batch the
four masks are drawn with ``torch.manual_seed(seed)`` (one draw per batch, as in batch mode):

- ``CutMix box``: timm's pixel box, Beta(1, 1), one box per batch.
- ``TokenMix blocks``: TokenMix's official block mask (28 of 49 tokens on the 7x7 grid, so its
  area share is constant; on it only a rule that reads the content can correlate).
- ``MaskMix grid``: MixPro's MaskMix, cells of 2 x 2 tokens (a 4 x 4 grid of cells on the 7 x 7
  tokens, the last row and column one token wide), k = ceil(16 lambda) own cells, lambda ~ Beta(1, 1),
  the cells drawn per sample.
- ``SMMix windows``: SMMix's max->min windows (the partner's most salient k x k token window from
  the model's own clean forward, pasted onto the own least salient window; the partner's pixels
  are moved).

The rules (every share below is the partner share; the package's ``lam`` is the own share):

- ``area``: 1 - lam_area, the pasted area (CutMix's, TokenMix-area's and SMMix's label).
- ``TransMix (official)`` / ``TransMix (paper)``: :meth:`tokenmix.methods.TransMix.partner_share`
  from the last block's CLS attention of the forward on the *mixed* batch.
- ``MixPro (PAL)``: :meth:`tokenmix.methods.MixPro.pal_shares` (``paper``): the TransMix (paper)
  attention share mixed with the area share by the progressive factor alpha = cos(softmax(z),
  area target) of the same forward, per sample.
- ``TL-Align``: 1 - beta of :meth:`tokenmix.methods.TLAlign.aligned_target` (token labels
  propagated through every block's attention of the mixed forward; ``variant="paper"``, so a
  pixel box starts with the fractional shares of the tokens it cuts).
- ``TokenMix (teacher)``: the teacher activation maps of the *test* split (images not augmented:
  crop box (0, 0, 1, 1), no flip) with Eq. 2's masses, normalised: y_partner / (y_own + y_partner)
  (0/0 -> 0.5; the official target sums to y_own + y_partner, its normalised partner share is this
  number). Needs the partner at the same position: not scored on SMMix windows.
- ``TokenMixup (saliency)``: Eq. 11's saliency share s_partner / (s_own + s_partner) with the
  trained model's CLS attention of block ``horizontal_layer`` on the clean images
  (:func:`tokenmix.analysis.probes.attention_saliency`), the saliency TokenMixup's HTM uses, applied
  to the mask at hand (HTM itself swaps tokens in feature space, where no pixel ground truth
  exists). Not scored on SMMix windows (same reason).

What the numbers mean
---------------------
Per (mask, rule) (:func:`summarize`): ``n`` samples; for each oracle the mean absolute error (in
share units: 0.10 = ten points of label mass on the wrong image) and the Pearson correlation
(does the rule rank the mixes right; NaN when the prediction or the oracle is constant); the mean
predicted share. The ``area`` row of the same mask is the baseline each rule has to beat. A small
error means the label follows what is visible; it says nothing directly about accuracy after
training. :func:`measure_checkpoints` repeats the table on the weights kept during a run
(``RunConfig.checkpoint_every``): does attention become a better label as the model learns?

Models: timm ViT/DeiT-style models with a CLS token (``vit_cpu`` and friends).
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
from tokenmix.methods.mixpro import MixPro, cell_tokens
from tokenmix.methods.smmix import SMMix, paste_windows
from tokenmix.methods.step import forward_outputs
from tokenmix.methods.teacher_maps import TeacherCacheError, load_teacher_maps
from tokenmix.methods.tlalign import TLAlign
from tokenmix.methods.tokenmix import TokenMix, teacher_masses
from tokenmix.methods.transmix import TransMix
from tokenmix.train.engine import load_model
from tokenmix.train.runs import CHECKPOINT, load_run

#: the masks every rule is scored on, in table order
MASKS: tuple[str, ...] = ("CutMix box", "TokenMix blocks", "MaskMix grid", "SMMix windows")
#: the label rules, in table order
RULES: tuple[str, ...] = ("area", "TransMix (official)", "TransMix (paper)", "TL-Align", "MixPro (PAL)",
                          "TokenMix (teacher)", "TokenMixup (saliency)")
#: rules that read the partner's map at the pasted position (not applicable to moved windows)
SAME_POSITION_RULES: frozenset[str] = frozenset({"TokenMix (teacher)", "TokenMixup (saliency)"})
#: the two ground truths
ORACLES: tuple[str, ...] = ("mass", "own share")
#: what each rule estimates (the oracle it targets), for the report
TARGETS: dict[str, str] = {"area": "neither (the pasted area)", "TransMix (official)": "own share (half area)",
                           "TransMix (paper)": "own share", "TL-Align": "own share",
                           "MixPro (PAL)": "own share (mixed with area by α)", "TokenMix (teacher)": "own share",
                           "TokenMixup (saliency)": "own share"}
#: columns of :func:`summarize`
TABLE_COLUMNS: tuple[str, ...] = ("mask", "rule", "n", "MAE (mass)", "pearson (mass)", "MAE (own share)",
                                  "pearson (own share)", "mean predicted", "note")
#: columns of :func:`fidelity_samples`
SAMPLE_COLUMNS: tuple[str, ...] = ("mask", "rule", "batch", "sample", "predicted", "oracle_mass", "oracle_own",
                                   "area")


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


def own_share_oracle(own: Tensor, partner_placed: Tensor, partner_full: Tensor, pixel_partner_mask: Tensor) -> Tensor:
    """The ground-truth partner share from each source's surviving share of its own foreground.

    Args:
        own: (B, C, H, W) raw intensities (>= 0) of each sample's own image.
        partner_placed: (B, C, H, W) the partner's pixels as placed in the mixed image (read where
            the mask is > 0).
        partner_full: (B, C, H, W) the partner's whole image (its total foreground mass).
        pixel_partner_mask: (B, 1, H, W) or (B, H, W) partner share of every pixel.
    Returns:
        (B,) float32 ``v_b / (v_a + v_b)`` with ``v_a = sum (1 - M) I_a / sum I_a`` and
        ``v_b = sum M I_b / sum I_b`` (an empty image counts as 0 surviving); 0/0 -> mean(M).
    """
    m = pixel_partner_mask.float()
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if not (own.shape == partner_placed.shape == partner_full.shape) or own.dim() != 4 or m.shape[0] != own.shape[0]:
        raise ValueError(f"expected three (B, C, H, W) images and a (B, 1, H, W) mask; got {tuple(own.shape)}, "
                         f"{tuple(partner_placed.shape)}, {tuple(partner_full.shape)}, {tuple(pixel_partner_mask.shape)}")
    a, bp, bf, m = own.double(), partner_placed.double(), partner_full.double(), m.double()
    tot_a, tot_b = a.sum(dim=(1, 2, 3)), bf.sum(dim=(1, 2, 3))
    v_a = torch.where(tot_a > 0, ((1 - m) * a).sum(dim=(1, 2, 3)) / tot_a.clamp_min(1e-300), torch.zeros_like(tot_a))
    v_b = torch.where(tot_b > 0, (m * bp).sum(dim=(1, 2, 3)) / tot_b.clamp_min(1e-300), torch.zeros_like(tot_b))
    den = v_a + v_b
    return torch.where(den > 0, v_b / den.clamp_min(1e-300), m.mean(dim=(1, 2, 3))).float()


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


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    return int(model.get_classifier().out_features)


def _draw_mix(mask: str, model: nn.Module, x: Tensor, xr: Tensor, y: Tensor, grid: TokenGrid, k: int,
              seed: int) -> tuple[MixedBatch, Tensor]:
    """One mask family's mixes of a batch: (mixed batch, the raw partner pixels as placed)."""
    torch.manual_seed(seed)
    if mask == "CutMix box":
        cm = CutMix(k)
        cm.grid = grid
        mixed = cm.mix(x, y)
        return mixed, xr[mixed.partner_index]
    if mask == "TokenMix blocks":
        tmx = TokenMix(k, variant="official", mask="block", labels="area", switch_prob=1.0)
        tmx.grid = grid
        mixed = tmx.mix(x, y)
        return mixed, xr[mixed.partner_index]
    if mask == "MaskMix grid":
        mm = MixPro(k, variant="paper", pal=False, switch_prob=1.0)
        mm.grid = grid
        mm.cell_side = cell_tokens(grid)
        mixed = mm.mix(x, y)
        return mixed, xr[mixed.partner_index]
    if mask == "SMMix windows":
        sm = SMMix(k, switch_prob=1.0, shared_head=True)  # shared head: no new module attached to the model
        sm.prepare_model(model)
        mixed = sm.mix(x, y)
        e = mixed.extras
        return mixed, paste_windows(xr, xr[mixed.partner_index], e["src"], e["dst"], e["k"], grid)
    raise ValueError(f"unknown mask {mask!r}; valid: {', '.join(MASKS)}")


def _rule_share(rule: str, model: nn.Module, mixed: MixedBatch, outputs: ModelOutputs, grid: TokenGrid, k: int,
                y: Tensor, index: Tensor | None, teacher_maps: Any, saliency: Tensor | None) -> Tensor | None:
    """The partner share (B,) that ``rule`` gives the mixes of ``mixed`` (None: cannot be computed)."""
    if rule == "area":
        return 1.0 - mixed.lam_area.float()
    if rule.startswith("TransMix"):
        tm = TransMix(k, variant="official" if "official" in rule else "paper")
        tm.prepare_model(model)
        if not tm.needs.qk:
            raise ValueError(f"the fidelity benchmark needs a timm ViT/DeiT with a CLS token, got {type(model).__name__}")
        attn, g = tm.attention(outputs)
        return tm.partner_share(attn, mixed, g).float()
    if rule == "MixPro (PAL)":
        mp = MixPro(k, variant="paper", pal=True)
        mp.prepare_model(model)
        return mp.pal_shares(outputs, mixed)[2].float()
    if rule == "TL-Align":
        tla = TLAlign(k, variant="paper", cutmix_snap="pixel", source="qk")
        tla.prepare_model(model)
        _, beta = tla.aligned_target(mixed, tla.attention_inputs(outputs))
        return 1.0 - beta.float()
    m, idx = mixed.partner_mask.float(), mixed.partner_index
    if rule == "TokenMix (teacher)":
        if teacher_maps is None or index is None:
            return None
        b = m.shape[0]
        own = teacher_maps.token_maps(index.long().cpu(), y.cpu(), torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4),
                                      torch.zeros(b, dtype=torch.bool), grid.rows, grid.cols,
                                      TokenMix(k).clamp_negative).to(m.device).float()
        y_own, y_par = teacher_masses(own, m, idx)
        s = y_own + y_par
        return torch.where(s > 0, y_par / s.clamp_min(1e-12), torch.full_like(s, 0.5))
    if rule == "TokenMixup (saliency)":
        s_own, s_par = (saliency * (1 - m)).sum(1), (saliency[idx] * m).sum(1)
        s = s_own + s_par
        return torch.where(s > 0, s_par / s.clamp_min(1e-12), 1.0 - mixed.lam_area.float())
    raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")


@torch.no_grad()
def score_batch(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                index: Tensor | None = None, teacher_maps: Any = None, seed: int = 0,
                masks: Sequence[str] = MASKS, rules: Sequence[str] = RULES,
                htm_layer: int = 2) -> dict[tuple[str, str], dict[str, Tensor]]:
    """Every rule's partner share on every mask's mixes of one batch, with both oracles.

    Args:
        model: a trained ViT with a CLS token (put in eval mode here; its mode and the global torch
            RNG state are restored afterwards).
        x_raw: (B, C, H, W) raw images (uint8 or float in 0..255, not normalised); B even.
        y: (B,) labels. mean, std: the dataset's normalisation (0..1 scale).
        index: (B,) dataset indices of the images in the split the teacher maps cover.
        teacher_maps: a :class:`tokenmix.methods.teacher_maps.TeacherMaps` (or anything with its
            ``token_maps``); None leaves ``TokenMix (teacher)`` out.
        seed: ``torch.manual_seed(seed)`` before each mask is drawn (the same draw for every rule).
        htm_layer: the block whose CLS attention is TokenMixup's saliency (clipped to the depth).
    Returns:
        {(mask, rule): {"predicted", "oracle_mass", "oracle_own", "area"}}, each (B,) float32 on the
        CPU, for the pairs that apply (:data:`SAME_POSITION_RULES` not on SMMix windows).
    """
    for name, given, valid in (("mask", masks, MASKS), ("rule", rules, RULES)):
        bad = sorted(set(given) - set(valid))
        if bad:
            raise ValueError(f"unknown {name}(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    if x_raw.dim() != 4 or len(x_raw) != len(y) or len(y) < 2 or len(y) % 2:
        raise ValueError(f"expected an even batch of images (B, C, H, W) and B labels, got {tuple(x_raw.shape)} "
                         f"and {len(y)}")
    grid = TokenGrid.from_model(model)
    k = _num_classes(model)
    device = next(model.parameters()).device
    xr, y = x_raw.float().to(device), y.long().to(device)
    x = normalise(xr, mean, std)
    was_training, rng = model.training, torch.get_rng_state()
    model.eval()
    out: dict[tuple[str, str], dict[str, Tensor]] = {}
    try:
        saliency = None
        if "TokenMixup (saliency)" in rules:
            saliency = attention_saliency(model, x, min(htm_layer, len(model.blocks) - 1)).float()
        for mask in masks:
            mixed, placed = _draw_mix(mask, model, x, xr, y, grid, k, seed)
            pix = pixel_mask(mixed, grid)
            oracles = {"oracle_mass": oracle_partner_share(xr, placed, pix),
                       "oracle_own": own_share_oracle(xr, placed, xr[mixed.partner_index], pix)}
            outputs = forward_outputs(model, Needs(qk=True), mixed.x)
            for rule in rules:
                if mask == "SMMix windows" and rule in SAME_POSITION_RULES:
                    continue
                pred = _rule_share(rule, model, mixed, outputs, grid, k, y, index, teacher_maps, saliency)
                if pred is not None:
                    out[(mask, rule)] = {"predicted": pred, **oracles, "area": 1.0 - mixed.lam_area.float()}
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    return {key: {n: t.detach().cpu().float() for n, t in d.items()} for key, d in out.items()}


# ---------------------------------------------------------------------------------------------
# over several batches

def fidelity_samples(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                     index: Tensor | None = None, teacher_maps: Any = None, n_batches: int = 16,
                     batch_size: int = 32, seed: int = 0, masks: Sequence[str] = MASKS,
                     rules: Sequence[str] = RULES, **kwargs: Any) -> pd.DataFrame:
    """Per-sample shares of :func:`score_batch` over consecutive batches of the given images.

    Batch i takes images ``[i * batch_size, (i + 1) * batch_size)`` and seed ``seed + i``.

    Args:
        x_raw, y, index: (n, C, H, W) raw images, (n,) labels, (n,) dataset indices, with
            n >= n_batches * batch_size.
        kwargs: ``htm_layer`` of :func:`score_batch`.
    Returns:
        Long table with :data:`SAMPLE_COLUMNS`.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size must be even and >= 2, got {batch_size}")
    if n_batches * batch_size > len(x_raw):
        raise ValueError(f"{n_batches} batches of {batch_size} need {n_batches * batch_size} images, got {len(x_raw)}")
    rows: list[pd.DataFrame] = []
    for i in range(n_batches):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        scored = score_batch(model, x_raw[sl], y[sl], mean, std, None if index is None else index[sl], teacher_maps,
                             seed + i, masks, rules, **kwargs)
        for (mask, rule), d in scored.items():
            rows.append(pd.DataFrame({"mask": mask, "rule": rule, "batch": i, "sample": np.arange(len(d["predicted"])),
                                      **{c: d[c].numpy() for c in ("predicted", "oracle_mass", "oracle_own", "area")}}))
    if not rows:
        return pd.DataFrame(columns=list(SAMPLE_COLUMNS))
    return pd.concat(rows, ignore_index=True)[list(SAMPLE_COLUMNS)]


def summarize(samples: pd.DataFrame, masks: Sequence[str] = MASKS, rules: Sequence[str] = RULES,
              skipped: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The fidelity table: one row per applicable (mask, rule), in ``masks`` x ``rules`` order,
    with :data:`TABLE_COLUMNS`. A rule without samples gets n = 0, NaN metrics and ``note`` =
    ``skipped[rule]`` (or ``"no samples"``)."""
    skipped = dict(skipped or {})
    rows = []
    for mask in masks:
        for rule in rules:
            if mask == "SMMix windows" and rule in SAME_POSITION_RULES:
                continue
            d = samples[(samples["mask"] == mask) & (samples["rule"] == rule)] if len(samples) else samples
            row: dict[str, Any] = {"mask": mask, "rule": rule, "n": int(len(d)), "note": ""}
            if len(d):
                p = torch.tensor(d["predicted"].to_numpy(np.float64))
                for oracle, col in (("mass", "oracle_mass"), ("own share", "oracle_own")):
                    o = torch.tensor(d[col].to_numpy(np.float64))
                    row[f"MAE ({oracle})"] = float((p - o).abs().mean())
                    row[f"pearson ({oracle})"] = float(pearson(p, o))
                row["mean predicted"] = float(p.mean())
            else:
                row.update({c: float("nan") for c in TABLE_COLUMNS[3:-1]})
                row["note"] = skipped.get(rule, "no samples")
            rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def fidelity_table(model: nn.Module, x_raw: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                   index: Tensor | None = None, teacher_maps: Any = None, n_batches: int = 16,
                   batch_size: int = 32, seed: int = 0, return_samples: bool = False,
                   **kwargs: Any) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`summarize` of :func:`fidelity_samples` (default 16 batches of 32 images: 512 mixes per
    (mask, rule), 16 draws of each mask). ``TokenMix (teacher)`` is marked skipped when
    ``teacher_maps`` is None. Returns the table, or (table, samples) with ``return_samples``."""
    samples = fidelity_samples(model, x_raw, y, mean, std, index, teacher_maps, n_batches, batch_size, seed, **kwargs)
    skipped = {"TokenMix (teacher)": "skipped: no teacher maps"} if teacher_maps is None else {}
    table = summarize(samples, kwargs.get("masks", MASKS), kwargs.get("rules", RULES), skipped)
    return (table, samples) if return_samples else table


def _open_maps(cfg: Any, data_dir: str | Path, teacher: str, teacher_maps: Any) -> Any:
    if isinstance(teacher_maps, str) and teacher_maps == "auto":
        try:
            return load_teacher_maps(cfg.dataset, cfg.img_size, teacher, "test", data_dir)
        except TeacherCacheError:
            return None
    return teacher_maps


def measure_run(run_dir: str | Path, data_dir: str | Path = "data", n_batches: int = 16, batch_size: int = 32,
                seed: int = 0, teacher: str = "cnn_small", teacher_maps: Any = "auto",
                download: bool = False, checkpoint: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fidelity table of a run's checkpoint (the final one, or ``checkpoint``) on its dataset's
    test split: the fixed subset of ``n_batches * batch_size`` test images of
    :func:`tokenmix.data.load_split` (``subset``, seed 0). ``teacher_maps="auto"`` opens the test
    split of the teacher cache under ``data_dir`` (None when missing or stale: TokenMix is then
    marked skipped). Returns (table, samples)."""
    model, cfg = load_model(run_dir, checkpoint=checkpoint)
    info = dataset_info(cfg.dataset)
    x, y, idx = load_split(cfg.dataset, cfg.img_size, False, data_dir, download, subset=n_batches * batch_size)
    maps = _open_maps(cfg, data_dir, teacher, teacher_maps)
    return fidelity_table(model, x, y, info.mean, info.std, idx, maps, n_batches, batch_size, seed, return_samples=True)


def measure_checkpoints(run_dir: str | Path, data_dir: str | Path = "data", n_batches: int = 16,
                        batch_size: int = 32, seed: int = 0, **kwargs: Any) -> pd.DataFrame:
    """:func:`measure_run` on every checkpoint kept during the run (``RunConfig.checkpoint_every``)
    and the final one, on the same images and mixes: the fidelity table with an ``epoch`` column
    first, and the checkpoint's test top-1 (``top1``, from the run's metrics) beside it."""
    run = load_run(run_dir)
    files = dict(run.epoch_checkpoints())
    final_epoch = int((run.summary or {}).get("epochs", run.config.get("epochs", 0)))
    files.setdefault(final_epoch, Path(run_dir) / CHECKPOINT)
    top1 = {int(m["epoch"]): m.get("top1", float("nan")) for m in run.metrics}
    tables = []
    for epoch, path in sorted(files.items()):
        table, _ = measure_run(run_dir, data_dir, n_batches, batch_size, seed, checkpoint=path, **kwargs)
        tables.append(table.assign(epoch=epoch, top1=top1.get(epoch, float("nan"))))
    df = pd.concat(tables, ignore_index=True)
    return df[["epoch", "top1"] + [c for c in df.columns if c not in ("epoch", "top1")]]


__all__ = ["MASKS", "ORACLES", "RULES", "SAMPLE_COLUMNS", "SAME_POSITION_RULES", "TABLE_COLUMNS", "TARGETS",
           "box_pixel_mask", "fidelity_samples", "fidelity_table", "measure_checkpoints", "measure_run", "normalise",
           "oracle_partner_share", "own_share_oracle", "pixel_mask", "score_batch", "summarize"]
