"""Study report (tokenmix.report.study): the paper-reported numbers (data file, names, matching,
markdown), accuracy vs time, the gallery, and write_study_figures' determinism."""
from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tokenmix import methods  # noqa: E402
from tokenmix.data import dataset_info, make_synthetic  # noqa: E402
from tokenmix.models import available_models  # noqa: E402
from tokenmix.report import (
    results_table,  # noqa: E402
    study,  # noqa: E402
)
from tokenmix.report.study import (PAPER_COLUMNS, PAPER_SOURCE, PAPER_TOP1, paper_match, paper_pivot, paper_results,
                                   paper_table_markdown, parse_label, plot_accuracy_vs_time, plot_gallery,
                                   results_with_paper, write_study_figures)
from tokenmix.train.runs import atomic_write_json, list_runs, write_metrics  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def papers() -> pd.DataFrame:
    return paper_results()


# ---------------------------------------------------------------------------------------------
# the data file

def test_paper_results_columns_and_values(papers):
    assert tuple(papers.columns) == PAPER_COLUMNS
    assert len(papers) > 50
    assert papers["top1"].dtype == float
    assert ((papers["top1"] > 0) & (papers["top1"] < 100)).all()
    for col in ("paper", "source", "dataset", "model", "method"):
        assert (papers[col].str.len() > 0).all(), col
    assert not papers.duplicated().any()
    assert set(papers["paper"]) == {"TransMix", "TokenMix", "TokenMixup", "SMMix", "TL-Align", "MixPro"}
    for row in papers.itertuples():  # every source names a table of its paper
        assert re.fullmatch(re.escape(row.paper) + r" ((suppl\. )?Table A?\d+|abstract)", row.source), row.source


def test_paper_results_use_our_names(papers):
    assert set(papers["dataset"]) <= {"imagenet", "cifar100", "cifar10"}
    models = set(available_models())
    for m in set(papers["model"]):
        assert m in models or re.fullmatch(r"pvt_(tiny|small|medium|large) \(v1\)", m), m
    for label in set(papers["method"]):
        name, variant, kwargs = parse_label(label)
        assert name in methods.available(), label
        params = methods.parameters(name)
        assert set(kwargs) <= set(params), label
        if variant is not None:
            assert variant in methods.method_class(name).variants, label
        methods.get(name, num_classes=10, **study._typed(name, kwargs), **({"variant": variant} if variant else {}))
    # PVT v1 rows say so
    assert papers[papers["model"].str.endswith("(v1)")]["notes"].str.contains("PVT v1").all()


@pytest.mark.parametrize("source,model,method,top1", [
    ("TL-Align Table 1", "deit_tiny_patch16_224", "cutmix", 72.2),
    ("TL-Align Table 1", "deit_tiny_patch16_224", "tl_align", 73.2),
    ("TL-Align Table 1", "deit_small_patch16_224", "tl_align", 80.6),
    ("TL-Align Table 1", "deit_base_patch16_224", "tl_align", 82.3),
    ("TL-Align Table 1", "swin_tiny_patch4_window7_224", "tl_align", 81.4),
    ("SMMix Table 1", "deit_tiny_patch16_224", "smmix", 73.6),
    ("SMMix Table 1", "deit_small_patch16_224", "smmix", 81.1),
    ("SMMix Table 1", "pvt_tiny (v1)", "smmix", 76.4),
    ("TokenMix Table 1", "deit_base_patch16_224", "tokenmix", 82.9),
    ("TokenMix Table 1", "cait_xxs24_224", "tokenmix", 78.0),
    ("TransMix suppl. Table 2", "deit_small_patch16_224", "transmix", 80.7),
    ("TokenMixup Table 1", "cct_7_3x1", "tokenmixup{tokenmixup_mode=htm}", 83.56),
])
def test_spot_checks_against_the_paper_texts(papers, source, model, method, top1):
    sel = papers[(papers.source == source) & (papers.model == model) & (papers.method == method)]
    assert top1 in set(sel["top1"]), sel


