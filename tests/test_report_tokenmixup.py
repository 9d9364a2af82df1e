"""TokenMixup analysis and figures: the saliency detectors (attention, rollout, gradient, random),
their latency, the HTM example, the paper-vs-official mask table, the curriculum run and the figure
functions. Expected values are computed independently (by hand or with plain loops)."""
from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tokenmix import methods  # noqa: E402
from tokenmix.analysis.experiments import curriculum
from tokenmix.analysis.probes import (attention_rollout, attention_saliency, block_input, gradient_saliency,
                                      pool_to_tokens, random_saliency, rollout, saliency_latency)
from tokenmix.methods.base import TokenGrid  # noqa: E402
from tokenmix.methods.tokenmixup import htm_mask, match_partners, saliency_from_attention, token_gains  # noqa: E402
from tokenmix.models import create_model  # noqa: E402
from tokenmix.models.attention import self_attention_map  # noqa: E402
from tokenmix.report.tokenmixup import (htm_example, latency_table, mask_variant_table, plot_curriculum,
                                        plot_htm_example, plot_saliency_comparison)

GRID = TokenGrid(4, 4, 4, 4)  # vit_cpu at 16 px: 4x4 tokens of 4x4 pixels


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("vit_cpu", 10, 16, 1).eval()  # CLS + 16 tokens, 4 blocks


def batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)


# ---------------------------------------------------------------------------------------------
# rollout

def test_rollout_of_one_block_is_a_plus_identity_renormalised():
    a = torch.tensor([[[0.5, 0.25, 0.25],
                       [0.0, 1.0, 0.0],
                       [0.2, 0.2, 0.6]]])
    expect = torch.tensor([[[0.75, 0.125, 0.125],
                            [0.0, 1.0, 0.0],
                            [0.1, 0.1, 0.8]]])
    torch.testing.assert_close(rollout([a]), expect)


def test_rollout_of_two_blocks_multiplies_later_on_the_left():
    g = torch.Generator().manual_seed(1)
    a1, a2 = torch.rand(2, 4, 4, generator=g).softmax(-1), torch.rand(2, 4, 4, generator=g).softmax(-1)
    eye = torch.eye(4)
    expect = ((a2 + eye) / 2) @ ((a1 + eye) / 2)
    out = rollout([a1, a2])
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 4))


