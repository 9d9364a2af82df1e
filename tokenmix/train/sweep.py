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
  parameters and its model name; unknown keys (the valid ones listed), repeated axis values and
  duplicate run ids are refused.
* **Results are never rewritten**: a cell whose record was made with other settings (any field
  that changes results, ``epochs`` included) is ``stale`` and left untouched, a record file that
  does not parse is ``damaged`` and skipped; ``--dry-run`` shows each cell's status.
* **Several workers split one sweep**: each cell is claimed with its run folder's lock
  (:class:`tokenmix.train.runs.RunLock`), so the same command started N times (N GPUs, a SLURM
  job array on a shared filesystem) runs each cell once; a cell another worker holds is ``busy``.
* **Paths are the grid's**: relative ``out_dir``, ``notebook`` and ``data_dir`` are resolved
  against :func:`grid_root`, so a sweep runs from any folder.
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

import itertools
import json
import os
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
from tokenmix.methods.teacher_maps import TeacherCacheError, cache_dir
from tokenmix.train.config import CliParser, ConfigError, RunConfig, debug_enabled
from tokenmix.train.engine import preflight, train
from tokenmix.train.runs import (CHECKPOINT, LOCK_TOKEN_ENV, SUMMARY, DamagedRecordError, RunLock, RunLockedError,
                                 atomic_write_json, checkpoint_readable, config_diff, describe_owner,
                                 format_diff, load_run, lock_holder, process_token, read_json)
from tokenmix.train.teacher import build_teacher_maps

#: the training notebook of the repository (the default ``notebook`` of a grid)
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "10_train.ipynb"
LAUNCHERS: tuple[str, ...] = ("papermill", "torchrun", "inprocess")
GRID_KEYS: tuple[str, ...] = ("name", "description", "out_dir", "notebook", "base", "regimes", "axes", "methods")
#: keys of a ``methods`` entry beside RunConfig fields, and of a ``regimes`` entry
ENTRY_KEYS: tuple[str, ...] = ("label", "extended")
#: what ``cell_status`` can say
STATUSES: tuple[str, ...] = ("new", "partial", "failed", "complete", "stale", "damaged", "busy")


def grid_root(path: str | Path) -> Path:
    """The folder a grid file's relative paths are resolved against: the nearest ancestor holding
    ``pyproject.toml`` or ``.git`` (the project the grid belongs to), else the grid file's folder."""
    here = Path(path).resolve().parent
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return here
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Cell:
    """One run of a sweep: its id, label (method configuration) and full config."""

    run_id: str
    label: str
    config: RunConfig


@dataclass
class Grid:
    """A parsed, validated grid file (``out_dir`` and ``notebook`` resolved, see :func:`grid_root`)."""

    name: str
    description: str
    out_dir: str
    notebook: str
    cells: list[Cell] = field(default_factory=list)
    root: str = "."


@dataclass
class CellResult:
    """What happened to one cell: ``status`` in {"skipped" (complete), "done", "failed", "busy"
    (another process holds it), "stale" (its record was made with other settings), "damaged"}."""

    run_id: str
    status: str
    seconds: float = 0.0
    top1: float | None = None
    error: str = ""


def _mapping(obj: object, where: str) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} must be a mapping of RunConfig fields, got {obj!r}")
    return dict(obj)


#: RunConfig fields a sweep sets itself (a grid file may not)
RESERVED: tuple[str, ...] = ("out_dir", "run_id", "resume")


def _no_reserved(keys: object, where: str) -> None:
    bad = sorted(set(map(str, keys)) & set(RESERVED))  # type: ignore[call-overload]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} cannot be set here (the sweep sets them: the grid's out_dir, "
                          f"run ids <dataset>-<model>-<label>-s<seed>, resume on)")


