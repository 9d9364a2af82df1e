"""Training-step cost of each method relative to CutMix, measured in one process.

Every method gets its own copy of the same initial model and its own AdamW; the methods are
interleaved (A B C A B C ...) after a warm-up so that drifts in machine load hit all of them
alike, and the median step time of each is divided by CutMix's. A step is the whole training
step: ``mix`` + forward (with the method's captures) + ``loss`` + backward + optimiser step.
Methods that read sample metadata (TokenMix's teacher maps) get a fresh random ``meta`` per step
(cache indices, padded-crop boxes, flips), so the map lookup and alignment are timed too.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import methods
from .engine import TrainForward
from .methods import ModelOutputs
from .models import create_model


@dataclass
class BenchResult:
    """Median step time (s) of one method and its ratio to the reference method."""

    label: str
    median_s: float
    ratio: float
    times: list[float]


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

    def step(method, fwd, opt) -> float:
        meta = (random_meta(batch_size, len(method.maps), img_size, img_size // 8)
                if method.needs.sample_meta else None)
        t0 = time.perf_counter()
        mixed = method.mix(x, y, meta=meta) if meta is not None else method.mix(x, y)
        loss, _ = method.loss(ModelOutputs(**fwd(mixed.x)), mixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for r in range(warmup + repeats):
        for spec, method, fwd, opt in runners:
            t = step(method, fwd, opt)
            if r >= warmup:
                times[spec].append(t)
    ref = statistics.median(times[reference])
    return [BenchResult(s, statistics.median(t), statistics.median(t) / ref, t) for s, t in times.items()]


def format_results(results: list[BenchResult], reference: str = "cutmix") -> str:
    lines = [f"| method | median step (ms) | vs {reference} |", "|---|---:|---:|"]
    lines += [f"| `{r.label}` | {1000 * r.median_s:.1f} | {r.ratio:.3f}× |" for r in results]
    return "\n".join(lines)
