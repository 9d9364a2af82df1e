"""Training-step cost of each method relative to CutMix, measured in one process.

Every method gets its own copy of the same initial model and its own AdamW; the methods are
interleaved (A B C A B C ...) after a warm-up so that drifts in machine load hit all of them
alike, and the median step time of each is divided by CutMix's.

Methods that switch between branches (SMMix with Mixup, TokenMix with Mixup, Mixup/CutMix)
produce two clusters of step times; the plain median of such a mixture jumps between the
clusters from run to run. The headline figure is therefore the **kind-weighted median**: the
median step time of each batch kind (``MixedBatch.kind``), weighted by how often that kind
occurred -- a robust estimate of the expected step time, equal to the plain median for
single-kind methods. The plain median and the mean are reported beside it. A step is the whole training
step: ``mix`` + forward (with the method's captures) + ``loss`` + backward + optimiser step.
Methods that read sample metadata (TokenMix's teacher maps) get a fresh random ``meta`` per step
(cache indices, padded-crop boxes, flips), so the map lookup and alignment are timed too.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import methods
from .engine import TrainForward
from .methods import ModelOutputs
from .models import create_model


@dataclass
class BenchResult:
    """Step times (s) of one method and their ratios to the reference method.

    ``typical_s`` is the kind-weighted median (see the module docstring) and ``ratio`` its ratio
    to the reference's; ``median_ratio`` / ``mean_ratio`` compare plain medians / means.
    ``kind_medians`` maps each batch kind to (median step s, share of steps)."""

    label: str
    median_s: float
    ratio: float
    times: list[float]
    kinds: list[str]
    typical_s: float = 0.0
    median_ratio: float = 0.0
    mean_ratio: float = 0.0
    kind_medians: dict[str, tuple[float, float]] = field(default_factory=dict)


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


def random_meta(batch_size: int, num_images: int, img_size: int, padding: int) -> dict[str, torch.Tensor]:
    """Sample metadata as the data pipeline would produce it: random indices, padded-crop boxes
    (normalised (y0, x0, y1, x1)) and flips."""
    off = (torch.randint(0, 2 * padding + 1, (batch_size, 2)).float() - padding) / img_size  # (B, 2)
    box = torch.cat([off, off + 1.0], dim=1)
    return {"index": torch.randint(0, num_images, (batch_size,)), "box": box,
            "flip": torch.rand(batch_size) < 0.5}


def step_time_ratios(specs: list[str], reference: str = "cutmix", model: str = "vit_cpu", img_size: int = 28,
                     in_chans: int = 1, num_classes: int = 10, batch_size: int = 64, warmup: int = 5,
                     repeats: int = 30, seed: int = 0) -> list[BenchResult]:
    """Median training-step time of each method spec, relative to ``reference`` (added if absent)."""
    if reference not in specs:
        specs = [reference] + list(specs)
    torch.manual_seed(seed)
    base = create_model(model, num_classes, img_size, in_chans)
    x = torch.randn(batch_size, in_chans, img_size, img_size)
    y = torch.randint(0, num_classes, (batch_size,))
    runners = []
    for spec in specs:
        name, kw = parse_spec(spec)
        method = methods.get(name, num_classes=num_classes, **kw)
        net = method.prepare_model(copy.deepcopy(base))
        method.prepare_training()
        fwd = TrainForward(net, method.needs).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        runners.append((spec, method, fwd, opt))

    def step(method, fwd, opt) -> tuple[float, str]:
        meta = (random_meta(batch_size, len(method.maps), img_size, img_size // 8)
                if method.needs.sample_meta else None)
        t0 = time.perf_counter()
        mixed = method.mix(x, y, meta=meta) if meta is not None else method.mix(x, y)
        loss, _ = method.loss(ModelOutputs(**fwd(mixed.x)), mixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, mixed.kind

    times: dict[str, list[float]] = {spec: [] for spec in specs}
    kinds: dict[str, list[str]] = {spec: [] for spec in specs}
    for r in range(warmup + repeats):
        for spec, method, fwd, opt in runners:
            t, kind = step(method, fwd, opt)
            if r >= warmup:
                times[spec].append(t)
                kinds[spec].append(kind)
    typical = {s: kind_weighted_median(times[s], kinds[s]) for s in specs}
    ref_typ, ref_med, ref_mean = (typical[reference][0], statistics.median(times[reference]),
                                  statistics.fmean(times[reference]))
    return [BenchResult(s, statistics.median(t), typical[s][0] / ref_typ, t, kinds[s], typical[s][0],
                        statistics.median(t) / ref_med, statistics.fmean(t) / ref_mean, typical[s][1])
            for s, t in times.items()]


def format_results(results: list[BenchResult], reference: str = "cutmix") -> str:
    """Markdown table: kind-weighted median (headline), plain median and mean ratios, per-kind medians."""
    lines = [f"| method | kind-weighted median step (ms) | vs {reference} | plain median vs {reference} "
             f"| mean vs {reference} | per batch kind: median ms (share) |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        per = ", ".join(f"{k} {1000 * m:.1f} ({w:.0%})" for k, (m, w) in r.kind_medians.items())
        lines.append(f"| `{r.label}` | {1000 * r.typical_s:.1f} | {r.ratio:.3f}× | {r.median_ratio:.3f}× "
                     f"| {r.mean_ratio:.3f}× | {per} |")
    return "\n".join(lines)
