"""Run records: atomic writes, loading and listing, git commit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tokenmix.train import runs as R


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "deep" / "er" / "f.bin"
    R.atomic_write_bytes(p, b"first")
    assert p.read_bytes() == b"first"
    R.atomic_write_bytes(p, b"second, longer content")
    assert p.read_bytes() == b"second, longer content"
    R.atomic_write_bytes(p, b"")
    assert p.read_bytes() == b""
    assert sorted(os.listdir(p.parent)) == ["f.bin"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "summary.json"
    R.atomic_write_json(p, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        R.atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_atomic_write_json_and_torch_save(tmp_path):
    obj = {"b": [1, 2.5, "x"], "a": {"nested": True}, "path": Path("/x/y")}
    R.atomic_write_json(tmp_path / "c.json", obj)
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"b": [1, 2.5, "x"], "a": {"nested": True}, "path": "/x/y"}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")  # sorted keys
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    R.atomic_torch_save(state, tmp_path / "ck.pt")
    back = torch.load(tmp_path / "ck.pt")
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    assert sorted(os.listdir(tmp_path)) == ["c.json", "ck.pt"]


def test_write_metrics_one_line_per_record(tmp_path):
    hist = [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.625, "loss": 1.25}]
    R.write_metrics(tmp_path / R.METRICS, hist)
    lines = (tmp_path / R.METRICS).read_text().splitlines()
    assert [json.loads(x) for x in lines] == hist
    R.write_metrics(tmp_path / R.METRICS, hist[:1])  # rewrite, not append
    assert len((tmp_path / R.METRICS).read_text().splitlines()) == 1


def make_run(root: Path, run_id: str, status: str | None = "complete", metrics=None) -> Path:
    d = root / run_id
    R.atomic_write_json(d / R.CONFIG, {"method": "cutmix", "seed": 0, "run_id": run_id})
    if metrics is not None:
        (d / R.METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics) + "\n\n")
    if status is not None:
        R.atomic_write_json(d / R.SUMMARY, {"status": status, "best_acc": 0.9})
    return d


def test_load_run(tmp_path):
    d = make_run(tmp_path, "r1", metrics=[{"epoch": 1}, {"epoch": 2}])
    run = R.load_run(d)
    assert run.run_id == "r1" and run.path == d
    assert run.config == {"method": "cutmix", "seed": 0, "run_id": "r1"}
    assert run.metrics == [{"epoch": 1}, {"epoch": 2}]  # blank lines skipped
    assert run.summary == {"status": "complete", "best_acc": 0.9} and run.complete


@pytest.mark.parametrize("status", [None, "running", "failed"])
def test_incomplete_runs(tmp_path, status):
    run = R.load_run(make_run(tmp_path, "r", status=status))
    assert not run.complete and run.metrics == []
    assert (run.summary is None) == (status is None)


def test_load_run_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        R.load_run(tmp_path / "empty")


def test_list_runs(tmp_path):
    for rid in ("b-run", "a-run", "c-run"):
        make_run(tmp_path, rid)
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    assert [r.run_id for r in R.list_runs(tmp_path)] == ["a-run", "b-run", "c-run"]
    assert R.list_runs(tmp_path / "missing") == []


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit(repo_root, tmp_path):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True)
    c = R.git_commit(repo_root)
    assert isinstance(c, str) and c
    if sha.returncode == 0:
        assert c.split("-dirty")[0] == sha.stdout.strip() and len(c.split("-")[0]) == 40
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True).stdout.strip()
        assert c.endswith("-dirty") == bool(dirty)
    assert R.git_commit() == c  # default: the package's own checkout
    assert R.git_commit(tmp_path) == "unknown"
