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
from tokenmix.analysis.fidelity import (MASKS, RULES, SAME_POSITION_RULES, TABLE_COLUMNS, fidelity_table,
                                        oracle_partner_share, pixel_mask, score_batch, summarize)
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


def test_own_share_oracle_hand_made():
    """Own image: mass 4 in the left column, 0 right; partner: mass 2 left, 6 right; the partner
    is pasted on the right column: v_a = 4/4 = 1, v_b = 6/8 = 0.75 -> 0.75 / 1.75 (the mass
    oracle says 6 / 10)."""
    own = torch.tensor([[[[2.0, 0.0], [2.0, 0.0]]]])
    par = torch.tensor([[[[1.0, 3.0], [1.0, 3.0]]]])
    m = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert fidelity.own_share_oracle(own, par, par, m).item() == pytest.approx(0.75 / 1.75)
    assert oracle_partner_share(own, par, m).item() == pytest.approx(0.6)
    # a moved window: the placed pixels differ from the partner's whole image
    placed = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert fidelity.own_share_oracle(own, placed, par, m).item() == pytest.approx((2 / 8) / (1 + 2 / 8))
    # nothing of either visible -> the area share; an empty partner counts as 0 surviving
    zero = torch.zeros_like(own)
    assert fidelity.own_share_oracle(zero, zero, zero, m).item() == pytest.approx(0.5)
    assert fidelity.own_share_oracle(own, zero, zero, m).item() == pytest.approx(0.0)
    # the scale of either image does not matter (normalised per image), unlike the mass oracle
    assert fidelity.own_share_oracle(own, 10 * par, 10 * par, m).item() == pytest.approx(0.75 / 1.75)
    assert oracle_partner_share(own, 10 * par, m).item() != pytest.approx(0.6)


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


def test_every_rule_on_every_mask_it_applies_to(tiny):
    model, x, y, idx = tiny
    scored = score_batch(model, x[:16], y[:16], MEAN, STD, idx[:16], FakeMaps(len(x), 64), seed=0)
    expected = [(m, r) for m in MASKS for r in RULES if not (m == "SMMix windows" and r in SAME_POSITION_RULES)]
    assert list(scored) == expected
    for key, d in scored.items():
        for name in ("predicted", "oracle_mass", "oracle_own", "area"):
            assert d[name].shape == (16,) and torch.isfinite(d[name]).all(), (key, name)
            assert (d[name] >= -1e-6).all() and (d[name] <= 1 + 1e-6).all(), (key, name)
    # the rules of one mask see the same mixes: same oracles and area
    for mask in MASKS:
        rows = [d for (m, _), d in scored.items() if m == mask]
        assert all(torch.equal(r["oracle_mass"], rows[0]["oracle_mass"]) for r in rows)
        assert all(torch.equal(r["area"], rows[0]["area"]) for r in rows)
        torch.testing.assert_close(scored[(mask, "area")]["predicted"], scored[(mask, "area")]["area"])
    # TokenMix's blocks have a constant area share (28 of 49 tokens on 7x7; here the 8x8 grid's count)
    assert scored[("TokenMix blocks", "area")]["area"].unique().numel() == 1
    assert not model.training
    # deterministic given the seed; no teacher maps -> no teacher rule; unknown names rejected
    again = score_batch(model, x[:16], y[:16], MEAN, STD, idx[:16], FakeMaps(len(x), 64), seed=0)
    assert all(torch.equal(scored[k]["predicted"], again[k]["predicted"]) for k in scored)
    assert ("CutMix box", "TokenMix (teacher)") not in score_batch(model, x[:4], y[:4], MEAN, STD, masks=("CutMix box",))
    with pytest.raises(ValueError, match="unknown rule"):
        score_batch(model, x[:4], y[:4], MEAN, STD, rules=("nope",))
    with pytest.raises(ValueError, match="unknown mask"):
        score_batch(model, x[:4], y[:4], MEAN, STD, masks=("nope",))