def load_grid(path: str | Path, out_dir: str | None = None, extended: bool = True) -> Grid:
    """Parse and validate a grid file (see the module docstring); ``extended=False`` leaves out the
    method entries marked ``extended: true``. Relative ``out_dir``, ``notebook`` and ``data_dir``
    in the file are resolved against :func:`grid_root` (so a sweep runs from any folder); an
    ``out_dir`` argument is taken as given.

    Raises:
        ConfigError: unknown keys (listing the valid ones), a bad cell (naming the cell and the valid
            choices), duplicate axis values, or two cells with the same run id.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with keys {', '.join(GRID_KEYS)}; got {type(spec).__name__}")
    unknown = sorted(set(map(str, spec)) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_KEYS)}")
    if not spec.get("methods") or not isinstance(spec["methods"], list):
        raise ConfigError(f"{path}: the grid needs a non-empty `methods` list")
    root = grid_root(path)
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ConfigError(f"{path}: name {name!r} must be letters, digits or ._+-")
    grid_out = str(Path(out_dir).expanduser().absolute() if out_dir
                   else root / Path(str(spec.get("out_dir") or f"runs/{name}")).expanduser())
    grid = Grid(name, str(spec.get("description", "")).strip(), grid_out,
                str(root / str(spec["notebook"])) if spec.get("notebook") else str(NOTEBOOK), root=str(root))
    if "\x00" in grid.notebook + grid.out_dir or not Path(grid.notebook).is_file():
        raise ConfigError(f"{path}: notebook {grid.notebook!r} not found (relative paths are resolved against {root}); "
                          f"leave `notebook` out for the training notebook {NOTEBOOK}")
    base, axes = _mapping(spec.get("base"), f"{path}: base"), _mapping(spec.get("axes"), f"{path}: axes")
    fields = set(RunConfig.field_names())
    valid = ", ".join(sorted(fields))
    for where, keys in ((f"{path}: base", base), (f"{path}: axes", axes)):
        bad = sorted(set(map(str, keys)) - fields)
        if bad:
            raise ConfigError(f"{where}: unknown RunConfig key(s) {', '.join(bad)}; valid: {valid}")
        _no_reserved(keys, where)
    if not isinstance(spec.get("regimes") or [], list):
        raise ConfigError(f"{path}: regimes must be a list of mappings, got {spec['regimes']!r}")
    regimes = [_mapping(r, f"{path}: regime {k}") for k, r in enumerate(spec.get("regimes") or [{}])]
    for r in regimes:
        if len(regimes) > 1 or r:
            name_ = r.pop("name", None)
            if not name_ or not re.fullmatch(r"[A-Za-z0-9_.]+", str(name_)):
                raise ConfigError(f"{path}: every regime needs a `name` of letters, digits, '_' or '.', got {name_!r}")
            bad = sorted(set(map(str, r)) - fields)
            if bad:
                raise ConfigError(f"{path}: regime {name_!r}: unknown RunConfig key(s) {', '.join(bad)}; valid: name, {valid}")
            _no_reserved(r, f"{path}: regime {name_!r}")
            r["name"] = str(name_)
    if len({r.get("name") for r in regimes}) < len(regimes):
        raise ConfigError(f"{path}: regime names must differ: {[r.get('name') for r in regimes]}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis {key!r} must be a non-empty list, got {values!r}")
        dup = sorted({repr(v) for v in values if sum(v == w and type(v) is type(w) for w in values) > 1})
        if dup:
            raise ConfigError(f"{path}: axis {key!r} repeats the value(s) {', '.join(dup)}: {values!r}; "
                              f"each value makes one set of cells, so give each once")
    seen: dict[str, str] = {}
    for regime, (i, entry) in itertools.product(regimes, enumerate(spec["methods"])):
        entry, regime = _mapping(entry, f"{path}: methods entry {i}"), dict(regime)
        bad = sorted(set(map(str, entry)) - fields - set(ENTRY_KEYS))
        if bad:
            raise ConfigError(f"{path}: methods entry {i} ({entry.get('method', '?')}): unknown key(s) "
                              f"{', '.join(bad)}; valid: {', '.join(ENTRY_KEYS)}, {valid}")
        where_e = f"{path}: methods entry {i} ({entry.get('method', '?')})"
        _no_reserved(entry, where_e)
        clash = sorted(set(entry) & set(axes))
        if clash:
            raise ConfigError(f"{where_e} sets {', '.join(clash)}, which the axes vary; set it in one place")
        if not isinstance(entry.get("extended", False), bool):
            raise ConfigError(f"{where_e}: extended must be true or false, got {entry['extended']!r}")
        if "label" in entry and not isinstance(entry["label"], str):
            raise ConfigError(f"{where_e}: label must be a string, got {entry['label']!r}")
        if entry.pop("extended", False) and not extended:
            continue
        label = str(entry.pop("label", entry.get("method", base.get("method", "cutmix"))))
        if not re.fullmatch(r"[\w.+=,@-]+", label):
            raise ConfigError(f"{path}: methods entry {i}: label {label!r} must be letters, digits or ._+=,@-")
        regime_name = regime.pop("name", "")
        for combo in itertools.product(*axes.values()):
            fields_ = {**base, **regime, **dict(zip(axes, combo)), **entry}
            where = f"cell {i} ({label}{', ' + regime_name if regime_name else ''}, {dict(zip(axes, combo))})"
            data_dir = fields_.get("data_dir", RunConfig.defaults()["data_dir"])
            if isinstance(data_dir, str) and data_dir:
                fields_["data_dir"] = str(root / Path(data_dir).expanduser())
            try:
                cfg = RunConfig.from_dict({**fields_, "out_dir": grid.out_dir, "run_id": "", "resume": True})
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


def cell_status(cell: Cell, detail: bool = False, check_lock: bool = True) -> str | tuple[str, str]:
    """One of :data:`STATUSES` (with ``detail``: ``(status, explanation)``). Writes nothing.

    ``complete``: a finished record made with the cell's settings; ``stale``: a record (finished
    or not) whose config differs from the cell's in a field that changes results (the sweep never
    touches it); ``damaged``: a record file that does not parse; ``busy``: another process holds
    the run (not asked with ``check_lock=False``, e.g. by the holder); ``partial`` (interrupted),
    ``failed`` (resumed by the next sweep) or ``new``.
    """
    run_dir = Path(cell.config.out_dir) / cell.run_id
    owner = lock_holder(run_dir) if check_lock else None
    try:
        if owner is not None:
            out = ("busy", f"in use by {describe_owner(owner)}")
        elif not (run_dir / "config.json").is_file():  # nothing trained yet (maybe failed before training)
            summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
            out = ("failed", str(summary.get("error", ""))) if summary.get("status") == "failed" else ("new", "")
        else:
            run = load_run(run_dir)
            diff = config_diff(run.config, cell.config.to_dict(), RunConfig.defaults())
            if diff:
                out = ("stale", f"its record differs in {format_diff(diff)}")
            elif run.complete:
                out = ("complete", f"top-1 {run.summary.get('final_top1', float('nan')):.2f} %")
            elif (run_dir / CHECKPOINT).is_file() and not checkpoint_readable(run_dir / CHECKPOINT):
                out = ("damaged", f"{run_dir / CHECKPOINT} is damaged (a truncated or corrupted archive); delete it to "
                                  f"retrain the run from epoch 1, or restore it from a copy")
            elif run.summary and run.summary.get("status") == "failed":
                out = ("failed", str(run.summary.get("error", "")))
            else:
                out = ("partial", f"{len(run.metrics)} of {cell.config.epochs} epochs")
    except DamagedRecordError as e:
        out = ("damaged", str(e))
    return out if detail else out[0]


def check_cells(cells: Sequence[Cell], statuses: Sequence[str] | None = None) -> None:
    """What ``train`` checks before it writes, for every cell still to run: the output folder can
    be written, the device exists on this machine, the dataset's files and the method's inputs
    (e.g. TokenMix's teacher cache) are there and the method runs with the model
    (:func:`~tokenmix.train.engine.preflight`; once per configuration, seeds aside).

    Raises:
        ConfigError: naming the first cell that cannot run and why.
    """
    seen: set[str] = set()
    for k, cell in enumerate(cells):
        if statuses is not None and statuses[k] in ("complete", "stale", "damaged", "busy"):
            continue
        cfg = cell.config
        key = json.dumps({**cfg.to_dict(), "seed": 0, "run_id": ""}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            preflight(cfg)
        except (ConfigError, TeacherCacheError) as e:
            raise ConfigError(f"cell {cell.run_id} cannot run: {e}") from e


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
    """Mark the cell's run failed (called with its lock held); a complete record is never touched."""
    run_dir = Path(cell.config.out_dir) / cell.run_id
    try:
        if load_run(run_dir).complete:
            return
    except (FileNotFoundError, DamagedRecordError):
        pass
    atomic_write_json(run_dir / SUMMARY, {"status": "failed", "run_id": cell.run_id, "error": message,
                                          "traceback": tb, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:02.0f} s"


def run_sweep(grid: Grid, launcher: str = "papermill", nproc: int = 1, cwd: str | Path | None = None,
              log: Callable[[str], None] = print, only: str = "", jobs: int = 1) -> list[CellResult]:
    """Execute every cell of ``grid`` (see the module docstring); returns one result per cell.

    Each cell is claimed with its run folder's lock (:class:`~tokenmix.train.runs.RunLock`) before
    its status is read, and held until its run ends; the process started for it joins the claim
    (:data:`~tokenmix.train.runs.LOCK_TOKEN_ENV`). A cell another process holds is left to it
    (``busy``), so several sweeps of one grid (N GPUs, N machines on a shared filesystem) run each
    cell once. ``stale`` and ``damaged`` cells are reported and left untouched.

    Args:
        launcher: ``"papermill"`` (default), ``"torchrun"`` (``nproc`` processes) or ``"inprocess"``.
        cwd: the working directory of the papermill kernel (default: the grid's root).
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
    cwd = Path(cwd or grid.root)
    os.environ[LOCK_TOKEN_ENV] = process_token()  # the runs this process starts join its claims

    def run_cell(i: int, cell: Cell) -> CellResult:
        head = f"[sweep {grid.name} {i}/{len(cells)}] {cell.run_id}"
        run_dir = Path(cell.config.out_dir) / cell.run_id
        lock = RunLock(run_dir, log)
        t0 = time.perf_counter()
        try:
            lock.acquire()
        except RunLockedError as e:
            log(f"{head}: busy, left to its owner ({str(e).split(' is in use by ')[-1].split(';')[0]})")
            return CellResult(cell.run_id, "busy", error=str(e))
        except OSError as e:  # the folder cannot be made or locked: nothing to record into
            log(f"{head}: FAILED: cannot claim {run_dir}: {e}")
            return CellResult(cell.run_id, "failed", error=str(e))
        try:
            state, why = cell_status(cell, detail=True, check_lock=False)
            if state == "complete":
                top1 = load_run(run_dir).summary.get("final_top1")
                log(f"{head}: complete ({why}), skipped")
                return CellResult(cell.run_id, "skipped", top1=top1)
            if state == "stale":
                log(f"{head}: STALE, left untouched: {why} (move the folder away to rerun the cell, "
                    f"or give the new settings another label)")
                return CellResult(cell.run_id, state, error=why)
            if state == "damaged":
                log(f"{head}: DAMAGED, left untouched: {why}")
                return CellResult(cell.run_id, state, error=why)
            log(f"{head}: {'resuming' if state in ('partial', 'failed') else 'starting'} "
                f"({cell.config.method}, {cell.config.epochs} epochs)")
            if launcher == "papermill":
                _papermill(cell, grid.notebook, cwd)
            elif launcher == "torchrun":
                _torchrun(cell, nproc)
            else:
                _inprocess(cell)
            summary = load_run(run_dir).summary or {}
            if summary.get("status") != "complete":
                raise RuntimeError(f"the run ended without a complete record (status {summary.get('status')!r})")
        except Exception as e:  # noqa: BLE001 -- one failing cell must not stop the sweep
            message, tb = _error_text(e)
            if message.startswith("DamagedRecordError"):  # found by the run: its record is left as it is
                log(f"{head}: DAMAGED, left untouched: {message}")
                return CellResult(cell.run_id, "damaged", time.perf_counter() - t0, error=message)
            try:
                _record_failure(cell, message, tb)
            except OSError as e2:
                message += f" (and its failure could not be recorded: {e2})"
            dt = time.perf_counter() - t0
            log(f"{head}: FAILED after {_duration(dt)}: {message.splitlines()[0][:300]}")
            return CellResult(cell.run_id, "failed", dt, error=message)
        finally:
            lock.release()
        dt = time.perf_counter() - t0
        log(f"{head}: done, top-1 {summary.get('final_top1', float('nan')):.2f} % in {_duration(dt)}")
        return CellResult(cell.run_id, "done", dt, top1=summary.get("final_top1"))

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the runs' processes
        results = list(pool.map(run_cell, range(1, len(cells) + 1), cells))
    n = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed", "busy", "stale", "damaged")}
    extra = "".join(f", {n[k]} {k}" for k in ("busy", "stale", "damaged") if n[k])
    log(f"[sweep {grid.name}] {n['done']} run, {n['skipped']} skipped (complete), {n['failed']} failed{extra}; "
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
    smoke = Grid(f"{grid.name} (smoke)", grid.description, str(work / "runs"), grid.notebook, cells, grid.root)
    return run_sweep(smoke, launcher="inprocess", log=log)


# ---------------------------------------------------------------------------------------------
# command line

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenmix sweep GRID.yaml [--launcher ...] [--nproc N] [--only S] [--dry-run] [--smoke]``."""
    p = CliParser(prog="python -m tokenmix sweep",
                  description="Run a grid of training runs (papermill by default); finished runs are skipped, "
                              "interrupted ones resumed, failed ones recorded. Started N times (N GPUs, N machines "
                              "on a shared filesystem), the sweeps split the cells: each runs once.")
    p.add_argument("grid", help="a grid file, e.g. configs/fmnist_cpu.yaml")
    p.add_argument("--launcher", default="papermill", choices=LAUNCHERS)
    p.add_argument("--nproc", type=int, default=1, help="processes per run for --launcher torchrun")
    p.add_argument("--out_dir", default=None, help="override the grid's output folder")
    p.add_argument("--only", default="", help="run only cells whose run id contains this text")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (papermill/torchrun)")
    p.add_argument("--core", action="store_true", help="leave out the method entries marked `extended: true`")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells and their status, run nothing")
    p.add_argument("--smoke", action="store_true", help="one tiny step of each cell on generated data")
    args = p.parse_args(None if argv is None else list(argv))
    for name, value, rule in (("--nproc", args.nproc, 1), ("--jobs", args.jobs, 1)):
        if value < rule:
            p.error(f"argument {name}: must be >= {rule}, got {value}")
    if args.jobs > 1 and args.launcher == "inprocess":
        p.error("argument --jobs: > 1 needs the papermill or torchrun launcher, not inprocess")
    try:
        grid = load_grid(args.grid, args.out_dir, extended=not args.core)
        cells = [c for c in grid.cells if args.only in c.run_id]
        if not cells:
            raise ConfigError(f"--only {args.only!r} matches none of the {len(grid.cells)} cells of {args.grid}")
        status = [cell_status(c, detail=True) for c in cells]
        if not args.smoke:
            check_cells(cells, [st for st, _ in status])
    except (ConfigError, OSError) as e:
        if debug_enabled():
            raise
        print(f"tokenmix sweep: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.dry_run:
        counts = {k: sum(s == k for s, _ in status) for k in STATUSES}
        print(f"{grid.name}: {len(cells)} cells -> {grid.out_dir}/ ("
              + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ")")
        for c, (state, why) in zip(cells, status):
            print(f"  {c.run_id}  [{state}]" + (f"  {why[:200]}" if why and state != "complete" else ""))
        return 0
    results = smoke_test(grid) if args.smoke else run_sweep(grid, args.launcher, args.nproc, only=args.only, jobs=args.jobs)
    return 1 if any(r.status in ("failed", "stale", "damaged") for r in results) else 0


__all__ = ["Cell", "CellResult", "Grid", "LAUNCHERS", "STATUSES", "cell_status", "check_cells", "grid_root", "load_grid", "main",
           "run_sweep", "smoke_config", "smoke_test"]
