"""Analysis records: measurements made on checkpoints, kept as small CSV files beside the runs.

Checkpoints are large and not published; what the report draws from them (label fidelity over
training, occlusion curves) is measured once and stored under ``<runs_dir>/analysis/`` as a CSV
plus a JSON sidecar naming its inputs (each checkpoint's run, file name, size and modification
time, and the measurement's parameters). :func:`cached_measurement` recomputes a table only when
its inputs exist and differ from the recorded ones; on a fresh clone (records, no checkpoints) it
returns the stored table, so ``make figures`` redraws every figure without a model.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tokenmix.train.runs import DamagedRecordError, RecordWarning, atomic_write_bytes, atomic_write_json

#: the folder of a runs folder that holds the analysis records
ANALYSIS_DIR = "analysis"


def analysis_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / ANALYSIS_DIR


def fingerprint(files: Sequence[str | Path], params: Mapping[str, Any]) -> dict[str, Any]:
    """What a measurement depends on: each file's parent folder, name, size and mtime, and ``params``."""
    return {"files": [{"run": Path(f).parent.name, "file": Path(f).name, "size": Path(f).stat().st_size,
                       "mtime_ns": Path(f).stat().st_mtime_ns} for f in files],
            "params": {k: params[k] for k in sorted(params)}}


def cached_measurement(runs_dir: str | Path, name: str, files: Sequence[str | Path], params: Mapping[str, Any],
                       compute: Callable[[], pd.DataFrame], float_format: str = "%.4f") -> pd.DataFrame | None:
    """The table ``<runs_dir>/analysis/<name>.csv``, (re)computed with ``compute()`` when every
    file of ``files`` exists and the recorded fingerprint differs (or there is no record).

    A damaged input (:class:`~tokenmix.train.runs.DamagedRecordError`, e.g. a truncated
    checkpoint) is reported with a :class:`~tokenmix.train.runs.RecordWarning` and the stored
    table is returned.

    Returns:
        The fresh or stored table; None when it can be neither computed (missing or damaged files) nor read.
    """
    folder = analysis_dir(runs_dir)
    csv, meta = folder / f"{name}.csv", folder / f"{name}.inputs.json"
    if files and all(Path(f).is_file() for f in files):
        want = fingerprint(files, params)
        have = json.loads(meta.read_text()) if meta.is_file() else None
        if have != want or not csv.is_file():
            try:
                df = compute()
            except DamagedRecordError as e:  # a damaged checkpoint: keep what was measured before
                warnings.warn(f"{name}: {e}; {'the stored measurement is used' if csv.is_file() else 'skipped'}",
                              RecordWarning, stacklevel=2)
            else:
                atomic_write_bytes(csv, df.to_csv(index=False, float_format=float_format, lineterminator="\n").encode())
                atomic_write_json(meta, want)
    if csv.is_file():  # what was stored (rounded), so that a fresh and a cached result draw the same
        return pd.read_csv(csv)
    return None


__all__ = ["ANALYSIS_DIR", "analysis_dir", "cached_measurement", "fingerprint"]
