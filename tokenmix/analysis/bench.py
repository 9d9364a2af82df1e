"""Training-step cost of each method relative to CutMix, measured in one process.

Every method gets its own copy of the same initial model and its own AdamW; the methods are
interleaved (A B C, B C A, C A B, ...: the order rotates each round, so no method always runs
after the same one) after a warm-up so that drifts in machine load hit all of them alike, and
the median step time of each is divided by CutMix's.

Methods that switch between branches (SMMix with Mixup, TokenMix with Mixup, Mixup/CutMix)
produce two clusters of step times; the plain median of such a mixture jumps between the
clusters from run to run. The headline figure is therefore the **kind-weighted median**: the
median step time of each batch kind (``MixedBatch.kind``), weighted by how often that kind
occurred -- a robust estimate of the expected step time, equal to the plain median for
single-kind methods. The plain median and the mean are reported beside it. A step is the whole training
step: ``mix`` + forward (with the method's captures) + ``loss`` + backward + optimiser step.
Methods that read sample metadata (TokenMix's teacher maps) get a fresh random ``meta`` per step
(cache indices, padded-crop boxes, flips), so the map lookup and alignment are timed too.

The same loop also times the method's own code alone: ``mix`` (the mixing) and ``loss`` (the label
rule and the criterion, from the captured attention; the captures themselves run inside the
forward). Peak memory is measured on separate, untimed steps: on CUDA the allocator's peak, on
the CPU the peak of live tensor storages allocated during the step (:class:`LiveTensorBytes`).

:func:`run_suite` (``python -m tokenmix bench``) runs every method on the CPU preset and on a
DeiT-S-shaped model at 32 px, adds TokenMixup's saliency-latency comparison, checks the targets
of :data:`TARGETS` and writes ``bench.{csv,md}`` for the README.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokenmix import methods
from tokenmix.analysis.probes import saliency_latency
from tokenmix.data import random_meta
from tokenmix.methods import MixStep
from tokenmix.methods.step import perf_clock
from tokenmix.methods.teacher_maps import TeacherCacheError, TeacherMaps, load_teacher_maps
from tokenmix.models import create_model
from tokenmix.train.engine import resolve_device
from tokenmix.train.runs import atomic_write_bytes


@dataclass
class BenchResult:
    """Step times (s) of one method and their ratios to the reference method.

    ``typical_s`` is the kind-weighted median (see the module docstring) and ``ratio`` its ratio
    to the reference's; ``median_ratio`` / ``mean_ratio`` compare plain medians / means.
    ``kind_medians`` maps each batch kind to (median step s, share of steps). ``mix_s`` and
    ``loss_s`` are the medians of the method's ``mix`` and ``loss`` calls inside the timed steps;
    ``peak_bytes`` the step's peak memory (NaN when not measured) and ``memory_ratio`` its ratio
    to the reference's."""

    label: str
    median_s: float
    ratio: float
    times: list[float]
    kinds: list[str]
    typical_s: float = 0.0
    median_ratio: float = 0.0
    mean_ratio: float = 0.0
    kind_medians: dict[str, tuple[float, float]] = field(default_factory=dict)
    mix_s: float = float("nan")
    loss_s: float = float("nan")
    peak_bytes: float = float("nan")
    memory_ratio: float = float("nan")


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    Every op's outputs whose storage is not one of its inputs' (i.e. not a view or an in-place
    result) count as an allocation of ``storage.nbytes()`` until that storage is freed. Backward
    ops run through the dispatcher too, so activations, gradients and optimiser temporaries are
    included; tensors that existed before (parameters, optimiser state) are not, and neither are
    allocator caching or an op's internal workspace. The CPU counterpart of CUDA's
    ``max_memory_allocated`` minus the memory in use at the start.

    >>> with LiveTensorBytes() as m:
    ...     a = torch.empty(1000)          # 4000 bytes
    ...     b = torch.empty(2000)          # + 8000
    ...     del a
    ...     c = torch.empty(500)           # 8000 + 2000 live
    >>> m.peak
    12000
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatcher's signature
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def peak_step_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak memory (bytes) of one call of ``step`` above what was allocated before it: the CUDA
    allocator's peak on CUDA, :class:`LiveTensorBytes` elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with LiveTensorBytes() as m:
        step()
    return int(m.peak)