def test_parse_label():
    assert parse_label("cutmix") == ("cutmix", None, {})
    assert parse_label("tl_align[paper]") == ("tl_align", "paper", {})
    assert parse_label("tokenmixup[paper]{tokenmixup_mode=vtm,tau=0.5}") == ("tokenmixup", "paper", {"tokenmixup_mode": "vtm", "tau": "0.5"})
    for bad in ("", "cut mix", "cutmix{mode}", "x[paper"):
        with pytest.raises(ValueError):
            parse_label(bad)


# ---------------------------------------------------------------------------------------------
# matching

def test_results_with_paper_matches_dataset_model_and_method(papers):
    ours = pd.DataFrame({
        "method": ["transmix", "tl_align", "tl_align[paper]", "tokenmixup[paper]{tokenmixup_mode=htm}", "tokenmixup[paper]",
                   "tokenmixup[paper]{tokenmixup_mode=vtm}", "cutmix", "transmix", "smmix"],
        "model": ["deit_small_patch16_224", "deit_small_patch16_224", "deit_small_patch16_224", "cct_7_3x1",
                  "cct_7_3x1", "cct_7_3x1", "vit_cpu", "vit_cpu", "deit_small_patch16_224"],
        "dataset": ["imagenet", "imagenet", "imagenet", "cifar100", "cifar100", "cifar100", "fashion_mnist",
                    "fashion_mnist", "cifar10"],
        "top1_mean": np.arange(9, dtype=float),
    })
    out = results_with_paper(ours, papers)
    assert list(out.columns) == list(ours.columns) + [PAPER_TOP1, PAPER_SOURCE]
    assert out[PAPER_TOP1].dtype == float
    # the method's own paper first: TransMix's 80.7 (not TL-Align's reproduction, 80.1)
    assert out.loc[0, PAPER_TOP1] == 80.7 and out.loc[0, PAPER_SOURCE] == "TransMix suppl. Table 2"
    assert out.loc[1, PAPER_TOP1] == 80.6 and out.loc[1, PAPER_SOURCE] == "TL-Align Table 1"
    assert out.loc[2, PAPER_TOP1] == 80.2 and out.loc[2, PAPER_SOURCE] == "TL-Align Table 7"  # exact variant
    # tokenmixup_mode=htm is TokenMixup's default: with or without it in the label, the HTM number
    assert out.loc[3, PAPER_TOP1] == out.loc[4, PAPER_TOP1] == 83.56
    assert out.loc[5, PAPER_TOP1] == 83.54
    # the CPU study matches nothing; nor does a dataset/model pair no paper reports for that method
    for i in (6, 7, 8):
        assert math.isnan(out.loc[i, PAPER_TOP1]) and out.loc[i, PAPER_SOURCE] == ""
    pd.testing.assert_frame_equal(out[list(ours.columns)], ours)  # ours untouched


def test_results_with_paper_on_the_cpu_study_leaves_the_column_empty(runs_dir):
    df = results_table(list_runs(runs_dir))
    out = results_with_paper(df)
    assert len(out) == len(df) and out[PAPER_TOP1].isna().all() and (out[PAPER_SOURCE] == "").all()


def test_paper_match_none_for_unknown_label(papers):
    assert paper_match(papers, "imagenet", "deit_small_patch16_224", "not a label!") is None


def test_paper_table_markdown_groups_by_source(papers):
    md = paper_table_markdown(papers)
    sources = list(dict.fromkeys(papers["source"]))
    headers = re.findall(r"^### (.+) \(", md, flags=re.M)
    assert headers == sources
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| dataset")]
    assert len(body) == len(papers)
    assert "| imagenet | deit_small_patch16_224" in md.replace("  ", " ") or "deit_small_patch16_224" in md
    piv = paper_pivot(papers, sources=["SMMix Table 1"])
    assert piv.loc[("SMMix Table 1", "imagenet", "deit_tiny_patch16_224"), "smmix"] == "73.6"
    assert piv.loc[("SMMix Table 1", "imagenet", "cait_xxs24_224"), "transmix"] == ""


# ---------------------------------------------------------------------------------------------
# accuracy vs time