def test_teacher_and_saliency_rules_by_hand_on_a_cutmix_box(tiny):
    """TokenMix's rule: normalised Eq. 2 masses of the teacher maps under the mask; TokenMixup's:
    Eq. 11's saliency share with the clean CLS attention; both on the same CutMix box."""
    from tokenmix.analysis.probes import attention_saliency
    model, x, y, idx = tiny
    maps = FakeMaps(len(x), 64, seed=1)
    scored = score_batch(model, x[:8], y[:8], MEAN, STD, idx[:8], maps, seed=2, masks=("CutMix box",),
                         rules=("TokenMix (teacher)", "TokenMixup (saliency)"), htm_layer=1)
    cm = get("cutmix", num_classes=10)
    cm.prepare_model(model)
    torch.manual_seed(2)
    xn = fidelity.normalise(x[:8].float(), MEAN, STD)
    mixed = cm.mix(xn, y[:8])
    m, j = mixed.partner_mask.float(), mixed.partner_index
    own = maps.maps[idx[:8]]
    y_own, y_par = (own * (1 - m)).sum(1), (own[j] * m).sum(1)
    torch.testing.assert_close(scored[("CutMix box", "TokenMix (teacher)")]["predicted"], y_par / (y_own + y_par))
    sal = attention_saliency(model, xn, 1).float()
    s_own, s_par = (sal * (1 - m)).sum(1), (sal[j] * m).sum(1)
    torch.testing.assert_close(scored[("CutMix box", "TokenMixup (saliency)")]["predicted"], s_par / (s_own + s_par))
    xr = x[:8].float()
    expected = oracle_partner_share(xr, xr[j], pixel_mask(mixed, cm.grid))
    torch.testing.assert_close(scored[("CutMix box", "TokenMix (teacher)")]["oracle_mass"], expected)


def test_fidelity_table_marks_tokenmix_skipped(tiny):
    model, x, y, idx = tiny
    table, samples = fidelity_table(model, x, y, MEAN, STD, idx, None, n_batches=2, batch_size=8,
                                    return_samples=True)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert len(table) == len(MASKS) * len(RULES) - len(SAME_POSITION_RULES)
    row = table.set_index(["mask", "rule"]).loc[("CutMix box", "TokenMix (teacher)")]
    assert row["n"] == 0 and math.isnan(row["MAE (mass)"]) and "skipped" in row["note"]
    area = table.set_index(["mask", "rule"]).loc[("CutMix box", "area")]
    assert area["n"] == 16
    assert set(samples["batch"]) == {0, 1}
    with pytest.raises(ValueError):
        fidelity_table(model, x, y, MEAN, STD, n_batches=5, batch_size=8)


def test_summarize_hand_made():
    s = pd.DataFrame({"mask": "CutMix box", "rule": ["area"] * 3, "batch": 0, "sample": [0, 1, 2],
                      "predicted": [0.1, 0.5, 0.9], "oracle_mass": [0.2, 0.5, 0.7], "oracle_own": [0.1, 0.5, 0.9],
                      "area": [0.1, 0.5, 0.9]})
    t = summarize(s, masks=("CutMix box",), rules=("area", "TL-Align"), skipped={"TL-Align": "skipped: test"})
    a = t.iloc[0]
    assert a["n"] == 3 and a["MAE (mass)"] == pytest.approx(0.1) and a["MAE (own share)"] == pytest.approx(0.0)
    assert a["mean predicted"] == pytest.approx(0.5) and a["pearson (own share)"] == pytest.approx(1.0)
    assert a["pearson (mass)"] > 0.9
    assert t.iloc[1]["n"] == 0 and t.iloc[1]["note"] == "skipped: test"


# ---------------------------------------------------------------------------------------------
# report

