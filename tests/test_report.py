"""Report: results table arithmetic, markdown, the report command (files, idempotence, no runs),
and the figure functions' structure."""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tokenmix import methods  # noqa: E402
from tokenmix.methods import TokenGrid  # noqa: E402
from tokenmix.report import (OUTPUTS, main, markdown_table, mixed_targets_table, paired_table, plot_curves,
                             results_markdown, results_table, show_attention, show_images, show_mixed_batch,
                             summary_table)
from tokenmix.report.tables import holm
from tokenmix.report.figures import unnormalize
from tokenmix.train.runs import atomic_write_json, list_runs, load_run, write_metrics  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def fake_run(root, run_id, method="cutmix", seed=0, final=70.0, best=None, tpe=10.0, ips=100.0,
             model="vit_cpu", dataset="fashion_mnist", epochs=2, variant="official", status="complete",
             method_kwargs=None):
    """A run folder as the engine writes it (only the fields the report reads matter)."""
    d = root / run_id
    atomic_write_json(d / "config.json", {"method": method, "variant": variant, "model": model,
                                          "dataset": dataset, "seed": seed, "epochs": epochs,
                                          "method_kwargs": method_kwargs or {}})
    best = final if best is None else best
    history = [{"epoch": e + 1, "train_loss": 2.0 - 0.1 * e, "top1": final - (epochs - 1 - e),
                "epoch_time": tpe, "images_per_s": ips} for e in range(epochs)]
    write_metrics(d / "metrics.jsonl", history)
    if status is not None:
        summary = {"status": status, "run_id": run_id, "method": method, "variant": variant, "model": model,
                   "dataset": dataset, "seed": seed, "epochs": epochs}
        if status == "complete":
            summary.update(final_top1=final, best_top1=best, time_per_epoch_s=tpe, images_per_s=ips)
        atomic_write_json(d / "summary.json", summary)
    return d


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # CutMix, 3 seeds: final 70/72/74 -> mean 72, sample std 2; best 71/73/75 -> 73; 10/12/14 s -> 12 s
    for s, (f, t, i) in enumerate([(70.0, 10.0, 100.0), (72.0, 12.0, 200.0), (74.0, 14.0, 300.0)]):
        fake_run(root, f"fm-cutmix-s{s}", "cutmix", s, final=f, best=f + 1, tpe=t, ips=i)
    # Mixup, 2 seeds: 60/64 -> mean 62, std sqrt(8); 18 s -> 1.5x CutMix's 12 s
    fake_run(root, "fm-mixup-s0", "mixup", 0, final=60.0, tpe=18.0, ips=50.0)
    fake_run(root, "fm-mixup-s1", "mixup", 1, final=64.0, tpe=18.0, ips=70.0)
    # the paper variant of mixup is its own row
    fake_run(root, "fm-mixup-paper-s0", "mixup", 0, final=10.0, tpe=6.0, variant="paper")
    # another dataset without CutMix: no relative time
    fake_run(root, "syn-mixup-s0", "mixup", 0, final=50.0, dataset="synthetic", tpe=3.0)
    # ignored: a failed run and an unfinished one (no summary) with absurd numbers
    fake_run(root, "fm-cutmix-failed", "cutmix", 9, final=0.0, status="failed")
    fake_run(root, "fm-cutmix-running", "cutmix", 8, final=0.0, status=None)
    return root


