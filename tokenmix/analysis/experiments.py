"""Small training experiments behind the notebooks' figures: each trains (or evaluates) models and
returns records or tables, which :mod:`tokenmix.report` draws.

- :func:`short_run` -- a short SMMix run recording its three loss terms per step (SMMix, Sec. 3.4).
- :func:`curriculum` -- a short TokenMixup run recording HTM's mixing decisions over training
  (TokenMixup, Sec. 3.2: the difficulty gate makes it a curriculum).
- :func:`open_teacher_maps`, :func:`occlusion_runs` -- TokenMix's occlusion study: its teacher cache
  and the CutMix / TokenMix runs it compares (reused when complete, else trained briefly).
- :func:`demo_runs`, :func:`runs_or_demo` -- tiny study runs for the results notebook when no study
  has been run.

Every run goes through :class:`tokenmix.methods.MixStep` (:func:`tokenmix.train.engine.quick_train`
or :func:`tokenmix.train.engine.train`), the package's one training step.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from tokenmix.data import load_split
from tokenmix.methods import MixStep, get, parameters
from tokenmix.methods.smmix import LOSS_TERMS
from tokenmix.methods.teacher_maps import TeacherCacheError, cache_dir, load_teacher_maps
from tokenmix.methods.tokenmixup import TokenMixup, difficulty
from tokenmix.models import create_model
from tokenmix.train.config import RunConfig
from tokenmix.train.engine import quick_train, train
from tokenmix.train.runs import list_runs, load_run
from tokenmix.train.teacher import build_teacher_maps


def short_run(images: Tensor, labels: Tensor, steps: int = 60, batch_size: int = 64, num_classes: int = 10,
              model_name: str = "vit_cpu", lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
              return_model: bool = False, **method_kw: Any) -> pd.DataFrame | tuple[pd.DataFrame, nn.Module, Any]:
    """Train ``model_name`` with SMMix (``switch_prob=1.0``: every batch an SMMix batch) for ``steps``
    AdamW steps on random batches of ``images`` (normalised (n, C, H, W), used as given).

    Returns:
        A DataFrame with one row per step: ``step``, ``loss`` (the weighted total), ``l_cls``,
        ``l_fine``, ``l_con``, ``window`` (k) and ``batch_top1`` (%, on the mixed batch against the
        own labels); with ``return_model=True`` the tuple (DataFrame, model, method).
    """

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes, images.shape[-1], images.shape[1])
    method = get("smmix", num_classes=num_classes, **dict({"switch_prob": 1.0}, **method_kw))
    mix_step = MixStep(model, method)
    model = mix_step.model
    method.prepare_training()
    rows = []
    for step, y, res in quick_train(mix_step, images, labels, steps, batch_size, lr, weight_decay, seed):
        info, out = res.info, res.outputs
        rows.append({"step": step, "loss": float(res.loss.detach()),
                     **{t: info.get(t, float("nan")) for t in LOSS_TERMS}, "window": info.get("window", float("nan")),
                     "batch_top1": 100.0 * float((out.logits.argmax(1) == y).float().mean())})
    df = pd.DataFrame(rows)
    return (df, model, method) if return_model else df



@dataclass
class CurriculumRun:
    """A small TokenMixup training run (:func:`curriculum`).

    Attributes:
        history: one row per step: ``step``, ``n_mixed`` (samples HTM mixed), ``tokens_replaced``
            (mean per mixed sample), ``difficulty_median`` (the gate's median score), ``loss``,
            ``scorenet_loss``, ``batch_top1`` (training-batch accuracy of the model, %).
        model, method: the trained model (train mode) and its TokenMixup method.
        batch_size, tau, variant, gate, smoothing: the settings (``gate``: the difficulty rule,
            ``"official"`` CE / 10 <= tau or ``"paper"`` CE < tau).
    """

    history: pd.DataFrame
    model: nn.Module
    method: TokenMixup
    batch_size: int
    tau: float
    variant: str
    gate: str
    smoothing: float


def curriculum(images: Tensor, labels: Tensor, steps: int = 300, batch_size: int = 64, num_classes: int = 10,
               model_name: str = "vit_cpu", variant: str = "paper", gate: str = "official", tau: float = 0.2,
               smoothing: float = 0.1,
               input_mix: str = "none", horizontal_layer: int = 2, lr: float = 1e-3, weight_decay: float = 0.05,
               seed: int = 0, **method_kw: Any) -> CurriculumRun:
    """Train ``model_name`` with TokenMixup (HTM) for ``steps`` AdamW steps on random batches of
    ``images`` (normalised (n, C, H, W), used as given, no augmentation) and record per step how
    many samples the difficulty gate let HTM mix.

    With the paper's gate (``gate="paper"``: CE < tau) and label smoothing s, the soft-target CE
    cannot fall below the target's entropy (about 0.50 for s = 0.1, K = 10), so at tau = 0.2
    nothing is ever mixed; the ``official`` gate (CE / 10 <= tau) mixes once the CE is below 10 tau.
    """

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes, images.shape[-1], images.shape[1])
    kw = dict(method_kw, gate=gate) if "gate" in parameters("tokenmixup") else dict(method_kw)
    method: TokenMixup = get("tokenmixup", num_classes=num_classes, smoothing=smoothing, variant=variant,
                             tau=tau, input_mix=input_mix, horizontal_layer=horizontal_layer, **kw)
    mix_step = MixStep(model, method)
    model = mix_step.model
    gate = method.gate
    rows = []
    for step, y, res in quick_train(mix_step, images, labels, steps, batch_size, lr, weight_decay, seed):
        htm, info, out = res.outputs.extras["htm"], res.info, res.outputs
        diff = difficulty(htm["scorenet_logits"], htm["target_pre"], gate)
        rows.append({"step": step, "n_mixed": int(info["n_mixed"]), "tokens_replaced": info["tokens_replaced"],
                     "difficulty_median": float(diff.median()), "loss": float(res.loss.detach()),
                     "scorenet_loss": info["scorenet_loss"],
                     "batch_top1": 100.0 * float((out.logits.argmax(1) == y).float().mean())})
    return CurriculumRun(pd.DataFrame(rows), model, method, batch_size, float(tau), variant, gate, float(smoothing))



def open_teacher_maps(dataset: str = "fashion_mnist", img_size: int = 28, teacher: str = "cnn_small",
                      data_dir: str | Path = "data", fallback_dir: str | Path | None = None, epochs: int = 1,
                      train_subset: int = 4096, seed: int = 0) -> tuple[Any, Path, bool]:
    """The ``train`` split of the default teacher cache (``<data_dir>/teacher_maps/...``, built by
    ``python -m tokenmix teacher``) if it is there and valid; else a small cache built in
    ``fallback_dir`` (default: a new temporary folder): the teacher trained for ``epochs`` on
    ``train_subset`` images, maps of the whole training split (about 30 s in all on 2 CPU cores).

    Returns:
        (TeacherMaps, the cache folder, whether it was built now).
    """
    try:
        return load_teacher_maps(dataset, img_size, teacher, "train", data_dir), \
            cache_dir(dataset, img_size, teacher, data_dir), False
    except TeacherCacheError:
        pass
    path = Path(fallback_dir) if fallback_dir else Path(tempfile.mkdtemp(prefix="tokenmix-teacher-"))
    build_teacher_maps(dataset, img_size, teacher, data_dir, path=path, epochs=epochs, train_subset=train_subset,
                       seed=seed, progress=False, splits=("train",))
    return load_teacher_maps(dataset, img_size, teacher, "train", data_dir, path), path, True


def occlusion_runs(runs: Mapping[str, str | Path], out_dir: str | Path, teacher_cache: str | Path | None = None,
                   **config: Any) -> tuple[dict[str, Path], bool]:
    """Run folders to compare: ``runs`` ({method: folder}) when every folder holds a complete
    run with a checkpoint; otherwise one tiny run per method trained into ``out_dir``.

    Args:
        runs: e.g. ``{"cutmix": ".../runs/fmnist-vit_cpu-cutmix-s0", "tokenmix": ...}``; the keys
            are the methods of the fallback runs.
        teacher_cache: the teacher cache of the fallback TokenMix run (``method_kwargs``).
        config: :class:`~tokenmix.train.config.RunConfig` fields of the fallback runs (e.g.
            ``train_subset=4096, test_subset=1000, epochs=3``); ``progress`` defaults to False.
    Returns:
        ({method: run folder}, whether the runs were trained now).
    """
    found = {}
    for name, path in runs.items():
        try:
            if load_run(path).has_checkpoint:
                found[name] = Path(path)
        except FileNotFoundError:
            pass
    if len(found) == len(runs):
        return found, False
    out = {}
    for name in runs:
        kw = {"progress": False, **config, "method": name, "out_dir": str(out_dir), "run_id": f"{name}-tiny"}
        if teacher_cache and "teacher_cache" in parameters(name):
            kw["method_kwargs"] = {**kw.get("method_kwargs", {}), "teacher_cache": str(teacher_cache)}
        cfg = RunConfig(**kw)
        train(cfg)
        out[name] = Path(out_dir) / cfg.run_id
    return out, True



def demo_runs(out_dir: str | Path | None = None, data_dir: str | Path = "data",
              methods: Sequence[str] = ("cutmix", "transmix")) -> Path:
    """Train one tiny run per method (1 epoch on 1000 Fashion-MNIST training images, 500 test
    images; the synthetic dataset at 32 px when Fashion-MNIST is not available locally) into
    ``out_dir`` (default: a new temporary folder) and return that folder. **Demo runs**: they only
    show what the report looks like, their numbers mean nothing."""
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="tokenmix-demo-runs-"))
    try:
        load_split("fashion_mnist", 28, False, data_dir, download=False)
        data = {"dataset": "fashion_mnist", "img_size": 28}
    except (OSError, RuntimeError, ValueError):
        data = {"dataset": "synthetic", "img_size": 32}
    for m in methods:
        cfg = RunConfig(method=m, train_subset=1000, test_subset=500, epochs=1, warmup_epochs=0.0, batch_size=64,
                        data_dir=str(data_dir), download=False, out_dir=str(out), run_id=f"demo-{m}",
                        progress=False, **data)
        train(cfg)
    return out


def runs_or_demo(runs_dir: str | Path, data_dir: str | Path = "data", min_runs: int = 2) -> tuple[Path, bool]:
    """``(runs_dir, False)`` when it holds at least ``min_runs`` complete runs, else
    ``(a temporary folder holding the runs of :func:`demo_runs`, True)``."""
    if sum(r.complete for r in list_runs(runs_dir)) >= min_runs:
        return Path(runs_dir), False
    return demo_runs(None, data_dir), True



__all__ = ["CurriculumRun", "curriculum", "demo_runs", "occlusion_runs", "open_teacher_maps", "runs_or_demo", "short_run"]