def test_attention_rollout_of_a_model_matches_a_hand_rollout(vit):
    x, _ = batch()
    feats = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: feats.__setitem__(i, a[0])) for i, b in enumerate(vit.blocks)]
    with torch.no_grad():
        vit(x)
    for h in hooks:
        h.remove()
    eye = torch.eye(17)
    r = eye
    for i, blk in enumerate(vit.blocks[:3]):
        with torch.no_grad():
            a = self_attention_map(blk.attn, blk.norm1(feats[i])).mean(1)
        r = ((a + eye) / 2) @ r
    torch.testing.assert_close(attention_rollout(vit, x, upto=3), r[:, 0, 1:], atol=1e-5, rtol=1e-4)
    qm = attention_rollout(vit, x, upto=3, saliency="query_mean")
    torch.testing.assert_close(qm, r[:, 1:, 1:].mean(1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="upto"):
        attention_rollout(vit, x, upto=5)


# ---------------------------------------------------------------------------------------------
# attention saliency

def _input_of(model, x, layer: int):
    """The input of ``model.blocks[layer]`` seen by a hook during a full forward."""
    seen = {}
    h = model.blocks[layer].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["x"]


def test_block_input_stops_early_and_matches_the_full_forward(vit):
    x, _ = batch()
    seen = {"x": _input_of(vit, x, 2)}
    after = []
    h = vit.blocks[3].register_forward_pre_hook(lambda m, a: after.append(1))
    try:
        got = block_input(vit, x, 2)
    finally:
        h.remove()
    torch.testing.assert_close(got, seen["x"])
    assert not after  # the forward stopped at block 2


def test_attention_saliency_is_the_blocks_attention_reduced(vit):
    x, _ = batch()
    with torch.no_grad():
        attn = self_attention_map(vit.blocks[1].attn, vit.blocks[1].norm1(_input_of(vit, x, 1)))
    expect = saliency_from_attention(attn, 1, "auto")
    got = attention_saliency(vit, x, 1)
    assert got.shape == (6, 16)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(got, attn.mean(1)[:, 0, 1:])  # the CLS row on the patches, head mean
    torch.testing.assert_close(attention_saliency(vit, x, 1, "query_mean"), attn.mean(1)[:, 1:, 1:].mean(1))


def test_attention_saliency_works_on_cct():
    torch.manual_seed(0)
    cct = create_model("cct_7_3x1", 10, 8, 1).eval()  # no CLS: 4x4 tokens
    x = torch.randn(3, 1, 8, 8)
    s = attention_saliency(cct, x, 2)
    assert s.shape == (3, 16)
    torch.testing.assert_close(s.sum(1), torch.ones(3))  # query mean of rows summing to 1 over all tokens
    assert attention_rollout(cct, x).shape == (3, 16)


def test_attention_saliency_reads_the_raw_input_under_tokenmixup_hooks(vit):
    method = methods.get("tokenmixup", num_classes=10, input_mix="none", tau=1e9, rho=0.0, horizontal_layer=2)
    model = method.prepare_model(copy.deepcopy(vit))
    x, y = batch()
    model.eval()
    torch.testing.assert_close(attention_saliency(model, x, 2), attention_saliency(vit, x, 2))


# ---------------------------------------------------------------------------------------------
# gradient and random saliency

def test_pool_to_tokens_sums_each_cell():
    grid = TokenGrid(2, 3, 2, 2)
    m = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6)
    # cells (row-major): [0,1,6,7], [2,3,8,9], [4,5,10,11], [12,13,18,19], ...
    expect = torch.tensor([[14., 22., 30., 62., 70., 78.]])
    torch.testing.assert_close(pool_to_tokens(m, grid), expect)
    with pytest.raises(ValueError, match="does not match"):
        pool_to_tokens(torch.zeros(1, 4, 4), grid)


class PixelModel(nn.Module):
    """Logits from the top-left 4x4 pixels only; has the patch_embed grid attributes."""

    def __init__(self):
        super().__init__()
        self.patch_embed = type("PE", (), {"grid_size": (4, 4), "patch_size": (4, 4)})()
        torch.manual_seed(0)
        self.fc = nn.Linear(2 * 16, 10)

    def forward(self, x):
        return self.fc(x[:, :, :4, :4].flatten(1))


def test_gradient_saliency_is_the_pooled_channel_norm_of_the_input_gradient():
    model = PixelModel()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 16, 16, generator=g), torch.tensor([1, 4, 7])
    s = gradient_saliency(model, x, y)
    assert s.shape == (3, 16) and (s >= 0).all()
    assert (s[:, 1:] == 0).all() and (s[:, 0] > 0).all()  # only token 0's pixels reach the loss
    # by hand: d CE / d logits = softmax - onehot; d logits / d pixels = fc.weight
    with torch.no_grad():
        p = model(x).softmax(1)
        p[torch.arange(3), y] -= 1
        gx = (p @ model.fc.weight).reshape(3, 2, 4, 4)
    torch.testing.assert_close(s[:, 0], gx.pow(2).sum(1).sqrt().sum((1, 2)))
    assert model.fc.weight.grad is None  # no parameter gradients


def test_gradient_saliency_on_a_vit_is_batch_independent(vit):
    x, y = batch()
    s = gradient_saliency(vit, x, y)
    assert s.shape == (6, 16) and (s >= 0).all() and (s > 0).any()
    torch.testing.assert_close(gradient_saliency(vit, x[:2], y[:2]), s[:2], atol=1e-6, rtol=1e-4)


def test_random_saliency():
    x = torch.zeros(5, 1, 16, 16)
    s = random_saliency(x, GRID, torch.Generator().manual_seed(0))
    assert s.shape == (5, 16) and ((s >= 0) & (s < 1)).all()


