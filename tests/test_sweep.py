"""The sweep runner: grid parsing and validation, skip / resume / failure isolation, papermill
execution, and the GPU recipe grids smoke-tested on generated data."""
import json
from pathlib import Path

import pytest

from tokenmix.train.config import ConfigError
from tokenmix.train.engine import train
from tokenmix.train.sweep import cell_status, load_grid, main, run_sweep, smoke_test

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = dict(dataset="synthetic", img_size=32, model="tiny_deit", train_subset=32, test_subset=16,
                 epochs=1, warmup_epochs=0.0, batch_size=16, progress=False)


def write_grid(tmp_path, methods, base=None, axes=None, name="g"):
    spec = {"name": name, "out_dir": str(tmp_path / "runs"), "base": {**TINY_BASE, **(base or {})},
            "axes": axes or {"seed": [0]}, "methods": methods}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(spec))  # JSON is YAML
    return p


def test_grid_product_and_run_ids(tmp_path):
    g = load_grid(write_grid(tmp_path, [{"method": "cutmix"}, {"method": "tokenmixup", "label": "tmu_vtm",
                                                                 "method_kwargs": {"tokenmixup_mode": "vtm"}}],
                             axes={"seed": [0, 1], "model": ["tiny_deit", "tiny_cait"]}))
    assert len(g.cells) == 8 and g.out_dir == str(tmp_path / "runs")
    ids = [c.run_id for c in g.cells]
    assert "synthetic-tiny_cait-tmu_vtm-s1" in ids and "synthetic-tiny_deit-cutmix-s0" in ids
    assert all(c.config.resume for c in g.cells)
    assert g.cells[-1].config.method_kwargs == {"tokenmixup_mode": "vtm"}


@pytest.mark.parametrize("methods, base, match", [
    ([{"method": "nosuch"}], {}, "nosuch.*valid"),
    ([{"method": "cutmix", "bogus_field": 1}], {}, "bogus_field"),
    ([{"method": "smmix", "method_kwargs": {"placement": "up->down"}}], {}, "placement.*valid"),
    ([{"method": "cutmix"}], {"model": "resnet50"}, "unknown model"),
    ([{"method": "cutmix"}, {"method": "cutmix"}], {}, "both make run id"),
])
def test_bad_grids_fail_before_anything_runs(tmp_path, methods, base, match):
    with pytest.raises(ConfigError, match=match):
        load_grid(write_grid(tmp_path, methods, base))
    assert not (tmp_path / "runs").exists()


