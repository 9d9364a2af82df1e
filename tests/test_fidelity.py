"""Label-fidelity benchmark: the oracle, pixel masks, the rules on a tiny model, the report files."""
from __future__ import annotations

import json
import math

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from tokenmix.analysis import fidelity  # noqa: E402
from tokenmix.analysis.fidelity import (RULES, TABLE_COLUMNS, fidelity_table, htm_input_mix, oracle_partner_share,
                                        pixel_mask, rule_shares, rule_triples, summarize)
from tokenmix.methods import TokenGrid, get  # noqa: E402
from tokenmix.methods.masks import paste_box, paste_token_mask  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class FakeMaps:
    """Stand-in for TeacherMaps: fixed normalised maps per dataset index."""

    def __init__(self, num_images: int, num_tokens: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(num_images, num_tokens, generator=g) ** 3
        self.maps = m / m.sum(1, keepdim=True)

    def token_maps(self, index, labels, box, flip, rows, cols, clamp_negative=False):
        assert self.maps.shape[1] == rows * cols
        return self.maps[index]


# ---------------------------------------------------------------------------------------------
# the oracle

def test_oracle_hand_made():
    own = torch.zeros(1, 1, 4, 4)
    own[..., :2] = 2.0 / 8  # mass 2 in the left half
    partner = torch.zeros(1, 1, 4, 4)
    partner[..., 2:] = 1.0 / 8  # mass 1 in the right half
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1.0  # the right half is pasted
    assert oracle_partner_share(own, partner, mask).item() == pytest.approx(1 / 3)
    # an all-black partner contributes nothing
    assert oracle_partner_share(own, torch.zeros_like(partner), mask).item() == 0.0
    # the partner pasted only over the own background: it owns everything that is there
    assert oracle_partner_share(torch.zeros_like(own), partner, mask).item() == 1.0


def test_oracle_identical_uniform_images_give_area():
    x = torch.full((2, 3, 8, 8), 7.0)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :4] = 1  # 25 %
    torch.testing.assert_close(oracle_partner_share(x, x.clone(), mask), torch.full((2,), 0.25))


def test_oracle_zero_over_zero_falls_back_to_area_and_sums_channels():
    z = torch.zeros(1, 2, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[:, :1] = 1  # 3-D mask accepted, a quarter of the pixels
    assert oracle_partner_share(z, z, mask).item() == pytest.approx(0.25)
    own = torch.zeros(1, 2, 4, 4)
    own[:, 1, 3, 3] = 3.0  # mass in the second channel, not pasted over
    part = torch.zeros(1, 2, 4, 4)
    part[:, 0, 0, 0] = 1.0  # inside the mask
    assert oracle_partner_share(own, part, mask).item() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        oracle_partner_share(own, part[:, :1], mask)


# ---------------------------------------------------------------------------------------------
# pixel masks

def test_pixel_mask_of_box_mix_matches_paste():
    grid = TokenGrid(7, 7, 4, 4)
    cm = get("cutmix", num_classes=10)
    cm.grid = grid
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(3)
    mixed = cm.mix(x, torch.arange(4))
    m = pixel_mask(mixed, grid)
    top, bottom, left, right = mixed.extras["box"]
    brute = torch.zeros(4, 1, 28, 28)
    for i in range(28):
        for j in range(28):
            brute[:, :, i, j] = float(top <= i < bottom and left <= j < right)
    torch.testing.assert_close(m, brute)
    # the mask reproduces the mixed images
    torch.testing.assert_close(x * (1 - m) + x[mixed.partner_index] * m, mixed.x)
    torch.testing.assert_close(paste_box(x, x[mixed.partner_index], mixed.extras["box"]), mixed.x)


def test_pixel_mask_of_token_mix_matches_brute_force():
    grid = TokenGrid(3, 4, 2, 3)
    tm = torch.zeros(2, 12)
    tm[0, [0, 5, 11]] = 1
    tm[1, [3, 4]] = 1
    from tokenmix.methods.base import MixedBatch
    x = torch.randn(2, 1, 6, 12)
    mixed = MixedBatch(x=paste_token_mask(x, x.flip(0), tm, grid), y=torch.zeros(2, dtype=torch.long),
                       y_partner=torch.zeros(2, dtype=torch.long), partner_index=torch.tensor([1, 0]),
                       partner_mask=tm, lam_area=1 - tm.mean(1), target=torch.zeros(2, 10))
    m = pixel_mask(mixed, grid)
    brute = torch.zeros(2, 1, 6, 12)
    for b in range(2):
        for i in range(6):
            for j in range(12):
                brute[b, 0, i, j] = tm[b, (i // 2) * 4 + j // 3]
    torch.testing.assert_close(m, brute)
    torch.testing.assert_close(x * (1 - m) + x.flip(0) * m, mixed.x)


def test_htm_input_mix_label_is_saliency_share():
    sal = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]])
    partners, mask, share = htm_input_mix(sal, rho=0.0)
    assert partners.tolist() == [1, 0]
    assert mask.tolist() == [[False, False, True, True], [True, True, False, False]]
    torch.testing.assert_close(share, torch.tensor([0.8 / 1.6, 0.8 / 1.6]))


