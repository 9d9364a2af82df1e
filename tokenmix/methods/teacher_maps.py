"""TokenMix teacher activation maps: the label math and the cache reader (built by ``tokenmix.train.teacher``).

Paper: Liu et al., "TokenMix: Rethinking Image Mixing for Data Augmentation in Vision
Transformers", ECCV 2022 (https://arxiv.org/abs/2207.08409), Sec. 3.2 and Table 6.
Official code: https://github.com/Sense-X/TokenMix (``relabel/``; the maps themselves come from
TokenLabeling's ``generate_label.py``: NFNet-F6 at 576 px, top-5 logits per location).

Pipeline:

1. ``python -m tokenmix teacher`` trains a classifier from :func:`tokenmix.models.create_model`
   (default ``cnn_small``, a few CPU minutes; the paper's Table 6 shows weak teachers cost little),
   or loads a checkpoint (a tokenmix run folder or a ``.pt`` state dict).
2. :func:`class_activation_maps`: the classifier applied at every location of the last feature
   map (CNN: the linear head as a 1x1 conv; ViT: norm + head on each patch token) -> per-location
   logits (B, K, h, w). The top-k classes per location are kept.
3. One cache folder per (dataset, resolution, teacher): ``meta.json`` plus, per split,
   ``<split>_values.npy`` (float16, (N, k, h, w)) and ``<split>_classes.npy`` (int16), loadable
   with ``np.load(mmap_mode="r")``. :func:`load_teacher_maps` raises :class:`TeacherCacheError`,
   naming the command that (re)builds the cache, when it is missing or stale (other format
   version, dataset, resolution, top-k or teacher weights).
4. At training time :meth:`TeacherMaps.token_maps` takes the ground-truth channel of each
   sample's map, aligns it with the augmentation actually applied (the crop box and flip recorded
   by :mod:`tokenmix.data`), integrates it exactly over every token of the model's grid, and
   normalises it over space.

Deviations from the official code (deliberate):

- Resampling integrates the piecewise-constant map over each token's source rectangle (exact
  area weights) instead of ``roi_align``'s bilinear samples; both are proportional inside the
  image, but padding shown by a crop carries no mass here (``roi_align`` clamps to the border).
- Box orientation: the official lookup hands ``roi_align`` (top, left, bottom, right) where it
  expects (x1, y1, x2, y2), transposing the crop on non-square crops; here rows stay rows (tested
  with an asymmetric map).
- RandAugment's geometric ops (shear, translate, rotate) are not applied to the maps (the official
  ``relabel`` pipeline warps the map with them); only crops and flips are aligned. The CPU preset
  does not use RandAugment.
- ``clamp_negative`` (TokenMix's default in both variants): the official maps are raw logits,
  zero where the ground truth is not among the top-k, and may be negative; the paper speaks of
  spatially normalised activations. Clamping each cell at zero (before the alignment) keeps the
  normalised map a distribution.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from tokenmix.data import load_split

#: bump when the cache layout or the meaning of its values changes
CACHE_FORMAT = 1
DEFAULT_TEACHER = "cnn_small"
SPLITS = ("train", "test")


class TeacherCacheError(FileNotFoundError):
    """The teacher-map cache is missing or stale; the message names the command that builds it."""


# ---------------------------------------------------------------------------------------------
# maps from a classifier

def class_activation_maps(model: nn.Module, x: Tensor) -> Tensor:
    """Per-location class logits of a classifier: (B, C, H, W) -> (B, K, h, w).

    CNNs (``forward_features`` returns (B, D, h, w) and ``get_classifier()`` is a linear layer
    after global pooling): the classifier is applied at every location. ViTs (timm-style,
    ``forward_features`` returns (B, T, D) with ``num_prefix_tokens`` and ``patch_embed.grid_size``):
    ``fc_norm`` and ``head`` are applied to every patch token.
    """
    feats = model.forward_features(x)
    if feats.dim() == 4:
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"class activation maps need a linear classifier, got {type(head).__name__}")
        return torch.einsum("bdhw,kd->bkhw", feats, head.weight) + head.bias.view(1, -1, 1, 1)
    if feats.dim() == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        rows, cols = model.patch_embed.grid_size
        tokens = feats[:, prefix:]  # (B, N, D)
        norm = getattr(model, "fc_norm", nn.Identity())
        logits = model.head(norm(tokens))  # (B, N, K)
        return logits.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)
    raise ValueError(f"forward_features returned shape {tuple(feats.shape)}; expected (B, D, h, w) or (B, T, D)")


@torch.no_grad()
def top_k_maps(model: nn.Module, images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], top_k: int,
               batch_size: int = 500, device: torch.device | str = "cpu",
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k class activation maps of uint8 images (N, C, H, W).

    Returns:
        values (N, k, h, w) float16 logits (descending over k) and classes (N, k, h, w) int16.
    """
    model = model.to(device).eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    vals, classes = [], []
    for (xb,) in tqdm(DataLoader(TensorDataset(images), batch_size=batch_size), desc="teacher maps", mininterval=1.0 if sys.stderr.isatty() else 30.0,
                      disable=not progress, leave=False):
        cam = class_activation_maps(model, (xb.to(device).float() - m) / s).float()  # (b, K, h, w)
        v, c = cam.topk(min(top_k, cam.shape[1]), dim=1)
        vals.append(v.half().cpu().numpy())
        classes.append(c.to(torch.int16).cpu().numpy())
    return np.concatenate(vals), np.concatenate(classes)


