"""Build TokenMix's teacher-map cache: train (or load) a small classifier, map every image, store.

Paper: Liu et al., "TokenMix: Rethinking Image Mixing for Data Augmentation in Vision
Transformers", ECCV 2022 (https://arxiv.org/abs/2207.08409), Sec. 3.2 and Table 6.
Official code: https://github.com/Sense-X/TokenMix (the maps come from TokenLabeling's
``generate_label.py``: NFNet-F6 at 576 px, top-5 logits per location).

``python -m tokenmix teacher`` trains a classifier from :func:`tokenmix.models.create_model`
(default ``cnn_small``, a few CPU minutes; the paper's Table 6 shows weak teachers cost little)
or loads a checkpoint, computes its top-k class activation maps
(:func:`tokenmix.methods.teacher_maps.top_k_maps`) and writes the cache that
:func:`tokenmix.methods.teacher_maps.load_teacher_maps` opens. The label math, the cache layout
and the deviations from the official code are documented in :mod:`tokenmix.methods.teacher_maps`.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenmix.data import build_datasets, load_split
from tokenmix.methods.teacher_maps import (CACHE_FORMAT, DEFAULT_TEACHER, SPLITS, TeacherCacheError, _sha256, cache_dir,
                                           load_teacher_maps, top_k_maps)
from tokenmix.models import create_model
from tokenmix.train.engine import evaluate, load_model, lr_at, resolve_device
from tokenmix.train.runs import atomic_torch_save, atomic_write_json


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.save appends no suffix
        np.save(f, arr)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# building: train (or load) the teacher, compute and store the maps

def train_teacher(model: nn.Module, train_ds, test_ds, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3,
                  weight_decay: float = 0.05, smoothing: float = 0.1, device: torch.device | str = "cpu",
                  seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Briefly train a classifier (AdamW, linear warmup over 1/4 epoch then cosine, smoothed CE).

    Returns the test metrics of :func:`tokenmix.train.engine.evaluate` plus ``train_seconds``.
    """
    device = torch.device(device)
    model = model.to(device).train()
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total, warmup = epochs * len(loader), max(len(loader) // 4, 1)
    t0, step = time.perf_counter(), 0
    for epoch in range(epochs):
        for x, y in tqdm(loader, desc=f"teacher epoch {epoch + 1}/{epochs}", disable=not progress, leave=False,
                         mininterval=1.0 if sys.stderr.isatty() else 30.0):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr, 1e-5, 1e-6)
            loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    metrics = evaluate(model, DataLoader(test_ds, batch_size=500), device)
    return {**metrics, "train_seconds": time.perf_counter() - t0}


def _load_checkpoint(checkpoint: Path, teacher: str, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    if checkpoint.is_dir():  # a tokenmix run folder
        return load_model(checkpoint)[0]
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    model = create_model(teacher, num_classes, img_size, in_chans)
    model.load_state_dict(state)
    return model


def build_teacher_maps(dataset: str = "fashion_mnist", img_size: int = 28, teacher: str = DEFAULT_TEACHER,
                       data_dir: str | Path = "data", path: str | Path | None = None, checkpoint: str = "",
                       epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, top_k: int = 5,
                       train_subset: int = 0, download: bool = True, force: bool = False, seed: int = 0,
                       device: str = "auto", progress: bool = True, splits: tuple[str, ...] = SPLITS) -> Path:
    """Build (or reuse) the teacher-map cache of ``dataset`` at ``img_size``; returns its folder.

    Args:
        teacher: a :func:`tokenmix.models.create_model` name (the architecture, and the cache's tag).
        checkpoint: load the teacher instead of training it: a tokenmix run folder or a ``.pt``
            state dict of ``teacher``.
        epochs, batch_size, lr, train_subset: the teacher's brief training (crop + flip augmentation).
        top_k: classes kept per location.
        force: rebuild even when a valid cache exists (an existing cache is otherwise kept).
        splits: the splits to map (training needs only "train").
    """
    bad = sorted(set(splits) - set(SPLITS))
    if bad or not splits:
        raise ValueError(f"unknown or no splits {bad or list(splits)}; valid: {', '.join(SPLITS)}")
    root = Path(path) if path else cache_dir(dataset, img_size, teacher, data_dir)
    if not force:
        try:
            for split in splits:
                load_teacher_maps(dataset, img_size, teacher, split, data_dir, root, top_k)
            if progress:
                print(f"[tokenmix] teacher maps already in {root} (pass force=True / --force to rebuild)")
            return root
        except TeacherCacheError:
            pass
    dev = resolve_device(device)
    torch.manual_seed(seed)
    train_ds, test_ds, info = build_datasets(dataset, img_size, data_dir, download, train_subset=train_subset)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)  # a half-rebuilt cache must not look valid
    if checkpoint:
        model = _load_checkpoint(Path(checkpoint), teacher, info.num_classes, img_size, info.in_chans)
        metrics = evaluate(model.to(dev), DataLoader(test_ds, batch_size=500), dev)
    else:
        model = create_model(teacher, info.num_classes, img_size, info.in_chans)
        if progress:
            print(f"[tokenmix] training teacher {teacher} on {dataset} ({len(train_ds)} images, {epochs} epochs)")
        metrics = train_teacher(model, train_ds, test_ds, epochs, batch_size, lr, device=dev, seed=seed,
                                progress=progress)
    atomic_torch_save({"model": model.state_dict(), "teacher": teacher, "metrics": metrics}, root / "teacher.pt")
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT, "dataset": dataset, "img_size": img_size, "teacher": teacher, "top_k": top_k,
        "checkpoint": str(checkpoint), "teacher_metrics": metrics, "teacher_sha256": _sha256(root / "teacher.pt"),
        "splits": {},
    }
    for split in splits:
        x, _, _ = load_split(dataset, img_size, split == "train", data_dir, download)
        t0 = time.perf_counter()
        values, classes = top_k_maps(model, x, info.mean, info.std, top_k, device=dev, progress=progress)
        _save_npy(root / f"{split}_values.npy", values)
        _save_npy(root / f"{split}_classes.npy", classes)
        meta["splits"][split] = {"num_images": len(x), "map_size": list(values.shape[-2:]),
                                 "data_sha1": hashlib.sha1(x.numpy().tobytes()).hexdigest(),
                                 "seconds": time.perf_counter() - t0}
    atomic_write_json(root / "meta.json", meta)  # written last: its presence marks a complete cache
    if progress:
        print(f"[tokenmix] teacher {teacher}: top-1 {metrics['top1']:.2f} %; maps "
              f"{meta['splits'][splits[0]]['map_size']} top-{top_k} in {root}")
    return root


__all__ = ["build_teacher_maps", "train_teacher"]