def test_plot_fidelity_and_its_training_curves(tmp_path):
    import matplotlib.pyplot as plt

    from tokenmix.report.fidelity import plot_fidelity, plot_fidelity_training
    rows = []
    for epoch in (1, 2):
        for mask in ("CutMix box", "TokenMix blocks"):
            for rule in ("area", "TL-Align"):
                rows.append({"epoch": epoch, "top1": 50.0 + epoch, "mask": mask, "rule": rule, "n": 4,
                             "MAE (mass)": 0.1 * epoch, "pearson (mass)": 0.5, "MAE (own share)": 0.05,
                             "pearson (own share)": 0.9, "mean predicted": 0.4, "note": ""})
    df = pd.DataFrame(rows)
    fig = plot_fidelity(df, save=tmp_path / "f")
    assert len(fig.axes) == 4  # 2 masks x (MAE, r)
    plt.close(fig)
    fig = plot_fidelity_training(df, save=tmp_path / "t")
    assert len(fig.axes) == 5  # 2 x 2 panels + the top-1 axis
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "area")
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [0.05, 0.05]
    plt.close(fig)
    assert (tmp_path / "f.png").is_file() and (tmp_path / "t.svg").is_file()
    with pytest.raises(ValueError, match="no rows of mask"):
        plot_fidelity_training(df, mask="SMMix windows")


def _fake_run(root, method="cutmix", every=0):
    """A complete 2-epoch run record with an untrained model's checkpoints (epoch ones with ``every``)."""
    from tokenmix.models import create_model
    from tokenmix.train.config import RunConfig
    from tokenmix.train.engine import build_method
    from tokenmix.train.runs import epoch_checkpoint_name
    cfg = RunConfig(method=method, dataset="synthetic", img_size=32, model="vit_cpu", run_id=f"syn-{method}-{every}",
                    epochs=2, checkpoint_every=every)
    run = root / cfg.run_id
    run.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_method(cfg, 10).prepare_model(create_model("vit_cpu", 10, 32, 3))
    torch.save({"model": model.state_dict()}, run / "checkpoint.pt")
    if every:
        torch.save({"model": model.state_dict()}, run / epoch_checkpoint_name(1))
        torch.save({"model": model.state_dict()}, run / epoch_checkpoint_name(2))
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "summary.json").write_text(json.dumps({"status": "complete", "epochs": 2}))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "top1": 11.0}\n{"epoch": 2, "top1": 12.0}\n')
    return run


def test_write_label_fidelity_measures_over_training_caches_and_redraws_without_checkpoints(tmp_path):
    from tokenmix.report.fidelity import FIDELITY_OUTPUTS, find_fidelity_run, write_label_fidelity
    runs, figs = tmp_path / "runs", tmp_path / "figures"
    assert write_label_fidelity(runs, figs, data_dir=tmp_path, dataset="synthetic") == []
    assert not figs.exists()
    _fake_run(runs, "transmix")
    _fake_run(runs, "cutmix")
    _fake_run(runs, "cutmix", every=1)
    assert find_fidelity_run(runs, "synthetic").run_id == "syn-cutmix-1"  # CutMix, with kept checkpoints
    kw = dict(data_dir=tmp_path, dataset="synthetic", n_batches=2, batch_size=8)
    paths = write_label_fidelity(runs, figs, **kw)
    assert sorted(p.name for p in paths) == sorted(FIDELITY_OUTPUTS)
    first = {p.name: p.read_bytes() for p in paths}
    record = pd.read_csv(runs / "analysis" / "label_fidelity.csv")
    assert sorted(set(record["epoch"])) == [1, 2] and set(record["top1"]) == {11.0, 12.0}
    table = pd.read_csv(figs / "label_fidelity.csv")
    assert list(table["mask"].unique()) == list(MASKS)
    assert "skipped" in table.set_index(["mask", "rule"]).loc[("CutMix box", "TokenMix (teacher)"), "note"]
    assert "syn-cutmix-1" in (figs / "label_fidelity.md").read_text()
    # the same checkpoints: the record is reused (not recomputed), the files are the same bytes
    stamp = (runs / "analysis" / "label_fidelity.csv").stat().st_mtime_ns
    write_label_fidelity(runs, figs, **kw)
    assert (runs / "analysis" / "label_fidelity.csv").stat().st_mtime_ns == stamp
    assert {p.name: p.read_bytes() for p in paths} == first
    # a clone without checkpoints redraws everything from the record
    for f in runs.glob("*/*.pt"):
        f.unlink()
    figs2 = tmp_path / "figures2"
    paths2 = write_label_fidelity(runs, figs2, **kw)
    assert {p.name: p.read_bytes() for p in paths2} == first
