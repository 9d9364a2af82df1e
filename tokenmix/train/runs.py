"""Run records: ``runs/<run_id>/`` with ``config.json``, ``metrics.jsonl`` (one line per epoch),
``summary.json``, ``checkpoint.pt`` and, for papermill runs, the executed notebook.

Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
crash never leaves a half-written record. Report code reads only these files.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"


def epoch_checkpoint_name(epoch: int) -> str:
    """The file of the weights kept after ``epoch`` (``RunConfig.checkpoint_every``)."""
    return f"checkpoint-e{epoch:04d}.pt"


class RunExistsError(FileExistsError):
    """The output folder already holds a run that this call must not overwrite."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_metrics(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the full history (kept in the checkpoint, so the two agree)."""
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode())


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or "unknown"."""
    try:
        here = cwd or Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Run:
    """A run record loaded from disk."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "complete"

    def epoch_checkpoints(self) -> dict[int, Path]:
        """{epoch: file} of the weights kept during training (``RunConfig.checkpoint_every``)."""
        out = {}
        for f in sorted(self.path.glob("checkpoint-e*.pt")):
            try:
                out[int(f.stem.split("-e")[1])] = f
            except ValueError:
                continue
        return out

    @property
    def has_checkpoint(self) -> bool:
        """Complete, with its final ``checkpoint.pt`` (a model that can be evaluated)."""
        return self.complete and (self.path / "checkpoint.pt").is_file()


def load_run(path: str | Path) -> Run:
    """Read a run folder. Raises FileNotFoundError when it has no ``config.json``."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds no run record ({CONFIG} missing)")
    config = json.loads((path / CONFIG).read_text())
    metrics = []
    if (path / METRICS).is_file():
        metrics = [json.loads(line) for line in (path / METRICS).read_text().splitlines() if line.strip()]
    summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else None
    return Run(path, config, metrics, summary)


def list_runs(root: str | Path = "runs") -> list[Run]:
    """Every run record under ``root`` (folders without ``config.json`` are skipped), sorted by id."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [load_run(p) for p in sorted(root.iterdir()) if (p / CONFIG).is_file()]