def row(df: pd.DataFrame, method: str, dataset: str = "fashion_mnist") -> pd.Series:
    sel = df[(df.method == method) & (df.dataset == dataset)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ---------------------------------------------------------------------------------------------
# results table

def test_results_table_aggregates_over_seeds(runs_dir):
    df = results_table(list_runs(runs_dir))
    assert list(df.columns) == ["method", "model", "dataset", "train_images", "epochs", "n_seeds", "top1_mean",
                                "top1_std", "best_top1", "train_top1", "time_per_epoch_s", "images_per_s",
                                "rel_time_vs_cutmix"]
    assert len(df) == 4  # cutmix, mixup, mixup[paper] on fashion_mnist; mixup on synthetic
    cm = row(df, "cutmix")
    assert cm.n_seeds == 3  # the failed and the unfinished runs are not counted
    assert cm.top1_mean == pytest.approx(72.0)
    assert cm.top1_std == pytest.approx(2.0)  # sample std (ddof=1)
    assert cm.best_top1 == pytest.approx(73.0)
    assert cm.time_per_epoch_s == pytest.approx(12.0)
    assert cm.images_per_s == pytest.approx(200.0)
    assert cm.epochs == "2"
    mu = row(df, "mixup")
    assert mu.n_seeds == 2
    assert mu.top1_mean == pytest.approx(62.0)
    assert mu.top1_std == pytest.approx(math.sqrt(8.0))
    assert mu.images_per_s == pytest.approx(60.0)


def test_results_table_relative_time_vs_cutmix(runs_dir):
    df = results_table(list_runs(runs_dir))
    assert row(df, "cutmix").rel_time_vs_cutmix == pytest.approx(1.0)
    assert row(df, "mixup").rel_time_vs_cutmix == pytest.approx(1.5)
    assert row(df, "mixup[paper]").rel_time_vs_cutmix == pytest.approx(0.5)
    assert math.isnan(row(df, "mixup", "synthetic").rel_time_vs_cutmix)  # no CutMix on that dataset


def test_results_table_single_seed_has_no_std_and_rows_are_sorted(runs_dir):
    df = results_table(list_runs(runs_dir))
    assert math.isnan(row(df, "mixup[paper]").top1_std)
    keys = list(zip(df.dataset, df.model, df.method))
    assert keys == sorted(keys)
    assert results_table([]).empty


def test_results_table_keeps_method_kwargs_apart(tmp_path):
    """Runs that differ in method_kwargs (e.g. TokenMix's labels) are separate rows, not seeds."""
    fake_run(tmp_path, "a", method="tokenmix", final=80.0)
    fake_run(tmp_path, "b", method="tokenmix", final=70.0, method_kwargs={"labels": "area", "mask": "random"})
    fake_run(tmp_path, "c", method="tokenmix", seed=1, final=60.0, variant="paper")
    df = results_table(list_runs(tmp_path))
    assert sorted(df["method"]) == ["tokenmix", "tokenmix[paper]", "tokenmix{labels=area,mask=random}"]
    assert (df["n_seeds"] == 1).all()


def test_paired_difference_to_cutmix_by_hand(runs_dir):
    """mixup 60/64 vs cutmix 70/72 on seeds 0/1: differences -10, -8 -> mean -9, sd sqrt(2); the
    paired t is -9 on 1 degree of freedom (a Cauchy law: p = 1 - 2 atan(9) / pi), the 95 % interval
    -9 +- t(0.975, 1) * 1 with t(0.975, 1) = tan(0.475 pi)."""
    df = paired_table(list_runs(runs_dir))
    mu = row(df, "mixup")
    assert mu.n_pairs == 2 and mu.reference == "cutmix"
    assert mu.diff_mean == pytest.approx(-9.0) and mu.diff_std == pytest.approx(math.sqrt(2))
    half = math.tan(0.475 * math.pi)
    assert (mu.ci_low, mu.ci_high) == (pytest.approx(-9 - half), pytest.approx(-9 + half))
    assert mu.t == pytest.approx(-9.0)
    assert mu.p_value == pytest.approx(1 - 2 * math.atan(9) / math.pi)
    assert mu.p_holm == pytest.approx(mu.p_value)  # mixup[paper] has one pair: no p, not in the family
    assert not mu.significant
    paper = row(df, "mixup[paper]")
    assert paper.n_pairs == 1 and paper.diff_mean == pytest.approx(-60.0) and math.isnan(paper.p_value)
    assert "cutmix" not in set(df.method)  # the reference is not compared with itself
    assert "synthetic" not in set(df.dataset)  # no CutMix there: nothing to pair with


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04); NaN stays out
    assert np.allclose(holm([0.01, 0.04, 0.03, float("nan")])[:3], [0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, 0.04, 0.03, float("nan")])[3])
    assert holm([0.6, 0.9]).tolist() == [1.0, 1.0]  # capped at 1


