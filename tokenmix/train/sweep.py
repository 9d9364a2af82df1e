"""Sweeps: a grid of runs (methods x models x datasets x seeds x overrides) from one YAML file.

``python -m tokenmix sweep configs/fmnist_cpu.yaml`` executes every cell of the grid as a
papermill run of ``notebooks/10_train.ipynb`` (the executed notebook is kept beside the run
record), or with ``--launcher torchrun --nproc N`` as ``torchrun -m tokenmix train`` (several
GPUs), or ``--launcher inprocess`` (no kernel start; what the tests and ``--smoke`` use).

* **Finished runs are skipped**, interrupted ones **resumed** (every cell runs with
  ``resume=True``; the engine continues from the last finished epoch).
* **A failing cell fails only that run**: its record gets ``status: failed`` with the error and
  the traceback (``summary.json``), the sweep goes on, and the exit code reports it. A failed run
  is retried (resumed) by the next sweep.
* **Everything is validated before anything runs**: each cell's ``RunConfig``, its method
  parameters and its model name; duplicate run ids are refused.
* **One progress line per run.**

Grid file::

    name: fmnist_cpu                 # the sweep's name; runs go to <out_dir> (default runs/<name>)
    description: ...
    base: {dataset: fashion_mnist, model: vit_cpu, epochs: 3, ...}   # RunConfig fields of every cell
    regimes:                         # optional: named sets of RunConfig overrides (crossed with the rest)
      - {name: n1k_e60, train_subset: 1000, epochs: 60}
    axes: {seed: [0, 1]}             # cartesian product over these RunConfig fields
    methods:                         # one entry per method configuration
      - {method: cutmix}
      - {method: tokenmixup, method_kwargs: {tokenmixup_mode: vtm}, label: tokenmixup_vtm}
      - {method: mixup_cutmix, extended: true}   # left out by --core (`make run`; `make study-full` runs all)

The run id of a cell is ``<dataset>-<model>-<label>-s<seed>`` (``label`` defaults to the method),
``<dataset>-<model>-<regime>-<label>-s<seed>`` when the grid has ``regimes``. ``--jobs N`` runs N
cells at a time, each in its own process.

``--smoke`` runs one step of each cell at tiny scale in a temporary folder: generated data
(``dataset="synthetic"``, 32 px), the family's tiny model (``tiny_deit``, ``tiny_cait``,
``tiny_swin``, ``tiny_pvt_v2``; CCT stays CCT), a few images, one epoch, and for TokenMix a
teacher cache built on the fly -- how the GPU recipes are checked on a machine without GPUs or
their datasets.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tokenmix import methods
from tokenmix.methods.teacher_maps import cache_dir
from tokenmix.train.config import ConfigError, RunConfig
from tokenmix.train.engine import train
from tokenmix.train.runs import atomic_write_json, load_run
from tokenmix.train.teacher import build_teacher_maps

NOTEBOOK = "notebooks/10_train.ipynb"
LAUNCHERS: tuple[str, ...] = ("papermill", "torchrun", "inprocess")
GRID_KEYS: tuple[str, ...] = ("name", "description", "out_dir", "notebook", "base", "regimes", "axes", "methods")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Cell:
    """One run of a sweep: its id, label (method configuration) and full config."""

    run_id: str
    label: str
    config: RunConfig


@dataclass
class Grid:
    """A parsed, validated grid file."""

    name: str
    description: str
    out_dir: str
    notebook: str
    cells: list[Cell] = field(default_factory=list)


@dataclass
class CellResult:
    """What happened to one cell: ``status`` in {"skipped", "done", "failed"}."""

    run_id: str
    status: str
    seconds: float = 0.0
    top1: float | None = None
    error: str = ""


def load_grid(path: str | Path, out_dir: str | None = None, extended: bool = True) -> Grid:
    """Parse and validate a grid file (see the module docstring); ``extended=False`` leaves out the
    method entries marked ``extended: true``.

    Raises:
        ConfigError: unknown top-level keys, a bad cell (naming the cell and the valid choices),
            or two cells with the same run id.
    """
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_KEYS)}")
    if not spec.get("methods"):
        raise ConfigError(f"{path}: the grid needs a non-empty `methods` list")
    name = str(spec.get("name") or path.stem)
    grid = Grid(name, str(spec.get("description", "")).strip(), out_dir or spec.get("out_dir") or f"runs/{name}",
                spec.get("notebook", NOTEBOOK))
    base, axes = dict(spec.get("base") or {}), dict(spec.get("axes") or {})
    regimes = [dict(r) for r in spec.get("regimes") or [{}]]
    for r in regimes:
        if len(regimes) > 1 or r:
            name_ = r.pop("name", None)
            if not name_ or not re.fullmatch(r"[A-Za-z0-9_.]+", str(name_)):
                raise ConfigError(f"{path}: every regime needs a `name` of letters, digits, '_' or '.', got {name_!r}")
            r["name"] = str(name_)
    if len({r.get("name") for r in regimes}) < len(regimes):
        raise ConfigError(f"{path}: regime names must differ: {[r.get('name') for r in regimes]}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis {key!r} must be a non-empty list, got {values!r}")
    seen: dict[str, str] = {}
    for regime, (i, entry) in itertools.product(regimes, enumerate(spec["methods"])):
        entry, regime = dict(entry), dict(regime)
        if entry.pop("extended", False) and not extended:
            continue
        label = str(entry.pop("label", entry.get("method", base.get("method", "cutmix"))))
        regime_name = regime.pop("name", "")
        for combo in itertools.product(*axes.values()):
            fields = {**base, **regime, **dict(zip(axes, combo)), **entry}
            where = f"cell {i} ({label}{', ' + regime_name if regime_name else ''}, {dict(zip(axes, combo))})"
            try:
                cfg = RunConfig(**{**fields, "out_dir": grid.out_dir, "run_id": "", "resume": True})
                middle = f"{regime_name}-{label}" if regime_name else label
                run_id = f"{cfg.dataset}-{cfg.model}-{middle}-s{cfg.seed}"
                cfg = cfg.replace(run_id=run_id)  # RunConfig validates the method's parameters too
            except (ConfigError, ValueError, TypeError) as e:
                raise ConfigError(f"{path}: {where}: {e}") from e
            if run_id in seen:
                raise ConfigError(f"{path}: {where} and {seen[run_id]} both make run id {run_id!r}; "
                                  "give them different `label`s")
            seen[run_id] = where
            grid.cells.append(Cell(run_id, label, cfg))
    return grid


def cell_status(cell: Cell) -> str:
    """``"complete"``, ``"failed"``, ``"partial"`` (interrupted) or ``"new"``."""
    run_dir = Path(cell.config.out_dir) / cell.run_id
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if not (run_dir / "config.json").is_file():  # nothing trained yet (maybe failed before training)
        return "failed" if summary.get("status") == "failed" else "new"
    run = load_run(run_dir)
    if run.complete and run.summary.get("epochs") == cell.config.epochs:
        return "complete"
    return "failed" if summary.get("status") == "failed" else "partial"


# ---------------------------------------------------------------------------------------------
# launchers

def _papermill(cell: Cell, notebook: str | Path, cwd: str | Path) -> None:
    import papermill as pm  # deferred: only the papermill launcher needs it, and it loads jupyter (~1 s)

    run_dir = Path(cell.config.out_dir) / cell.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(run_dir / Path(notebook).name), parameters=cell.config.to_dict(),
                        kernel_name="python3", cwd=str(cwd), progress_bar=False, log_output=False)


def _torchrun(cell: Cell, nproc: int) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tokenmix", "train"]
    for k, v in cell.config.to_dict().items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)]
    subprocess.run(args, check=True)


def _inprocess(cell: Cell) -> None:

    train(cell.config)


def _error_text(e: BaseException) -> tuple[str, str]:
    """(one-line error, traceback) of an exception, also for papermill's kernel-side errors."""
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    if ename is not None:
        tb = "\n".join(_ANSI.sub("", line) for line in getattr(e, "traceback", []) or [])
        return f"{ename}: {evalue}", tb
    return f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e))


