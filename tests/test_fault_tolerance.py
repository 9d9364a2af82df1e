"""Fault tolerance: runs killed with SIGKILL (mid-epoch, mid-checkpoint write, between the
checkpoint and the metrics file) resume to the metrics of an uninterrupted run; a non-finite loss
fails the run cleanly (last good checkpoint kept, record marked failed, the sweep goes on); bad
input fails with one clear error before any work starts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmix.methods.teacher_maps import TeacherCacheError
from tokenmix.train.config import ConfigError, RunConfig
from tokenmix.train.engine import check_batch, preflight, train
from tokenmix.train.runs import CHECKPOINT, RunExistsError, load_run

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, **kw) -> RunConfig:
    base = dict(dataset="synthetic", img_size=32, train_subset=128, test_subset=64, epochs=3, batch_size=32,
                out_dir=str(tmp_path), progress=False, warmup_epochs=0.5, seed=5, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = load_run(a), load_run(b)
    assert ra.complete and rb.complete
    assert len(ra.metrics) == len(rb.metrics)
    for ma, mb in zip(ra.metrics, rb.metrics):
        for key in ("epoch", "train_loss", "top1", "top5", "test_loss", "lr"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-6, abs=1e-9), key
    assert ra.summary["final_top1"] == pytest.approx(rb.summary["final_top1"])
    wa = torch.load(a / CHECKPOINT, weights_only=False)["model"]
    wb = torch.load(b / CHECKPOINT, weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# SIGKILL at three moments, then resume

# Runs the config given as JSON in a child process and SIGKILLs it at the named moment: "epoch"
# (the 2nd step of epoch 2), "checkpoint" (half-way through writing epoch 2's checkpoint: the
# temporary file is cut to half its size, then the process dies before the rename) or "metrics"
# (after the last checkpoint is in place, before metrics.jsonl and summary.json are written).
KILLER = r"""
import json, os, signal, sys
import tokenmix.train.engine as E
from tokenmix.train.config import RunConfig

cfg = RunConfig.from_dict(json.loads(sys.argv[1]))
moment = sys.argv[2]
steps_per_epoch = cfg.train_subset // cfg.batch_size

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "epoch":
    build = E.build_method
    def build_and_arm(c, k):
        m = build(c, k)
        loss, calls = m.loss, [0]
        def loss_then_die(*a, **kw):
            calls[0] += 1
            if calls[0] == steps_per_epoch + 2:
                die()
            return loss(*a, **kw)
        m.loss = loss_then_die
        return m
    E.build_method = build_and_arm
elif moment == "checkpoint":
    fsync, seen = os.fsync, [0]
    def fsync_then_die(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] == 2:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                die()
        return fsync(fd)
    os.fsync = fsync_then_die
elif moment == "metrics":
    write = E.write_metrics
    def write_or_die(path, history):
        if len(history) == cfg.epochs:
            die()
        return write(path, history)
    E.write_metrics = write_or_die
E.train(cfg)
raise SystemExit("the run was not killed")
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(tiny_cfg(out, run_id="full", method="mixup_cutmix"))
    return out / "full"


@pytest.mark.parametrize("moment, epochs_kept", [("epoch", 1), ("checkpoint", 1), ("metrics", 3)])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted, moment, epochs_kept):
    cfg = tiny_cfg(tmp_path, run_id="cut", method="mixup_cutmix")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, cfg.to_json(), moment], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_dir = tmp_path / "cut"
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["epoch"] == epochs_kept  # the old one survives
    leftovers = list(run_dir.glob(".*.tmp"))
    assert bool(leftovers) == (moment == "checkpoint")  # the half-written file, never renamed
    assert not load_run(run_dir).complete
    with pytest.raises(RunExistsError, match="unfinished"):
        train(cfg)
    train(cfg.replace(resume=True))
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(uninterrupted, run_dir)


# ---------------------------------------------------------------------------------------------
# non-finite loss

def nan_from(monkeypatch, step: int, method: str | None = None) -> None:
    """Make the loss of every method built by the engine (or of ``method`` only) NaN from its
    ``step``-th training step on (the run's one method object also runs the preflight's dry step,
    which is call 1 and is not counted)."""
    import tokenmix.train.engine as E
    build = E.build_method

    def build_nan(cfg, k):
        m = build(cfg, k)
        if method is None or cfg.method == method:
            loss, calls = m.loss, [0]

            def nan_loss(*a, **kw):
                calls[0] += 1
                value, info = loss(*a, **kw)
                return (value * float("nan") if calls[0] - 1 >= step else value), info
            m.loss = nan_loss
        return m
    monkeypatch.setattr(E, "build_method", build_nan)


def test_non_finite_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_from(monkeypatch, step=4 + 2)  # 4 steps per epoch: epoch 2, its 2nd step (index 1)
    cfg = tiny_cfg(tmp_path, run_id="nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at epoch 2, step 1.*the checkpoint after "
                                                 r"epoch 1 is kept"):
        train(cfg)
    run = load_run(tmp_path / "nan")
    assert run.summary["status"] == "failed" and "non-finite loss" in run.summary["error"]
    assert not run.complete and [m["epoch"] for m in run.metrics] == [1]
    ckpt = torch.load(tmp_path / "nan" / CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, monkeypatch):
    nan_from(monkeypatch, step=1)
    with pytest.raises(FloatingPointError, match=r"at epoch 1, step 0; no checkpoint was written yet"):
        train(tiny_cfg(tmp_path, run_id="nan1"))
    assert not (tmp_path / "nan1" / CHECKPOINT).exists()
    assert load_run(tmp_path / "nan1").summary["status"] == "failed"


def test_sweep_goes_on_after_a_non_finite_run(tmp_path, monkeypatch):
    from tokenmix.train.sweep import cell_status, load_grid, run_sweep
    nan_from(monkeypatch, step=1, method="mixup")
    spec = {"name": "nan", "out_dir": str(tmp_path / "runs"), "axes": {"seed": [0]},
            "base": dict(dataset="synthetic", img_size=32, train_subset=32, test_subset=16, epochs=1,
                         warmup_epochs=0.0, batch_size=16, progress=False, model="tiny_deit"),
            "methods": [{"method": "mixup"}, {"method": "cutmix"}]}
    (tmp_path / "g.yaml").write_text(json.dumps(spec))
    grid = load_grid(tmp_path / "g.yaml")
    res = {r.run_id.split("-")[2]: r for r in run_sweep(grid, launcher="inprocess", log=lambda s: None)}
    assert res["mixup"].status == "failed" and "non-finite loss" in res["mixup"].error
    assert res["cutmix"].status == "done"
    assert [cell_status(c) for c in grid.cells] == ["failed", "complete"]


# ---------------------------------------------------------------------------------------------
# bad input: one clear error before any work starts (no run folder, no data loaded)

@pytest.mark.parametrize("fields, match", [
    ({"method": "cutmixx"}, r"unknown method 'cutmixx'; valid: .*cutmix.*transmix"),
    ({"model": "vit_cpuu"}, r"vit_cpuu.*valid"),
    ({"dataset": "mnist"}, r"unknown dataset 'mnist'; valid: fashion_mnist, cifar10"),
    ({"method": "transmix", "variant": "v2"}, r"unknown variant 'v2'; valid: official, paper"),
    ({"img_size": 30}, r"img_size 30 is not divisible by the patch size 4.*valid nearby sizes: .*28, 32"),
    ({"method": "smmix", "method_kwargs": {"placement": "x"}}, r"placement 'x'.*valid"),
    ({"batch_size": 0}, r"batch_size = 0 is invalid: must be >= 1"),
])
def test_bad_config_values(tmp_path, fields, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path, run_id="bad", **fields)


@pytest.mark.parametrize("fields, match", [
    # the token grid is 1 x 1 at 4 px with a stride-4 tokenizer
    ({"method": "smmix", "img_size": 4, "model": "vit_cpu"}, r"smmix.*at least 2x2"),
    ({"method": "tokenmix", "img_size": 4, "model": "vit_cpu", "method_kwargs": {"labels": "area"}},
     r"tokenmix.*token grid"),
    ({"method": "tokenmixup", "model": "tiny_deit", "method_kwargs": {"horizontal_layer": 9}},
     r"horizontal_layer 9 is outside the model's 4 blocks \(valid: 0\.\.3\)"),
    ({"method": "tokenmixup", "model": "tiny_swin"}, r"tokenmixup.*Swin"),
])
def test_method_model_mismatch_fails_before_any_work(tmp_path, fields, match):
    cfg = tiny_cfg(tmp_path, run_id="bad", **fields)
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "bad").exists()


def test_batch_split_over_processes_lists_valid_sizes():
    assert check_batch(32, 2) == 16
    assert check_batch(7, 1) == 7  # an odd batch mixes (its unpaired sample stays unmixed)
    assert check_batch(6, 2) == 3
    with pytest.raises(ConfigError, match=r"batch_size 30 over 4 process\(es\) gives 7.5 images.*4, 8, 16, 32"):
        check_batch(30, 4)
    with pytest.raises(ConfigError, match=r"batch_size 1 over 2 process\(es\) gives 0.5 images"):
        check_batch(1, 2)


def test_teacher_cache_missing_or_stale_fails_before_any_work(tmp_path, teacher_cache):
    data_dir, cache = teacher_cache
    cfg = tiny_cfg(tmp_path, run_id="tm", method="tokenmix", data_dir=str(tmp_path / "nodata"))
    with pytest.raises(TeacherCacheError, match="python -m tokenmix teacher --dataset synthetic --img_size 32"):
        train(cfg)
    assert not (tmp_path / "tm").exists()
    preflight(cfg.replace(data_dir=str(data_dir)))  # the valid cache passes
    stale = tmp_path / "data"
    shutil.copytree(data_dir, stale)
    meta_file = next(stale.glob("teacher_maps/*/meta.json"))
    meta = json.loads(meta_file.read_text())
    meta["splits"]["train"]["data_sha1"] = "0" * 40  # built from other images
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(TeacherCacheError, match=r"stale teacher cache.*maps 512 train images.*--force"):
        train(cfg.replace(data_dir=str(stale)))
    assert not (tmp_path / "tm").exists()


def test_an_output_folder_holding_another_run_is_refused(tmp_path):
    train(tiny_cfg(tmp_path, run_id="taken", epochs=1, train_subset=32, test_subset=16))
    before = (tmp_path / "taken" / "summary.json").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a finished run.*never overwritten"):
        train(tiny_cfg(tmp_path, run_id="taken", method="mixup", epochs=1))
    with pytest.raises(RunExistsError, match=r"cannot resume .* method \(recorded 'cutmix', now 'mixup'\)"):
        train(tiny_cfg(tmp_path, run_id="taken", method="mixup", epochs=1, resume=True))
    assert (tmp_path / "taken" / "summary.json").read_bytes() == before


@pytest.mark.parametrize("method", ["none", "mixup", "cutmix", "mixup_cutmix", "transmix", "tl_align", "smmix",
                                    "tokenmixup"])
def test_preflight_passes_valid_configs_and_leaves_the_rng_alone(tmp_path, method):
    cfg = tiny_cfg(tmp_path, run_id="ok", method=method, model="tiny_deit")
    torch.manual_seed(123)
    preflight(cfg, world_size=2)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    assert not (tmp_path / "ok").exists()


def test_cli_reports_a_method_model_mismatch_in_one_line(tmp_path, capsys):
    from tokenmix.__main__ import main
    rc = main(["train", "--method", "smmix", "--dataset", "synthetic", "--img_size", "4", "--out_dir", str(tmp_path),
               "--run_id", "x", "--progress", "false", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("tokenmix train: error: method 'smmix'") and "Traceback" not in err
    assert not (tmp_path / "x").exists()