def test_runs_under_different_protocols_are_neither_pooled_nor_paired(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path, f"c{seed}", "cutmix", seed, final=70.0 + seed)
        fake_run(tmp_path, f"m{seed}", "mixup", seed, final=72.0 + seed)
        fake_run(tmp_path, f"m-long{seed}", "mixup", seed, final=90.0, epochs=5)  # another schedule
    runs = list_runs(tmp_path)
    df = results_table(runs)
    assert sorted(zip(df.method, df.epochs)) == [("cutmix", "2"), ("mixup", "2"), ("mixup", "5")]
    paired = paired_table(runs)
    assert len(paired) == 1  # the 5-epoch runs have no CutMix under their protocol
    r = paired.iloc[0]
    # identical differences (+2 on every seed): zero variance, an exact interval and p = 0
    assert r.diff_mean == pytest.approx(2.0) and r.ci_low == r.ci_high == pytest.approx(2.0)
    assert r.p_value == 0.0 and r.significant


def test_markdown_shows_the_paired_difference(runs_dir):
    runs = list_runs(runs_dir)
    md = results_markdown(results_table(runs), paired_table(runs))
    line = next(line for line in md.splitlines() if line.startswith("| mixup ") and "fashion_mnist" in line)
    assert "-9.00 [-21.71, +3.71]" in line and "*" not in line.split("|")[8]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_has_one_line_per_row(runs_dir):
    df = results_table(list_runs(runs_dir))
    md = results_markdown(df)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(df)  # header, separator, rows
    header = cells(table[0])
    body = {tuple(cells(line)[:3]): dict(zip(header, cells(line))) for line in table[2:]}
    cutmix = body[("cutmix", "vit_cpu", "fashion_mnist")]
    assert cutmix["seeds"] == "3" and cutmix["top-1 (%)"] == "72.00 ± 2.00"
    assert cutmix["best top-1 (%)"] == "73.00" and cutmix["time vs CutMix"] == "1.00×"
    mixup = body[("mixup", "vit_cpu", "fashion_mnist")]
    assert mixup["top-1 (%)"] == f"62.00 ± {math.sqrt(8):.2f}" and mixup["time vs CutMix"] == "1.50×"
    assert body[("mixup", "vit_cpu", "synthetic")]["time vs CutMix"] == "—"  # no CutMix reference
    assert body[("mixup[paper]", "vit_cpu", "fashion_mnist")]["top-1 (%)"] == "10.00"  # one seed: no std
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_markdown_table_formatting():
    df = pd.DataFrame({"name": ["a|b", "c"], "x": [1.23456, float("nan")], "n": [3, 10]})
    md = markdown_table(df, floatfmt=".1f")
    lines = md.splitlines()
    assert lines[0].split("|")[1].strip() == "name"
    assert set(lines[1].replace("|", "")) <= {"-", ":"}
    assert lines[1].split("|")[2].endswith(":") and not lines[1].split("|")[1].endswith(":")  # numbers right
    assert "a\\|b" in lines[2] and "1.2" in lines[2] and "—" in lines[3]
    assert len(lines) == 4 and md.endswith("\n")


# ---------------------------------------------------------------------------------------------
# the report command

def test_main_writes_files_and_is_idempotent(runs_dir, tmp_path, capsys):
    figs = tmp_path / "figures"
    assert main(["--runs", str(runs_dir), "--figures", str(figs)]) == 0
    names = sorted(p.name for p in figs.iterdir())
    # the core files; the study files (tokenmix.report.study.STUDY_OUTPUTS) and other report
    # modules may add more, which must be just as reproducible
    assert set(OUTPUTS) <= set(names)
    first = {name: (figs / name).read_bytes() for name in names}
    assert all(first.values())
    out = capsys.readouterr().out
    assert "7 complete run(s)" in out and "2 unfinished or failed skipped" in out
    # a second call, and a call into a fresh folder, give the same bytes
    assert main(["--runs", str(runs_dir), "--figures", str(figs)]) == 0
    figs2 = tmp_path / "figures2"
    assert main(["--runs", str(runs_dir), "--figures", str(figs2)]) == 0
    assert sorted(p.name for p in figs2.iterdir()) == names
    for name in names:
        assert (figs / name).read_bytes() == first[name], name
        assert (figs2 / name).read_bytes() == first[name], name
    csv = pd.read_csv(figs / "results.csv")
    df = results_table(list_runs(runs_dir))
    assert len(csv) == len(df)
    np.testing.assert_allclose(csv.top1_mean, df.top1_mean, atol=1e-4)
    assert b"<dc:date>" not in first["training_curves.svg"]
    assert (figs / "results.md").read_text() == results_markdown(df, paired_table(list_runs(runs_dir)))


