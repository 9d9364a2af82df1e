"""TokenMix analysis and figures: the occlusion test (exact counts, nesting, ratio 0 = plain
accuracy, all patches dropped = a constant image, same occlusions for every model and batch size),
the figure functions (structure, files), and the report's occlusion figure from tiny runs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tokenmix import RunConfig  # noqa: E402
from tokenmix.analysis.experiments import occlusion_runs
from tokenmix.analysis.probes import (OCCLUSION_RATIOS, black_level, occlude, occlusion_accuracy, occlusion_count,
                                      occlusion_mask, occlusion_ranks)
from tokenmix.data import DEBIAN_FASHION_MNIST, dataset_info  # noqa: E402
from tokenmix.methods.base import TokenGrid  # noqa: E402
from tokenmix.methods.teacher_maps import TeacherMaps  # noqa: E402
from tokenmix.methods.tokenmix import official_token_count  # noqa: E402
from tokenmix.report import OUTPUTS, main  # noqa: E402
from tokenmix.report.figures import find_root
from tokenmix.report.tokenmix import (OCCLUSION_OUTPUTS, alignment_views, find_occlusion_runs, mask_count_statistics,
                                      mask_count_table, mask_examples, occlusion_curves, occlusion_table,
                                      plot_count_statistics, plot_masks, plot_occlusion, plot_teacher_targets,
                                      sample_mask_counts, show_map_alignment, teacher_mix, write_tokenmix_occlusion)
from tokenmix.train.engine import load_model  # noqa: E402
from tokenmix.train.runs import atomic_write_json  # noqa: E402

GRID = TokenGrid(4, 4, 2, 2)  # 8x8 images, 16 patches


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


class PixelClassifier(nn.Module):
    """Linear on the flattened pixels: (B, C, 8, 8) -> (B, K); deterministic."""

    def __init__(self, c: int = 1, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(c * 64, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def images(b=40, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, 8, 8, generator=g), torch.randint(0, 4, (b,), generator=g)


# ---------------------------------------------------------------------------------------------
# occlusion

@pytest.mark.parametrize("n,ratio,k", [(10, 0.7, 7), (10, 0.3, 3), (49, 0.1, 4), (49, 0.9, 44), (196, 0.5, 98),
                                       (16, 0.0, 0), (16, 1.0, 16), (100, 0.29, 29)])
def test_occlusion_count_is_floor_of_ratio_n(n, ratio, k):
    assert occlusion_count(n, ratio) == k


@pytest.mark.parametrize("ratio", [-0.1, 1.01])
def test_occlusion_count_rejects_ratios_outside_0_1(ratio):
    with pytest.raises(ValueError, match="drop ratio"):
        occlusion_count(16, ratio)


def test_occlusion_mask_drops_exactly_floor_ratio_n_per_image():
    g = torch.Generator().manual_seed(0)
    for ratio in OCCLUSION_RATIOS + (1.0,):
        m = occlusion_mask(32, 49, ratio, g)
        assert m.dtype == torch.bool and m.shape == (32, 49)
        assert (m.sum(1) == occlusion_count(49, ratio)).all(), ratio
    # uniform: over many images every patch is dropped about equally often
    m = occlusion_mask(4000, 16, 0.25, torch.Generator().manual_seed(1)).float().mean(0)
    assert torch.allclose(m, torch.full((16,), 0.25), atol=0.03)


def test_occlusion_masks_are_nested_and_seeded():
    ranks = occlusion_ranks(8, 49, torch.Generator().manual_seed(0))
    assert (ranks.sort(1).values == torch.arange(49)).all()  # a permutation per image
    masks = [occlusion_mask(8, 49, r, ranks=ranks) for r in OCCLUSION_RATIOS]
    for a, b in zip(masks, masks[1:]):
        assert (a <= b).all()  # dropped at 10 % stays dropped at 20 %
    again = occlusion_ranks(8, 49, torch.Generator().manual_seed(0))
    assert torch.equal(ranks, again)
    assert not torch.equal(ranks, occlusion_ranks(8, 49, torch.Generator().manual_seed(1)))


def test_occlude_sets_exactly_the_dropped_patches():
    x, _ = images(3, c=2)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, 0] = mask[1, 5] = mask[2, 15] = True
    fill = torch.tensor([-1.5, 2.5])
    out = occlude(x, mask, GRID, fill)
    changed = (out != x).any(1)  # (B, H, W)
    expect = torch.zeros(3, 8, 8, dtype=torch.bool)
    expect[0, 0:2, 0:2] = expect[1, 2:4, 2:4] = expect[2, 6:8, 6:8] = True
    assert torch.equal(changed, expect)
    assert (out[0, 0, :2, :2] == -1.5).all() and (out[0, 1, :2, :2] == 2.5).all()
    assert torch.equal(occlude(x, mask, GRID, 0.0)[1, :, 2:4, 2:4], torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="token grid"):
        occlude(x[:, :, :6], mask, GRID)


def test_black_level_is_pixel_zero():
    info = dataset_info("cifar10")
    lvl = black_level(info)
    assert lvl.shape == (3,)
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    assert torch.allclose(lvl * std + mean, torch.zeros(3), atol=1e-6)
    assert torch.allclose(black_level(SimpleNamespace(mean=(0.5,), std=(0.25,))), torch.tensor([-2.0]))


def test_occlusion_accuracy_at_ratio_0_is_plain_accuracy():
    model = PixelClassifier()
    x, y = images(40)
    with torch.no_grad():
        plain = 100.0 * float((model(x).argmax(1) == y).float().mean())
    acc = occlusion_accuracy(model, x, y, GRID, ratios=(0.0,))
    assert list(acc) == [0.0] and acc[0.0] == pytest.approx(plain)


def test_occlusion_accuracy_with_every_patch_dropped_is_that_of_a_constant_image():
    model = PixelClassifier()
    x, y = images(40)
    fill = -0.7
    with torch.no_grad():
        const = int(model(torch.full((1, 1, 8, 8), fill)).argmax(1))
    acc = occlusion_accuracy(model, x, y, GRID, ratios=(1.0,), fill=fill)
    assert acc[1.0] == pytest.approx(100.0 * float((y == const).float().mean()))


def test_occlusion_accuracy_matches_a_direct_computation_and_is_batch_size_free():
    model = PixelClassifier()
    x, y = images(37)
    fill = torch.tensor([0.3])
    ratios = (0.0, 0.25, 0.5, 0.75)
    got = occlusion_accuracy(model, x, y, GRID, ratios, fill, seed=5, batch_size=256)
    assert occlusion_accuracy(model, x, y, GRID, ratios, fill, seed=5, batch_size=4) == got
    ranks = occlusion_ranks(37, 16, torch.Generator().manual_seed(5))
    with torch.no_grad():
        for r in ratios:
            xo = occlude(x, occlusion_mask(37, 16, r, ranks=ranks), GRID, fill)
            assert got[r] == pytest.approx(100.0 * float((model(xo).argmax(1) == y).float().mean())), r
    assert occlusion_accuracy(model, x, y, GRID, ratios, fill, seed=6) != got  # another seed, other patches


def test_occlusion_accuracy_uses_eval_mode_and_restores_it():
    class ModeProbe(PixelClassifier):
        seen: list = []

        def forward(self, x):
            self.seen.append(self.training)
            return super().forward(x)

    model = ModeProbe().train()
    x, y = images(8)
    occlusion_accuracy(model, x, y, GRID, ratios=(0.5,))
    assert model.seen and not any(model.seen) and model.training


def test_occlusion_curves_same_model_same_curve():
    model = PixelClassifier()
    x, y = images(24)
    curves = occlusion_curves({"a": model, "b": model}, x, y, (0.0, 0.5), seed=0, grid=GRID)
    assert curves["a"] == curves["b"] and set(curves["a"]) == {0.0, 0.5}


# ---------------------------------------------------------------------------------------------
# figures

def fake_maps(n=16, k=3, h=4, w=4, classes=4, seed=0):
    g = np.random.default_rng(seed)
    values = g.normal(size=(n, k, h, w)).astype(np.float16)
    cls = np.stack([g.permutation(classes)[:k] for _ in range(n * h * w)]).reshape(n, h, w, k)
    return TeacherMaps(values, np.ascontiguousarray(cls.transpose(0, 3, 1, 2)).astype(np.int16), {"top_k": k})


def batch_with_meta(b=6):
    x, y = images(b)
    meta = {"index": torch.arange(b), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0], [-0.25, 0.0, 0.75, 1.0]] * (b // 2)),
            "flip": torch.tensor([False, True] * (b // 2))}
    return x, y, meta


def test_plot_masks(tmp_path):
    x, y = images(6)
    mixed = mask_examples(x, y, GRID, seed=0, num_classes=4)
    assert set(mixed) == {"block", "random", "cutmix"}
    n_off = official_token_count(16)
    assert int(mixed["block"].partner_mask[0].sum()) <= n_off and int(mixed["random"].partner_mask[0].sum()) == n_off
    fig = plot_masks(x, mixed, GRID, sample=1, save=tmp_path / "masks")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4 + 1
    assert (tmp_path / "masks.png").stat().st_size > 0 and (tmp_path / "masks.svg").is_file()


@pytest.mark.parametrize("mask", ["block", "cutmix"])
def test_plot_teacher_targets(tmp_path, mask):
    x, y, meta = batch_with_meta()
    torch.manual_seed(0)
    mixed = teacher_mix(x, y, meta, fake_maps(), GRID, num_classes=4, mask=mask)
    assert mixed.kind == ("tokenmix" if mask == "block" else "cutmix") and "y_own" in mixed.extras
    fig = plot_teacher_targets(x, mixed, GRID, n=3, save=tmp_path / "t")
    assert len(fig.axes) == 6 * 3 and (tmp_path / "t.png").is_file()
    with pytest.raises(ValueError, match="teacher"):
        plot_teacher_targets(x, mask_examples(x, y, GRID, num_classes=4)["block"], GRID)


def test_show_map_alignment_and_alignment_views(tmp_path):
    from tokenmix.data import InMemoryImages, TensorTransform
    raw = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    ds = InMemoryImages(raw[::2], torch.arange(6) % 4, TensorTransform(True, (0.5,), (0.25,), 2),
                        source_index=torch.arange(0, 12, 2), with_meta=True)
    torch.manual_seed(0)
    items = [ds[i] for i in (1, 4)]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    meta = {k: torch.stack([it[2][k] for it in items]) for k in ("index", "box", "flip")}
    maps = fake_maps(n=12)
    source, stored, aligned = alignment_views(ds, maps, y, meta, GRID)
    assert torch.allclose(source, (raw[[2, 8]].float() / 255 - 0.5) / 0.25, atol=1e-5)
    assert stored.shape == (2, 4, 4) and aligned.shape == (2, 16)
    assert torch.allclose(aligned.sum(1), torch.ones(2))
    fig = show_map_alignment(source, stored, x, aligned, GRID, meta["flip"], y, n=2, save=tmp_path / "a")
    assert len(fig.axes) == 8 and (tmp_path / "a.svg").is_file()
    with pytest.raises(ValueError, match="not in this dataset"):
        alignment_views(ds, maps, y, {**meta, "index": torch.tensor([1, 2])}, GRID)


def test_mask_counts_and_their_figure(tmp_path):
    state = torch.random.get_rng_state()
    c = sample_mask_counts(TokenGrid(7, 7, 4, 4), n_draws=50, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert np.array_equal(c, sample_mask_counts(TokenGrid(7, 7, 4, 4), n_draws=50, seed=3))
    assert c.max() <= official_token_count(49) and (c == official_token_count(49)).mean() > 0.8
    grids = (TokenGrid(14, 14, 16, 16), TokenGrid(7, 7, 4, 4))
    counts = mask_count_statistics(grids, n_draws=30)
    table = mask_count_table(counts)
    assert list(table.grid) == ["14x14"] * 3 + ["7x7"] * 3
    assert table.loc[0, "max"] <= 112 and table.loc[3, "max"] <= 28
    fig = plot_count_statistics(counts, save=tmp_path / "c")
    assert len(fig.axes) == 2 and (tmp_path / "c.png").is_file()


def test_plot_occlusion_and_table(tmp_path):
    curves = {"cutmix": {0.0: 90.0, 0.5: 50.0}, "tokenmix": {0.0: 89.0, 0.5: 60.0}}
    fig = plot_occlusion(curves, save=tmp_path / "o")
    assert len(fig.axes) == 2 and (tmp_path / "o.png").is_file()
    diff = fig.axes[1].lines[0].get_ydata()
    assert list(diff) == [-1.0, 10.0]
    assert len(plot_occlusion({"cutmix": curves["cutmix"]}).axes) == 1
    t = occlusion_table(curves)
    assert list(t.columns) == ["0 %", "50 %"] and t.loc["tokenmix", "50 %"] == 60.0


def test_plot_occlusion_gives_every_curve_its_own_colour():
    c = {0.0: 90.0, 0.5: 50.0}
    names = ["cutmix", "tokenmix", "tokenmix{labels=area}", "tokenmix[paper]"]
    fig = plot_occlusion({n: c for n in names})
    colours = [line.get_color() for line in fig.axes[0].lines]
    assert len(set(colours)) == len(names)


def test_find_root(tmp_path, repo_root):
    assert find_root(repo_root / "notebooks") == repo_root
    assert find_root(repo_root) == repo_root
    assert (find_root(tmp_path) / "tokenmix" / "__init__.py").is_file()  # outside: the package's checkout


# ---------------------------------------------------------------------------------------------
# runs: the report's occlusion figure

def tiny_run(root, method, dataset="synthetic", img_size=32, **kw):
    cfg = RunConfig(method=method, dataset=dataset, img_size=img_size, train_subset=64, test_subset=32, epochs=1,
                    batch_size=32, warmup_epochs=0.0, out_dir=str(root), run_id=f"{dataset}-{method}", progress=False,
                    **({"method_kwargs": {"labels": "area"}} if method == "tokenmix" else {}), **kw)
    from tokenmix.train.engine import train
    train(cfg)
    return root / cfg.run_id


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for m in ("cutmix", "tokenmix", "mixup"):
        tiny_run(root, m)
    return root


def test_find_occlusion_runs_needs_a_complete_pair(tmp_path, synthetic_runs):
    assert find_occlusion_runs(synthetic_runs, "fashion_mnist") == []
    runs = find_occlusion_runs(synthetic_runs, "synthetic")
    assert sorted(r.config["method"] for r in runs) == ["cutmix", "tokenmix"]
    # an unfinished TokenMix run does not count
    root = tmp_path / "runs"
    for name in ("synthetic-cutmix", "synthetic-tokenmix"):
        src = synthetic_runs / name
        dst = root / name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    atomic_write_json(root / "synthetic-tokenmix" / "summary.json", {"status": "failed"})
    assert find_occlusion_runs(root, "synthetic") == []
    assert write_tokenmix_occlusion(root, tmp_path / "figs", dataset="synthetic") == []
    assert not (tmp_path / "figs").exists()


def test_write_tokenmix_occlusion_from_runs(tmp_path, synthetic_runs):
    figs = tmp_path / "figs"
    paths = write_tokenmix_occlusion(synthetic_runs, figs, n_images=32, ratios=(0.0, 0.5, 1.0), dataset="synthetic")
    assert sorted(p.name for p in paths) == sorted(OCCLUSION_OUTPUTS)
    first = {p.name: p.read_bytes() for p in paths}
    df = pd.read_csv(figs / "tokenmix_occlusion.csv")
    assert sorted(df.method) == ["cutmix", "tokenmix"] and (df.n_images == 32).all()
    assert list(df.columns[-3:]) == ["drop_0.0", "drop_0.5", "drop_1.0"]
    # the ratio-0 column is the run's plain accuracy on those images
    from tokenmix.report.tokenmix import occlusion_test_set
    x, y, _ = occlusion_test_set("synthetic", 32, 32)
    for _, row in df.iterrows():
        model, _ = load_model(synthetic_runs / row.run_id)
        with torch.no_grad():
            assert row["drop_0.0"] == pytest.approx(100 * float((model(x).argmax(1) == y).float().mean()), abs=0.01)
    # same records -> same bytes
    write_tokenmix_occlusion(synthetic_runs, figs, n_images=32, ratios=(0.0, 0.5, 1.0), dataset="synthetic")
    assert {p.name: p.read_bytes() for p in paths} == first
    assert b"<dc:date>" not in first["tokenmix_occlusion.svg"]
    # a clone of the records without checkpoints redraws the same files from the stored measurement
    import shutil
    clone = tmp_path / "clone"
    shutil.copytree(synthetic_runs, clone, ignore=shutil.ignore_patterns("*.pt"))
    assert not list(clone.glob("*/*.pt")) and (clone / "analysis" / "tokenmix_occlusion.csv").is_file()
    paths2 = write_tokenmix_occlusion(clone, tmp_path / "figs2", n_images=32, ratios=(0.0, 0.5, 1.0),
                                      dataset="synthetic")
    assert {p.name: p.read_bytes() for p in paths2} == first


def test_occlusion_runs_uses_complete_runs_or_trains_tiny_ones(tmp_path, synthetic_runs):
    given = {"cutmix": synthetic_runs / "synthetic-cutmix", "tokenmix": synthetic_runs / "synthetic-tokenmix"}
    runs, trained = occlusion_runs(given, tmp_path / "out")
    assert runs == given and not trained and not (tmp_path / "out").exists()
    runs, trained = occlusion_runs({"cutmix": tmp_path / "missing"}, tmp_path / "out", dataset="synthetic",
                                   img_size=32, train_subset=64, test_subset=32, epochs=1, batch_size=32,
                                   warmup_epochs=0.0)
    assert trained and runs == {"cutmix": tmp_path / "out" / "cutmix-tiny"}
    assert json.loads((runs["cutmix"] / "summary.json").read_text())["status"] == "complete"


def test_load_model_without_the_teacher_cache(tmp_path):
    """A TokenMix run with teacher labels loads for evaluation even when its cache is gone
    (``load_model`` runs ``prepare_model`` only, not ``prepare_training``)."""
    from tokenmix.train.engine import train
    maps_dir = tmp_path / "teacher"
    fake = fake_maps(n=512, k=3, h=8, w=8, classes=10)
    maps_dir.mkdir()
    np.save(maps_dir / "train_values.npy", fake.values)
    np.save(maps_dir / "train_classes.npy", fake.classes)
    import hashlib

    from tokenmix.data import load_split
    sha1 = hashlib.sha1(load_split("synthetic", 32, True)[0].numpy().tobytes()).hexdigest()  # the images it maps
    atomic_write_json(maps_dir / "meta.json", {"format": 1, "dataset": "synthetic", "img_size": 32,
                                               "teacher": "cnn_small", "top_k": 3,
                                               "splits": {"train": {"num_images": 512, "data_sha1": sha1}}})
    cfg = RunConfig(method="tokenmix", dataset="synthetic", img_size=32, train_subset=64, test_subset=32, epochs=1,
                    batch_size=32, warmup_epochs=0.0, out_dir=str(tmp_path / "runs"), run_id="tm", progress=False,
                    method_kwargs={"teacher_cache": str(maps_dir)})
    train(cfg)
    for f in maps_dir.iterdir():
        f.unlink()
    model, loaded = load_model(tmp_path / "runs" / "tm")
    assert not model.training and loaded.method == "tokenmix"
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_report_main_writes_the_occlusion_figure(tmp_path, capsys, monkeypatch):
    import functools

    import tokenmix.report.fidelity as FID
    import tokenmix.report.tokenmix as T
    monkeypatch.setattr(T, "write_tokenmix_occlusion", functools.partial(T.write_tokenmix_occlusion, n_images=64))
    monkeypatch.setattr(FID, "write_label_fidelity", functools.partial(FID.write_label_fidelity, n_batches=1,
                                                                        batch_size=8))
    root = tmp_path / "runs"
    for m in ("cutmix", "tokenmix"):
        tiny_run(root, m, dataset="fashion_mnist", img_size=28, download=False)
    figs = tmp_path / "figures"
    assert main(["--runs", str(root), "--figures", str(figs)]) == 0
    written = {p.name for p in figs.iterdir()}
    assert set(OUTPUTS + OCCLUSION_OUTPUTS) <= written  # (+ the study and label-fidelity files)
    assert "tokenmix_occlusion.png" in capsys.readouterr().out
    assert len(pd.read_csv(figs / "tokenmix_occlusion.csv")) == 2


def test_report_main_skips_the_occlusion_figure_without_a_pair(tmp_path, capsys, synthetic_runs):
    figs = tmp_path / "figures"
    assert main(["--runs", str(synthetic_runs), "--figures", str(figs)]) == 0
    written = {p.name for p in figs.iterdir()}
    assert set(OUTPUTS) <= written and not written & set(OCCLUSION_OUTPUTS)  # synthetic runs: no fashion_mnist pair
    assert "occlusion figure skipped" in capsys.readouterr().out