# ---------------------------------------------------------------------------------------------
# alignment with the applied augmentation

def _overlap(lo: Tensor, hi: Tensor, n_out: int, n_cells: int) -> Tensor:
    """Share of each source cell covered by each output interval.

    The output span [lo, hi) (normalised source coordinates, (B,)) is cut into ``n_out`` equal
    intervals; returns (B, n_out, n_cells) with entry [b, o, c] = |interval o  cap  cell c| / |cell c|,
    cells being [c / n_cells, (c + 1) / n_cells).
    """
    t = torch.arange(n_out + 1, dtype=lo.dtype, device=lo.device) / n_out
    edges = lo[:, None] + (hi - lo)[:, None] * t  # (B, n_out + 1)
    a, b = edges[:, :-1, None], edges[:, 1:, None]  # (B, n_out, 1)
    c = torch.arange(n_cells, dtype=lo.dtype, device=lo.device) / n_cells
    return (torch.minimum(b, c + 1 / n_cells) - torch.maximum(a, c)).clamp_min(0) * n_cells


def align_maps(maps: Tensor, box: Tensor, flip: Tensor, rows: int, cols: int) -> Tensor:
    """Carry per-image maps through a crop and flip onto a token grid, by exact area integration.

    Each map cell's value is its mass, spread evenly over the cell; a token receives the mass of
    the part of every cell its (cropped, possibly mirrored) footprint covers. Regions outside
    the source image (padding) carry no mass.

    Args:
        maps: (B, h, w) values over the source image.
        box: (B, 4) the shown region (y0, x0, y1, x1) in normalised source coordinates.
        flip: (B,) bool, the output was mirrored left-right after cropping.
        rows, cols: token grid of the output.
    Returns:
        (B, rows, cols) token masses (not normalised).
    """
    b, h, w = maps.shape
    box = box.to(maps.dtype)
    oy = _overlap(box[:, 0], box[:, 2], rows, h)  # (B, rows, h)
    ox = _overlap(box[:, 1], box[:, 3], cols, w)  # (B, cols, w)
    out = oy @ maps @ ox.transpose(1, 2)  # (B, rows, cols)
    return torch.where(flip.view(-1, 1, 1).bool(), out.flip(-1), out)


def normalise_over_space(m: Tensor, clamp_negative: bool, eps: float = 1e-8) -> Tensor:
    """(B, N) -> maps summing to 1 over N.

    ``clamp_negative=False`` is the official rule ``m / (sum m + 1e-8)`` (raw logits: may be
    negative or explode when the sum is near 0). ``True`` clamps at zero first and falls back to
    a uniform map when nothing is positive.
    """
    if not clamp_negative:
        return m / (m.sum(1, keepdim=True) + eps)
    m = m.clamp_min(0)
    s = m.sum(1, keepdim=True)
    return torch.where(s > 0, m / s.clamp_min(eps), torch.full_like(m, 1.0 / m.shape[1]))


# ---------------------------------------------------------------------------------------------
# the cache

def cache_dir(dataset: str, img_size: int, teacher: str = DEFAULT_TEACHER, data_dir: str | Path = "data") -> Path:
    """Default cache folder: ``<data_dir>/teacher_maps/<dataset>-<img_size>px-<teacher>``."""
    return Path(data_dir) / "teacher_maps" / f"{dataset}-{img_size}px-{teacher}"


def build_command(dataset: str, img_size: int, teacher: str, data_dir: str | Path) -> str:
    cmd = f"python -m tokenmix teacher --dataset {dataset} --img_size {img_size} --teacher {teacher}"
    return cmd + ("" if str(data_dir) == "data" else f" --data_dir {data_dir}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class TeacherMaps:
    """One split's cached top-k maps, memory-mapped.

    Attributes:
        values: (N, k, h, w) float16 logits; classes: (N, k, h, w) int16.
        meta: the cache's ``meta.json``.
    """

    values: np.ndarray
    classes: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.values)

    def ground_truth_maps(self, index: Tensor, labels: Tensor) -> Tensor:
        """The ground-truth channel of the stored maps: (B,) indices and labels -> (B, h, w) float32,
        zero where the label is not among a location's top-k (as the official dense scatter)."""
        idx = index.detach().cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise IndexError(f"sample index {bad} outside the teacher cache of {len(self)} images "
                             f"({self.meta.get('dataset')}); the cache does not belong to this dataset")
        order = np.argsort(idx)  # sorted reads are kinder to a memory map
        vals = np.empty((len(idx),) + self.values.shape[1:], dtype=np.float32)
        cls = np.empty((len(idx),) + self.classes.shape[1:], dtype=np.int64)
        vals[order] = self.values[idx[order]]
        cls[order] = self.classes[idx[order]]
        v, c = torch.from_numpy(vals), torch.from_numpy(cls)
        y = labels.detach().cpu().view(-1, 1, 1, 1)
        return (v * (c == y)).sum(1)  # (B, h, w)

    def token_maps(self, index: Tensor, labels: Tensor, box: Tensor, flip: Tensor, rows: int, cols: int,
                   clamp_negative: bool = False) -> Tensor:
        """Normalised ground-truth maps on the token grid of the augmented images: (B, rows * cols)."""
        gt = self.ground_truth_maps(index, labels)  # (B, h, w)
        if clamp_negative:
            gt = gt.clamp_min(0)  # per cell, before cells are summed into tokens
        m = align_maps(gt, box.detach().cpu().float(), flip.detach().cpu(), rows, cols).flatten(1)
        return normalise_over_space(m, clamp_negative).to(labels.device)


