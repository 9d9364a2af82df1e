"""MixPro (tokenmix.methods.mixpro): MaskMix's token-aligned grid mask and Progressive Attention
Labeling. Expected values are computed here independently (by hand, by reading pixels, or from the
attention captured with AttentionCapture), never copied from the implementation's output."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenmix import methods
from tokenmix.methods import MixPro, MixStep, forward_outputs
from tokenmix.methods.base import TokenGrid, mix_targets, one_hot
from tokenmix.methods.masks import sample_lam
from tokenmix.methods.mixpro import (cell_grid, cell_tokens, maskmix_batch, own_cell_count, pal_partner_share,
                                     progressive_factor)
from tokenmix.models import AttentionCapture, create_model

K = 10
# (grid, s): s divides the grid / cut border cells / rectangular / one token per cell
CASES = [(TokenGrid(8, 8, 4, 4), 2), (TokenGrid(7, 7, 4, 4), 2), (TokenGrid(6, 9, 2, 2), 3), (TokenGrid(5, 5, 4, 4), 1)]


def cells_of(mask_tokens: torch.Tensor, grid: TokenGrid, s: int) -> list[list[torch.Tensor]]:
    """The token values of every cell, read off the (rows, cols) token mask by slicing."""
    m = mask_tokens.view(grid.rows, grid.cols)
    n_h, n_w = math.ceil(grid.rows / s), math.ceil(grid.cols / s)
    return [[m[i * s:(i + 1) * s, j * s:(j + 1) * s] for j in range(n_w)] for i in range(n_h)]


# ---------------------------------------------------------------------------------------------
# the mask size

def test_cell_size_default_and_validation():
    assert cell_tokens(TokenGrid(7, 7, 4, 4)) == 2            # ceil(7 / 4): a 4 x 4 grid of cells
    assert cell_tokens(TokenGrid(16, 16, 14, 14)) == 4        # the released DeiT: P = 56 with p = 14
    assert cell_tokens(TokenGrid(14, 14, 16, 16)) == 4        # OpenMixup's P = 64 at 224 px / 16
    assert cell_tokens(TokenGrid(7, 7, 4, 4), 12) == 3
    assert cell_grid(TokenGrid(7, 7, 4, 4), 2) == (4, 4) and cell_grid(TokenGrid(6, 9, 2, 2), 3) == (2, 3)
    with pytest.raises(ValueError, match=r"mask_patch 6 px is not a multiple of the model's patch size 4 px.*valid: 0"):
        cell_tokens(TokenGrid(7, 7, 4, 4), 6)
    with pytest.raises(ValueError, match="leaves a single cell"):
        cell_tokens(TokenGrid(7, 7, 4, 4), 28)  # the whole image: MaskMix would never mix
    with pytest.raises(ValueError, match="leaves a single cell.*at most 24"):
        cell_tokens(TokenGrid(7, 7, 4, 4), 32)
    assert cell_tokens(TokenGrid(7, 7, 4, 4), 24) == 6  # 2 x 2 cells, the last ones one token wide
    with pytest.raises(ValueError, match="mask_patch must be >= 0"):
        methods.get("mixpro", num_classes=K, mask_patch=-4)
    # refused when the model is prepared, before any batch: one line naming the value and the choices
    model = create_model("vit_cpu", num_classes=K, img_size=28, in_chans=1)
    with pytest.raises(ValueError, match="mask_patch 6 px"):
        MixStep(model, "mixpro", mask_patch=6)


def test_own_cell_count_is_ceil_and_at_least_one():
    assert [own_cell_count(16, v) for v in (0.0, 1e-9, 1 / 16, 0.07, 0.5, 0.99, 1.0)] == [1, 1, 1, 2, 8, 16, 16]


def test_cell_count_under_beta_one_is_uniform():
    """Under Beta(1, 1), P(k) = 1/T for k = 1..T and E[k / T] = (T + 1) / (2T) (0.531 for T = 16)."""
    torch.manual_seed(0)
    ks = torch.tensor([own_cell_count(16, sample_lam(1.0)) for _ in range(8000)])
    freq = torch.bincount(ks, minlength=17)[1:].float() / len(ks)
    assert bool((freq - 1 / 16).abs().max() < 0.012)
    assert abs(float(ks.float().mean() / 16) - 17 / 32) < 0.01


# ---------------------------------------------------------------------------------------------
# MaskMix

@pytest.mark.parametrize("grid, s", CASES)
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_maskmix_cells_are_token_aligned_and_counted(grid, s, variant):
    torch.manual_seed(1)
    b = 6
    x = torch.randn(b, 3, *grid.img_size)
    y = torch.arange(b)
    lam = 0.4
    mixed = maskmix_batch(x, y, lam, grid, s, K, 0.1, variant)
    n_h, n_w = math.ceil(grid.rows / s), math.ceil(grid.cols / s)
    k = math.ceil(n_h * n_w * lam)
    pm = mixed.partner_mask
    assert pm.shape == (b, grid.num_tokens) and set(pm.unique().tolist()) <= {0.0, 1.0}
    for i in range(b):
        cells = cells_of(pm[i], grid, s)
        # every cell is wholly own or wholly partner, and exactly k cells are own
        assert all(bool((c == c.flatten()[0]).all()) for row in cells for c in row)
        assert sum(float(c.flatten()[0]) == 0.0 for row in cells for c in row) == k
        # every pixel comes from exactly one image: the mixed pixel is the own or the partner pixel
        j = int(mixed.partner_index[i])
        assert j == b - 1 - i
        for r in range(grid.rows):
            for c in range(grid.cols):
                sl = (slice(None), slice(r * grid.patch_h, (r + 1) * grid.patch_h),
                      slice(c * grid.patch_w, (c + 1) * grid.patch_w))
                src = x[j] if pm[i, r * grid.cols + c] == 1 else x[i]
                assert torch.equal(mixed.x[i][sl], src[sl])
    own_tokens = 1.0 - pm.mean(1)
    if variant == "official":
        torch.testing.assert_close(mixed.lam_area, torch.full((b,), k / (n_h * n_w)))
    else:
        torch.testing.assert_close(mixed.lam_area, own_tokens)
    torch.testing.assert_close(mixed.target, mix_targets(y, y.flip(0), mixed.lam_area, K, 0.1))
    torch.testing.assert_close(mixed.target.sum(1), torch.ones(b))
    if grid.rows % s == 0 and grid.cols % s == 0:  # the two area readings agree when s divides the grid
        torch.testing.assert_close(own_tokens, torch.full((b,), k / (n_h * n_w)))


def test_cut_border_cell_area_hand_case():
    """7 x 7 tokens, cells of 2: a lone own corner cell (3, 3) is one token: official 1/16, paper 1/49."""
    grid, s = TokenGrid(7, 7, 4, 4), 2
    for seed in range(200):
        torch.manual_seed(seed)
        mixed = maskmix_batch(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), 1e-6, grid, s, K, 0.0, "paper")
        own = (mixed.partner_mask[0] == 0).nonzero().flatten().tolist()
        if own == [48]:
            assert float(mixed.lam_area[0]) == pytest.approx(1 / 49)
            torch.manual_seed(seed)
            off = maskmix_batch(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), 1e-6, grid, s, K, 0.0, "official")
            assert off.partner_mask[0].tolist() == mixed.partner_mask[0].tolist()
            assert float(off.lam_area[0]) == pytest.approx(1 / 16)
            return
    pytest.fail("the corner cell was never drawn alone in 200 seeds")


def test_cells_are_drawn_per_sample():
    torch.manual_seed(0)
    mixed = maskmix_batch(torch.randn(8, 1, 28, 28), torch.arange(8), 0.5, TokenGrid(7, 7, 4, 4), 2, K, 0.1)
    assert len({tuple(r.tolist()) for r in mixed.partner_mask}) > 1


# ---------------------------------------------------------------------------------------------
# the progressive factor and PAL

def test_progressive_factor_bounds_and_limit_cases():
    y = torch.tensor([0, 1, 2])
    target = one_hot(y, K)
    sure_right = torch.full((3, K), -30.0).scatter(1, y[:, None], 30.0)
    sure_wrong = torch.full((3, K), -30.0).scatter(1, ((y + 1) % K)[:, None], 30.0)
    torch.testing.assert_close(progressive_factor(sure_right, target), torch.ones(3))
    torch.testing.assert_close(progressive_factor(sure_wrong, target), torch.zeros(3), atol=1e-6, rtol=0)
    # uniform prediction against a one-hot: cos = (1/K) / (sqrt(1/K) * 1) = 1 / sqrt(K)
    torch.testing.assert_close(progressive_factor(torch.zeros(3, K), target), torch.full((3,), K ** -0.5))
    gen = torch.Generator().manual_seed(0)
    a = progressive_factor(torch.randn(64, K, generator=gen) * 5, F.softmax(torch.randn(64, K, generator=gen), -1))
    assert bool(((a >= 0) & (a <= 1)).all())


def test_pal_share_limits():
    attn, area = torch.tensor([0.9, 0.1]), torch.tensor([0.3, 0.6])
    torch.testing.assert_close(pal_partner_share(torch.zeros(2), attn, area), area)
    torch.testing.assert_close(pal_partner_share(torch.ones(2), attn, area), attn)
    torch.testing.assert_close(pal_partner_share(torch.tensor([0.25, 0.5]), attn, area),
                               torch.tensor([0.25 * 0.9 + 0.75 * 0.3, 0.5 * 0.1 + 0.5 * 0.6]))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("vit_cpu", num_classes=K, img_size=28, in_chans=1).eval()


def test_pal_label_matches_brute_force(vit):
    """PAL target from the CLS attention of the last block (captured independently), the factor
    from the same forward's prediction, combined by hand."""
    m = methods.get("mixpro", num_classes=K)
    assert isinstance(m, MixPro) and (m.variant, m.pal, m.switch_prob) == ("paper", True, 1.0)
    m.prepare_model(vit)
    torch.manual_seed(3)
    x, y = torch.randn(8, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mixed = m.mix(x, y)
    assert mixed.kind == "maskmix"
    out = forward_outputs(vit, m.needs, mixed.x)
    target, info = m.label(out, mixed)
    with torch.no_grad(), AttentionCapture(vit, (-1,), "cls") as cap:
        logits = vit(mixed.x)
    a = cap[-1]  # (B, N) CLS -> patch attention, head mean
    lam_attn = (a * mixed.partner_mask).sum(1) / a.sum(1)
    area_t = mix_targets(y, y.flip(0), mixed.lam_area, K, 0.1)
    alpha = F.cosine_similarity(F.softmax(logits, -1), area_t, dim=-1)
    lam_p = alpha * lam_attn + (1 - alpha) * (1 - mixed.lam_area)
    expected = (1 - lam_p)[:, None] * one_hot(y, K, 0.1) + lam_p[:, None] * one_hot(y.flip(0), K, 0.1)
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert info["pal_alpha"] == pytest.approx(float(alpha.mean()), abs=1e-5)
    assert target.grad_fn is None  # the label carries no gradient (paper reading)


def test_official_recipe_and_pal_branch(vit):
    m = methods.get("mixpro", num_classes=K, variant="official")
    assert (m.pal, m.switch_prob) == (False, 0.5)
    m.prepare_model(vit)
    torch.manual_seed(0)
    kinds = [m.mix(torch.randn(4, 1, 28, 28), torch.arange(4)).kind for _ in range(400)]
    share = kinds.count("maskmix") / len(kinds)
    assert 0.42 < share < 0.58 and set(kinds) == {"maskmix", "mixup", "cutmix"}
    # PAL off: area target on MaskMix batches
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6)
    mm = methods.get("mixpro", num_classes=K, variant="official", switch_prob=1.0)
    mm.prepare_model(vit)
    mixed = mm.mix(x, y)
    out = forward_outputs(vit, mm.needs, mixed.x)
    assert torch.equal(mm.label(out, mixed)[0], mixed.target)
    # the released PAL branch: hard CE weighted per sample, the factor with gradient
    pal = methods.get("mixpro", num_classes=K, variant="official", switch_prob=1.0, pal=True)
    pal.prepare_model(vit)
    torch.manual_seed(1)
    mixed = pal.mix(x, y)
    out = forward_outputs(vit, pal.needs, mixed.x)
    logits = out.logits.detach().requires_grad_(True)
    out.logits = logits
    loss, info = pal.loss(out, mixed)
    # every share by hand: the CLS attention captured independently, the area as k / T
    with torch.no_grad(), AttentionCapture(vit, (-1,), "cls") as cap:
        vit(mixed.x)
    a = cap[-1]
    lam_attn = (a * mixed.partner_mask).sum(1) / a.sum(1)
    k = mixed.extras["own_cells"]
    assert mixed.extras["cells"] == (4, 4)
    torch.testing.assert_close(mixed.lam_area, torch.full((6,), k / 16))
    area_t = mix_targets(y, y.flip(0), torch.full((6,), k / 16), K, 0.1)
    alpha = F.cosine_similarity(F.softmax(logits.detach(), -1), area_t, dim=-1)
    lam_p = (alpha * lam_attn + (1 - alpha) * (1 - k / 16)).detach()
    by_hand = ((1 - lam_p) * F.cross_entropy(logits, y, reduction="none")
               + lam_p * F.cross_entropy(logits, y.flip(0), reduction="none")).mean()
    torch.testing.assert_close(loss, by_hand)  # the value; the gradient below differs
    expected = by_hand
    # the switch's Mixup/CutMix batches keep their area target (the released `maskmix and ATTN`)
    switch = methods.get("mixpro", num_classes=K, variant="official", pal=True, switch_prob=0.0)
    switch.prepare_model(vit)
    torch.manual_seed(2)
    other = switch.mix(x, y)
    assert other.kind in ("mixup", "cutmix")
    out2 = forward_outputs(vit, switch.needs, other.x)
    torch.testing.assert_close(switch.loss(out2, other)[0], -(other.target * F.log_softmax(out2.logits, -1)).sum(1).mean())
    g_full = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    g_detached = torch.autograd.grad(expected, logits)[0]
    assert not torch.allclose(g_full, g_detached)  # the gradient also flows through alpha


def test_train_step_every_variant_finite(vit):
    for kw in ({}, {"variant": "official"}, {"variant": "official", "pal": True}, {"mask_patch": 4},
               {"mask_patch": 16, "switch_prob": 1.0}):
        torch.manual_seed(0)
        step = MixStep(vit.train(), "mixpro", **kw)
        out = step(torch.randn(5, 1, 28, 28), torch.arange(5))  # odd batch: the middle sample stays unmixed
        assert torch.isfinite(out.loss), kw
        out.loss.backward()
        if out.mixed.kind == "maskmix":
            assert float(out.mixed.partner_mask[2].sum()) == 0.0 and float(out.mixed.lam_area[2]) == 1.0
    vit.eval()
