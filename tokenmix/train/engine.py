"""Training and evaluation: one loop for every method and model.

Device-agnostic (CUDA with AMP when present, else CPU), DDP when started by ``torchrun``
(each rank trains on its share of the single-process global batches, logged values are
averaged over all ranks, rank 0 alone writes), AdamW with a per-step cosine schedule and
linear warmup, a checkpoint written atomically after every epoch, ``resume=True`` continuing an
interrupted run, and per-epoch reseeding so a resumed CPU run repeats an uninterrupted one.
The loop never special-cases a method: each step is one call of
:class:`tokenmix.methods.MixStep` (mix -> forward with the method's captures -> loss).
"""
from __future__ import annotations

import math
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Sampler
from tqdm import tqdm

from tokenmix import methods
from tokenmix.data import (build_datasets, check_dataset, clean_train_view, dataset_info, num_classes_of,
                           random_meta, with_sample_meta)
from tokenmix.methods import MixMethod, MixStep, StepOutput
from tokenmix.models import count_parameters, create_model
from tokenmix.train.config import ConfigError, RunConfig
from tokenmix.train.runs import (CHECKPOINT, CONFIG, METRICS, SUMMARY, RunExistsError, RunLockedError,
                                 atomic_torch_save, atomic_write_json, claim_run, config_diff, epoch_checkpoint_name,
                                 describe_owner, folder_problem, format_diff, git_commit, load_checkpoint, load_run, lock_holder,
                                 write_metrics)

