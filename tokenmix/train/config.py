"""RunConfig: one flat, typed, validated description of a training run.

The papermill ``parameters`` cell of ``notebooks/10_train.ipynb`` and ``python -m tokenmix train
--key value`` hold exactly these fields. Unknown keys, wrong types and invalid values raise
``ConfigError`` naming the valid choices, before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from timm.data.auto_augment import rand_augment_transform

from tokenmix import methods
from tokenmix.data import DATASETS, dataset_info
from tokenmix.models import patch_size_for


class ConfigError(ValueError):
    """An invalid run configuration (the message names the bad value and the valid choices)."""


#: the largest token grid a run may ask for (side x side tokens), e.g. 384 px at patch 4 is 96 x 96
MAX_TOKENS = 96 * 96


def debug_enabled() -> bool:
    """Whether user errors should show their traceback (``--debug`` or ``TOKENMIX_DEBUG=1``)."""
    return os.environ.get("TOKENMIX_DEBUG", "") not in ("", "0")


class CliParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line (``<prog>: error: ...; see --help``) and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


@dataclass
class RunConfig:
    """Every setting of a run. Defaults: the main CPU job (`make run`): the `vit_cpu` preset with
    CutMix on full Fashion-MNIST, 10 epochs, batch 64 (88.3 % test top-1 in about 11 minutes on 2 cores).

    Mixing parameters are read by the methods that have a parameter of the same name
    (``tokenmix.methods.parameters(name)``); ``method_kwargs`` passes method-specific extras.
    """

    # what to train
    method: str = "cutmix"
    variant: str = ""  # "" = the method's default (official; paper for tokenmixup and mixpro), filled in at validation
    model: str = "vit_cpu"
    dataset: str = "fashion_mnist"
    img_size: int = 28
    patch_size: int = 0  # 0 = the model's default (4 for presets and small timm models)
    # data
    data_dir: str = "data"
    download: bool = True
    train_subset: int = 0  # 0 = all training images
    test_subset: int = 0
    crop_padding: int = -1  # -1 = img_size // 8
    hflip: bool = True
    randaugment: str = ""  # e.g. "rand-m9-mstd0.5-inc1"; "" = off
    num_workers: int = 0
    # mixing
    smoothing: float = 0.1
    mix_prob: float = 1.0
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5  # probability of CutMix when Mixup and CutMix are both on (timm)
    cutmix_snap: str = "pixel"  # "pixel" or "token"
    method_kwargs: dict = field(default_factory=dict)
    # optimisation
    epochs: int = 10
    batch_size: int = 64  # global batch (split across processes under torchrun)
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0  # in [0, epochs]; = epochs: the whole run warms up (no cosine phase)
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    drop_path: float = 0.0
    clip_grad: float = 0.0  # 0 = off
    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # autocast + grad scaling, only on CUDA
    threads: int = 0  # torch CPU threads; 0 = torch's default
    eval_every: int = 1
    checkpoint_every: int = 0  # also keep the weights of every N-th epoch (checkpoint-e<epoch>.pt); 0 = off
    eval_train: int = 0  # also evaluate the first N training images (all if fewer) un-augmented (train/test gap); 0 = off
    out_dir: str = "runs"
    run_id: str = ""  # "" = <dataset>-<model>-<method>-s<seed>-<timestamp>
    resume: bool = False  # continue an interrupted run (or return a finished one) with this run_id
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        self.validate()
        if not self.variant:  # resolved, so that run records name the variant actually used
            self.variant = methods.parameters(self.method).get("variant") or "official"

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """{field: default value} (``variant`` unresolved)."""
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from a dict; unknown keys raise ``ConfigError`` listing the valid keys."""
        bad = sorted(set(d) - set(cls.field_names()))
        if bad:
            raise ConfigError(f"unknown RunConfig key(s) {', '.join(bad)}; valid keys: {', '.join(cls.field_names())}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        hints = typing.get_type_hints(RunConfig)
        for f in dataclasses.fields(self):
            v, t = getattr(self, f.name), hints[f.name]
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
                continue
            if t is int and isinstance(v, float) and v.is_integer():
                setattr(self, f.name, int(v))
                continue
            ok = isinstance(v, t) and not (t in (int, float) and isinstance(v, bool))
            if not ok:
                raise ConfigError(f"RunConfig.{f.name} must be {t.__name__}, got {v!r} ({type(v).__name__})")
            if t is float and not math.isfinite(v):
                raise ConfigError(f"RunConfig.{f.name} = {v!r} is invalid: must be a finite number")

        def choice(name: str, value: str, valid: typing.Iterable[str]) -> None:
            valid = list(valid)
            if value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")

        choice("method", self.method, methods.available())
        if self.variant:  # "" = the method's default
            choice("variant", self.variant, methods.method_class(self.method).variants)
        choice("dataset", self.dataset, DATASETS)
        choice("cutmix_snap", self.cutmix_snap, ("pixel", "token"))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"unknown device {self.device!r}; valid: auto, cpu, cuda, cuda:N, mps")
        if self.patch_size < 0:
            raise ConfigError(f"RunConfig.patch_size = {self.patch_size} is invalid: must be >= 1, or 0 for the "
                              f"model's default")
        try:
            p = patch_size_for(self.model, self.img_size, self.patch_size or None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.img_size <= 0 or self.img_size % p:
            valid = [s for s in range(max(p, self.img_size - 2 * p), self.img_size + 2 * p + 1) if s % p == 0]
            raise ConfigError(f"img_size {self.img_size} is not divisible by the patch size {p} of model "
                              f"{self.model!r}; valid nearby sizes: {', '.join(map(str, valid[:8]))}")
        if (self.img_size // p) ** 2 > MAX_TOKENS:
            side = math.isqrt(MAX_TOKENS)
            raise ConfigError(f"img_size {self.img_size} at patch size {p} makes {(self.img_size // p) ** 2} tokens, "
                              f"more than the {MAX_TOKENS} supported; valid: img_size <= {side * p} for model "
                              f"{self.model!r}, or a larger patch_size")
        params = methods.parameters(self.method)
        bad = sorted(set(self.method_kwargs) - set(params))
        if bad:
            raise ConfigError(f"method {self.method!r} has no parameter(s) {', '.join(bad)} in method_kwargs; "
                              f"valid: {', '.join(k for k in params if k != 'num_classes')}")
        kwargs = self.method_params(dataset_info(self.dataset).num_classes)
        if not kwargs.get("variant", True):
            del kwargs["variant"]  # "" = the method's default, resolved after validation
        try:  # the method's own checks of its parameter values (cheap: nothing is loaded)
            methods.get(self.method, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"method {self.method!r}: {e}") from None
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("min_lr", self.min_lr >= 0, ">= 0"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, "in [0, epochs]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("drop_path", 0 <= self.drop_path < 1, "in [0, 1)"),
            ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"), ("mix_prob", 0 <= self.mix_prob <= 1, "in [0, 1]"),
            ("switch_prob", 0 <= self.switch_prob <= 1, "in [0, 1]"),
            ("mixup_alpha", self.mixup_alpha > 0, "> 0"), ("cutmix_alpha", self.cutmix_alpha > 0, "> 0"),
            ("train_subset", self.train_subset >= 0, ">= 0 (0 = all)"), ("test_subset", self.test_subset >= 0, ">= 0"),
            ("num_workers", self.num_workers >= 0, ">= 0"), ("threads", self.threads >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 1, ">= 1"), ("eval_train", self.eval_train >= 0, ">= 0 (0 = off)"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 = off)"), ("clip_grad", self.clip_grad >= 0, ">= 0 (0 = off)"),
            ("crop_padding", -1 <= self.crop_padding <= self.img_size, "in [0, img_size], or -1 for img_size // 8"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"), ("warmup_lr", self.warmup_lr >= 0, ">= 0"),
            ("threads", self.threads <= 1024, "in [0, 1024]"), ("num_workers", self.num_workers <= 256, "in [0, 256]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"RunConfig.{name} = {getattr(self, name)!r} is invalid: must be {rule}")
        info = dataset_info(self.dataset)
        in_memory = [d for d in DATASETS if dataset_info(d).num_train]
        for name in ("train_subset", "test_subset", "eval_train"):
            if getattr(self, name) and not info.num_train:
                raise ConfigError(f"RunConfig.{name} needs an in-memory dataset, not the image folder {self.dataset!r}; "
                                  f"valid datasets: {', '.join(in_memory)}")
        n_train = self.train_subset or info.num_train
        for name, size, split in (("train_subset", info.num_train, "training"), ("test_subset", info.num_test, "test")):
            if getattr(self, name) > size > 0:
                raise ConfigError(f"RunConfig.{name} = {getattr(self, name)} is more than the {size} images of "
                                  f"{self.dataset}'s {split} split; valid: 0 (all) to {size}")
        if n_train and n_train < self.batch_size:
            raise ConfigError(f"RunConfig.batch_size = {self.batch_size} is more than the {n_train} training images "
                              f"(train_subset {self.train_subset or 'all'}); valid: batch_size <= {n_train}, or a "
                              f"larger train_subset")
        if self.randaugment:
            try:  # the spec is parsed by timm (an unknown op or a malformed part raises)
                rand_augment_transform(self.randaugment, {})
            except Exception as e:  # noqa: BLE001 -- timm raises several types for a bad spec
                raise ConfigError(f"RunConfig.randaugment {self.randaugment!r} is not a timm RandAugment spec ({e}); "
                                  f"valid: '' (off) or e.g. 'rand-m9-mstd0.5-inc1'") from None
        if self.run_id and not re.fullmatch(r"[\w.+=,@:-]{1,200}", self.run_id) or self.run_id.startswith("."):
            raise ConfigError(f"run_id {self.run_id!r} must be a plain folder name: 1-200 letters, digits or "
                              f"._+=,@:- not starting with '.'")
        for name in ("out_dir", "data_dir"):
            if "\x00" in getattr(self, name):
                raise ConfigError(f"RunConfig.{name} {getattr(self, name)!r} must be a path (no NUL character)")

    def method_params(self, num_classes: int) -> dict[str, Any]:
        """Constructor arguments for ``methods.get(self.method, ...)``: every config field whose
        name is a parameter of the method, then ``method_kwargs``."""
        params = methods.parameters(self.method)
        out: dict[str, Any] = {k: getattr(self, k) for k in params if k in self.field_names()}
        out["num_classes"] = num_classes
        out.update(self.method_kwargs)
        return out