def load_teacher_maps(dataset: str, img_size: int, teacher: str = DEFAULT_TEACHER, split: str = "train",
                      data_dir: str | Path = "data", path: str | Path | None = None,
                      top_k: int | None = None) -> TeacherMaps:
    """Open one split of a cache, checking that it is the one asked for.

    Args:
        path: the cache folder (default :func:`cache_dir`).
        top_k: also require this top-k.
    Raises:
        TeacherCacheError: missing, or stale (format, dataset, resolution, teacher, top-k or teacher
            weights differ); the message names the command that rebuilds it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    root = Path(path) if path else cache_dir(dataset, img_size, teacher, data_dir)
    cmd = build_command(dataset, img_size, teacher, data_dir) + (f" --path {path}" if path else "")
    meta_file = root / "meta.json"
    if not meta_file.is_file():
        raise TeacherCacheError(f"no teacher maps for {dataset} at {img_size} px by {teacher!r} in {root}; "
                                f"build them with `{cmd}`")
    meta = json.loads(meta_file.read_text())
    expected = {"format": CACHE_FORMAT, "dataset": dataset, "img_size": img_size, "teacher": teacher}
    if top_k is not None:
        expected["top_k"] = top_k
    diff = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    ckpt = root / "teacher.pt"
    if ckpt.is_file() and meta.get("teacher_sha256") != _sha256(ckpt):
        diff["teacher weights"] = ("built from other weights", "teacher.pt now")
    if diff:
        raise TeacherCacheError(
            f"stale teacher cache {root}: " + ", ".join(f"{k} is {a!r}, expected {b!r}" for k, (a, b) in diff.items())
            + f"; rebuild it with `{cmd} --force`")
    files = [root / f"{split}_values.npy", root / f"{split}_classes.npy"]
    if split not in meta.get("splits", {}) or not all(f.is_file() for f in files):
        raise TeacherCacheError(f"teacher cache {root} has no {split!r} split; build it with `{cmd} --force`")
    values, classes = (np.load(f, mmap_mode="r") for f in files)
    if values.shape != classes.shape or len(values) != meta["splits"][split]["num_images"]:
        raise TeacherCacheError(f"teacher cache {root} is inconsistent ({values.shape} vs {classes.shape}); "
                                f"rebuild it with `{cmd} --force`")
    return TeacherMaps(values, classes, meta)


def verify_cache_data(maps: TeacherMaps, dataset: str, img_size: int, data_dir: str | Path = "data",
                      split: str = "train", download: bool = False) -> None:
    """Check that a cache was built from the images training will read: same number of images and
    the same pixels (``data_sha1`` of the size-fitted uint8 split, recorded when the cache was
    built). Only for in-memory datasets (not the ImageNet image folder).

    Raises:
        TeacherCacheError: stale cache (other images), naming the rebuild command.
    """
    teacher = maps.meta.get("teacher", DEFAULT_TEACHER)
    x = load_split(dataset, img_size, split == "train", data_dir, download)[0]
    stored = maps.meta.get("splits", {}).get(split, {})
    now = hashlib.sha1(x.numpy().tobytes()).hexdigest()
    if len(x) != len(maps) or stored.get("data_sha1") != now:
        cmd = build_command(dataset, img_size, teacher, data_dir)
        raise TeacherCacheError(
            f"stale teacher cache of {teacher!r} for {dataset}: it maps {len(maps)} {split} images (data_sha1 "
            f"{str(stored.get('data_sha1'))[:12]}), but {dataset} at {img_size} px now has {len(x)} "
            f"(data_sha1 {now[:12]}); rebuild it with `{cmd} --force`")


__all__ = ["CACHE_FORMAT", "DEFAULT_TEACHER", "SPLITS", "TeacherCacheError", "TeacherMaps", "align_maps", "build_command",
           "cache_dir", "class_activation_maps", "load_teacher_maps", "normalise_over_space", "top_k_maps",
           "verify_cache_data"]