def test_saliency_latency_has_positive_medians(vit):
    x, y = batch()
    out = saliency_latency(vit, x, y, layer=2, repeats=2, warmup=1)
    assert {"gradient", "attention", "random"} <= set(out)
    assert all(v > 0 for v in out.values())
    df = latency_table(out)
    assert list(df.columns) == ["ms per batch", "speed-up vs gradient"]
    assert df["speed-up vs gradient"].iloc[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gradient"):
        latency_table({"random": 1.0})


# ---------------------------------------------------------------------------------------------
# HTM example, mask variants, curriculum, figures

def test_htm_example_and_its_figure(vit, tmp_path):
    method = methods.get("tokenmixup", num_classes=10, input_mix="none", rho=0.0, horizontal_layer=2)
    model = method.prepare_model(copy.deepcopy(vit))
    x, y = batch(8)
    ex = htm_example(model, method, x, y, tau=1e9)  # every sample easy
    assert method.tau == 0.2 and not model.training  # restored
    assert ex.easy.all() and ex.mixed == list(range(8))
    # the mask is the paper mask on the recorded saliency with the recorded partners
    gains = token_gains(ex.saliency, ex.saliency, 0.0)
    torch.testing.assert_close(ex.partners, match_partners(gains.sum(-1)))
    assert torch.equal(ex.mask, htm_mask(gains, ex.partners, "paper"))
    torch.testing.assert_close(ex.target.sum(1), torch.ones(8))
    fig = plot_htm_example(ex, GRID, n=2, save=tmp_path / "htm")
    assert isinstance(fig, Figure) and len(fig.axes) == 8
    assert (tmp_path / "htm.png").is_file() and (tmp_path / "htm.svg").is_file()


def test_mask_variant_table_matches_row_zero_rule():
    sal = torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    df = mask_variant_table(sal, torch.tensor([True, True, False]), rho=0.0)
    assert list(df["sample"]) == [0, 1]
    # sample 0 gains most from 1 or 2 (0.7 each); sample 1 from 0 or 2 (0.7 each): distinct partners
    for _, r in df.iterrows():
        own = sal[r["sample"]]
        par = sal[r["partner"]]
        paper = (par - own > 0)
        official = (par - sal[0] > 0)
        assert r["tokens (paper)"] == int(paper.sum()) and r["tokens (official)"] == int(official.sum())
        assert r["tokens differing"] == int((paper ^ official).sum())
    assert df["tokens differing"].iloc[0] == 0  # row 0 is its own row


def test_curriculum_records_every_step_and_plots(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    run = curriculum(images, labels, steps=4, batch_size=16, tau=0.3)
    h = run.history
    assert len(h) == 4 and list(h["step"]) == [1, 2, 3, 4]
    assert ((h["n_mixed"] >= 0) & (h["n_mixed"] <= 16)).all()
    assert (h["n_mixed"] > 0).any()  # CE / 10 of an untrained ScoreNet is about 0.23 <= 0.3
    fig = plot_curriculum(run, save=tmp_path / "cur")
    assert isinstance(fig, Figure) and (tmp_path / "cur.png").is_file()
    with pytest.raises(ValueError, match="batch_size"):
        curriculum(images, labels, steps=1, batch_size=100)


def test_paper_gate_never_mixes_under_label_smoothing():
    if "gate" not in methods.parameters("tokenmixup"):
        pytest.skip("this version ties the gate to the variant")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    run = curriculum(images, labels, steps=2, batch_size=16, gate="paper", tau=0.2)
    assert (run.history["n_mixed"] == 0).all()


def test_plot_saliency_comparison(vit, tmp_path):
    x, y = batch(4)
    maps = {"attention": attention_saliency(vit, x, 2), "rollout": attention_rollout(vit, x),
            "gradient": gradient_saliency(vit, x, y)}
    fig = plot_saliency_comparison(x, maps, GRID, n=3, labels=y, save=tmp_path / "sal")
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 4
    assert (tmp_path / "sal.png").is_file() and (tmp_path / "sal.svg").is_file()
    with pytest.raises(ValueError, match="must be"):
        plot_saliency_comparison(x, {"bad": torch.zeros(4)}, GRID)
    assert isinstance(latency_table({"gradient": 2.0, "attention": 0.1}), pd.DataFrame)