def fake_run(root, run_id, method="cutmix", seed=0, final=70.0, tpe=10.0, model="vit_cpu",
             dataset="fashion_mnist", method_kwargs=None, variant="official"):
    d = root / run_id
    atomic_write_json(d / "config.json", {"method": method, "variant": variant, "model": model, "dataset": dataset,
                                          "seed": seed, "epochs": 2, "method_kwargs": method_kwargs or {}})
    write_metrics(d / "metrics.jsonl", [{"epoch": e + 1, "train_loss": 2.0 - 0.1 * e, "top1": final - 1 + e,
                                         "epoch_time": tpe} for e in range(2)])
    atomic_write_json(d / "summary.json", {"status": "complete", "run_id": run_id, "method": method,
                                           "variant": variant, "model": model, "dataset": dataset, "seed": seed,
                                           "epochs": 2, "final_top1": final, "best_top1": final,
                                           "time_per_epoch_s": tpe, "images_per_s": 100.0})
    return d


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1):
        fake_run(root, f"cutmix-s{s}", "cutmix", s, final=80.0 + 2 * s, tpe=10.0)
        fake_run(root, f"transmix-s{s}", "transmix", s, final=81.0 + 2 * s, tpe=12.0)
        fake_run(root, f"tmu-vtm-s{s}", "tokenmixup", s, final=79.0, tpe=15.0, method_kwargs={"tokenmixup_mode": "vtm"},
                 variant="paper")
    fake_run(root, "syn-mixup-s0", "mixup", 0, final=50.0, dataset="synthetic")  # no CutMix there: left out
    return root


def test_plot_accuracy_vs_time_one_point_per_method(runs_dir):
    df = results_table(list_runs(runs_dir))
    fig = plot_accuracy_vs_time(df)
    ax = fig.axes[0]
    assert len(ax.containers) == 3
    labels = sorted(c.get_label() for c in ax.containers)
    assert labels == ["cutmix", "tokenmixup[paper]{tokenmixup_mode=vtm}", "transmix"]
    points = {c.get_label(): tuple(np.asarray(c.lines[0].get_xydata())[0]) for c in ax.containers}
    assert points["cutmix"] == pytest.approx((1.0, 81.0))
    assert points["transmix"] == pytest.approx((1.2, 82.0))
    assert points["tokenmixup[paper]{tokenmixup_mode=vtm}"] == pytest.approx((1.5, 79.0))
    # error bars: the sample std over the two seeds (sqrt(2) for cutmix)
    cut = next(c for c in ax.containers if c.get_label() == "cutmix")
    seg = cut.lines[2][0].get_segments()[0]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * math.sqrt(2))


def test_plot_accuracy_vs_time_needs_cutmix(runs_dir):
    df = results_table(list_runs(runs_dir))
    with pytest.raises(ValueError, match="CutMix"):
        plot_accuracy_vs_time(df[df.dataset == "synthetic"])


# ---------------------------------------------------------------------------------------------
# gallery and the report files

ALL_METHODS = ("none", "mixup", "cutmix", "mixup_cutmix", "transmix", "tokenmix", "tokenmixup{tokenmixup_mode=htm}",
               "tokenmixup{tokenmixup_mode=vtm}", "smmix", "tl_align", "tl_align[paper]", "mixpro", "mixpro[official]",
               "compose{label=transmix,mask=maskmix}")


def test_plot_gallery_runs_for_every_method():
    info = dataset_info("synthetic")
    x, y = make_synthetic(8, 10, 32, seed=0)
    images = (x.float() / 255 - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1)
    assert {parse_label(m)[0] for m in ALL_METHODS} == set(methods.available())
    fig = plot_gallery(images, y, methods=ALL_METHODS, n=4, class_names=info.classes, mean=info.mean, std=info.std)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == len(ALL_METHODS) * 4
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert len(ylabels) == len(ALL_METHODS)
    assert any(lab.startswith("tokenmix\n") and "no teacher" in lab for lab in ylabels)
    # titles: the target's top-2 classes with weights
    assert re.fullmatch(r"colour\d \d\.\d\d\ncolour\d \d\.\d\d", image_axes[0].get_title())


def test_plot_gallery_is_seeded():
    x, y = make_synthetic(6, 10, 32, seed=0)
    a = plot_gallery(x.float(), y, methods=("cutmix", "smmix"), n=4, seed=3)
    b = plot_gallery(x.float(), y, methods=("cutmix", "smmix"), n=4, seed=3)
    for ax_a, ax_b in zip(a.axes, b.axes):
        assert ax_a.get_title() == ax_b.get_title()
        np.testing.assert_array_equal(ax_a.images[0].get_array(), ax_b.images[0].get_array())