EpochCallback = Callable[[int, dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# runtime helpers

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def available_devices() -> list[str]:
    """The device names this machine can run on: ``cpu``, ``cuda:0`` ... and ``mps`` when present."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    mps = getattr(torch.backends, "mps", None)
    return out + (["mps"] if mps is not None and mps.is_available() else [])


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (the local rank's GPU) when available, else CPU; ``cuda`` -> the local rank's GPU.

    Raises:
        ConfigError: the device is not on this machine (the message lists the available ones).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    have = available_devices()
    want = f"cuda:{local_rank}" if name == "cuda" else name
    if want not in have:
        raise ConfigError(f"device {name!r} is not available on this machine; available: auto, "
                          + ", ".join(have + (["cuda"] if "cuda:0" in have else [])))
    return torch.device(want)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank (reseeding per epoch makes resumed runs exact)."""
    return (seed * 1_000_003 + epoch * 1009 + rank * 7919) % 2**31


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float, warmup_lr: float) -> float:
    """Linear warmup from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample evaluated exactly once across ranks."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class GlobalBatchSampler(ShardSampler):
    """One rank's share of the single-process epoch order: the permutation ``RandomSampler`` draws
    from ``generator``, cut to whole global batches, then indices ``rank, rank + world, ...``.

    With a per-process batch of ``global_batch / world`` every step of every rank together sees
    exactly the global batch a single process sees at that step (same samples, same step count),
    so a ``torchrun`` run differs from a single-process run only where random numbers are drawn
    per process: data augmentation and the mixing (each process mixes its own part of the batch).
    """

    def __init__(self, n: int, rank: int, world_size: int, global_batch: int, generator: torch.Generator) -> None:
        perm = torch.randperm(n, generator=generator)[: (n // global_batch) * global_batch]
        self.indices = perm[rank::world_size].tolist()


def merge_step_sums(sums: dict[str, float], counts: dict[str, int],
                    info: DistInfo) -> tuple[dict[str, float], dict[str, int]]:
    """Per-key sums and counts of the logged step values, added over all ranks (each rank may
    report different keys, e.g. SMMix's terms only on its SMMix batches)."""
    if not info.enabled:
        return sums, counts
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, (sums, counts))
    total_s: dict[str, float] = {}
    total_c: dict[str, int] = {}
    for s, c in gathered:
        for k in s:
            total_s[k] = total_s.get(k, 0.0) + s[k]
            total_c[k] = total_c.get(k, 0) + c[k]
    return total_s, total_c


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, info: DistInfo = DistInfo(),
             amp: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole loader (summed over ranks)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                             (top[:, 0] == y).sum().double(), (top == y[:, None]).any(1).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if info.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return {"test_loss": float(sums[0]) / n, "top1": 100 * float(sums[1]) / n, "top5": 100 * float(sums[2]) / n}


# ---------------------------------------------------------------------------------------------
# run folders

def default_run_id(cfg: RunConfig) -> str:
    return f"{cfg.dataset}-{cfg.model}-{cfg.method}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"


def open_run_dir(cfg: RunConfig) -> tuple[Path, str]:
    """Decide what to do with ``<out_dir>/<run_id>``: "new", "resume" or "done". Reads only.

    A folder holding a run is never overwritten: without ``resume`` it raises
    :class:`RunExistsError`; with ``resume`` the stored config must match in every field that
    changes the result (all but ``RESUME_FREE``; ``epochs`` included, so a finished run is never
    extended or retrained), else :class:`RunExistsError` names the differing fields. A folder
    with no ``config.json`` (e.g. only a papermill notebook) counts as empty.
    """
    path = Path(cfg.out_dir) / cfg.run_id
    if not (path / CONFIG).is_file():
        return path, "new"
    run = load_run(path, metrics=False)
    if not cfg.resume:
        owner = None if run.complete else lock_holder(path)
        if owner is not None:
            raise RunLockedError(f"{path} is in use by {describe_owner(owner)}; wait for it to finish or stop it")
        what = "a finished run" if run.complete else "an unfinished run"
        raise RunExistsError(f"{path} already holds {what}; pass resume=True (--resume true) to continue or reuse "
                             f"it, or choose another run_id / out_dir (results are never overwritten)")
    diff = config_diff(run.config, cfg.to_dict(), RunConfig.defaults())
    if diff:
        raise RunExistsError(f"cannot resume {path}: its recorded config differs in {format_diff(diff)}; "
                             f"choose another run_id / out_dir for the new settings (results are never overwritten)")
    if run.complete:
        return path, "done"
    return path, "resume"


def plan_run(cfg: RunConfig) -> str:
    """What ``train(cfg)`` would do, checked as ``train`` checks it and writing nothing: "new",
    "resume", "done" or "busy: <owner>" (another process holds the run). Raises what ``train``
    would raise for bad input (``ConfigError``, ``RunExistsError``, ``TeacherCacheError``, ...)."""
    preflight(cfg)
    path, state = open_run_dir(cfg) if cfg.run_id else (None, "new")
    owner = lock_holder(path) if path is not None else None
    return state if owner is None else f"busy: in use by {describe_owner(owner)}"


# ---------------------------------------------------------------------------------------------
# training

def build_method(cfg: RunConfig, num_classes: int) -> MixMethod:
    return methods.get(cfg.method, **cfg.method_params(num_classes))


def check_batch(batch_size: int, world_size: int = 1) -> int:
    """The per-process batch of a global ``batch_size`` split over ``world_size`` processes.

    Raises:
        ConfigError: the split is uneven or empty; the message lists valid sizes.
    """
    per, rem = divmod(batch_size, world_size)
    if rem == 0 and per >= 1:
        return per
    valid = ", ".join(str(world_size * k) for k in (1, 2, 4, 8))
    raise ConfigError(f"batch_size {batch_size} over {world_size} process(es) gives {batch_size / world_size:g} "
                      f"images per process; the global batch must split evenly; valid global batch sizes: "
                      f"{valid}, ... (any multiple of {world_size})")


def preflight(cfg: RunConfig, world_size: int = 1, method: MixMethod | None = None) -> None:
    """Check everything about ``cfg`` that can be checked before any work starts (no data loaded,
    nothing written): the device (on this machine), the output folder (writable), the dataset's files
    (:func:`tokenmix.data.check_dataset`), the method's parameters against the model (token grid, window and block
    sizes, layer indices), the per-process batch, the method's inputs (TokenMix's teacher cache:
    present, and built from the same training images) and one dry training step of the method on
    random data (no backward). The global RNG state is left untouched.

    Args:
        method: the run's method object (built from ``cfg`` when not given); it is prepared on a
            throwaway model here and keeps no state from it.

    Raises:
        ConfigError: the method cannot run with this model, image size or batch (the message
            names the values and, where there is a list, the valid choices).
        tokenmix.methods.teacher_maps.TeacherCacheError: missing or stale teacher cache (names the build command).
    """
    info = dataset_info(cfg.dataset)
    what = f"method {cfg.method!r} ({cfg.variant}) with model {cfg.model!r} at {cfg.img_size} px"
    per = check_batch(cfg.batch_size, world_size)
    resolve_device(cfg.device)
    if folder_problem(cfg.out_dir):
        raise ConfigError(f"RunConfig.out_dir {cfg.out_dir!r}: {folder_problem(cfg.out_dir)}")
    try:
        check_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    with torch.random.fork_rng(devices=[]):
        method = method or build_method(cfg, info.num_classes)
        try:
            model = create_model(cfg.model, info.num_classes, cfg.img_size, info.in_chans,
                                 patch_size=cfg.patch_size or None)
            step = MixStep(model, method).train()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{what}: {e}") from e
        method.prepare_training()
        method.verify_inputs()
        b = min(per, 4)
        x = torch.randn(b, info.in_chans, cfg.img_size, cfg.img_size)
        y = torch.randint(0, info.num_classes, (b,))
        try:
            with torch.no_grad():
                step(x, y, random_meta(b, 1, cfg.img_size, cfg.img_size // 8))
        except (ValueError, RuntimeError, IndexError, TypeError) as e:
            raise ConfigError(f"{what} fails a dry training step on {b} random images "
                              f"(token grid {method.grid}): {e}") from e
        finally:
            method.release_model(model)


def train(cfg: RunConfig, callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the run's summary (also in ``summary.json``).

    ``callbacks`` are called as ``cb(epoch, record)`` after each epoch's checkpoint is written
    (an exception raised there interrupts the run like a crash would).
    """
    dev_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    dinfo = init_distributed(dev_type)
    device = resolve_device(cfg.device, dinfo.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.run_id:
        rid = [default_run_id(cfg)]
        if dinfo.enabled:
            dist.broadcast_object_list(rid, src=0)
        cfg = cfg.replace(run_id=rid[0])
    run_dir, state = open_run_dir(cfg)
    if state == "done":  # a complete record never changes: no lock needed to read it
        if dinfo.is_main:
            print(f"[tokenmix] {run_dir} is already complete; returning its summary")
        return load_run(run_dir).summary
    method = build_method(cfg, dataset_info(cfg.dataset).num_classes)  # the run's one method object
    preflight(cfg, dinfo.world_size, method)  # bad input fails here, before data is loaded or files written
    with _hold(run_dir, dinfo) as claim:
        run_dir, state = open_run_dir(cfg)  # again under the lock: another process may have finished it
        if state == "done":
            return load_run(run_dir).summary
        return _train(cfg, callbacks, dinfo, device, method, run_dir, state, claim.verify)


class _NoClaim:
    def verify(self) -> None:  # ranks other than 0 write nothing
        return None


@contextmanager
def _hold(run_dir: Path, dinfo: DistInfo) -> Iterator[Any]:
    """Rank 0 holds the run folder (:func:`claim_run`) for the whole run; every rank learns
    whether it got it, so a refused run stops on all ranks with the same message. Yields the
    claim (``verify()`` before each write)."""
    with ExitStack() as stack:
        error, claim = [""], _NoClaim()
        if dinfo.is_main:
            try:
                claim = stack.enter_context(claim_run(run_dir))
            except RunLockedError as e:
                error = [str(e)]
        if dinfo.enabled:
            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise RunLockedError(error[0])
        yield claim


def _train(cfg: RunConfig, callbacks: Sequence[EpochCallback], dinfo: DistInfo, device: torch.device,
           method: MixMethod, run_dir: Path, state: str, verify: Callable[[], None]) -> dict[str, Any]:
    """The body of :func:`train`, with the run folder held (``verify()`` before each write)."""
    seed_everything(cfg.seed)
    train_ds, test_ds, dinfo_data = build_datasets(
        cfg.dataset, cfg.img_size, cfg.data_dir, cfg.download, cfg.train_subset, cfg.test_subset,
        cfg.crop_padding, cfg.hflip, cfg.randaugment)
    num_classes = num_classes_of(train_ds, dinfo_data)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch < 1:  # an image folder (the in-memory sizes are checked by RunConfig)
        raise ConfigError(f"the training set ({len(train_ds)} images) is smaller than one batch ({cfg.batch_size}); "
                          f"valid: batch_size <= {len(train_ds)}")
    model = create_model(cfg.model, num_classes, cfg.img_size, dinfo_data.in_chans,
                         patch_size=cfg.patch_size or None, drop_path_rate=cfg.drop_path)
    if num_classes != method.num_classes:
        method = build_method(cfg, num_classes)  # an ImageNet subset with fewer classes
    if method.needs.sample_meta:
        train_ds = with_sample_meta(train_ds) or build_datasets(
            cfg.dataset, cfg.img_size, cfg.data_dir, cfg.download, cfg.train_subset, cfg.test_subset,
            cfg.crop_padding, cfg.hflip, cfg.randaugment, train_meta=True)[0]
    step = MixStep(model.to(device), method, amp=cfg.amp and device.type == "cuda").to(device)  # methods may read the device
    model = step.model
    method.prepare_training()  # before the record is written: a missing input leaves no half-made run
    if dinfo.enabled:
        dist.barrier()
    if dinfo.is_main:
        verify()
        if state == "new":
            atomic_write_json(run_dir / CONFIG, cfg.to_dict())
        for tmp in run_dir.glob(".*.tmp"):  # left by a process killed while writing (we hold the lock)
            tmp.unlink(missing_ok=True)

    net: nn.Module = step
    if dinfo.enabled:  # device_ids=None: the inputs are on the device already, meta stays on the CPU
        net = nn.parallel.DistributedDataParallel(step, device_ids=None,
                                                  find_unused_parameters=step.find_unused_parameters)

    per_rank = cfg.batch_size // dinfo.world_size
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    param_groups = param_groups_weight_decay(model, cfg.weight_decay, getattr(model, "no_weight_decay", set)())
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    test_loader = DataLoader(test_ds, batch_size=max(per_rank, 256), sampler=ShardSampler(len(test_ds), dinfo.rank, dinfo.world_size),
                             num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    train_eval_loader = None
    if cfg.eval_train:
        clean = clean_train_view(train_ds, test_ds, cfg.eval_train)
        train_eval_loader = DataLoader(clean, batch_size=max(per_rank, 256),
                                       sampler=ShardSampler(len(clean), dinfo.rank, dinfo.world_size),
                                       num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    start_epoch, history = 0, []
    if state == "resume" and (run_dir / CHECKPOINT).is_file():
        ckpt = load_checkpoint(run_dir / CHECKPOINT, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        if dinfo.is_main:
            verify()
            write_metrics(run_dir / METRICS, history)  # a kill between the two writes left it behind
            print(f"[tokenmix] resuming {run_dir} after epoch {start_epoch}")

    if dinfo.is_main:
        print(f"[tokenmix] run {cfg.run_id}: {cfg.method} ({cfg.variant}) on {cfg.model} "
              f"({count_parameters(model) / 1e6:.2f} M params), {cfg.dataset} {cfg.img_size}px, "
              f"{len(train_ds)} train / {len(test_ds)} test, {cfg.epochs} epochs, batch {cfg.batch_size}, "
              f"device {device}{' x' + str(dinfo.world_size) if dinfo.enabled else ''}")
    show_bar = cfg.progress and dinfo.is_main
    t_run = time.perf_counter()
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, dinfo.rank))
        order = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 0))  # the same on every rank
        sampler: Sampler = (GlobalBatchSampler(len(train_ds), dinfo.rank, dinfo.world_size, cfg.batch_size, order)
                            if dinfo.enabled else RandomSampler(train_ds, generator=order))
        loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, drop_last=True,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, dinfo.rank)))
        net.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_steps = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_bar, leave=False,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr, cfg.warmup_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            out = net(x, y, batch[2] if len(batch) > 2 else None)  # meta stays on the CPU (cache lookups)
            loss, info = out.loss, out.info
            if not torch.isfinite(loss):
                if dinfo.is_main:
                    verify()
                _fail(run_dir, cfg, dinfo, f"non-finite loss {float(loss.detach())} at epoch {epoch + 1}, step {i}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            n_steps += 1
            for k, v in {"train_loss": float(loss.detach()), **info}.items():
                sums[k] = sums.get(k, 0.0) + float(v)  # each key averaged over the steps that report it
                counts[k] = counts.get(k, 0) + 1
            if show_bar and i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}", refresh=False)
        bar.close()
        sums, counts = merge_step_sums(sums, counts, dinfo)  # logged values: means over all ranks' steps
        train_time = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "lr": lr, "train_time": train_time,
                  "images_per_s": n_steps * cfg.batch_size / max(train_time, 1e-9),
                  **{k: v / counts[k] for k, v in sums.items()}}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            t1 = time.perf_counter()
            record.update(evaluate(model, test_loader, device, dinfo, use_amp))
            if train_eval_loader is not None:
                clean = evaluate(model, train_eval_loader, device, dinfo, use_amp)
                record.update(train_top1=clean["top1"], train_eval_loss=clean["test_loss"])
            record["eval_time"] = time.perf_counter() - t1
        record["epoch_time"] = time.perf_counter() - t0
        history.append(record)
        if dinfo.is_main:
            verify()
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history, "num_classes": num_classes,
                               "config": cfg.to_dict()}, run_dir / CHECKPOINT)
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:  # kept: analysis over training
                atomic_torch_save({"model": model.state_dict(), "epoch": epoch + 1, "num_classes": num_classes},
                                  run_dir / epoch_checkpoint_name(epoch + 1))
            write_metrics(run_dir / METRICS, history)
            acc = f"top1 {record['top1']:.2f}  top5 {record['top5']:.2f}  " if "top1" in record else ""
            print(f"[tokenmix] epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  {acc}"
                  f"lr {lr:.2e}  {record['epoch_time']:.1f} s ({record['images_per_s']:.0f} img/s)", flush=True)
        if dinfo.enabled:
            dist.barrier()
        for cb in callbacks:
            cb(epoch + 1, record)

    summary = _summary(cfg, history, model, device, dinfo, time.perf_counter() - t_run)
    if dinfo.is_main:
        verify()
        atomic_write_json(run_dir / SUMMARY, summary)
        print(f"[tokenmix] done: top1 {summary['final_top1']:.2f} (best {summary['best_top1']:.2f}); "
              f"record in {run_dir}")
    return summary


def quick_train(step: MixStep, images: Tensor, labels: Tensor, steps: int, batch_size: int, lr: float = 1e-3,
                weight_decay: float = 0.05, seed: int = 0) -> Iterator[tuple[int, Tensor, StepOutput]]:
    """A short AdamW training of ``step`` on random batches of ``images`` (normalised (n, C, H, W),
    no augmentation; the notebooks' per-step studies). Yields ``(step, y, StepOutput)`` after each
    optimiser step."""
    if steps < 1 or batch_size < 1 or batch_size > len(images):
        raise ValueError(f"need steps >= 1 and 1 <= batch_size <= {len(images)}, got {steps}, {batch_size}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(step.parameters(), lr=lr, weight_decay=weight_decay)
    step.train()
    for i in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        out = step(images[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        yield i + 1, labels[idx], out


def _fail(run_dir: Path, cfg: RunConfig, dinfo: DistInfo, message: str) -> None:
    if dinfo.is_main:
        atomic_write_json(run_dir / SUMMARY, {"status": "failed", "error": message, "run_id": cfg.run_id})
    ckpt = run_dir / CHECKPOINT
    if ckpt.is_file():
        kept = f"the checkpoint after epoch {load_checkpoint(ckpt)['epoch']} is kept in {run_dir}"
    else:
        kept = f"no checkpoint was written yet (the run failed in its first epoch), {run_dir} holds its config"
    raise FloatingPointError(f"{message}; {kept}; the record is marked failed (lower lr or set clip_grad, "
                             f"in a new run_id)")


def _summary(cfg: RunConfig, history: list[dict[str, Any]], model: nn.Module, device: torch.device,
             dinfo: DistInfo, wall: float) -> dict[str, Any]:
    evals = [r for r in history if "top1" in r]
    last = evals[-1] if evals else {}
    return {
        "status": "complete", "run_id": cfg.run_id, "method": cfg.method, "variant": cfg.variant,
        "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed, "epochs": cfg.epochs,
        "final_top1": last.get("top1", float("nan")), "final_top5": last.get("top5", float("nan")),
        **({"final_train_top1": last["train_top1"]} if "train_top1" in last else {}),  # with eval_train
        "best_top1": max((r["top1"] for r in evals), default=float("nan")),
        "train_time_s": sum(r["train_time"] for r in history),
        "total_time_s": sum(r["epoch_time"] for r in history),
        "time_per_epoch_s": float(np.mean([r["epoch_time"] for r in history])) if history else float("nan"),
        "images_per_s": float(np.mean([r["images_per_s"] for r in history])) if history else float("nan"),
        "wall_time_this_session_s": wall, "peak_memory_mb": peak_memory_mb(device),
        "params": count_parameters(model), "device": str(device), "world_size": dinfo.world_size,
        "threads": torch.get_num_threads(), "git_commit": git_commit(), "torch": torch.__version__,
        "timm": timm.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "finished_at": datetime.now().isoformat(timespec="seconds"),
    }


def load_model(run_dir: str | Path, map_location: str | torch.device = "cpu",
               checkpoint: str | Path | None = None) -> tuple[nn.Module, RunConfig]:
    """Rebuild a run's model from its record and load the checkpoint weights (eval mode):
    the final ``checkpoint.pt``, or ``checkpoint`` (e.g. a kept epoch's, ``Run.epoch_checkpoints()``)."""
    run = load_run(run_dir)
    cfg = RunConfig.from_dict(run.config)
    info = dataset_info(cfg.dataset)
    ckpt = load_checkpoint(checkpoint or Path(run_dir) / CHECKPOINT, map_location=map_location)
    num_classes = int(ckpt.get("num_classes", info.num_classes))
    model = create_model(cfg.model, num_classes, cfg.img_size, info.in_chans, patch_size=cfg.patch_size or None)
    model = build_method(cfg, num_classes).prepare_model(model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg
