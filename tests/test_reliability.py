"""Reliability: one process per run (a lock tried with real processes), records never rewritten,
damaged files named in one line, bad input refused in one line before anything is written (with a
property test over every CLI option and grid key), sweeps from any folder, several sweep workers
running each cell once, record files that follow the umask."""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from tokenmix.__main__ import main
from tokenmix.train.config import ConfigError, RunConfig
from tokenmix.train.engine import train
from tokenmix.train.runs import (CHECKPOINT, CONFIG, LOCK_OWNER, METRICS, SUMMARY, DamagedRecordError, RecordWarning,
                                 RunExistsError, RunLock, RunLockedError, atomic_write_json, list_runs, load_run,
                                 lock_holder)
from tokenmix.train.sweep import cell_status, grid_root, load_grid, run_sweep

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
TINY = dict(dataset="synthetic", img_size=32, train_subset=64, test_subset=32, epochs=2, batch_size=32,
            progress=False, warmup_epochs=0.5, device="cpu", model="tiny_deit")


def tiny(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(**{**TINY, "out_dir": str(tmp_path), "data_dir": str(tmp_path / "data"), **kw})


def cli(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.is_file()}


# a process that holds a run folder's lock until its stdin closes
HOLDER = r"""
import sys, time
from tokenmix.train.runs import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=ENV, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked", p.stderr.read()
    return p


# ---------------------------------------------------------------------------------------------
# 1. one process per run folder

def test_a_second_process_is_refused_naming_the_owner_and_a_dead_owners_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    holder = start_holder(run_dir)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by process {holder.pid} on host"):
            RunLock(run_dir).acquire()
        assert lock_holder(run_dir)["pid"] == holder.pid
        # the CLI on the same run id: one line, exit 2, nothing written into the folder
        (run_dir / ".metrics.jsonl.1-ab.tmp").write_text("the owner's temp file")
        rc, _, err = cli("train", *sum(([f"--{k}", str(v)] for k, v in TINY.items()), []),
                         "--out_dir", str(tmp_path / "runs"), "--run_id", "r", "--data_dir", str(tmp_path / "d"))
        assert rc == 2 and err.count("\n") == 1 and str(holder.pid) in err and "Traceback" not in err
        assert (run_dir / ".metrics.jsonl.1-ab.tmp").exists()  # its temp files are left alone
        assert not (run_dir / CONFIG).exists()
    finally:
        holder.kill()  # SIGKILL: the lock dies with the process, its owner record stays
        holder.wait()
    assert (run_dir / LOCK_OWNER).exists()
    assert lock_holder(run_dir) is None
    messages = []
    lock = RunLock(run_dir, log=messages.append).acquire()
    assert lock.took_over["pid"] == holder.pid
    assert "taking over the lock" in messages[0] and "no longer holds it" in messages[0]
    assert json.loads((run_dir / LOCK_OWNER).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_OWNER).exists()


def test_an_owner_record_naming_a_live_pid_does_not_block_a_free_lock(tmp_path):
    """A dead owner's pid reused by another process: the flock is free, so the lock is taken over."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    atomic_write_json(run_dir / LOCK_OWNER, {"host": "h", "pid": 1, "token": "h:1:x", "since": "then"})
    (run_dir / ".lock").touch()
    messages = []
    with RunLock(run_dir, log=messages.append) as lock:
        assert lock.took_over["pid"] == 1 and "taking over" in messages[0]


def test_probing_a_lock_never_makes_a_real_claim_fail(tmp_path):
    import threading

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "keep").touch()
    RunLock(run_dir).acquire().release()  # a folder with a lock file
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            lock_holder(run_dir)

    t = threading.Thread(target=probe)
    t.start()
    try:
        for _ in range(40):
            RunLock(run_dir).acquire().release()
    finally:
        stop.set()
        t.join()


def test_a_claim_waiting_while_the_holder_removes_its_empty_folder_gets_the_lock(tmp_path):
    import threading

    for k in range(20):
        run_dir = tmp_path / f"r{k}"
        holder = RunLock(run_dir).acquire()  # made the folder; holds nothing else
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(RunLock(run_dir).acquire()))
        t.start()
        time.sleep(0.05)
        holder.release()  # removes the empty folder while the other waits
        t.join()
        assert isinstance(got[0], RunLock) and got[0].held
        got[0].release()
        assert not run_dir.exists()


def test_a_refused_claim_leaves_the_holders_files(tmp_path):
    run_dir = tmp_path / "fresh"
    holder = start_holder(run_dir)  # the holder made the folder
    try:
        with pytest.raises(RunLockedError):
            RunLock(run_dir).acquire()
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", LOCK_OWNER]
        assert lock_holder(run_dir)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_two_trainings_on_one_run_id_one_trains_the_other_is_refused(tmp_path):
    # both with resume=True (a sweep launched twice): only the lock keeps them apart
    cfg = tiny(tmp_path, run_id="same", epochs=12, train_subset=512, batch_size=16, resume=True)
    args = [sys.executable, "-m", "tokenmix", "train"]
    for k, v in cfg.to_dict().items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)]
    a = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while lock_holder(tmp_path / "same") is None and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    b = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    out_a, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a
    assert b.returncode == 2 and "in use by process" in b.stderr and "Traceback" not in b.stderr, b.stderr
    run = load_run(tmp_path / "same")
    assert run.complete and [m["epoch"] for m in run.metrics] == list(range(1, 13))  # one run's records, not two
    assert not (tmp_path / "same" / LOCK_OWNER).exists()


@pytest.mark.parametrize("then", ["another process claims it", "nobody claims it"])
def test_a_run_started_for_a_claim_stops_or_takes_over_when_its_claimant_dies(tmp_path, monkeypatch, then):
    """A run started by a sweep worker writes under the worker's lock (joined through the token);
    if the worker dies, the run takes the lock itself, or stops before writing when another
    process got it first."""
    run_dir = tmp_path / "r"
    holder = start_holder(run_dir)
    others = []
    monkeypatch.setenv("TOKENMIX_LOCK_TOKEN", json.loads((run_dir / LOCK_OWNER).read_text())["token"])

    def after_epoch(epoch, record):
        if epoch == 1:
            holder.kill()
            holder.wait()
            if then == "another process claims it":
                others.append(start_holder(run_dir))

    cfg = tiny(tmp_path, run_id="r", epochs=2)
    try:
        if then == "another process claims it":
            with pytest.raises(RunLockedError, match="has ended and another one holds"):
                train(cfg, callbacks=[after_epoch])
            assert torch.load(run_dir / CHECKPOINT, weights_only=False)["epoch"] == 1  # nothing written after
            assert len(load_run(run_dir).metrics) == 1 and not (run_dir / SUMMARY).exists()
        else:
            assert train(cfg, callbacks=[after_epoch])["status"] == "complete"
            assert lock_holder(run_dir) is None and not (run_dir / LOCK_OWNER).exists()
    finally:
        for p in [holder, *others]:
            p.kill()
            p.wait()


def test_a_run_refused_after_its_folder_was_made_leaves_nothing(tmp_path, monkeypatch):
    import tokenmix.train.engine as E

    def boom(*a, **k):
        raise FileNotFoundError("no such dataset file")

    monkeypatch.setattr(E, "build_datasets", boom)
    with pytest.raises(FileNotFoundError):
        train(tiny(tmp_path, run_id="gone"))
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 2. results are never rewritten

def test_a_finished_run_is_never_changed_by_a_resume_with_other_settings(tmp_path):
    cfg = tiny(tmp_path, run_id="done")
    train(cfg)
    before = snapshot(tmp_path / "done")
    for change in ({"epochs": 3}, {"lr": 1e-3}, {"seed": 1}, {"mix_prob": 0.5}):
        with pytest.raises(RunExistsError, match=f"differs in {next(iter(change))} "):
            train(cfg.replace(resume=True, **change))
    assert train(cfg.replace(resume=True, data_dir=str(tmp_path / "elsewhere"), progress=True))["status"] == "complete"
    assert snapshot(tmp_path / "done") == before
    rc, _, err = cli("train", "--resume", "true", "--epochs", "3", *sum(([f"--{k}", str(v)] for k, v in TINY.items()
                                                                        if k != "epochs"), []),
                     "--out_dir", str(tmp_path), "--run_id", "done", "--data_dir", str(tmp_path / "data"))
    assert rc == 2 and "epochs (recorded 2, now 3)" in err and err.count("\n") == 1
    assert snapshot(tmp_path / "done") == before


def write_grid(path: Path, out_dir: Path, epochs: int = 2, seeds=(0, 1), methods=("cutmix", "mixup")) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "g", "out_dir": str(out_dir),
        "base": {**TINY, "epochs": epochs, "data_dir": str(out_dir.parent / "data")},
        "axes": {"seed": list(seeds)}, "methods": [{"method": m} for m in methods]}))
    return path


def test_an_edited_grid_never_overwrites_its_old_cells(tmp_path):
    grid_file = write_grid(tmp_path / "g.yaml", tmp_path / "runs", methods=("cutmix",), seeds=(0,))
    grid = load_grid(grid_file)
    run_sweep(grid, launcher="inprocess", log=lambda m: None)
    run_dir = Path(grid.out_dir) / grid.cells[0].run_id
    before = snapshot(run_dir)
    edited = load_grid(write_grid(tmp_path / "g.yaml", tmp_path / "runs", epochs=3, methods=("cutmix",), seeds=(0,)))
    assert cell_status(edited.cells[0], detail=True) == ("stale", "its record differs in epochs (recorded 2, now 3)")
    rc, out, _ = cli("sweep", str(grid_file), "--dry-run")
    assert rc == 0 and "[stale]" in out and "epochs (recorded 2, now 3)" in out
    logs = []
    results = run_sweep(edited, launcher="inprocess", log=logs.append)
    assert [r.status for r in results] == ["stale"] and "left untouched" in logs[0]
    assert snapshot(run_dir) == before
    assert cli("sweep", str(grid_file), "--launcher", "inprocess")[0] == 1  # not all cells are done


# ---------------------------------------------------------------------------------------------
# 3. damaged records

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run and an interrupted one (1 of 2 epochs), to be copied and damaged."""
    root = tmp_path_factory.mktemp("finished")
    train(tiny(root, run_id="full"))

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(root, run_id="cut"), callbacks=[stop])
    return root


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_checkpoint_is_named_on_resume(finished, tmp_path):
    run_dir = copy_run(finished / "cut", tmp_path / "cut")
    data = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedRecordError, match=r"checkpoint.pt is damaged .*delete it to retrain"):
        train(tiny(tmp_path, run_id="cut", resume=True))
    rc, _, err = cli("train", "--resume", "true", *sum(([f"--{k}", str(v)] for k, v in TINY.items()), []),
                     "--out_dir", str(tmp_path), "--run_id", "cut", "--data_dir", str(tmp_path / "data"))
    assert rc == 2 and "checkpoint.pt is damaged" in err and err.count("\n") == 1


def test_damaged_json_and_metrics_lines_are_named(finished, tmp_path):
    run_dir = copy_run(finished / "full", tmp_path / "full")
    (run_dir / SUMMARY).write_text('{"status": "compl')
    with pytest.raises(DamagedRecordError, match=r"summary.json is damaged \(not valid JSON"):
        load_run(run_dir)
    (run_dir / SUMMARY).write_text("[1, 2]")
    with pytest.raises(DamagedRecordError, match=r"summary.json is damaged \(a JSON list"):
        load_run(run_dir)
    run_dir = copy_run(finished / "full", tmp_path / "mid")
    lines = (run_dir / METRICS).read_text().splitlines()
    (run_dir / METRICS).write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(DamagedRecordError, match=r"metrics.jsonl is damaged \(line 1 of 2"):
        load_run(run_dir)


def test_a_torn_last_metrics_line_is_recovered_from_the_checkpoint(finished, tmp_path):
    good = load_run(finished / "full").metrics
    run_dir = copy_run(finished / "full", tmp_path / "full")
    text = (run_dir / METRICS).read_text()
    (run_dir / METRICS).write_text(text[: len(text) - 40])
    with pytest.warns(RecordWarning, match="recovered from checkpoint.pt"):
        assert load_run(run_dir).metrics == good
    (run_dir / CHECKPOINT).unlink()  # no checkpoint: the torn line is left out, with a warning
    with pytest.warns(RecordWarning, match="torn and no checkpoint"):
        assert load_run(run_dir).metrics == good[:-1]


def test_report_and_sweep_skip_a_damaged_run_and_carry_on(finished, tmp_path):
    runs = tmp_path / "runs"
    copy_run(finished / "full", runs / "synthetic-tiny_deit-cutmix-s0")
    copy_run(finished / "full", runs / "synthetic-tiny_deit-cutmix-s1")
    (runs / "synthetic-tiny_deit-cutmix-s1" / SUMMARY).write_text("not json")
    with pytest.warns(RecordWarning, match="skipped run synthetic-tiny_deit-cutmix-s1"):
        assert [r.run_id for r in list_runs(runs)] == ["synthetic-tiny_deit-cutmix-s0"]
    with pytest.raises(DamagedRecordError):
        list_runs(runs, damaged="raise")
    rc, out, err = cli("report", "--runs", str(runs), "--figures", str(tmp_path / "fig"))
    assert rc == 0 and "tokenmix: warning: skipped run synthetic-tiny_deit-cutmix-s1" in err, err
    assert (tmp_path / "fig" / "results.csv").is_file()
    grid_file = write_grid(tmp_path / "g.yaml", runs, methods=("cutmix",), seeds=(0, 1, 2))
    # the copies were made with the run ids "full": their configs differ in run_id only
    for s in (0, 1):
        cfg_file = runs / f"synthetic-tiny_deit-cutmix-s{s}" / CONFIG
        if s == 0:
            c = json.loads(cfg_file.read_text())
            c.update(run_id=cfg_file.parent.name, seed=0, out_dir=str(runs), resume=True,
                     data_dir=str(tmp_path / "data"))
            atomic_write_json(cfg_file, c)
    rc, out, _ = cli("sweep", str(grid_file), "--dry-run")
    assert rc == 0 and "-s1  [damaged]" in out and "summary.json is damaged" in out and "-s2  [new]" in out, out
    logs = []
    results = run_sweep(load_grid(grid_file), launcher="inprocess", log=logs.append)
    assert [r.status for r in results] == ["skipped", "damaged", "done"], logs


def test_a_measurement_on_a_damaged_checkpoint_keeps_the_stored_table(tmp_path):
    import pandas as pd

    from tokenmix.analysis.records import cached_measurement

    ck = tmp_path / "run" / CHECKPOINT
    ck.parent.mkdir()
    ck.write_bytes(b"v1")
    stored = cached_measurement(tmp_path, "m", [ck], {"p": 1}, lambda: pd.DataFrame({"a": [1.0]}))
    ck.write_bytes(b"v2, truncated")

    def damaged():
        raise DamagedRecordError(f"{ck} is damaged (EOFError)")

    with pytest.warns(RecordWarning, match="is damaged .*the stored measurement is used"):
        assert cached_measurement(tmp_path, "m", [ck], {"p": 1}, damaged).equals(stored)
    with pytest.warns(RecordWarning, match="skipped"):
        assert cached_measurement(tmp_path, "other", [ck], {"p": 1}, damaged) is None


def test_records_that_parse_but_are_not_records_are_damaged(finished, tmp_path):
    run_dir = copy_run(finished / "full", tmp_path / "full")
    good = (run_dir / CONFIG).read_text()
    (run_dir / CONFIG).write_text("{}")
    with pytest.raises(DamagedRecordError, match=r"config.json is damaged \(no method\)"):
        load_run(run_dir)
    (run_dir / CONFIG).write_text(good)
    summary = json.loads((run_dir / SUMMARY).read_text())
    atomic_write_json(run_dir / SUMMARY, {**summary, "final_top1": None})
    with pytest.raises(DamagedRecordError, match="status complete but final_top1 not a number"):
        load_run(run_dir)


def test_a_sweep_leaves_a_run_with_a_damaged_checkpoint_untouched(finished, tmp_path):
    runs = tmp_path / "runs"
    grid_file = write_grid(tmp_path / "g.yaml", runs, methods=("cutmix",), seeds=(0,))
    cell = load_grid(grid_file).cells[0]
    run_dir = copy_run(finished / "cut", runs / cell.run_id)
    c = json.loads((run_dir / CONFIG).read_text())
    atomic_write_json(run_dir / CONFIG, {**c, "run_id": cell.run_id})
    data = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(data[: len(data) // 2])
    assert cell_status(cell) == "damaged"
    before = snapshot(run_dir)
    assert [r.status for r in run_sweep(load_grid(grid_file), launcher="inprocess", log=lambda m: None)] == ["damaged"]
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("argv, message", [
    (["report", "--runs", "{tmp}/typo"], "argument --runs: {tmp}/typo is not a folder"),
    (["report", "--runs", "{tmp}", "--figures", "{tmp}/afile"], "afile is a file, not a folder"),
    (["report", "--runs", "{tmp}", "--readme", "{tmp}/none.md"], "none.md is not a file"),
    (["teacher", "--epochs", "0", "--data_dir", "{tmp}/d"], "argument --epochs: must be >= 1"),
    (["teacher", "--top_k", "0", "--data_dir", "{tmp}/d"], "argument --top_k: must be >= 1"),
    (["teacher", "--lr", "nan", "--data_dir", "{tmp}/d"], "argument --lr: must be a finite number > 0"),
    (["teacher", "--checkpoint", "{tmp}/none.pt", "--data_dir", "{tmp}/d"], "none.pt does not exist"),
    (["methods", "bogus"], "unexpected argument(s) bogus"),
    (["sweep", "{tmp}/none.yaml"], "none.yaml"),
])
def test_other_commands_refuse_bad_input_in_one_line(argv, message, tmp_path):
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = cli(*argv)
    assert rc == 2 and err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert files_under(tmp_path) == ["afile"]


def test_a_relative_out_dir_is_the_callers(tmp_path, monkeypatch):
    grid_file = write_grid(tmp_path / "g.yaml", tmp_path / "runs")
    monkeypatch.chdir(tmp_path / "..")
    assert load_grid(grid_file, "rel").out_dir == str(Path.cwd() / "rel")


# ---------------------------------------------------------------------------------------------
# 4. bad input: one line, exit 2, nothing on disk

BASE_ARGS = ["--dataset", "synthetic", "--img_size", "32", "--model", "tiny_deit", "--train_subset", "64",
             "--test_subset", "32", "--batch_size", "32", "--epochs", "1", "--progress", "false", "--device", "cpu"]
BAD_TRAIN = {
    "cuda": (["--device", "cuda"], "device 'cuda' is not available on this machine; available: auto, cpu"),
    "cuda:0": (["--device", "cuda:0"], "device 'cuda:0' is not available"),
    "mps": (["--device", "mps"], "device 'mps' is not available"),
    "tpu": (["--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N, mps"),
    "imagenet": (["--dataset", "imagenet", "--img_size", "224", "--train_subset", "0", "--test_subset", "0",
                  "--model", "tiny_deit"], "train/<class>/*.JPEG"),
    "cifar": (["--dataset", "cifar100", "--download", "false"], "cifar-100-python not found"),
    "lr inf": (["--lr", "inf"], "RunConfig.lr = inf is invalid: must be a finite number"),
    "lr nan": (["--lr", "nan"], "RunConfig.lr = nan is invalid"),
    "lr 0": (["--lr", "0"], "RunConfig.lr = 0.0 is invalid: must be > 0"),
    "epochs 0": (["--epochs", "0"], "RunConfig.epochs = 0 is invalid"),
    "subset big": (["--train_subset", "100000"], "more than the 512 images of synthetic's training split"),
    "subset small": (["--train_subset", "10"], "batch_size = 32 is more than the 10 training images"),
    "test subset big": (["--test_subset", "129"], "more than the 128 images of synthetic's test split"),
    "seed": (["--seed", "-1"], "RunConfig.seed = -1 is invalid"),
    "run_id": (["--run_id", "../up"], "must be a plain folder name"),
    "randaugment": (["--randaugment", "auto-m9"], "is not a timm RandAugment spec"),
    "img huge": (["--img_size", "4096"], "more than the 9216 supported"),
    "patch": (["--patch_size", "-4"], "RunConfig.patch_size = -4 is invalid"),
    "epochs x": (["--epochs", "x"], "argument --epochs: invalid int value: 'x'; see --help"),
    "unknown option": (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    "kwargs": (["--method_kwargs", '{"nosuch": 1}'], "has no parameter(s) nosuch"),
    "out under a file": (["--out_dir", "{tmp}/afile/runs"], "afile is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_input_is_one_line_exit_2_and_nothing_written(case, tmp_path):
    argv, message = BAD_TRAIN[case]
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = cli("train", *BASE_ARGS, "--out_dir", str(tmp_path / "runs"), "--data_dir", str(tmp_path / "data"),
                       *argv)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert files_under(tmp_path) == ["afile"]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="finite"):
        main(["train", "--lr", "inf", "--debug", "--out_dir", str(tmp_path)])


def test_one_epoch_works_with_the_default_warmup(tmp_path):
    cfg = RunConfig(**{**TINY, "epochs": 1, "warmup_epochs": RunConfig.defaults()["warmup_epochs"]},
                    out_dir=str(tmp_path), run_id="one")
    assert cfg.warmup_epochs == 1.0 and train(cfg)["status"] == "complete"


BAD_GRIDS = {
    "dup seed": ({"axes": {"seed": [0, 0]}}, "axis 'seed' repeats the value(s) 0"),
    "base key": ({"base": {**TINY, "epoch": 3}}, "base: unknown RunConfig key(s) epoch; valid: amp, batch_size"),
    "axis key": ({"axes": {"seeds": [0, 1]}}, "axes: unknown RunConfig key(s) seeds; valid:"),
    "entry key": ({"methods": [{"method": "cutmix", "lable": "x"}]}, "unknown key(s) lable; valid: label, extended"),
    "regime key": ({"regimes": [{"name": "r", "epochz": 1}]}, "regime 'r': unknown RunConfig key(s) epochz"),
    "methods": ({"methods": "cutmix"}, "needs a non-empty `methods` list"),
    "entry type": ({"methods": ["cutmix"]}, "methods entry 0 must be a mapping"),
    "top key": ({"runs": 3}, "unknown key(s) runs; valid: name, description"),
    "bad value": ({"base": {**TINY, "lr": -1}}, "RunConfig.lr = -1.0 is invalid"),
    "reserved": ({"methods": [{"method": "cutmix", "run_id": "x"}]}, "run_id cannot be set here"),
    "axis clash": ({"axes": {"method": ["mixup"]}}, "sets method, which the axes vary"),
    "extended": ({"methods": [{"method": "cutmix", "extended": "maybe"}]}, "extended must be true or false"),
    "label": ({"methods": [{"method": "cutmix", "label": None}]}, "label must be a string"),
    "device": ({"base": {**TINY, "device": "cuda:3"}}, "cannot run: device 'cuda:3' is not available"),
    "teacher": ({"methods": [{"method": "tokenmix"}]}, "cannot run:"),
    "only": ({}, "--only 'zzz' matches none"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grids_are_one_line_exit_2(case, tmp_path):
    change, message = BAD_GRIDS[case]
    spec = {"name": "g", "out_dir": str(tmp_path / "runs"), "base": dict(TINY), "axes": {"seed": [0]},
            "methods": [{"method": "cutmix"}], **change}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    for extra in (["--dry-run"], ["--launcher", "inprocess"]):
        rc, out, err = cli("sweep", str(tmp_path / "g.yaml"), *extra, *(["--only", "zzz"] if case == "only" else []))
        assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert files_under(tmp_path) == ["g.yaml"]


# ---------------------------------------------------------------------------------------------
# 4b. property test: random values for every option and grid key

def _property_values():
    from hypothesis import strategies as st

    return st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 2, 10**9, -(2**40)]),
                     st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from(["", "cpu", "cuda:1", "mps", "auto", "cutmix", "tiny_deit", "vit_cpu",
                                      "synthetic", "imagenet", "true", "false", "token", "{}", '{"a": 1}',
                                      "rand-m9-mstd0.5", "x/y", "..", "\u00e9t\u00e9", "a b"]),
                     st.text(max_size=12), st.booleans())


def _typed_values(t: type):
    """Values of a field's own type (most pass argparse and reach the validation)."""
    from hypothesis import strategies as st

    return {int: st.one_of(st.integers(-5, 400), st.sampled_from([0, 1, 2, 10**6, 2**32, -1])),
            float: st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                             st.floats(0, 2), st.sampled_from([0.0, 1.0, 1e-9, 1e30, -0.5])),
            bool: st.booleans(), str: st.one_of(st.text(max_size=12), st.sampled_from(["cpu", "auto", "x"])),
            dict: st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2, 9), st.text(max_size=4)), max_size=2),
            }[t]


def test_property_every_train_option_exit_0_or_one_line_exit_2_and_nothing_written():
    import typing

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    hints = typing.get_type_hints(RunConfig)
    # fields whose valid values can be expensive (long runs, big models, downloads, global thread
    # counts, folders outside the test's own) are tried as --dry-run only
    dry_only = {"epochs", "model", "img_size", "train_subset", "test_subset", "eval_train", "dataset", "download",
                "threads", "num_workers", "out_dir", "data_dir", "batch_size", "patch_size"}

    seen: dict[tuple[int, bool], int] = {}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(st.data())
    def prop(data):
        field = data.draw(st.sampled_from(RunConfig.field_names()), label="field")
        value = data.draw(st.one_of(_typed_values(hints[field]), _property_values()), label="value")
        dry = field in dry_only or data.draw(st.integers(0, 3), label="dry") > 0  # 1 in 4: a real tiny run
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            text = json.dumps(value) if isinstance(value, dict) else str(value)
            argv = ["train", *BASE_ARGS, "--out_dir", str(root / "runs"), "--data_dir", str(root / "data"),
                    f"--{field}", text, *(["--dry-run"] if dry else [])]
            rc, out, err = cli(*argv)
            seen[(rc, dry)] = seen.get((rc, dry), 0) + 1
            if rc == 1:  # a valid value that trains into a non-finite loss (e.g. lr 1e30): a failed record
                assert "non-finite loss" in err and err.count("\n") == 1, (argv, err)
                return
            assert rc in (0, 2), (argv, rc, err)
            if rc == 2:
                assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
                assert files_under(root) == [], argv
            else:
                assert not [f for f in files_under(root) if f.endswith(".tmp") or LOCK_OWNER in f], argv
                assert dry or load_run(next((root / "runs").iterdir())).complete, argv

    prop()
    assert seen.get((2, True), 0) + seen.get((2, False), 0) >= 20 and seen.get((0, True), 0) >= 10
    assert seen.get((0, False), 0) >= 3  # some random values made real runs


def test_property_every_grid_key_exit_0_or_one_line_exit_2_and_nothing_written():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = [("top", k) for k in ("name", "description", "out_dir", "notebook", "base", "regimes", "axes", "methods",
                                 "nosuch")] \
        + [("base", k) for k in RunConfig.field_names() + ["nosuch"]] + [("axis", "seed"), ("axis", "lr"),
                                                                        ("entry", "label"), ("entry", "extended")]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(st.sampled_from(keys), st.one_of(_property_values(), st.lists(_property_values(), max_size=3),
                                            st.dictionaries(st.sampled_from(["lr", "seed", "method", "x"]),
                                                            _property_values(), max_size=2)))
    def prop(key, value):
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            spec = {"name": "g", "out_dir": str(root / "runs"),
                    "base": {**TINY, "data_dir": str(root / "data")}, "axes": {"seed": [0]},
                    "methods": [{"method": "cutmix"}]}
            where, k = key
            if where == "top":
                spec[k] = value
            elif where == "base":
                spec["base"][k] = value
            elif where == "axis":
                spec["axes"][k] = value
            else:
                spec["methods"][0][k] = value
            (root / "g.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
            rc, out, err = cli("sweep", str(root / "g.yaml"), "--dry-run")
            assert rc in (0, 2), (key, value, err)
            if rc == 2:
                assert err.count("\n") == 1 and "Traceback" not in err, (key, value, err)
            assert files_under(root) == ["g.yaml"], (key, value)

    prop()


# ---------------------------------------------------------------------------------------------
# 5. sweeps from any folder (the non-finite message: test_fault_tolerance)

def test_a_sweep_resolves_its_paths_against_the_grid_and_runs_from_any_folder(tmp_path):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    spec = {"name": "g", "out_dir": "results/g", "base": {**TINY, "epochs": 1}, "axes": {"seed": [0]},
            "methods": [{"method": "cutmix"}]}
    (project / "configs" / "g.yaml").write_text(yaml.safe_dump(spec))
    grid = load_grid(project / "configs" / "g.yaml")
    assert grid_root(project / "configs" / "g.yaml") == project.resolve()
    assert grid.out_dir == str(project.resolve() / "results" / "g")
    assert grid.cells[0].config.data_dir == str(project.resolve() / "data")
    assert Path(grid.notebook).is_file() and Path(grid.notebook).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "tokenmix", "sweep", str(project / "configs" / "g.yaml")], cwd=elsewhere,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_run(project / "results" / "g" / grid.cells[0].run_id).complete
    assert (project / "results" / "g" / grid.cells[0].run_id / "10_train.ipynb").is_file()  # papermill
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 6. several workers split one sweep

def test_two_workers_split_a_sweep_each_cell_runs_once_and_the_report_matches_one_worker(tmp_path):
    two = write_grid(tmp_path / "two.yaml", tmp_path / "two" / "runs", epochs=2)
    one = write_grid(tmp_path / "one.yaml", tmp_path / "one" / "runs", epochs=2)
    cmd = [sys.executable, "-m", "tokenmix", "sweep", "--launcher", "inprocess"]
    workers = [subprocess.Popen(cmd + [str(two)], env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    grid = load_grid(two)
    for cell in grid.cells:
        started = sum(log.count(f"{cell.run_id}: starting") for log in logs)
        assert started == 1, (cell.run_id, logs)
        run = load_run(Path(grid.out_dir) / cell.run_id)
        assert run.complete and [m["epoch"] for m in run.metrics] == [1, 2]
    assert sum(log.count(": starting") for log in logs) == 4
    r = subprocess.run(cmd + [str(one)], env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout
    import pandas as pd

    tables = []
    for name in ("one", "two"):
        assert cli("report", "--runs", str(tmp_path / name / "runs"), "--figures", str(tmp_path / name / "fig"))[0] == 0
        tables.append(pd.read_csv(tmp_path / name / "fig" / "results.csv").drop(
            columns=["time_per_epoch_s", "images_per_s", "rel_time_vs_cutmix"]))
    assert len(tables[0]) == 2 and tables[0].equals(tables[1])  # every number but the timings


# ---------------------------------------------------------------------------------------------
# 7. record files follow the umask

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_record_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        train(tiny(tmp_path, run_id="m", epochs=1, checkpoint_every=1))
    finally:
        os.umask(old)
    for f in (tmp_path / "m").iterdir():
        if f.name != ".lock":
            assert stat.S_IMODE(f.stat().st_mode) == mode, f.name
