"""A 2-process torchrun (gloo, CPU) smoke test: the run completes and rank 0 alone writes records."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tokenmix", "train", "--dataset", "synthetic", "--img_size", "32", "--train_subset", "128",
           "--test_subset", "50", "--epochs", "2", "--batch_size", "32", "--method", "cutmix",
           "--out_dir", str(tmp_path), "--run_id", "ddp", "--progress", "false", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["world_size"] == 2
    metrics = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    # only rank 0 logs epochs; each epoch line appears once
    assert proc.stdout.count("[tokenmix] epoch 1/2") == 1
    # evaluation covered every test image exactly once across the two ranks (50 = 25 + 25):
    # top-1 is then a multiple of 2 %
    assert abs(metrics[-1]["top1"] * 50 / 100 - round(metrics[-1]["top1"] * 50 / 100)) < 1e-6
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "config.json",
                                                                     "metrics.jsonl", "summary.json"]
