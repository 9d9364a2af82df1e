"""RunConfig: defaults, types, choices, method parameters, round trips."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tokenmix import methods
from tokenmix.data import DATASETS
from tokenmix.models import PRESETS
from tokenmix.train.config import ConfigError, RunConfig


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.method in methods.available() and cfg.dataset in DATASETS
    assert set(cfg.to_dict()) == set(RunConfig.field_names())
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="epoch") as e:
        RunConfig.from_dict({"epoch": 3, "lr": 0.1})
    msg = str(e.value)
    for name in RunConfig.field_names():
        assert name in msg
    with pytest.raises(ConfigError, match="bogus"):
        RunConfig().replace(bogus=1)


@pytest.mark.parametrize("field, value", [
    ("epochs", "3"), ("epochs", True), ("epochs", 2.5), ("batch_size", None), ("lr", "0.1"), ("lr", True),
    ("amp", "yes"), ("amp", 1), ("method", 3), ("method_kwargs", []), ("method_kwargs", "{}"),
    ("img_size", 32.5), ("data_dir", 1),
])
def test_wrong_types_rejected(field, value):
    with pytest.raises(ConfigError, match=rf"RunConfig\.{field} must be"):
        RunConfig(**{field: value})


def test_int_accepted_for_float_and_integral_float_for_int():
    cfg = RunConfig(lr=1, warmup_epochs=0, smoothing=0, epochs=3.0)
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert isinstance(cfg.smoothing, float) and isinstance(cfg.warmup_epochs, float)
    assert isinstance(cfg.epochs, int) and cfg.epochs == 3


@pytest.mark.parametrize("field, value, valid", [
    ("method", "nosuch", methods.available()),
    ("dataset", "mnist", list(DATASETS)),
    ("variant", "faithful", ["official", "paper"]),
    ("cutmix_snap", "grid", ["pixel", "token"]),
    ("device", "tpu", ["auto", "cpu", "cuda", "cuda:N", "mps"]),
    ("model", "resnet50", sorted(PRESETS) + ["vit_*", "deit_*"]),
])
def test_unknown_choice_names_valid_choices(field, value, valid):
    with pytest.raises(ConfigError, match=repr(value)) as e:
        RunConfig(**{field: value})
    for v in valid:
        assert v in str(e.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_valid_devices(device):
    assert RunConfig(device=device).device == device


@pytest.mark.parametrize("model, img, patch, sizes", [
    ("vit_cpu", 30, 0, ["28", "32"]), ("vit_cpu", 30, 8, ["24", "32"]),
    ("deit_tiny_patch16_224", 30, 0, ["28", "32"]), ("deit_tiny_patch16_224", 100, 0, ["96", "112"]),
])
def test_img_size_not_divisible_names_valid_sizes(model, img, patch, sizes):
    with pytest.raises(ConfigError, match=f"img_size {img} is not divisible") as e:
        RunConfig(model=model, img_size=img, patch_size=patch)
    listed = str(e.value).split("valid nearby sizes:")[1].replace(",", " ").split()
    assert set(sizes) <= set(listed)
    p = patch or (4 if img <= 64 else 16)
    assert all(int(s) % p == 0 and int(s) > 0 for s in listed)


def test_valid_sizes_accepted():
    RunConfig(model="vit_cpu", img_size=32)
    RunConfig(model="deit_tiny_patch16_224", img_size=224)
    RunConfig(model="vit_cpu", img_size=48, patch_size=8)


@pytest.mark.parametrize("bad", [
    {"batch_size": 0}, {"batch_size": -2}, {"epochs": 0}, {"lr": 0.0}, {"min_lr": -1.0},
    {"smoothing": 1.0}, {"mix_prob": 1.5}, {"switch_prob": -0.1}, {"mixup_alpha": 0.0}, {"cutmix_alpha": -1.0},
    {"drop_path": 1.0}, {"weight_decay": -0.1}, {"epochs": 2, "warmup_epochs": 2.5}, {"crop_padding": -2},
    {"eval_every": 0}, {"train_subset": -1}, {"threads": -1}, {"clip_grad": -1.0},
    {"run_id": "a/b"}, {"run_id": ".."}, {"run_id": "a\\b"},
])
def test_invalid_values_name_the_field(bad):
    field = [k for k in bad if k != "epochs"][0] if len(bad) > 1 else next(iter(bad))
    with pytest.raises(ConfigError, match=field):
        RunConfig(**bad)


def test_odd_batch_is_valid_and_zero_is_named():
    assert RunConfig(batch_size=33).batch_size == 33  # an odd batch mixes, its unpaired sample unmixed
    with pytest.raises(ConfigError, match="batch_size") as e:
        RunConfig(batch_size=0)
    assert ">= 1" in str(e.value)


def test_method_kwargs_unknown_param():
    with pytest.raises(ConfigError, match="bogus") as e:
        RunConfig(method="cutmix", method_kwargs={"bogus": 1})
    assert "cutmix_alpha" in str(e.value) and "cutmix_snap" in str(e.value)
    with pytest.raises(ConfigError, match="switch_prob"):
        RunConfig(method="mixup", method_kwargs={"switch_prob": 0.3})


@pytest.mark.parametrize("name", ["none", "mixup", "cutmix", "mixup_cutmix"])
def test_method_params_are_exactly_the_constructor_params(name):
    cfg = RunConfig(method=name, smoothing=0.2, mix_prob=0.7, mixup_alpha=0.4, cutmix_alpha=0.3,
                    switch_prob=0.9, cutmix_snap="token", variant="paper")
    params = cfg.method_params(num_classes=13)
    ctor = methods.parameters(name)
    assert set(params) == set(ctor)  # every constructor parameter is a config field (or num_classes)
    assert params["num_classes"] == 13
    for k, v in params.items():
        if k != "num_classes":
            assert v == getattr(cfg, k)
    m = methods.get(name, **params)
    for k, v in params.items():
        assert getattr(m, k) == v


def test_method_params_excludes_other_methods_fields():
    params = RunConfig(method="mixup").method_params(10)
    assert "cutmix_alpha" not in params and "switch_prob" not in params and "lr" not in params
    assert "mixup_alpha" in params


def test_method_kwargs_override_fields():
    cfg = RunConfig(method="cutmix", cutmix_alpha=0.5, method_kwargs={"cutmix_alpha": 0.2})
    assert cfg.method_params(10)["cutmix_alpha"] == 0.2
    assert methods.get("cutmix", **cfg.method_params(10)).cutmix_alpha == 0.2


def test_replace_validates_and_leaves_the_original():
    cfg = RunConfig(epochs=3)
    new = cfg.replace(epochs=5, method="mixup")
    assert (cfg.epochs, cfg.method) == (3, "cutmix") and (new.epochs, new.method) == (5, "mixup")
    with pytest.raises(ConfigError):
        cfg.replace(batch_size=0)


def test_dict_and_json_round_trip():
    cfg = RunConfig(method="mixup_cutmix", lr=3e-4, method_kwargs={"switch_prob": 0.8}, run_id="abc",
                    randaugment="rand-m9-mstd0.5-inc1", amp=False)
    d = cfg.to_dict()
    assert RunConfig.from_dict(d) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    d["method_kwargs"]["switch_prob"] = 0.1  # to_dict copies
    assert cfg.method_kwargs == {"switch_prob": 0.8}
    assert json.loads(cfg.to_json()) == dataclasses.asdict(cfg)