# ---------------------------------------------------------------------------------------------
# rules on a tiny untrained model (synthetic colour images, 8x8 tokens)

@pytest.fixture(scope="module")
def tiny():
    from tokenmix.data import load_split
    from tokenmix.models import create_model
    torch.manual_seed(0)
    model = create_model("vit_cpu", 10, 32, 3).eval()
    x, y, idx = load_split("synthetic", 32, False, synthetic_size=128)  # 32 test images
    return model, x, y, idx


def test_rule_shares_every_rule(tiny):
    model, x, y, idx = tiny
    maps = FakeMaps(len(x), 64)
    # an untrained model's saliency is nearly flat: rho = 0 so that HTM mixes something
    shares = rule_shares(model, x[:16], y[:16], MEAN, STD, idx[:16], maps, seed=0, htm_rho=0.0)
    assert list(shares) == list(RULES)
    for rule, (p, o) in shares.items():
        n = 16 if rule != "TokenMixup (HTM saliency)" else p.shape[0]
        assert 0 < n <= 16
        assert p.shape == o.shape == (n,), rule
        assert torch.isfinite(p).all() and torch.isfinite(o).all(), rule
        assert (p >= -1e-6).all() and (p <= 1 + 1e-6).all(), rule
        assert (o >= 0).all() and (o <= 1).all(), rule
    assert not model.training


def test_tokenmix_rule_is_normalised_teacher_partner_mass(tiny):
    model, x, y, idx = tiny
    maps = FakeMaps(len(x), 64, seed=1)
    pred, oracle, area = rule_triples(model, x[:8], y[:8], MEAN, STD, idx[:8], maps, seed=2,
                                      rules=("TokenMix (teacher)",))["TokenMix (teacher)"]
    tmx = get("tokenmix", num_classes=10, labels="area", switch_prob=1.0)
    tmx.grid = TokenGrid(8, 8, 4, 4)
    torch.manual_seed(2)
    m = tmx.mix(fidelity.normalise(x[:8].float(), MEAN, STD), y[:8]).partner_mask  # the same block mask
    own = maps.maps[idx[:8]]
    y_own = (own * (1 - m)).sum(1)
    y_par = (own.flip(0) * m).sum(1)
    torch.testing.assert_close(pred, y_par / (y_own + y_par))
    torch.testing.assert_close(area, m.mean(1))
    xr = x[:8].float()
    torch.testing.assert_close(oracle, oracle_partner_share(xr, xr.flip(0), fidelity.token_mask_to_pixels(m, tmx.grid)))


def test_cutmix_area_rule_and_determinism(tiny):
    model, x, y, idx = tiny
    rules = ("CutMix (area)", "TransMix (official)", "SMMix (area)")
    t1 = rule_triples(model, x[:8], y[:8], MEAN, STD, seed=5, rules=rules)
    cm = get("cutmix", num_classes=10)
    cm.prepare_model(model)
    torch.manual_seed(5)
    mixed = cm.mix(fidelity.normalise(x[:8].float(), MEAN, STD), y[:8])
    pred, oracle, area = t1["CutMix (area)"]
    torch.testing.assert_close(pred, 1 - mixed.lam_area)
    torch.testing.assert_close(area, pred)
    # the oracle of the box on the raw images
    expected = oracle_partner_share(x[:8].float(), x[:8].float()[mixed.partner_index], pixel_mask(mixed, cm.grid))
    torch.testing.assert_close(oracle, expected)
    # SMMix's label is its area share
    torch.testing.assert_close(t1["SMMix (area)"][0], t1["SMMix (area)"][2])
    t2 = rule_triples(model, x[:8], y[:8], MEAN, STD, seed=5, rules=rules)
    for r in rules:
        for a, b in zip(t1[r], t2[r]):
            assert torch.equal(a, b)
    # TokenMix without maps is absent, unknown rules are rejected
    assert "TokenMix (teacher)" not in rule_shares(model, x[:4], y[:4], MEAN, STD, rules=("TokenMix (teacher)",))
    with pytest.raises(ValueError, match="unknown rule"):
        rule_shares(model, x[:4], y[:4], MEAN, STD, rules=("nope",))