def test_write_study_figures_is_deterministic(runs_dir, tmp_path, monkeypatch):
    info = dataset_info("synthetic")
    x, y = make_synthetic(6, 10, 32, seed=0)
    images = (x.float() / 255 - 0.5) / 0.25
    # the gallery from a small synthetic batch (the real one reads the local Fashion-MNIST test split)
    monkeypatch.setattr(study, "gallery_batch", lambda data_dir="data", n=6: (images, y, torch.arange(6), info))
    a = write_study_figures(runs_dir, tmp_path / "a")
    b = write_study_figures(runs_dir, tmp_path / "b")
    names = [p.name for p in a]
    assert names == ["accuracy_vs_time.png", "accuracy_vs_time.svg", "gallery.png", "gallery.svg",
                     "paper_results.md"]
    assert [p.name for p in b] == names
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    mtimes = [p.stat().st_mtime_ns for p in a]
    write_study_figures(runs_dir, tmp_path / "a")  # unchanged files are not rewritten
    assert [p.stat().st_mtime_ns for p in a] == mtimes
    assert (tmp_path / "a" / "paper_results.md").read_text().startswith("# Paper-reported results")


def test_write_study_figures_without_runs_or_data(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "gallery_batch", lambda data_dir="data", n=6: None)
    paths = write_study_figures(tmp_path / "no-runs", tmp_path / "fig")
    assert [p.name for p in paths] == ["paper_results.md"]


def test_load_fidelity(tmp_path):
    assert study.load_fidelity(tmp_path) is None
    pd.DataFrame({"method": ["cutmix"], "value": [0.5]}).to_csv(tmp_path / "label_fidelity.csv", index=False)
    df = study.load_fidelity(tmp_path)
    assert list(df.columns) == ["method", "value"]
    fig = study.plot_fidelity_if_available(df)  # None unless tokenmix.report.fidelity can plot it
    assert fig is None or isinstance(fig, matplotlib.figure.Figure)


def test_paper_table_markdown_selects_sources(papers):
    md = paper_table_markdown(papers, sources=study.MAIN_TABLES)
    assert re.findall(r"^### (.+) \(", md, flags=re.M) == list(study.MAIN_TABLES)
    assert set(study.MAIN_TABLES) <= set(papers["source"])


def test_spread_positions_keeps_order_and_gap():
    from tokenmix.report.study import spread_positions
    vals = [0.50, 0.51, 0.505, 0.9, 0.1, 0.995]
    out = spread_positions(vals, gap=0.05)
    order = sorted(range(len(vals)), key=lambda i: vals[i])
    ranked = [out[i] for i in order]
    assert all(b - a >= 0.05 - 1e-12 for a, b in zip(ranked, ranked[1:]))  # order kept, gap held
    assert min(out) >= 0.0 and max(out) <= 1.0
    assert out[4] == pytest.approx(0.1)  # an isolated label does not move
    assert spread_positions([0.2, 0.7], gap=0.1) == [0.2, 0.7]  # nothing to do
    assert spread_positions([0.5, 0.5], gap=0.2) == pytest.approx([0.5, 0.7])  # hand-computed push-up
    assert spread_positions([1.0, 1.0], gap=0.2) == pytest.approx([0.8, 1.0])  # pulled down from the top
    many = spread_positions([0.5] * 5, gap=0.5)  # cannot fit: centred on [0, 1]
    assert (min(many) + max(many)) / 2 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gap"):
        spread_positions([0.1], gap=-1.0)


def test_plot_accuracy_vs_time_labels_do_not_overlap(runs_dir):
    from matplotlib.text import Text
    df = results_table(list_runs(runs_dir))
    ok = df["rel_time_vs_cutmix"].notna()
    df.loc[ok, "top1_mean"] = 80.0 + 0.01 * np.arange(int(ok.sum()))  # three points at one height
    df.loc[ok, "rel_time_vs_cutmix"] = 1.0 + 0.01 * np.arange(int(ok.sum()))
    fig = plot_accuracy_vs_time(df)
    fig.canvas.draw()
    boxes = [Text.get_window_extent(t) for t in fig.axes[0].texts]  # the text alone, not its leader line
    assert len(boxes) == 3
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
