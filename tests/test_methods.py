"""The method interface (tokenmix.methods.base), the baselines and the registry."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from tokenmix import methods
from tokenmix.methods.base import (MixMethod, ModelOutputs, TokenGrid, entropy, flip_pairing, mix_targets, one_hot,
                                   soft_target_cross_entropy)
from tokenmix.methods.baselines import CutMix, Mixup, MixupCutMix, cutmix_batch, mixup_batch

BASELINES = ["none", "mixup", "cutmix", "mixup_cutmix"]
GRIDS = [TokenGrid(8, 8, 4, 4), TokenGrid(7, 7, 4, 4), TokenGrid(6, 4, 4, 8)]


def hand_one_hot(y, k: int, s: float) -> torch.Tensor:
    out = torch.empty(len(y), k)
    for i, c in enumerate(y.tolist()):
        for j in range(k):
            out[i, j] = (1 - s + s / k) if j == c else s / k
    return out


def batch(grid: TokenGrid, b: int = 6, c: int = 3, k: int = 10):
    x = torch.randn(b, c, *grid.img_size)
    y = torch.randint(0, k, (b,))
    return x, y


def build(name: str, grid: TokenGrid, **kw) -> MixMethod:
    m = methods.get(name, num_classes=kw.pop("num_classes", 10), **kw)
    m.grid = grid
    return m


# ---------------------------------------------------------------------------------------------
# one_hot / mix_targets / loss

@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5])
def test_one_hot_smoothing_values(k, s):
    y = torch.randint(0, k, (7,))
    t = one_hot(y, k, s)
    assert t.dtype == torch.float32 and t.shape == (7, k)
    torch.testing.assert_close(t, hand_one_hot(y, k, s))
    torch.testing.assert_close(t.sum(1), torch.ones(7))
    # and timm's helper with the same on/off values
    torch.testing.assert_close(t, timm_mixup.one_hot(y, k, on_value=1 - s + s / k, off_value=s / k))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("s", [0.0, 0.1])
def test_mix_targets_equals_timm(lam, s):
    k, b = 10, 8
    y = torch.randint(0, k, (b,))
    ours = mix_targets(y, y.flip(0), lam, k, s)
    torch.testing.assert_close(ours, timm_mixup.mixup_target(y, k, lam, s))
    ours_vec = mix_targets(y, y.flip(0), torch.full((b,), lam), k, s)
    torch.testing.assert_close(ours_vec, timm_mixup.mixup_target(y, k, lam, s))


def test_mix_targets_per_sample_lam():
    k, b, s = 5, 4, 0.2
    y, yp = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 0, 3])
    lam = torch.tensor([0.1, 0.5, 0.9, 0.25])
    t = mix_targets(y, yp, lam, k, s)
    oh, ohp = hand_one_hot(y, k, s), hand_one_hot(yp, k, s)
    for i in range(b):
        torch.testing.assert_close(t[i], lam[i] * oh[i] + (1 - lam[i]) * ohp[i])
    torch.testing.assert_close(t.sum(1), torch.ones(b))


def test_soft_target_cross_entropy_one_hot_equals_cross_entropy():
    logits, y = torch.randn(9, 7), torch.randint(0, 7, (9,))
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot(y, 7)), F.cross_entropy(logits, y))
    # with smoothing: torch's label_smoothing follows the same (1 - s + s/K, s/K) rule
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot(y, 7, 0.1)),
                               F.cross_entropy(logits, y, label_smoothing=0.1))


def test_soft_target_cross_entropy_equals_timm_and_probability_targets():
    logits = torch.randn(6, 5)
    target = torch.softmax(torch.randn(6, 5), 1)
    ours = soft_target_cross_entropy(logits, target)
    torch.testing.assert_close(ours, SoftTargetCrossEntropy()(logits, target))
    torch.testing.assert_close(ours, F.cross_entropy(logits, target))
    # half-precision logits are computed in float32
    out16 = soft_target_cross_entropy(logits.half(), target)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, F.cross_entropy(logits.half().float(), target))


def test_entropy_uniform_and_one_hot():
    assert entropy(torch.full((3, 8), 1 / 8)) == pytest.approx(math.log(8), rel=1e-6)
    assert entropy(one_hot(torch.tensor([1, 2]), 4)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# pairing and grid

@pytest.mark.parametrize("b", [2, 4, 6, 128])
def test_flip_pairing_is_a_fixed_point_free_involution(b):
    idx = flip_pairing(b)
    assert idx.dtype == torch.int64 and idx.tolist() == [b - 1 - i for i in range(b)]
    assert torch.equal(idx[idx], torch.arange(b))
    assert not torch.any(idx == torch.arange(b))


@pytest.mark.parametrize("b", [1, 3, 7])
def test_flip_pairing_of_an_odd_batch_pairs_the_middle_sample_with_itself(b):
    idx = flip_pairing(b)
    assert idx.tolist() == list(range(b - 1, -1, -1)) and int(idx[b // 2]) == b // 2
    assert [i for i in range(b) if idx[i] == i] == [b // 2]


def test_flip_pairing_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        flip_pairing(0)


def test_token_grid_from_model(vit_cpu_gray):
    g = TokenGrid.from_model(vit_cpu_gray)
    assert g == TokenGrid(4, 4, 4, 4) and g.img_size == (16, 16) and g.num_tokens == 16


def test_token_grid_from_model_rejects_non_vit():
    with pytest.raises(ValueError, match="patch_embed"):
        TokenGrid.from_model(nn.Linear(3, 3))


@pytest.mark.parametrize("img, patch, expected", [
    (32, 4, TokenGrid(8, 8, 4, 4)), (28, 4, TokenGrid(7, 7, 4, 4)), (32, (4, 8), TokenGrid(8, 4, 4, 8)),
    ((24, 32), (4, 8), TokenGrid(6, 4, 4, 8)), ((15, 10), 5, TokenGrid(3, 2, 5, 5)),
])
def test_token_grid_for_image(img, patch, expected):
    g = TokenGrid.for_image(img, patch)
    assert g == expected
    h, w = (img, img) if isinstance(img, int) else img
    assert g.img_size == (h, w) and g.num_tokens == expected.rows * expected.cols


@pytest.mark.parametrize("img, patch", [(30, 4), ((32, 30), 4), (32, (4, 5)), (7, 2)])
def test_token_grid_for_image_rejects_non_divisible(img, patch):
    with pytest.raises(ValueError, match="not divisible"):
        TokenGrid.for_image(img, patch)


# ---------------------------------------------------------------------------------------------
# every baseline: structural invariants

CASES = [("none", {}), ("mixup", {}), ("cutmix", {"cutmix_snap": "pixel"}), ("cutmix", {"cutmix_snap": "token"}),
         ("mixup_cutmix", {"cutmix_snap": "pixel"}), ("mixup_cutmix", {"cutmix_snap": "token"})]


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}-{k.get('cutmix_snap', '')}" for n, k in CASES])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_mixed_batch_invariants(name, kw, grid):
    m = build(name, grid, **kw)
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = batch(grid)
        mb = m.mix(x, y)
        b, n = x.shape[0], grid.num_tokens
        assert mb.x.shape == x.shape and mb.x.dtype == x.dtype
        assert mb.target.shape == (b, 10) and mb.partner_mask.shape == (b, n) and mb.lam_area.shape == (b,)
        assert torch.all(mb.target >= 0)
        torch.testing.assert_close(mb.target.sum(1), torch.ones(b))
        assert torch.all((mb.partner_mask >= 0) & (mb.partner_mask <= 1))
        assert torch.all((mb.lam_area >= 0) & (mb.lam_area <= 1))
        assert torch.equal(mb.y, y) and torch.equal(mb.y_partner, y[mb.partner_index])
        torch.testing.assert_close(mb.lam_area, 1 - mb.partner_mask.mean(1), atol=1e-6, rtol=0)
        # the target is the area rule, lam * own + (1 - lam) * partner, each smoothed first
        expected = (mb.lam_area[:, None] * hand_one_hot(y, 10, 0.1)
                    + (1 - mb.lam_area[:, None]) * hand_one_hot(mb.y_partner, 10, 0.1))
        torch.testing.assert_close(mb.target, expected)
        assert mb.kind in ("none", "mixup", "cutmix")
        if name == "none":
            assert mb.kind == "none"


def test_none_is_the_identity():
    grid = GRIDS[0]
    m = build("none", grid, smoothing=0.0)
    x, y = batch(grid, b=5)  # odd batches are fine when nothing is mixed
    mb = m.mix(x, y)
    assert torch.equal(mb.x, x) and torch.equal(mb.partner_index, torch.arange(5))
    assert torch.equal(mb.target, F.one_hot(y, 10).float())
    assert torch.all(mb.partner_mask == 0) and torch.all(mb.lam_area == 1)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_mixup_blends_whole_images(grid):
    m = build("mixup", grid)
    for seed in range(5):
        torch.manual_seed(seed)
        x, y = batch(grid)
        mb = m.mix(x, y)
        assert mb.kind == "mixup"
        lam = float(mb.lam_area[0])
        assert torch.all(mb.lam_area == lam)
        flip = torch.arange(x.shape[0] - 1, -1, -1)
        assert torch.equal(mb.partner_index, flip)
        torch.testing.assert_close(mb.x, lam * x + (1 - lam) * x[flip], atol=1e-6, rtol=0)
        torch.testing.assert_close(mb.partner_mask, torch.full_like(mb.partner_mask, 1 - lam))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_cutmix_pixel_box(grid):
    m = build("cutmix", grid, cutmix_snap="pixel")
    h, w = grid.img_size
    straddling = 0
    for seed in range(20):
        torch.manual_seed(seed)
        x, y = batch(grid)
        mb = m.mix(x, y)
        assert mb.kind == "cutmix"
        flip = torch.arange(x.shape[0] - 1, -1, -1)
        top, bottom, left, right = mb.extras["box"]
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        ins = inside.expand_as(x)
        assert torch.equal(mb.x[ins], x[flip][ins]) and torch.equal(mb.x[~ins], x[~ins])
        area = (bottom - top) * (right - left)
        assert torch.all(mb.lam_area == torch.tensor(1 - area / (h * w), dtype=torch.float32))
        # per-token partner share = area share of each token, the same for every sample
        pooled = F.avg_pool2d(inside.float()[None, None], (grid.patch_h, grid.patch_w)).flatten()
        for i in range(x.shape[0]):
            torch.testing.assert_close(mb.partner_mask[i], pooled, atol=1e-6, rtol=0)
        frac = mb.partner_mask[0]
        straddling += int(torch.any((frac > 0) & (frac < 1)))
    assert straddling > 0  # pixel boxes do produce fractional tokens


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_cutmix_token_snap_is_binary(grid):
    m = build("cutmix", grid, cutmix_snap="token")
    for seed in range(20):
        torch.manual_seed(seed)
        x, y = batch(grid)
        mb = m.mix(x, y)
        pm = mb.partner_mask
        assert torch.all((pm == 0) | (pm == 1))
        top, bottom, left, right = mb.extras["box"]
        assert top % grid.patch_h == 0 and bottom % grid.patch_h == 0
        assert left % grid.patch_w == 0 and right % grid.patch_w == 0
        flip = torch.arange(x.shape[0] - 1, -1, -1)
        pix = pm.reshape(-1, 1, grid.rows, grid.cols).repeat_interleave(grid.patch_h, 2) \
            .repeat_interleave(grid.patch_w, 3).bool().expand_as(x)
        assert torch.equal(mb.x[pix], x[flip][pix]) and torch.equal(mb.x[~pix], x[~pix])
        torch.testing.assert_close(mb.lam_area, 1 - pm.mean(1), atol=1e-6, rtol=0)


def test_token_snap_box_follows_rand_bbox_on_the_grid(monkeypatch):
    grid = TokenGrid(7, 7, 4, 4)
    centres = iter([3, 6])

    def fake_randint(low, high, size, *a, **k):
        assert (low, high) == (0, 7)  # the centre is drawn on the token grid
        return torch.tensor(next(centres))

    monkeypatch.setattr(torch, "randint", fake_randint)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 1])
    # lam 0.5 on a 7-token side: int(7 * 0.7071) = 4 tokens -> rows 1..5, cols 4..7 (clipped)
    mb = cutmix_batch(x, y, 0.5, grid, 10, 0.0, snap="token")
    assert mb.extras["box"] == (4, 20, 16, 28)
    assert mb.lam_area[0].item() == pytest.approx(1 - 16 * 12 / 784)


@pytest.mark.parametrize("lam", [0.2, 0.5, 0.7])
def test_mixup_batch_equals_timm_mixup(monkeypatch, lam):
    grid, k, s = TokenGrid(8, 8, 4, 4), 10, 0.1
    x, y = batch(grid, b=8, k=k)
    ours = mixup_batch(x, y, lam, grid, k, s)
    mixer = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=s, num_classes=k)
    monkeypatch.setattr(np.random, "beta", lambda a, b: lam)
    monkeypatch.setattr(np.random, "rand", lambda: 0.0)
    tx, tt = mixer(x.clone(), y.clone())
    torch.testing.assert_close(ours.x, tx, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.target, tt)


@pytest.mark.parametrize("lam, centre", [(0.5, (10, 30)), (0.3, (0, 0)), (0.75, (16, 16)), (0.9, (31, 2))])
def test_cutmix_batch_equals_timm_cutmix_for_even_sides(monkeypatch, lam, centre):
    grid, k, s = TokenGrid(8, 8, 4, 4), 10, 0.1
    assert int(32 * math.sqrt(1 - lam)) % 2 == 0  # odd sides differ by design, see test_masks
    x, y = batch(grid, b=8, k=k)
    it = iter(centre)
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, *a, **kw: torch.tensor(next(it)))
    ours = cutmix_batch(x, y, lam, grid, k, s)
    monkeypatch.undo()
    mixer = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=s, num_classes=k)
    it2 = iter(centre)
    monkeypatch.setattr(np.random, "beta", lambda a, b: lam)
    monkeypatch.setattr(np.random, "rand", lambda: 0.0)
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: next(it2))
    tx, tt = mixer(x.clone(), y.clone())
    assert torch.equal(ours.x, tx)
    torch.testing.assert_close(ours.target, tt)


# ---------------------------------------------------------------------------------------------
# probabilities

@pytest.mark.parametrize("switch_prob", [0.0, 0.25, 0.7, 1.0])
def test_mixup_cutmix_switch_frequency(switch_prob):
    grid = TokenGrid(2, 2, 4, 4)
    m = build("mixup_cutmix", grid, switch_prob=switch_prob)
    x, y = batch(grid, b=2, c=1)
    n = 600
    kinds = [m.mix(x, y).kind for _ in range(n)]
    assert set(kinds) <= {"mixup", "cutmix"}
    freq = kinds.count("cutmix") / n
    if switch_prob in (0.0, 1.0):
        assert freq == switch_prob
    else:
        assert abs(freq - switch_prob) < 0.08  # > 4 binomial standard deviations


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup_cutmix"])
@pytest.mark.parametrize("mix_prob", [0.0, 0.3, 0.8, 1.0])
def test_mix_prob_leaves_that_share_unmixed(name, mix_prob):
    grid = TokenGrid(2, 2, 4, 4)
    m = build(name, grid, mix_prob=mix_prob)
    x, y = batch(grid, b=2, c=1)
    n = 500
    out = [m.mix(x, y) for _ in range(n)]
    unmixed = [mb for mb in out if mb.kind == "none"]
    share = len(unmixed) / n
    if mix_prob in (0.0, 1.0):
        assert share == 1 - mix_prob
    else:
        assert abs(share - (1 - mix_prob)) < 0.08
    for mb in unmixed[:5]:
        assert torch.equal(mb.x, x) and torch.all(mb.lam_area == 1) and torch.all(mb.partner_mask == 0)


@pytest.mark.parametrize("name", BASELINES)
def test_mix_is_reproducible_under_torch_seed(name):
    grid = GRIDS[1]
    m = build(name, grid)
    x, y = batch(grid)
    torch.manual_seed(123)
    a = [m.mix(x, y) for _ in range(3)]
    torch.manual_seed(123)
    b = [m.mix(x, y) for _ in range(3)]
    for ma, mb in zip(a, b):
        assert torch.equal(ma.x, mb.x) and torch.equal(ma.target, mb.target)
        assert torch.equal(ma.partner_mask, mb.partner_mask) and ma.extras == mb.extras
    if name != "none":  # the RNG is actually consumed: successive draws differ
        assert len({float(mb.lam_area[0]) for mb in a}) > 1


# ---------------------------------------------------------------------------------------------
# setup errors

@pytest.mark.parametrize("name", BASELINES)
def test_mix_without_prepare_model_raises(name):
    m = methods.get(name, num_classes=10)
    with pytest.raises(RuntimeError, match="prepare_model"):
        m.mix(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", BASELINES)
def test_prepare_model_reads_the_grid_and_checks_the_input_size(name, vit_cpu_gray):
    m = methods.get(name, num_classes=10)
    assert m.prepare_model(vit_cpu_gray) is vit_cpu_gray
    assert m.grid == TokenGrid(4, 4, 4, 4)
    mb = m.mix(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    assert mb.partner_mask.shape == (4, 16)
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        m.mix(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup_cutmix"])
def test_an_odd_batch_mixes_every_pair_and_leaves_the_middle_sample_alone(name):
    grid = GRIDS[0]
    m = build(name, grid, smoothing=0.1)
    torch.manual_seed(3)
    x, y = batch(grid, b=5)
    mb = m.mix(x, y)
    assert torch.equal(mb.x[2], x[2]) and torch.equal(mb.target[2], hand_one_hot(y[2:3], 10, 0.1)[0])
    assert float(mb.lam_area[2]) == 1.0 and float(mb.partner_mask[2].abs().sum()) == 0.0
    # the pairs (0, 4) and (1, 3) are mixed exactly as in the even batch made of them
    torch.manual_seed(3)
    batch(grid, b=5)
    even = m.mix(x[[0, 1, 3, 4]], y[[0, 1, 3, 4]])
    torch.testing.assert_close(mb.x[[0, 1, 3, 4]], even.x)
    torch.testing.assert_close(mb.target[[0, 1, 3, 4]], even.target)


def test_loss_is_soft_target_ce_of_the_target():
    grid = GRIDS[0]
    m = build("cutmix", grid)
    x, y = batch(grid)
    mb = m.mix(x, y)
    logits = torch.randn(x.shape[0], 10)
    loss, info = m.loss(ModelOutputs(logits=logits), mb)
    torch.testing.assert_close(loss, F.cross_entropy(logits, mb.target))
    assert info["lam"] == pytest.approx(float(mb.lam_area.mean()))


# ---------------------------------------------------------------------------------------------
# registry and constructor validation

def test_available_is_sorted_and_has_the_baselines():
    names = methods.available()
    assert names == sorted(names) and set(BASELINES) <= set(names)
    assert {methods.method_class(n).name for n in names} == set(names)


@pytest.mark.parametrize("name, cls", [("none", MixMethod), ("mixup", Mixup), ("cutmix", CutMix),
                                       ("mixup_cutmix", MixupCutMix)])
def test_get_builds_the_registered_class(name, cls):
    m = methods.get(name, num_classes=7, smoothing=0.2)
    assert type(m) is cls and m.num_classes == 7 and m.smoothing == 0.2 and m.name == name


def test_get_unknown_name_lists_valid_methods():
    with pytest.raises(ValueError, match="nosuch") as e:
        methods.get("nosuch", num_classes=10)
    for n in methods.available():
        assert n in str(e.value)


def test_get_unknown_param_lists_valid_params():
    with pytest.raises(ValueError, match="bogus") as e:
        methods.get("cutmix", num_classes=10, bogus=1)
    for p in ("cutmix_alpha", "cutmix_snap", "smoothing", "mix_prob"):
        assert p in str(e.value)
    with pytest.raises(ValueError, match="switch_prob"):
        methods.get("cutmix", num_classes=10, switch_prob=0.5)  # a parameter of another method


@pytest.mark.parametrize("name", BASELINES)
def test_parameters_match_the_constructor(name):
    cls = methods.method_class(name)
    sig = inspect.signature(cls.__init__)
    params = methods.parameters(name)
    assert list(params) == [k for k in sig.parameters if k != "self"]
    assert params["num_classes"] is None
    for k, p in sig.parameters.items():
        if k not in ("self", "num_classes"):
            assert params[k] == p.default


@pytest.mark.parametrize("name", BASELINES)
def test_bad_variant_rejected(name):
    with pytest.raises(ValueError, match="official, paper"):
        methods.get(name, num_classes=10, variant="bogus")
    assert methods.get(name, num_classes=10, variant="paper").variant == "paper"


@pytest.mark.parametrize("name, kw", [
    ("none", {"num_classes": 0}), ("none", {"smoothing": 1.0}), ("none", {"smoothing": -0.1}),
    ("mixup", {"mix_prob": 1.5}), ("mixup", {"mixup_alpha": 0.0}), ("cutmix", {"cutmix_alpha": -1.0}),
    ("cutmix", {"cutmix_snap": "bogus"}), ("mixup_cutmix", {"switch_prob": 1.5}),
    ("mixup_cutmix", {"cutmix_snap": "grid"}), ("mixup_cutmix", {"mixup_alpha": 0.0}),
])
def test_constructor_validation(name, kw):
    kw = {"num_classes": 10, **kw}
    with pytest.raises(ValueError):
        methods.get(name, **kw)


def test_register_rejects_a_second_class_under_a_taken_name(monkeypatch):
    from tokenmix.methods import registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Other(MixMethod):
        name = "cutmix"

    with pytest.raises(ValueError, match="already registered"):
        methods.register(Other)
    assert methods.register(CutMix) is CutMix  # re-registering the same class is a no-op

    class New(MixMethod):
        name = "zz_new"

    methods.register(New)
    assert "zz_new" in methods.available() and methods.available() == sorted(methods.available())
