"""tokenmix.analysis.probes (TL-Align Eq. 2 / Eq. 13, layerwise ratios, TransMix ratios) on hand-computed
cases and small models, the TransMix / TL-Align figure functions' structure, and the parameters
cell of the two notebooks that use them."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tokenmix import methods  # noqa: E402
from tokenmix.analysis import probes as A  # noqa: E402
from tokenmix.methods.base import MixedBatch, TokenGrid, mix_targets  # noqa: E402
from tokenmix.methods.baselines import cutmix_batch  # noqa: E402
from tokenmix.methods.masks import box_token_share  # noqa: E402
from tokenmix.methods.tlalign import TLAlign, initial_own_share  # noqa: E402
from tokenmix.methods.transmix import TransMix  # noqa: E402
from tokenmix.models import AttentionCapture  # noqa: E402
from tokenmix.report.tlalign import plot_layerwise_ratios, plot_token_presence, show_label_alignment
from tokenmix.report.transmix import (plot_transmix_lambdas, show_token_masks, show_transmix_samples,
                                      transmix_ratios_table)

ROOT = Path(__file__).resolve().parents[1]
SIG = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Eq. 13: the similarity-based mixing ratio

def basis(*idx: int, d: int = 6) -> torch.Tensor:
    """Rows e_i of the identity in R^d, as one image of tokens (1, T, d)."""
    return torch.eye(d)[list(idx)].unsqueeze(0)


def test_eq13_hand_computed():
    own, partner = basis(0, 1), basis(2, 3)  # orthonormal tokens of X1 and X2
    mixed = torch.stack([torch.eye(6)[0], torch.eye(6)[2], (torch.eye(6)[0] + torch.eye(6)[2]) / 2 ** 0.5]).unsqueeze(0)
    s1, s2 = A.similarity_scores(mixed, own, partner)
    torch.testing.assert_close(s1, torch.tensor([[1.0, 0.0, 2 ** -0.5]]))
    torch.testing.assert_close(s2, torch.tensor([[0.0, 1.0, 2 ** -0.5]]))
    lam = A.similarity_mixing_ratio(mixed, own, partner)
    # softmax(s1, s2)_1 with the raw cosines: exactly an own token -> sigmoid(1 - 0), not 1
    torch.testing.assert_close(lam, torch.tensor([[SIG(1.0), SIG(-1.0), 0.5]]))


def test_eq13_is_the_softmax_of_the_two_scores(rng):
    zm, z1, z2 = (torch.from_numpy(rng.normal(size=(3, 7, 5))).float() for _ in range(3))
    s1, s2 = A.similarity_scores(zm, z1, z2)
    expected = torch.softmax(torch.stack([s1, s2]), dim=0)[0]
    torch.testing.assert_close(A.similarity_mixing_ratio(zm, z1, z2), expected)
    # and with a temperature: softmax((s1, s2) / tau)
    torch.testing.assert_close(A.similarity_mixing_ratio(zm, z1, z2, temperature=0.3),
                               torch.softmax(torch.stack([s1, s2]) / 0.3, dim=0)[0])


def test_eq13_exact_own_or_partner_token_goes_to_one_or_zero_when_sharpened():
    own, partner = basis(0, 1), basis(2, 3)
    mixed = torch.cat([basis(1), basis(3)], dim=1)  # token 0 is own token 1, token 1 is partner token 1
    lam = A.similarity_mixing_ratio(mixed, own, partner, temperature=1e-3)
    torch.testing.assert_close(lam, torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)


def test_eq13_takes_the_max_over_candidates_and_ignores_norms():
    own, partner = basis(0, 1), basis(2, 3)
    mixed = torch.tensor([[[3.0, 0.0, 1.0, 0.0, 0.0, 0.0]]])
    base = A.similarity_mixing_ratio(mixed, own, partner)
    # a worse extra candidate (negative cosine) changes nothing; scaling any token changes nothing
    partner_plus = torch.cat([partner, -basis(0)], dim=1)
    torch.testing.assert_close(A.similarity_mixing_ratio(mixed, own, partner_plus), base)
    torch.testing.assert_close(A.similarity_mixing_ratio(7 * mixed, 0.2 * own, 5 * partner), base)
    # cos with e0 = 3/sqrt(10), with e2 = 1/sqrt(10)
    assert float(base) == pytest.approx(SIG(2 / 10 ** 0.5), abs=1e-6)


def test_eq13_range_without_clipping(rng):
    zm, z1, z2 = (torch.from_numpy(rng.normal(size=(4, 9, 3))).float() for _ in range(3))
    lam = A.similarity_mixing_ratio(zm, z1, z2)
    assert lam.shape == (4, 9)
    # cosines in [-1, 1] -> sigmoid(s1 - s2) in [sigmoid(-2), sigmoid(2)]
    assert float(lam.min()) >= SIG(-2) - 1e-6 and float(lam.max()) <= SIG(2) + 1e-6
    # swapping the two images gives 1 - lam
    torch.testing.assert_close(A.similarity_mixing_ratio(zm, z2, z1), 1 - lam)


def test_eq13_rejects_non_positive_temperature():
    z = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="temperature"):
        A.similarity_mixing_ratio(z, z, z, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Eq. 2: presence; pearson

def test_presence_hand_computed():
    t = 4
    eye = torch.eye(t).unsqueeze(0)
    torch.testing.assert_close(A.token_presence(eye), torch.ones(1, t))  # identity mixing: p = 1
    torch.testing.assert_close(A.token_presence(torch.full((1, t, t), 1 / t)), torch.ones(1, t))  # uniform: p = 1
    to_first = torch.zeros(1, t, t)
    to_first[:, :, 0] = 1.0  # every query attends to token 0 only
    torch.testing.assert_close(A.token_presence(to_first), torch.tensor([[4.0, 0.0, 0.0, 0.0]]))
    a = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]])
    torch.testing.assert_close(A.token_presence(a), torch.tensor([[0.7, 0.8, 1.5]]))


def test_presence_sums_to_the_number_of_tokens():
    a = torch.randn(3, 2, 7, 7).softmax(-1).mean(1)
    torch.testing.assert_close(A.token_presence(a).sum(1), torch.full((3,), 7.0))


def test_pearson():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert float(A.pearson(a, 3 * a + 1)) == pytest.approx(1.0)
    assert float(A.pearson(a, -a)) == pytest.approx(-1.0)
    assert math.isnan(float(A.pearson(a, torch.ones(3))))
    # hand: a - mean = (-4, -1, 5) / 3, b - mean = (-1, 2, -1) / 3 -> r = (4 - 2 - 5) / sqrt(42 * 6)
    b = torch.tensor([0.0, 1.0, 0.0])
    assert float(A.pearson(a, b)) == pytest.approx(-3 / math.sqrt(42 * 6), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# TransMix ratios

def hand_transmix_batch() -> tuple[MixedBatch, TokenGrid]:
    """4x4 image, 2x2 tokens of 2x2 px; box rows 0..2, cols 0..1 (6 of 16 px)."""
    grid = TokenGrid(2, 2, 2, 2)
    box = (0, 3, 0, 2)
    share = box_token_share(box, grid)
    torch.testing.assert_close(share, torch.tensor([1.0, 0.0, 0.5, 0.0]))  # token (1, 0) half covered
    y = torch.tensor([0, 1])
    mixed = MixedBatch(x=torch.zeros(2, 1, 4, 4), y=y, y_partner=y.flip(0), partner_index=torch.tensor([1, 0]),
                       partner_mask=share.expand(2, -1).clone(), lam_area=torch.full((2,), 10 / 16),
                       target=mix_targets(y, y.flip(0), 10 / 16, 3), kind="cutmix", extras={"box": box})
    return mixed, grid


def test_transmix_ratios_hand_computed():
    mixed, grid = hand_transmix_batch()
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.2], [0.4, 0.1, 0.0, 0.1]])
    r = A.transmix_ratios(mixed, attn, grid, num_classes=3)
    assert list(r) == ["area", "attention, nearest mask", "attention, area mask", "official", "paper"]
    # nearest mask: token (r, c) pasted iff pixel (2r, 2c) in the box -> [1, 0, 1, 0]
    # sample 0: lam_attn nearest = 0.4 / 0.8 = 0.5, area-weighted = (0.1 + 0.15) / 0.8 = 0.3125
    # sample 1: nearest = 0.4 / 0.6, area-weighted = 0.4 / 0.6
    torch.testing.assert_close(r["area"], torch.tensor([0.625, 0.625]))
    torch.testing.assert_close(r["attention, nearest mask"], torch.tensor([0.5, 1 - 0.4 / 0.6]))
    torch.testing.assert_close(r["attention, area mask"], torch.tensor([1 - 0.3125, 1 - 0.4 / 0.6]))
    # official: own = 1 - (partner area + partner attention share) / 2
    torch.testing.assert_close(r["official"], torch.tensor([1 - (0.375 + 0.5) / 2, 1 - (0.375 + 0.4 / 0.6) / 2]))
    torch.testing.assert_close(r["paper"], r["attention, area mask"])


def test_transmix_ratios_match_the_target_the_method_trains_on(vit_cpu_gray):
    """The analysis' official / paper own shares are the ones inside TransMix's training target
    (the method's forward through forward_outputs, with whatever it captures)."""
    from tokenmix.methods import forward_outputs
    grid = TokenGrid.from_model(vit_cpu_gray)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    for variant in ("official", "paper"):
        tm = methods.get("transmix", num_classes=10, variant=variant, switch_prob=1.0)
        tm.prepare_model(vit_cpu_gray)
        mixed = tm.mix(x, y)
        with torch.no_grad():
            outputs = forward_outputs(vit_cpu_gray, tm.needs, mixed.x)
            tm.loss(outputs, mixed)
            label_target = tm.label(outputs, mixed)[0]
            with AttentionCapture(vit_cpu_gray, [-1], reduce="cls") as cap:
                vit_cpu_gray(mixed.x)
        r = A.transmix_ratios(mixed, cap[-1], grid, num_classes=10)
        torch.testing.assert_close(label_target, mix_targets(mixed.y, mixed.y_partner, r[variant], 10, 0.1),
                                   atol=1e-5, rtol=0)


def test_collect_transmix_ratios(vit_cpu_gray):
    m = methods.get("transmix", num_classes=10, switch_prob=1.0)
    m.prepare_model(vit_cpu_gray)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    r, draws = A.collect_transmix_ratios(vit_cpu_gray, m, x, y, n_draws=3, num_classes=10)
    assert len(draws) == 3 and all(v.shape == (18,) for v in r.values())
    assert r["draw"].tolist() == [0.0] * 6 + [1.0] * 6 + [2.0] * 6
    for k in ("area", "official", "paper"):
        assert float(r[k].min()) >= 0 and float(r[k].max()) <= 1
    torch.testing.assert_close(r["official"], (r["area"] + r["attention, nearest mask"]) / 2)
    # the attention of each draw is the CLS row of the mixed forward
    mixed, attn = draws[1]
    with torch.no_grad(), AttentionCapture(vit_cpu_gray, [-1], reduce="cls") as cap:
        vit_cpu_gray(mixed.x)
    torch.testing.assert_close(attn, cap[-1])
    mixup = methods.get("transmix", num_classes=10, switch_prob=0.0)
    mixup.prepare_model(vit_cpu_gray)
    with pytest.raises(ValueError, match="CutMix"):
        A.collect_transmix_ratios(vit_cpu_gray, mixup, x, y, n_draws=2, num_classes=10)


# ---------------------------------------------------------------------------------------------
# capture and layerwise ratios

def test_capture_blocks_features_are_the_block_io(deit_tiny_32):
    x = torch.randn(2, 3, 32, 32)
    cap = A.capture_blocks(deit_tiny_32, x)
    depth = len(deit_tiny_32.blocks)
    assert len(cap.features) == depth + 1 and len(cap.qk) == depth
    assert all(f.shape == (2, 65, 192) for f in cap.features)
    with torch.no_grad():
        torch.testing.assert_close(deit_tiny_32.blocks[0](cap.features[0]), cap.features[1])
        torch.testing.assert_close(deit_tiny_32.forward_head(deit_tiny_32.norm(cap.features[-1])), cap.logits)
        torch.testing.assert_close(cap.logits, deit_tiny_32(x))
    # hooks are removed
    assert not deit_tiny_32.blocks[0]._forward_pre_hooks and not deit_tiny_32.blocks[-1]._forward_hooks


def test_capture_blocks_needs_blocks():
    with pytest.raises(ValueError, match="blocks"):
        A.capture_blocks(nn.Linear(3, 3), torch.randn(1, 3))


@pytest.fixture
def token_cutmix(deit_tiny_32):
    """A token-aligned CutMix batch of random images for deit_tiny at 32 px (8x8 tokens)."""
    grid = TokenGrid.from_model(deit_tiny_32)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    return x, cutmix_batch(x, y, 0.6, grid, 10, 0.1, snap="token"), grid


def test_layerwise_ratios_shapes_and_invariants(deit_tiny_32, token_cutmix):
    x, mixed, grid = token_cutmix
    r = A.layerwise_mixing_ratios(deit_tiny_32, mixed, x, num_classes=10)
    depth, t = len(deit_tiny_32.blocks), 1 + grid.num_tokens
    assert r.similarity.shape == (depth + 1, 4, t) and r.tl_align.shape == (depth + 1, 4, t)
    assert r.presence.shape == (depth, 4, t) and r.num_layers == depth
    assert float(r.similarity.min()) > 0 and float(r.similarity.max()) < 1
    assert float(r.tl_align.min()) >= -1e-6 and float(r.tl_align.max()) <= 1 + 1e-6
    # the CLS token entering block 1 is the same vector in every image: s1 = s2 -> 0.5
    torch.testing.assert_close(r.similarity[0, :, 0], torch.full((4,), 0.5))
    torch.testing.assert_close(r.tl_align[0], initial_own_share(mixed, 1))
    torch.testing.assert_close(r.cutmix, mixed.lam_area)
    torch.testing.assert_close(r.presence.sum(-1), torch.full((depth, 4), float(t)), atol=1e-4, rtol=0)
    assert r.kdim_max_abs_diff < 1e-5
    assert set(r.token(0)) == {"similarity (Eq. 13)", "TL-Align", "CutMix (area)", "TransMix (official)"}
    assert all(v.shape == (depth + 1, 4) for v in r.token(0).values())
    assert all(v.shape == (depth + 1,) for v in r.errors().values())
    agree = r.agreement(0)
    assert all(math.isnan(float(v[0])) for v in agree.values())  # layer 0: the CLS ratio is constant


def test_layerwise_eq13_at_the_input_recovers_the_token_mask(deit_tiny_32, token_cutmix):
    """A linear patchify: a pasted token entering block 1 *is* the partner's token at the same
    position, a kept token the own one, so a sharpened Eq. 13 gives exactly 1 - partner_mask."""
    x, mixed, grid = token_cutmix
    assert 0 < float(mixed.partner_mask.sum(1)[0]) < grid.num_tokens
    r = A.layerwise_mixing_ratios(deit_tiny_32, mixed, x, num_classes=10, temperature=1e-3)
    torch.testing.assert_close(r.similarity[0, :, 1:], 1 - mixed.partner_mask, atol=1e-4, rtol=0)
    # then the patch agreement of layer 0 is perfect for both label sets (they are equal at layer 0)
    pa = r.patch_agreement()
    assert float(pa["TL-Align (propagated labels)"][0]) == pytest.approx(1.0, abs=1e-4)
    assert float(pa["initial labels (fixed)"][0]) == pytest.approx(1.0, abs=1e-4)


def test_layerwise_tlalign_and_transmix_match_the_methods(deit_tiny_32, token_cutmix):
    x, mixed, grid = token_cutmix
    for variant in ("official", "paper"):
        r = A.layerwise_mixing_ratios(deit_tiny_32, mixed, x, num_classes=10, transmix_variant=variant)
        with torch.no_grad(), AttentionCapture(deit_tiny_32, [-1], reduce="cls") as cap:
            deit_tiny_32(mixed.x)
        tm = TransMix(10, variant=variant)
        tm.prepare_model(deit_tiny_32)
        torch.testing.assert_close(r.transmix, 1 - tm.partner_share(cap[-1], mixed), atol=1e-5, rtol=0)
    qk = A.capture_blocks(deit_tiny_32, mixed.x).qk
    tla = TLAlign(10, 0.1)
    tla.prepare_model(deit_tiny_32)
    _, beta = tla.aligned_target(mixed, qk)
    torch.testing.assert_close(r.tl_align[-1, :, 0], beta, atol=1e-5, rtol=0)
    assert A.tlalign_path_difference(deit_tiny_32, mixed, 10) < 1e-5


def test_layerwise_ratios_concatenate_draws(vit_cpu_gray):
    m = methods.get("tl_align", num_classes=10)
    m.prepare_model(vit_cpu_gray)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    draws = A.mix_draws(m, x, y, 3)
    assert len(draws) == 3 and all(d.kind == "cutmix" for d in draws)
    r = A.layerwise_mixing_ratios(vit_cpu_gray, draws, x, num_classes=10)
    one = A.layerwise_mixing_ratios(vit_cpu_gray, draws[2], x, num_classes=10)
    assert r.similarity.shape[1] == 12 and r.cutmix.shape == (12,)
    torch.testing.assert_close(r.similarity[:, 8:], one.similarity)
    torch.testing.assert_close(r.tl_align[:, 8:], one.tl_align)


def synthetic_ratios(layers: int = 3, b: int = 5, t: int = 5) -> A.LayerwiseRatios:
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(layers + 1, b, t, generator=g)
    return A.LayerwiseRatios(similarity=sim, tl_align=sim.clone(), cutmix=torch.rand(b, generator=g),
                             transmix=torch.rand(b, generator=g), presence=torch.rand(layers, b, t, generator=g) + 0.5,
                             kdim_max_abs_diff=0.0, num_prefix_tokens=1)


def test_agreement_and_errors_on_synthetic_ratios():
    r = synthetic_ratios()
    torch.testing.assert_close(r.agreement(0)["TL-Align"], torch.ones(4))
    torch.testing.assert_close(r.errors(0)["TL-Align"], torch.zeros(4))
    torch.testing.assert_close(r.patch_agreement()["TL-Align (propagated labels)"], torch.ones(4))
    err = r.errors(2)["CutMix (area)"]
    torch.testing.assert_close(err, (r.cutmix - r.similarity[:, :, 2]).abs().mean(1))


# ---------------------------------------------------------------------------------------------
# figures

def test_transmix_figures(vit_cpu_gray):
    m = methods.get("transmix", num_classes=10, switch_prob=1.0)
    m.prepare_model(vit_cpu_gray)
    grid = TokenGrid.from_model(vit_cpu_gray)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    r, draws = A.collect_transmix_ratios(vit_cpu_gray, m, x, y, n_draws=2, num_classes=10)
    mixed, attn = draws[0]
    with pytest.raises(ValueError, match="this batch's ratios"):  # the ratios of all draws
        show_transmix_samples(x, mixed, attn, grid, r)
    one = A.transmix_ratios(mixed, attn, grid, 10)
    torch.testing.assert_close(one["official"], r["official"][:6])
    fig = show_transmix_samples(x, mixed, attn, grid, one, n=4, mean=(0.5,), std=(0.25,))
    assert isinstance(fig, Figure) and len(fig.axes) == 5 * 4
    assert [t.get_text() for t in fig.axes[4 * 4].get_yticklabels()] == ["area", "official", "paper"]  # row 5, sample 0
    fig = plot_transmix_lambdas(r, n_bars=5)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(fig.axes[1].get_xticklabels()) == 5
    fig = show_token_masks(mixed.x[0], {"a": mixed.partner_mask[0], "b": 1 - mixed.partner_mask[0]}, grid,
                           box=mixed.extras["box"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3  # two masks + colour bar
    with pytest.raises(ValueError, match="attention"):
        show_transmix_samples(x, mixed, attn[:, :3], grid, one)
    table = transmix_ratios_table(r, n=4)
    assert list(table.index) == [0, 4, 7, 11]  # round(linspace(0, 11, 4)) and list(table.columns) == list(r)
    assert table["draw"].tolist() == [0, 0, 1, 1]


def test_tlalign_figures(vit_cpu_gray, tmp_path):
    m = methods.get("tl_align", num_classes=10)
    m.prepare_model(vit_cpu_gray)
    grid = TokenGrid.from_model(vit_cpu_gray)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    draws = A.mix_draws(m, x, y, 2)
    r = A.layerwise_mixing_ratios(vit_cpu_gray, draws, x, num_classes=10)
    depth = len(vit_cpu_gray.blocks)
    fig = plot_layerwise_ratios(r, n=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 3 + 2
    assert len(fig.axes[0].get_lines()) == 4  # Eq. 13, TL-Align, CutMix, TransMix
    fig = show_label_alignment(x, draws, r, grid, draw=1, n=3, save=tmp_path / "f5")
    assert isinstance(fig, Figure) and len(fig.axes) == 6 * 3 + 1
    assert (tmp_path / "f5.png").is_file() and (tmp_path / "f5.svg").is_file()
    fig = show_label_alignment(x, draws[0], r, grid, n=2, show_similarity=False)
    assert len(fig.axes) == 5 * 2 + 1
    with pytest.raises(ValueError, match="out of range"):
        show_label_alignment(x, draws, r, grid, draw=2)  # only two draws
    fig = plot_token_presence(r, grid, sample=1, box=draws[0].extras["box"])
    assert isinstance(fig, Figure) and len(fig.axes) == depth + 1 + 1


# ---------------------------------------------------------------------------------------------
# notebooks

@pytest.mark.parametrize("name", ["01_transmix.ipynb", "05_tl_align.ipynb"])
def test_notebook_has_exactly_one_literal_parameters_cell(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "code"
    body = ast.parse(cells[0].source).body
    assert body and all(isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) for n in body)
    for node in body:
        ast.literal_eval(node.value)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "%matplotlib inline" in src and "progress=False" in src