def _record_failure(cell: Cell, message: str, tb: str) -> None:
    run_dir = Path(cell.config.out_dir) / cell.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "summary.json", {"status": "failed", "run_id": cell.run_id, "error": message,
                                                 "traceback": tb, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:02.0f} s"


def run_sweep(grid: Grid, launcher: str = "papermill", nproc: int = 1, cwd: str | Path = ".",
              log: Callable[[str], None] = print, only: str = "", jobs: int = 1) -> list[CellResult]:
    """Execute every cell of ``grid`` (see the module docstring); returns one result per cell.

    Args:
        launcher: ``"papermill"`` (default), ``"torchrun"`` (``nproc`` processes) or ``"inprocess"``.
        cwd: the working directory of the papermill kernel (the repository root).
        only: run only the cells whose run id contains this substring.
        jobs: cells run at the same time (each in its own process; set ``threads`` in the grid's
            ``base`` so that ``jobs * threads`` does not exceed the cores).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and launcher == "inprocess":
        raise ValueError("jobs > 1 needs a launcher that starts processes (papermill or torchrun), not inprocess")
    cells = [c for c in grid.cells if only in c.run_id]
    notebook = Path(cwd) / grid.notebook

    def run_cell(i: int, cell: Cell) -> CellResult:
        head = f"[sweep {grid.name} {i}/{len(cells)}] {cell.run_id}"
        state = cell_status(cell)
        if state == "complete":
            top1 = load_run(Path(cell.config.out_dir) / cell.run_id).summary.get("final_top1")
            log(f"{head}: complete (top-1 {top1:.2f} %), skipped")
            return CellResult(cell.run_id, "skipped", top1=top1)
        log(f"{head}: {'resuming' if state in ('partial', 'failed') else 'starting'} "
            f"({cell.config.method}, {cell.config.epochs} epochs)")
        t0 = time.perf_counter()
        try:
            if launcher == "papermill":
                _papermill(cell, notebook, cwd)
            elif launcher == "torchrun":
                _torchrun(cell, nproc)
            else:
                _inprocess(cell)
            summary = load_run(Path(cell.config.out_dir) / cell.run_id).summary
            if summary.get("status") != "complete":
                raise RuntimeError(f"the run ended without a complete record (status {summary.get('status')!r})")
        except Exception as e:  # noqa: BLE001 -- one failing cell must not stop the sweep
            message, tb = _error_text(e)
            _record_failure(cell, message, tb)
            dt = time.perf_counter() - t0
            log(f"{head}: FAILED after {_duration(dt)}: {message.splitlines()[0][:300]}")
            return CellResult(cell.run_id, "failed", dt, error=message)
        dt = time.perf_counter() - t0
        log(f"{head}: done, top-1 {summary.get('final_top1', float('nan')):.2f} % in {_duration(dt)}")
        return CellResult(cell.run_id, "done", dt, top1=summary.get("final_top1"))

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the runs' processes
        results = list(pool.map(run_cell, range(1, len(cells) + 1), cells))
    n = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    log(f"[sweep {grid.name}] {n['done']} run, {n['skipped']} skipped (complete), {n['failed']} failed; "
        f"records in {grid.out_dir}/")
    return results


# ---------------------------------------------------------------------------------------------
# smoke test of a grid (GPU recipes on this machine)

TINY_FOR_PREFIX: tuple[tuple[str, str], ...] = (("deit_", "tiny_deit"), ("vit_", "tiny_deit"), ("cait_", "tiny_cait"),
                                                ("swin_", "tiny_swin"), ("pvt_v2_", "tiny_pvt_v2"))


def smoke_config(cfg: RunConfig, out_dir: str | Path, data_dir: str | Path) -> RunConfig:
    """``cfg`` shrunk to one tiny step on generated data (same method, variant, mixing and
    optimiser settings; the model replaced by its family's tiny version)."""
    model = next((tiny for prefix, tiny in TINY_FOR_PREFIX if cfg.model.startswith(prefix)), cfg.model)
    return cfg.replace(dataset="synthetic", img_size=32, patch_size=0, model=model, train_subset=8, test_subset=8,
                       batch_size=4, epochs=1, warmup_epochs=0.0, num_workers=0, out_dir=str(out_dir),
                       data_dir=str(data_dir), download=False, device="cpu", progress=False, eval_every=1)


def smoke_test(grid: Grid, log: Callable[[str], None] = print, workdir: str | Path | None = None) -> list[CellResult]:
    """One tiny training step and evaluation of every cell of ``grid`` (seeds collapsed to the
    first), in-process, in a temporary folder. Returns the results (``failed`` ones say why)."""

    work = Path(workdir or tempfile.mkdtemp(prefix=f"tokenmix-smoke-{grid.name}-"))
    seen: set[str] = set()
    cells = []
    for c in grid.cells:
        key = c.label + "|" + c.config.model + "|" + c.config.dataset
        if key not in seen:
            seen.add(key)
            cells.append(Cell(c.run_id, c.label, smoke_config(c.config, work / "runs", work / "data")))
    needs_maps = any(methods.get(c.config.method, **c.config.method_params(10)).needs.teacher_maps for c in cells)
    if needs_maps and not cache_dir("synthetic", 32, data_dir=work / "data").is_dir():
        build_teacher_maps("synthetic", 32, data_dir=work / "data", epochs=1)
    smoke = Grid(f"{grid.name} (smoke)", grid.description, str(work / "runs"), grid.notebook, cells)
    return run_sweep(smoke, launcher="inprocess", log=log)


# ---------------------------------------------------------------------------------------------
# command line

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenmix sweep GRID.yaml [--launcher ...] [--nproc N] [--only S] [--dry-run] [--smoke]``."""
    p = argparse.ArgumentParser(prog="python -m tokenmix sweep",
                                description="Run a grid of training runs (papermill by default); finished runs "
                                            "are skipped, interrupted ones resumed, failed ones recorded.")
    p.add_argument("grid", help="a grid file, e.g. configs/fmnist_cpu.yaml")
    p.add_argument("--launcher", default="papermill", choices=LAUNCHERS)
    p.add_argument("--nproc", type=int, default=1, help="processes per run for --launcher torchrun")
    p.add_argument("--out_dir", default=None, help="override the grid's output folder")
    p.add_argument("--only", default="", help="run only cells whose run id contains this text")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (papermill/torchrun)")
    p.add_argument("--core", action="store_true", help="leave out the method entries marked `extended: true`")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    p.add_argument("--smoke", action="store_true", help="one tiny step of each cell on generated data")
    args = p.parse_args(None if argv is None else list(argv))
    try:
        grid = load_grid(args.grid, args.out_dir, extended=not args.core)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        print(f"tokenmix sweep: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{grid.name}: {len(grid.cells)} cells -> {grid.out_dir}/")
        for c in grid.cells:
            print(f"  {c.run_id}  [{cell_status(c)}]")
        return 0
    results = smoke_test(grid) if args.smoke else run_sweep(grid, args.launcher, args.nproc, only=args.only, jobs=args.jobs)
    return 1 if any(r.status == "failed" for r in results) else 0


__all__ = ["Cell", "CellResult", "Grid", "LAUNCHERS", "cell_status", "load_grid", "main", "run_sweep",
           "smoke_config", "smoke_test"]
