"""Notebooks: one literal `parameters` cell each, 10_train's parameters are exactly RunConfig's
fields, committed notebooks carry no outputs, and papermill injection reaches the run record.
(nbval executes every notebook with its stored defaults through the pytest addopts.)"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from tokenmix import RunConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TRAIN_NB = ROOT / "notebooks" / "10_train.ipynb"


def tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"00_tour.ipynb", "10_train.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exactly_one_literal_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    cells = tagged(nb, "parameters")
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters' (papermill needs exactly one)"
    cell = cells[0]
    assert cell.cell_type == "code"
    # only `name = <literal>` lines (papermill does not recompute derived values)
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), \
            f"{path.name}: parameters cell line {node.lineno} is not `name = literal`"
        ast.literal_eval(node.value)
    params = pm.inspect_notebook(str(path))
    assert set(params) == {n.targets[0].id for n in ast.parse(cell.source).body}  # papermill parses every line


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs; strip them"


def train_defaults() -> dict:
    params = pm.inspect_notebook(str(TRAIN_NB))
    return {name: ast.literal_eval(p["default"]) for name, p in params.items()}


def test_train_parameters_are_exactly_the_runconfig_fields():
    params = pm.inspect_notebook(str(TRAIN_NB))
    assert list(params) == RunConfig.field_names()
    defaults = train_defaults()
    cfg = RunConfig(**defaults)  # the stored defaults validate
    # CPU-quick defaults that leave nothing in runs/ when executed as is (nbval)
    assert cfg.out_dir == "" and cfg.progress is False and cfg.resume is False
    assert cfg.model == "vit_cpu" and cfg.dataset == "fashion_mnist"
    assert 0 < cfg.train_subset <= 5000 and 0 < cfg.test_subset <= 2000 and cfg.epochs <= 3
    assert cfg.warmup_epochs < 1  # papermill runs with epochs=1 stay valid
    # no derived values: every default is a literal of the field's type
    for name, value in defaults.items():
        assert type(value) is type(getattr(RunConfig(), name)), name


def test_train_notebook_builds_config_from_all_fields():
    nb = nbformat.read(TRAIN_NB, as_version=4)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "RunConfig.field_names()" in src and 'tempfile.mkdtemp(prefix="tokenmix-")' in src


def test_papermill_injection_reaches_the_run_record(tmp_path, monkeypatch):
    """Execute 10_train with injected parameters and check the run record it writes."""
    # the kernel imports the package from this checkout even when it is not pip-installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    params = dict(dataset="synthetic", img_size=32, train_subset=256, test_subset=64, epochs=1, batch_size=32,
                  out_dir=str(tmp_path / "runs"), run_id="pm")
    out_nb = tmp_path / "10_train.out.ipynb"
    pm.execute_notebook(str(TRAIN_NB), str(out_nb), parameters=params, kernel_name="python3",
                        cwd=str(tmp_path), progress_bar=False, execution_timeout=600)
    run_dir = tmp_path / "runs" / "pm"
    config = json.loads((run_dir / "config.json").read_text())
    expected = RunConfig(**{**train_defaults(), **params}).to_dict()
    assert config == expected
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and json.loads(metrics[0])["epoch"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["run_id"] == "pm" and summary["epochs"] == 1
    # papermill put the injected cell right after the parameters cell, and the figure was shown
    nb = nbformat.read(out_nb, as_version=4)
    idx = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(idx) == 1 and "parameters" in nb.cells[idx[0] - 1].metadata.get("tags", [])
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the training curves were not displayed"