@pytest.mark.parametrize("setup", ["missing", "empty", "incomplete"])
def test_main_without_complete_runs_writes_nothing(tmp_path, capsys, setup):
    runs = tmp_path / "runs"
    if setup != "missing":
        runs.mkdir()
    if setup == "incomplete":
        fake_run(runs, "unfinished", status=None)
        fake_run(runs, "failed", status="failed")
    figs = tmp_path / "figures"
    if setup == "missing":  # a typo'd folder: one line, exit 2
        with pytest.raises(SystemExit) as e:
            main(["--runs", str(runs), "--figures", str(figs)])
        assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
        assert not figs.exists()
        return
    assert main(["--runs", str(runs), "--figures", str(figs)]) == 0
    assert not figs.exists()
    out = capsys.readouterr().out
    assert "nothing written" in out and ("no run records" in out or "none complete" in out)


def test_cli_report_command(runs_dir, tmp_path):
    from tokenmix.__main__ import main as cli
    figs = tmp_path / "f"
    assert cli(["report", "--runs", str(runs_dir), "--figures", str(figs)]) == 0
    assert (figs / "results.md").is_file()


# ---------------------------------------------------------------------------------------------
# figures

def test_unnormalize_inverts_normalisation():
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 4, 5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = unnormalize(x, mean, std)
    assert out.shape == (2, 4, 5, 3)
    np.testing.assert_allclose(out, raw.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    grey = unnormalize(torch.randn(3, 1, 6, 6))  # no statistics: min-max per image
    assert grey.shape == (3, 6, 6, 1) and grey.min() == 0.0 and grey.max() == 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_show_images_grid(channels, tmp_path):
    x = torch.randn(5, channels, 8, 8)
    fig = show_images(x, labels=[0, 1, 2, 3, 4], class_names=list("abcde"), mean=(0.5,) * channels,
                      std=(0.2,) * channels, ncols=3, title="t", save=tmp_path / "imgs")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 5 and all(len(ax.images) == 1 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == list("abcde")
    assert fig.axes[0].images[0].get_array().shape == ((8, 8) if channels == 1 else (8, 8, 3))
    assert (tmp_path / "imgs.png").stat().st_size > 0 and (tmp_path / "imgs.svg").stat().st_size > 0


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_show_mixed_batch(name):
    grid = TokenGrid.for_image(16, 4)  # 4x4 tokens
    method = methods.get(name, num_classes=10)
    method.grid = grid
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    mixed = method.mix(x, y)
    fig = show_mixed_batch(mixed, grid, [f"c{k}" for k in range(10)], (0.5,), (0.25,), n=4, num_classes=10)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * 4 + 1  # image, mask, target bars per sample + the colour bar
    img_axes = [ax for ax in fig.axes if len(ax.images) == 1]
    mask_axes = [ax for ax in fig.axes if len(ax.images) == 2]
    assert len(img_axes) == 4 and len(mask_axes) == 4
    heat = mask_axes[0].images[1].get_array()
    assert heat.shape == (16, 16)
    # the heatmap is the partner mask upsampled per token
    np.testing.assert_allclose(heat[::4, ::4].reshape(-1), mixed.partner_mask[0].numpy(), atol=1e-6)
    bars = [ax for ax in fig.axes if ax.patches]
    assert len(bars) == 4 and all(len(ax.patches) == 2 for ax in bars)
    top = sorted((p.get_width() for p in bars[0].patches), reverse=True)
    np.testing.assert_allclose(top, mixed.target[0].topk(2).values.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        show_mixed_batch(mixed, grid, None, None, None, n=2, num_classes=7)
    tab = mixed_targets_table(mixed, n=3)
    assert len(tab) == 3
    np.testing.assert_allclose(tab["lam_area"] + tab["partner_share"], 1.0, atol=2e-3)


def test_show_attention():
    grid = TokenGrid.for_image(12, 4)  # 3x3 tokens
    attn = torch.zeros(3, 9)
    attn[:, 4] = 1.0  # all attention on the centre token
    fig = show_attention(torch.randn(3, 3, 12, 12), attn, grid, (0.5,) * 3, (0.2,) * 3, labels=[0, 1, 2],
                         preds=[0, 2, 2], class_names=["a", "b", "c"], ncols=2)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    overlays = [ax for ax in fig.axes if len(ax.images) == 2]
    assert len(overlays) == 3
    m = overlays[0].images[1].get_array()
    assert m.shape == (12, 12) and m[6, 6] == pytest.approx(1.0) and m[0, 0] == pytest.approx(0.0)
    assert sorted(ax.get_title() for ax in fig.axes if ax.get_title()) == ["a\npred: a", "b\npred: c", "c\npred: c"]
    with pytest.raises(ValueError, match="token grid"):
        show_attention(torch.randn(3, 3, 12, 12), torch.rand(3, 10), grid)


def test_plot_curves(runs_dir, tmp_path):
    runs = [r for r in list_runs(runs_dir) if r.complete]
    fig = plot_curves(runs, save=tmp_path / "curves")
    assert isinstance(fig, Figure)
    ax_loss, ax_acc = fig.axes
    assert len(ax_loss.lines) == len(runs) and len(ax_acc.lines) == len(runs)
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [r["top1"] for r in runs[0].metrics])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == f"{runs[0].config['method']}/{runs[0].run_id}"
    assert any(lab.startswith("mixup[paper]/") for lab in labels)
    one = plot_curves(load_run(runs_dir / "fm-mixup-s0"))
    assert len(one.axes) == 2 and len(one.axes[0].lines) == 1
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "curves.svg").is_file()


def test_summary_table():
    tab = summary_table({"final_top1": 71.23456, "run_id": "r", "git_commit": "abc", "epochs": 2})
    assert list(tab.index) == ["run_id", "epochs", "final_top1"]  # known keys, in a fixed order
    assert tab.loc["final_top1", "value"] == 71.23


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    from tokenmix.report import README_END, README_START, update_readme
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n")
    assert update_readme(readme, "| a |\n|---|\n| 1 |\n")
    text = readme.read_text()
    assert text == f"# t\n\nbefore\n{README_START}\n| a |\n|---|\n| 1 |\n{README_END}\nafter\n"
    assert not update_readme(readme, "| a |\n|---|\n| 1 |")  # unchanged -> not rewritten
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(readme, "x")


# ---------------------------------------------------------------------------------------------
# the regime pilot

def _regime_run(root, run_id, method, n, epochs, final, train_top1, hflip=False):
    d = fake_run(root, run_id, method, 0, final=final, epochs=epochs)
    cfg = json.loads((d / "config.json").read_text())
    atomic_write_json(d / "config.json", {**cfg, "train_subset": n, "hflip": hflip, "crop_padding": 0 if not hflip else -1})
    summ = json.loads((d / "summary.json").read_text())
    atomic_write_json(d / "summary.json", {**summ, "final_train_top1": train_top1})
    return d


def test_regime_table_summary_and_report(tmp_path):
    from tokenmix.report.regime import REGIME_OUTPUTS, regime_summary, regime_table, write_regime_report
    root = tmp_path / "pilot"
    _regime_run(root, "a-none", "none", 1000, 3, 70.0, 100.0)
    _regime_run(root, "a-cutmix", "cutmix", 1000, 3, 76.0, 90.0)
    _regime_run(root, "a-mixup", "mixup", 1000, 3, 73.0, 95.0)
    _regime_run(root, "b-none", "none", 5000, 2, 82.0, 88.0, hflip=True)
    _regime_run(root, "b-cutmix", "cutmix", 5000, 2, 80.0, 81.0, hflip=True)
    t = regime_table(list_runs(root))
    assert len(t) == 5 and set(t.regime) == {"1000 img x 3 ep, no aug, vit_cpu", "5000 img x 2 ep, crop+flip, vit_cpu"}
    a = t[t.regime.str.startswith("1000")]
    assert list(a.method) == ["none", "mixup", "cutmix"]  # baselines first
    assert a.set_index("method").loc["cutmix", "gap"] == pytest.approx(14.0)
    assert a.set_index("method").loc["cutmix", "vs_none"] == pytest.approx(6.0)
    assert (t.images_seen == t.train_images * t.epochs).all()
    s = regime_summary(t).set_index("regime")
    assert s.loc["1000 img x 3 ep, no aug, vit_cpu", "cutmix - none"] == pytest.approx(6.0)
    assert s.loc["1000 img x 3 ep, no aug, vit_cpu", "best mixing - none"] == pytest.approx(6.0)
    assert s.loc["5000 img x 2 ep, crop+flip, vit_cpu", "cutmix - none"] == pytest.approx(-2.0)
    assert s.loc["1000 img x 3 ep, no aug, vit_cpu", "gap of none"] == pytest.approx(30.0)
    paths = write_regime_report(root, tmp_path / "figs")
    assert sorted(p.name for p in paths) == sorted(REGIME_OUTPUTS)
    first = {p.name: p.read_bytes() for p in paths}
    write_regime_report(root, tmp_path / "figs2")
    assert {p.name: (tmp_path / "figs2" / p.name).read_bytes() for p in paths} == first
    assert write_regime_report(tmp_path / "nothing", tmp_path / "figs3") == [] and not (tmp_path / "figs3").exists()


def test_ablation_table_pairs_each_rule_with_its_masks_area_label(tmp_path):
    """Hand case: mask A area 70/72/74, A+teacher 71/74/74 (diffs 1, 2, 0); mask B area 60/60/60
    and B+pal 61/62/63 (diffs 1, 2, 3); a paper-variant area run of A is never paired with A's."""
    from tokenmix.report import ablation_table
    from tokenmix.report.tables import ablation_markdown

    root = tmp_path / "abl"
    cells = {("A", "area"): (70.0, 72.0, 74.0), ("A", "teacher"): (71.0, 74.0, 74.0),
             ("B", "area"): (60.0, 60.0, 60.0), ("B", "pal"): (61.0, 62.0, 63.0)}
    for (mask, label), finals in cells.items():
        for s, f in enumerate(finals):
            fake_run(root, f"{mask}-{label}-s{s}", method="compose", seed=s, final=f,
                     method_kwargs={"mask": mask, "label": label})
    fake_run(root, "A-area-paper-s0", method="compose", seed=0, final=99.0, variant="paper",
             method_kwargs={"mask": "A", "label": "area"})
    t = ablation_table(list_runs(root))
    row = t[(t["mask"] == "A") & (t["label"] == "teacher")].iloc[0]
    assert row.n_pairs == 3 and row.diff_mean == pytest.approx(1.0)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd (= 1) / sqrt(3)
    assert (row.ci_low, row.ci_high) == (pytest.approx(1 - half), pytest.approx(1 + half))
    b = t[(t["mask"] == "B") & (t["label"] == "pal")].iloc[0]
    assert b.diff_mean == pytest.approx(2.0) and b.n_pairs == 3
    paper = t[t["mask"] == "A[paper]"]
    assert list(paper["label"]) == ["area"] and int(paper["n_seeds"].iloc[0]) == 1  # its own family
    ref = t[(t["mask"] == "A") & (t["label"] == "area")].iloc[0]
    assert ref.top1_mean == pytest.approx(72.0) and ref.diff_mean == 0.0
    md = ablation_markdown(t)
    assert "+1.00 [" in md and "0 (reference)" in md and "| B " in md