def test_unknown_top_level_key(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nmethods: [{method: cutmix}]\nmodels: [a]\n")
    with pytest.raises(ConfigError, match="unknown key.*models.*valid"):
        load_grid(p)
    assert main([str(p), "--dry-run"]) == 2


def test_skip_and_failure_isolation(tmp_path):
    # tokenmixup refuses Swin at prepare time: that cell fails, the others run
    grid = load_grid(write_grid(tmp_path, [{"method": "cutmix"}, {"method": "tokenmixup", "model": "tiny_swin"},
                                           {"method": "transmix"}]))
    lines: list[str] = []
    res = run_sweep(grid, launcher="inprocess", log=lines.append)
    assert [r.status for r in res] == ["done", "failed", "done"]
    failed = json.loads((tmp_path / "runs" / "synthetic-tiny_swin-tokenmixup-s0" / "summary.json").read_text())
    assert failed["status"] == "failed" and "Swin" in failed["error"] and "Traceback" in failed["traceback"]
    assert any("FAILED" in line and "Swin" in line for line in lines)
    assert lines[-1].startswith("[sweep g] 2 run, 0 skipped (complete), 1 failed")
    # a second sweep skips the finished runs and retries the failed one
    res2 = run_sweep(grid, launcher="inprocess", log=lines.append)
    assert [r.status for r in res2] == ["skipped", "failed", "skipped"]
    assert res2[0].top1 == res[0].top1


def test_interrupted_run_is_resumed(tmp_path):
    grid = load_grid(write_grid(tmp_path, [{"method": "cutmix"}], base={"epochs": 2}))
    cell = grid.cells[0]

    def crash(epoch, record):
        raise KeyboardInterrupt  # the machine going down after the first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(cell.config, callbacks=[crash])
    assert cell_status(cell) == "partial"
    lines: list[str] = []
    res = run_sweep(grid, launcher="inprocess", log=lines.append)
    assert res[0].status == "done" and "resuming" in lines[0]
    metrics = (tmp_path / "runs" / cell.run_id / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in metrics] == [1, 2]
    assert cell_status(cell) == "complete"


def test_papermill_launcher_keeps_the_executed_notebook(tmp_path):
    grid = load_grid(write_grid(tmp_path, [{"method": "mixup"}]))
    res = run_sweep(grid, launcher="papermill", cwd=REPO, log=lambda s: None)
    assert res[0].status == "done", res[0].error
    run_dir = tmp_path / "runs" / grid.cells[0].run_id
    nb = json.loads((run_dir / "10_train.ipynb").read_text())
    assert any("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("grid_file", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_grids_validate_and_run_one_tiny_step_per_cell(grid_file, tmp_path):
    grid = load_grid(grid_file)
    assert grid.cells and grid.description
    res = smoke_test(grid, log=lambda s: None, workdir=tmp_path)
    assert res and all(r.status == "done" for r in res), [(r.run_id, r.error) for r in res if r.status != "done"]


def test_fmnist_study_grid_is_the_chosen_regime_with_three_seeds_and_a_core():
    grid = load_grid(REPO / "configs" / "fmnist_cpu.yaml")
    labels = sorted({c.label for c in grid.cells})
    assert labels == sorted(["none", "mixup", "cutmix", "mixup_cutmix", "transmix", "tokenmix", "tokenmixup_htm",
                             "tokenmixup_vtm", "smmix", "tl_align", "mixpro"])
    assert sorted({c.config.seed for c in grid.cells}) == [0, 1, 2]
    assert {(c.config.model, c.config.train_subset, c.config.epochs, c.config.hflip, c.config.crop_padding)
            for c in grid.cells} == {("vit_cpu", 1000, 60, False, 0)}
    assert grid.out_dir == str(REPO.resolve() / "results" / "fmnist_cpu")
    assert all(c.config.checkpoint_every == 10 for c in grid.cells if c.label == "cutmix")  # label fidelity
    core = load_grid(REPO / "configs" / "fmnist_cpu.yaml", extended=False)
    assert len(core.cells) == 21
    assert {c.label for c in core.cells} == set(labels) - {"mixup_cutmix", "tokenmixup_vtm", "smmix", "mixpro"}


def test_ablation_grid_pairs_every_rule_with_its_masks_area_label_on_the_study_protocol():
    from tokenmix import methods
    from tokenmix.methods.compose import PAPER_ABLATIONS

    grid = load_grid(REPO / "configs" / "fmnist_ablation.yaml")
    study = load_grid(REPO / "configs" / "fmnist_cpu.yaml")
    assert len(grid.cells) == 33 and grid.out_dir == str(REPO.resolve() / "results" / "fmnist_ablation")
    pairs = {(c.config.method_kwargs["mask"], c.config.method_kwargs["label"]) for c in grid.cells}
    assert {m for m, _ in pairs} == {m for m, lab in pairs if lab == "area"}  # every mask has its area reference
    assert {c.config.method for c in grid.cells} == {"compose"}
    assert pairs <= set(PAPER_ABLATIONS.values())  # every cell is a row of a paper
    ref = next(c.config for c in study.cells if c.label == "cutmix")
    same = ("model", "train_subset", "epochs", "batch_size", "lr", "hflip", "crop_padding", "threads", "eval_every")
    assert all(getattr(c.config, k) == getattr(ref, k) for c in grid.cells for k in same)
    for c in grid.cells:  # every cell builds
        methods.get("compose", **c.config.method_params(10))


def test_regimes_cross_methods_and_name_the_runs(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"name": "r", "out_dir": str(tmp_path / "runs"), "base": TINY_BASE,
                             "regimes": [{"name": "short", "epochs": 1}, {"name": "long_noflip", "epochs": 3,
                                                                          "hflip": False}],
                             "axes": {"seed": [0, 1]}, "methods": [{"method": "cutmix"}, {"method": "none"}]}))
    g = load_grid(p)
    assert len(g.cells) == 8
    by_id = {c.run_id: c.config for c in g.cells}
    assert by_id["synthetic-tiny_deit-long_noflip-none-s1"].epochs == 3
    assert by_id["synthetic-tiny_deit-long_noflip-none-s1"].hflip is False
    assert by_id["synthetic-tiny_deit-short-cutmix-s0"].epochs == 1 and by_id["synthetic-tiny_deit-short-cutmix-s0"].hflip
    assert [c.run_id for c in g.cells][:2] == ["synthetic-tiny_deit-short-cutmix-s0", "synthetic-tiny_deit-short-cutmix-s1"]


@pytest.mark.parametrize("regimes, match", [
    ([{"epochs": 2}], "needs a `name`"),
    ([{"name": "a/b", "epochs": 2}], "needs a `name`"),
    ([{"name": "a", "epochs": 2}, {"name": "a", "epochs": 3}], "regime names must differ"),
    ([{"name": "a", "epochz": 2}], "epochz"),
])
def test_bad_regimes_are_refused(tmp_path, regimes, match):
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"name": "r", "base": TINY_BASE, "regimes": regimes, "methods": [{"method": "cutmix"}]}))
    with pytest.raises(ConfigError, match=match):
        load_grid(p)


def test_extended_entries_are_left_out_by_core(tmp_path):
    p = write_grid(tmp_path, [{"method": "cutmix"}, {"method": "mixup", "extended": True}])
    assert [c.label for c in load_grid(p).cells] == ["cutmix", "mixup"]
    assert [c.label for c in load_grid(p, extended=False).cells] == ["cutmix"]
    assert main([str(p), "--core", "--dry-run"]) == 0


def test_jobs_run_cells_side_by_side(tmp_path):
    grid = load_grid(write_grid(tmp_path, [{"method": "mixup"}, {"method": "cutmix"}], base={"threads": 1}))
    lines: list[str] = []
    res = run_sweep(grid, launcher="papermill", cwd=REPO, log=lines.append, jobs=2)
    assert [r.status for r in res] == ["done", "done"], [r.error for r in res]
    assert [r.run_id for r in res] == [c.run_id for c in grid.cells]  # results keep the grid's order
    assert sum("starting" in line for line in lines) == 2
    with pytest.raises(ValueError, match="inprocess"):
        run_sweep(grid, launcher="inprocess", jobs=2)
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_sweep(grid, launcher="papermill", jobs=0)