def test_fidelity_table_marks_tokenmix_skipped(tiny):
    model, x, y, idx = tiny
    table, samples = fidelity_table(model, x, y, MEAN, STD, idx, None, n_batches=2, batch_size=8,
                                    return_samples=True)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["rule"]) == list(RULES)
    row = table.set_index("rule").loc["TokenMix (teacher)"]
    assert row["n"] == 0 and math.isnan(row["MAE"]) and "skipped" in row["note"]
    cut = table.set_index("rule").loc["CutMix (area)"]
    assert cut["n"] == 16 and cut["MAE"] == pytest.approx(cut["area MAE"])
    assert set(samples["batch"]) == {0, 1}
    with pytest.raises(ValueError):
        fidelity_table(model, x, y, MEAN, STD, n_batches=5, batch_size=8)


def test_summarize_hand_made():
    s = pd.DataFrame({"rule": ["A"] * 3, "batch": 0, "sample": [0, 1, 2], "predicted": [0.1, 0.5, 0.9],
                      "oracle": [0.2, 0.5, 0.7], "area": [0.0, 0.5, 1.0]})
    t = summarize(s, rules=("A", "B"), skipped={"B": "skipped: test"})
    a = t.iloc[0]
    assert a["n"] == 3 and a["MAE"] == pytest.approx(0.1) and a["RMSE"] == pytest.approx(math.sqrt(0.05 / 3))
    assert a["mean predicted"] == pytest.approx(0.5) and a["mean oracle"] == pytest.approx(1.4 / 3)
    assert a["area MAE"] == pytest.approx(0.5 / 3) and a["pearson"] > 0.9
    assert t.iloc[1]["n"] == 0 and t.iloc[1]["note"] == "skipped: test"


# ---------------------------------------------------------------------------------------------
# report

def test_plot_fidelity_from_table_and_samples(tmp_path):
    import matplotlib.pyplot as plt

    from tokenmix.report.fidelity import plot_fidelity
    s = pd.DataFrame({"rule": ["CutMix (area)"] * 4 + ["TL-Align"] * 4, "batch": 0, "sample": [0, 1, 2, 3] * 2,
                      "predicted": [0.1, 0.4, 0.6, 0.9, 0.2, 0.3, 0.5, 0.8], "oracle": [0.2, 0.3, 0.7, 0.8] * 2,
                      "area": [0.1, 0.4, 0.6, 0.9] * 2})
    table = summarize(s, rules=("CutMix (area)", "TL-Align", "TokenMix (teacher)"))
    fig = plot_fidelity(s, table, save=tmp_path / "f")
    assert len(fig.axes) == 4
    plt.close(fig)
    fig = plot_fidelity(table)
    assert len(fig.axes) == 1
    plt.close(fig)
    assert (tmp_path / "f.png").is_file() and (tmp_path / "f.svg").is_file()


def _fake_run(root, method="cutmix"):
    from tokenmix.models import create_model
    from tokenmix.train.config import RunConfig
    from tokenmix.train.engine import build_method
    cfg = RunConfig(method=method, dataset="synthetic", img_size=32, model="vit_cpu", run_id=f"syn-{method}")
    run = root / cfg.run_id
    run.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_method(cfg, 10).prepare_model(create_model("vit_cpu", 10, 32, 3))
    torch.save({"model": model.state_dict()}, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    return run


def test_write_label_fidelity_fake_run_is_reproducible(tmp_path):
    from tokenmix.report.fidelity import FIDELITY_OUTPUTS, find_fidelity_run, write_label_fidelity
    runs, figs = tmp_path / "runs", tmp_path / "figures"
    assert write_label_fidelity(runs, figs, data_dir=tmp_path, dataset="synthetic") == []
    assert not figs.exists()
    _fake_run(runs, "transmix")
    _fake_run(runs, "cutmix")
    assert find_fidelity_run(runs, "synthetic").config["method"] == "cutmix"
    kw = dict(data_dir=tmp_path, dataset="synthetic", n_batches=2, batch_size=8)
    paths = write_label_fidelity(runs, figs, **kw)
    assert sorted(p.name for p in paths) == sorted(FIDELITY_OUTPUTS)
    first = {p.name: p.read_bytes() for p in paths}
    table = pd.read_csv(figs / "label_fidelity.csv")
    assert list(table["rule"]) == list(RULES)
    assert "skipped" in table.set_index("rule").loc["TokenMix (teacher)", "note"]  # no teacher cache in tmp_path
    assert "syn-cutmix" in (figs / "label_fidelity.md").read_text()
    write_label_fidelity(runs, figs, **kw)
    assert {p.name: p.read_bytes() for p in paths} == first