def kind_weighted_median(times: list[float], kinds: list[str]) -> tuple[float, dict[str, tuple[float, float]]]:
    """Sum over batch kinds of (median time of that kind) x (share of steps of that kind).

    >>> kind_weighted_median([1.0, 1.1, 2.0, 2.2], ["a", "a", "b", "b"])[0]
    1.575
    """
    if len(times) != len(kinds) or not times:
        raise ValueError(f"need one kind per time and at least one step; got {len(times)} times, {len(kinds)} kinds")
    per = {k: (statistics.median([t for t, kk in zip(times, kinds) if kk == k]), kinds.count(k) / len(kinds))
           for k in sorted(set(kinds))}
    return sum(m * w for m, w in per.values()), per


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"tl_align:path=kdim,variant=paper"`` -> ("tl_align", {"path": "kdim", "variant": "paper"})."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        for conv in (int, float):
            try:
                kwargs[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            kwargs[k] = {"true": True, "false": False}.get(v.lower(), v)
    return name, kwargs


def bench_teacher_maps(num_images: int, num_classes: int, map_size: int, top_k: int = 5, seed: int = 0) -> Any:
    """Random in-memory teacher maps of a cache's shape, for timing TokenMix where no cache was built
    (the lookup and alignment cost the same; the labels are meaningless)."""
    g = np.random.default_rng(seed)
    values = g.standard_normal((num_images, top_k, map_size, map_size)).astype(np.float16)
    classes = g.integers(0, num_classes, (num_images, top_k, map_size, map_size)).astype(np.int16)
    return TeacherMaps(values, classes, {"dataset": "random", "top_k": top_k})


#: the reference row: a hand-written timm training step with ``timm.data.Mixup`` in CutMix mode
TIMM_REFERENCE = "timm_cutmix"

StepRunner = Callable[[], tuple[float, float, float, str]]


def package_step(step: MixStep, x: Tensor, y: Tensor, img_size: int, clock: Callable[[], float]) -> StepRunner:
    """One timed training step of ``step`` (AdamW) on ``x, y``: returns (total s, mix s, loss s, kind)."""
    opt = torch.optim.AdamW(step.parameters(), lr=1e-4)
    n_images = len(getattr(step.method, "maps", None) or ()) or 1
    meta = random_meta(len(x), n_images, img_size, img_size // 8) if step.method.needs.sample_meta else None

    def run() -> tuple[float, float, float, str]:
        t0 = clock()
        out = step(x, y, meta)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return clock() - t0, out.times["mix"], out.times["loss"], out.mixed.kind
    return run


def timm_cutmix_step(model: nn.Module, num_classes: int, x: Tensor, y: Tensor,
                     clock: Callable[[], float]) -> StepRunner:
    """The plain timm recipe as a user writes it: ``x, target = mixup_fn(x, y)`` with
    ``timm.data.Mixup(mixup_alpha=0, cutmix_alpha=1, label_smoothing=0.1)``, ``model(x)``,
    ``SoftTargetCrossEntropy``, AdamW (the package's overhead is its CutMix step against this)."""
    mixup_fn = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
    criterion = SoftTargetCrossEntropy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def run() -> tuple[float, float, float, str]:
        t0 = clock()
        xm, target = mixup_fn(x, y)  # in place, as in a timm loop (pasting boxes of x into x keeps its values)
        t1 = clock()
        out = model(xm)
        t2 = clock()
        loss = criterion(out, target)
        t3 = clock()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return clock() - t0, t1 - t0, t3 - t2, "cutmix"
    return run


def step_time_ratios(specs: list[str], reference: str = "cutmix", model: str = "vit_cpu", img_size: int = 28,
                     in_chans: int = 1, num_classes: int = 10, batch_size: int = 64, warmup: int = 5,
                     repeats: int = 30, seed: int = 0, patch_size: int | None = None, memory: bool = False,
                     teacher_maps: Any = None, device: str = "cpu") -> list[BenchResult]:
    """Median training-step time of each method spec, relative to ``reference`` (added if absent).

    Args:
        specs: method specs (:func:`parse_spec`), e.g. ``"tl_align:path=kdim"``.
        memory: also measure each method's peak step memory (separate, untimed steps).
        teacher_maps: maps for TokenMix specs (default: the method's own cache, opened by
            ``prepare_training``; raises when missing).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (times are taken after a CUDA synchronise).
    """
    if reference not in specs:
        specs = [reference] + list(specs)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    base = create_model(model, num_classes, img_size, in_chans, patch_size=patch_size).to(dev)
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    clock = perf_clock(dev)
    runners = []
    for spec in specs:
        if spec == TIMM_REFERENCE:
            runners.append((spec, timm_cutmix_step(copy.deepcopy(base), num_classes, x, y, clock)))
            continue
        name, kw = parse_spec(spec)
        method = methods.get(name, num_classes=num_classes, **kw)
        mix_step = MixStep(copy.deepcopy(base), method).to(dev).train()
        if teacher_maps is not None and hasattr(method, "maps"):
            method.maps = teacher_maps
        method.prepare_training()
        mix_step.clock = clock
        runners.append((spec, package_step(mix_step, x, y, img_size, clock)))

    times: dict[str, list[float]] = {spec: [] for spec in specs}
    parts: dict[str, list[tuple[float, float]]] = {spec: [] for spec in specs}
    kinds: dict[str, list[str]] = {spec: [] for spec in specs}
    for r in range(warmup + repeats):
        for j in range(len(runners)):  # rotated each round: no method always follows the same one
            spec, run_step = runners[(r + j) % len(runners)]
            t, t_mix, t_loss, kind = run_step()
            if r >= warmup:
                times[spec].append(t)
                parts[spec].append((t_mix, t_loss))
                kinds[spec].append(kind)
    peaks = {spec: float("nan") for spec in specs}
    if memory:
        for spec, run_step in runners:
            peaks[spec] = float(peak_step_bytes(run_step, dev))
    typical = {s: kind_weighted_median(times[s], kinds[s]) for s in specs}
    ref_typ, ref_med, ref_mean = (typical[reference][0], statistics.median(times[reference]),
                                  statistics.fmean(times[reference]))
    return [BenchResult(s, statistics.median(t), typical[s][0] / ref_typ, t, kinds[s], typical[s][0],
                        statistics.median(t) / ref_med, statistics.fmean(t) / ref_mean, typical[s][1],
                        mix_s=statistics.median(p[0] for p in parts[s]),
                        loss_s=statistics.median(p[1] for p in parts[s]),
                        peak_bytes=peaks[s], memory_ratio=peaks[s] / peaks[reference])
            for s, t in times.items()]


def format_results(results: list[BenchResult], reference: str = "cutmix") -> str:
    """Markdown table: kind-weighted median (headline), plain median and mean ratios, the method's
    own mix / loss time, peak memory when measured, per-kind medians."""
    mem = any(np.isfinite(r.peak_bytes) for r in results)
    lines = [f"| method | kind-weighted median step (ms) | vs {reference} | plain median vs {reference} "
             f"| mean vs {reference} | mix (ms) | loss + label (ms) |"
             + (f" peak memory (MB) | memory vs {reference} |" if mem else "")
             + " per batch kind: median ms (share) |",
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if mem else "") + "---|"]
    for r in results:
        per = ", ".join(f"{k} {1000 * m:.1f} ({w:.0%})" for k, (m, w) in r.kind_medians.items())
        lines.append(f"| `{r.label}` | {1000 * r.typical_s:.1f} | {r.ratio:.3f}× | {r.median_ratio:.3f}× "
                     f"| {r.mean_ratio:.3f}× | {1000 * r.mix_s:.2f} | {1000 * r.loss_s:.2f} |"
                     + (f" {r.peak_bytes / 2**20:.1f} | {r.memory_ratio:.2f}× |" if mem else "") + f" {per} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the suite: python -m tokenmix bench

@dataclass(frozen=True)
class BenchSetting:
    """One model / input setting of the suite; ``dataset`` sizes TokenMix's teacher maps."""

    name: str
    model: str
    img_size: int
    in_chans: int
    num_classes: int
    batch_size: int
    warmup: int
    repeats: int
    patch_size: int | None = None
    dataset: str = "synthetic"


#: the CPU preset (Fashion-MNIST shapes) and a DeiT-S-shaped model at 32 px (CIFAR-100 shapes;
#: patch 4, 64 tokens + CLS; a smaller batch and fewer steps, as one step costs ~20x more)
SETTINGS: tuple[BenchSetting, ...] = (
    BenchSetting("CPU preset", "vit_cpu", 28, 1, 10, 64, 5, 60, None, "fashion_mnist"),
    BenchSetting("DeiT-S, 32 px", "deit_small_patch16_224", 32, 3, 100, 32, 2, 8, 4, "cifar100"),
)
SUITE_METHODS: tuple[str, ...] = ("cutmix", TIMM_REFERENCE, "mixup", "mixup_cutmix", "transmix", "tl_align", "tl_align:path=kdim",
                                  "tokenmix", "tokenmixup:tokenmixup_mode=htm", "tokenmixup:tokenmixup_mode=vtm", "smmix",
                                  "mixpro", "mixpro:variant=official")
#: the step-time targets of the CPU preset (ratio to CutMix): what each method's extra work should cost
TARGETS: dict[str, float] = {"transmix": 1.03, "tl_align": 1.05, "tl_align:path=kdim": 1.05, "tokenmix": 1.05,
                             "tokenmixup:tokenmixup_mode=htm": 1.15, "tokenmixup:tokenmixup_mode=vtm": 1.10, "smmix": 1.25,
                             "mixpro": 1.03}
#: the package's CutMix step may cost at most this much more than the hand-written timm step
TIMM_OVERHEAD_TARGET = 1.02
#: gradient saliency must be at least this many times slower than TokenMixup's attention saliency
SALIENCY_SPEEDUP_TARGET = 10.0


def machine_description() -> str:
    """One line: CPU model, cores, torch threads, GPU if any, OS, Python, torch and timm versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {timm.__version__}")


def _suite_teacher_maps(setting: BenchSetting, data_dir: str | Path) -> tuple[Any, str]:
    """The setting's real teacher cache when one was built, else random maps of the same shape."""
    try:
        return load_teacher_maps(setting.dataset, setting.img_size, data_dir=data_dir), "the teacher cache"
    except (TeacherCacheError, ValueError):
        n = {"fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}.get(setting.dataset, 512)
        return (bench_teacher_maps(n, setting.num_classes, setting.img_size // 4),
                f"random maps of a {setting.dataset} cache's shape")


@dataclass
class SuiteResult:
    """What :func:`run_suite` measured: step rows per setting, the saliency latencies, the machine."""

    steps: dict[str, list[BenchResult]]
    settings: tuple[BenchSetting, ...]
    saliency: dict[str, float]
    saliency_setting: str
    maps_note: dict[str, str]
    machine: str
    date: str
    seconds: float

    def table(self) -> list[dict[str, Any]]:
        """One dict per (setting, method): the CSV rows."""
        rows = []
        for st in self.settings:
            for r in self.steps[st.name]:
                target = TARGETS.get(r.label)
                rows.append({"setting": st.name, "model": st.model, "img_size": st.img_size, "batch": st.batch_size,
                             "steps": st.repeats, "method": r.label, "step_ms": 1000 * r.typical_s,
                             "vs_cutmix": r.ratio, "plain_median_vs_cutmix": r.median_ratio,
                             "mean_vs_cutmix": r.mean_ratio, "target": target if target else float("nan"),
                             "met": "" if target is None else bool(r.ratio <= target),
                             "mix_ms": 1000 * r.mix_s, "loss_ms": 1000 * r.loss_s,
                             "peak_mb": r.peak_bytes / 2**20, "memory_vs_cutmix": r.memory_ratio})
        return rows

    @property
    def saliency_speedup(self) -> float:
        return self.saliency["gradient"] / self.saliency["attention"]

    def missed(self) -> list[str]:
        """The targets not met (CPU preset rows and the saliency speed-up), as readable strings."""
        out = [f"{r['method']} {r['vs_cutmix']:.3f}x > {r['target']:.2f}x ({r['setting']})"
               for r in self.table() if r["met"] is False and r["setting"] == self.settings[0].name]
        for r in self.table():
            if r["method"] == TIMM_REFERENCE and r["setting"] == self.settings[0].name \
                    and 1.0 / r["vs_cutmix"] > TIMM_OVERHEAD_TARGET:
                out.append(f"the package's CutMix step costs {1.0 / r['vs_cutmix']:.3f}x the timm step "
                           f"> {TIMM_OVERHEAD_TARGET:.2f}x")
        if self.saliency_speedup < SALIENCY_SPEEDUP_TARGET:
            out.append(f"attention saliency only {self.saliency_speedup:.1f}x faster than gradient saliency")
        return out

    def markdown(self) -> str:
        """The Markdown report (``bench.md``; ``make figures`` pastes it into the README)."""
        lines = ["# Step cost of each method relative to CutMix", "",
                 f"Measured {self.date} by `python -m tokenmix bench` ({self.seconds:.0f} s) on {self.machine}. "
                 "Whole training steps (mix + forward with the method's captures + loss + backward + AdamW), "
                 "one model copy per method, methods interleaved after a warm-up; **vs CutMix** is the ratio "
                 "of kind-weighted medians (module `tokenmix.analysis.bench`). **mix** and **loss + label** time the "
                 "method's own code inside those steps. **Peak memory**: one separate step per method; on "
                 "the CPU the peak of live tensor storages allocated during the step (activations, gradients, "
                 "temporaries; not the parameters), on CUDA the allocator's peak. Targets apply to the CPU "
                 "preset.", ""]
        for st in self.settings:
            lines += [f"**{st.name}** (`{st.model}`, {st.img_size} px"
                      + (f", patch {st.patch_size}" if st.patch_size else "")
                      + f", batch {st.batch_size}, {st.repeats} steps per method after {st.warmup} warm-up; "
                      f"TokenMix with {self.maps_note[st.name]}):", "",
                      "| method | step (ms) | vs CutMix | target | mix (ms) | loss + label (ms) "
                      "| peak memory (MB) | memory vs CutMix |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in (row for row in self.table() if row["setting"] == st.name):
                tgt = ("" if r["met"] == "" else f"≤ {r['target']:.2f}× " + ("✓" if r["met"] else "**missed**"))
                lines.append(f"| `{r['method']}` | {r['step_ms']:.1f} | {r['vs_cutmix']:.3f}× | {tgt} "
                             f"| {r['mix_ms']:.2f} | {r['loss_ms']:.2f} | {r['peak_mb']:.1f} "
                             f"| {r['memory_vs_cutmix']:.2f}× |")
            by = {r.label: r for r in self.steps[st.name]}
            if TIMM_REFERENCE in by:
                over = 1.0 / by[TIMM_REFERENCE].ratio
                lines += ["", f"`{TIMM_REFERENCE}` is a hand-written timm step (`x, target = mixup_fn(x, y)` with "
                              f"`timm.data.Mixup(mixup_alpha=0, cutmix_alpha=1)`, `model(x)`, "
                              f"`SoftTargetCrossEntropy`): the package's CutMix step costs **{over:.3f}×** it "
                              f"(target ≤ {TIMM_OVERHEAD_TARGET:.2f}×"
                              + (": ✓)." if over <= TIMM_OVERHEAD_TARGET else ": **missed**).")]
            for spec, r in by.items():  # a configured variant against the method's defaults
                base = parse_spec(spec)[0]
                if spec != base and base in by:
                    d = by[base]
                    lines += ["", f"`{spec}` against `{base}`: {r.typical_s / d.typical_s:.3f}× the step; loss + "
                                  f"label {1000 * r.loss_s:.2f} vs {1000 * d.loss_s:.2f} ms."]
            lines.append("")
        sal = self.saliency
        lines += [f"**TokenMixup's saliency detectors** ({self.saliency_setting}; median per batch, interleaved; "
                  f"`tokenmix.analysis.probes.saliency_latency`): gradient saliency is **{self.saliency_speedup:.1f}×** "
                  f"slower than the attention saliency TokenMixup uses (target ≥ {SALIENCY_SPEEDUP_TARGET:.0f}×: "
                  + ("✓" if self.saliency_speedup >= SALIENCY_SPEEDUP_TARGET else "**missed**") + ").", "",
                  "| detector | ms per batch | vs attention |", "|---|---:|---:|"]
        for k, v in sal.items():
            lines.append(f"| {k} | {1000 * v:.2f} | {v / sal['attention']:.1f}× |")
        missed = self.missed()
        lines += ["", "All targets met." if not missed else "Targets missed: " + "; ".join(missed) + "."]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``bench.csv`` (step rows), ``bench_saliency.csv`` and ``bench.md`` atomically."""

        out = Path(out_dir)
        paths = [out / "bench.csv", out / "bench_saliency.csv", out / "bench.md"]
        atomic_write_bytes(paths[0], pd.DataFrame(self.table()).to_csv(index=False, float_format="%.4f").encode())
        sal = pd.DataFrame([{"detector": k, "ms": 1000 * v, "vs_attention": v / self.saliency["attention"]}
                            for k, v in self.saliency.items()])
        atomic_write_bytes(paths[1], sal.to_csv(index=False, float_format="%.4f").encode())
        atomic_write_bytes(paths[2], self.markdown().encode())
        return paths


def run_suite(settings: Sequence[BenchSetting] = SETTINGS, specs: Sequence[str] = SUITE_METHODS,
              data_dir: str | Path = "data", memory: bool = True, saliency_repeats: int = 10,
              log: Callable[[str], None] = print, device: str = "cpu") -> SuiteResult:
    """Every method in every setting (interleaved within a setting), then the saliency latencies
    of TokenMixup's detectors on the first setting's model (at TokenMixup's default HTM block)."""
    t0 = time.perf_counter()
    steps, notes = {}, {}
    for st in settings:
        maps, notes[st.name] = _suite_teacher_maps(st, data_dir)
        log(f"[bench] {st.name}: {len(specs)} methods x ({st.warmup} + {st.repeats}) steps, {st.model} "
            f"at {st.img_size} px, batch {st.batch_size}")
        ts = time.perf_counter()
        steps[st.name] = step_time_ratios(list(specs), model=st.model, img_size=st.img_size, in_chans=st.in_chans,
                                          num_classes=st.num_classes, batch_size=st.batch_size, warmup=st.warmup,
                                          repeats=st.repeats, patch_size=st.patch_size, memory=memory,
                                          teacher_maps=maps, device=device)
        log(f"[bench] {st.name}: done in {time.perf_counter() - ts:.0f} s")
    st = settings[0]
    torch.manual_seed(0)
    model = create_model(st.model, st.num_classes, st.img_size, st.in_chans, patch_size=st.patch_size).train()
    x = torch.randn(st.batch_size, st.in_chans, st.img_size, st.img_size)
    y = torch.randint(0, st.num_classes, (st.batch_size,))
    layer = int(methods.parameters("tokenmixup")["horizontal_layer"])  # TokenMixup's default HTM block
    sal = saliency_latency(model, x, y, layer, repeats=saliency_repeats)
    where = f"`{st.model}`, batch {st.batch_size}, block {layer}"
    return SuiteResult(steps, tuple(settings), sal, where, notes, machine_description(),
                       datetime.now().strftime("%Y-%m-%d %H:%M"), time.perf_counter() - t0)
