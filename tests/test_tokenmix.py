"""TokenMix (tokenmix.methods.tokenmix): block / random token masks, teacher-mass targets, losses.

Expected values are computed independently (by hand, by replaying recorded blocks, or by
per-token loops), never copied from the implementation's output. The teacher maps themselves
(alignment, cache) are tested in ``test_teacher.py``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_method

from tokenmix import methods
from tokenmix.methods import tokenmix as tm
from tokenmix.methods.base import ModelOutputs, TokenGrid
from tokenmix.methods.tokenmix import (TokenMix, block_mask, official_target, official_token_count, paper_target,
                                       paper_token_count, random_mask, scaled_min_tokens, teacher_masses)
from tokenmix.train.config import RunConfig
from tokenmix.train.engine import train
from tokenmix.train.runs import load_run

K = 10
ASPECT = 0.3  # the official aspect-ratio range is [0.3, 1 / 0.3]


def make(variant: str = "official", grid: TokenGrid | None = TokenGrid(4, 4, 4, 4), **kw) -> TokenMix:
    return make_method("tokenmix", TokenMix, K, variant, grid, **kw)


# ---------------------------------------------------------------------------------------------
# token counts

def test_official_and_paper_token_counts():
    # official: min(N, floor(0.5 N) + round(14 N / 196))
    assert official_token_count(196) == 98 + 14 == 112
    assert official_token_count(49) == 24 + 4 == 28  # 14 * 49 / 196 = 3.5 rounds up to 4
    assert official_token_count(64) == 32 + 5 == 37  # 4.57 -> 5
    assert official_token_count(196, 0.9) == 176 + 14  # floor(176.4) + 14
    assert official_token_count(196, 0.95) == 196  # 186 + 14 = 200, capped at N
    assert official_token_count(1) == 1 and official_token_count(4) == 2 + 1
    # paper: floor(lambda N)
    assert paper_token_count(196, 0.5) == 98
    assert paper_token_count(196, 0.3) == 58  # floor(58.8)
    assert paper_token_count(49, 0.5) == 24
    assert paper_token_count(10, 0.999) == 9
    # the 14-of-196 offset scaled to the grid, rounded half up, at least 1
    assert [scaled_min_tokens(n) for n in (196, 49, 64, 100, 16, 4, 1)] == [14, 4, 5, 7, 1, 1, 1]
    assert scaled_min_tokens(196, 16) == 16 and scaled_min_tokens(49, 16) == 4 and scaled_min_tokens(49, 0) == 1


def test_method_token_count_per_variant():
    g14, g7 = TokenGrid(14, 14, 16, 16), TokenGrid(7, 7, 4, 4)
    assert make("official", g14).token_count(g14) == 112
    assert make("official", g7).token_count(g7) == 28
    assert make("paper", g14).token_count(g14) == 98
    assert make("paper", g14, mask_ratio=0.3).token_count(g14) == 58
    torch.manual_seed(1)
    counts = {make("paper", g14, tokenmix_alpha=1.0).token_count(g14) for _ in range(30)}
    assert len(counts) > 10 and all(0 <= c <= 196 for c in counts)  # lambda ~ Beta(1, 1) per batch


# ---------------------------------------------------------------------------------------------
# block masks

def test_block_mask_count_statistics_official():
    """Reference (3000 draws of the released generator): mean 111.98, 98.8 % exactly 112."""
    torch.manual_seed(0)
    masks = torch.stack([block_mask(14, 14, 112, min_block=1) for _ in range(2000)])
    assert masks.shape == (2000, 196) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    counts = masks.sum(1)
    assert counts.max() <= 112  # never more than asked
    assert abs(float(counts.mean()) - 112) < 1.0
    assert float((counts == 112).float().mean()) >= 0.95
    # the masks differ between draws and cover the whole grid over many draws
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks[:50]}) == 50
    assert bool((masks.mean(0) > 0).all())


def test_block_mask_non_square_grid():
    torch.manual_seed(0)
    count = official_token_count(60)  # 30 + round(4.29) = 34
    assert count == 34
    masks = torch.stack([block_mask(6, 10, count) for _ in range(300)])
    assert masks.shape == (300, 60) and set(masks.unique().tolist()) <= {0.0, 1.0}
    counts = masks.sum(1)
    assert counts.max() <= count and float((counts == count).float().mean()) > 0.9


_RECORDED: list[tuple[int, int, int, int]] = []


class _RecordingMask(torch.Tensor):
    """A tensor that records every slice assignment ``mask[t:b, l:r] = 1`` (= one accepted block)."""

    def __setitem__(self, key, value):
        rows, cols = key
        _RECORDED.append((rows.start, rows.stop, cols.start, cols.stop))
        super().__setitem__(key, value)


class _TorchWithRecordingZeros:
    """Stands in for ``torch`` inside the tokenmix module: ``zeros`` returns a recording mask."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*shape, **kw):
        return torch.zeros(*shape, **kw).as_subclass(_RecordingMask)


def _draw_blocks(monkeypatch, rows: int, cols: int, count: int, min_block: int, draws: int):
    """[(mask, [(top, bottom, left, right), ...]), ...]: each draw with the blocks it accepted."""
    monkeypatch.setattr(tm, "torch", _TorchWithRecordingZeros())
    out = []
    for _ in range(draws):
        _RECORDED.clear()
        m = block_mask(rows, cols, count, min_block)
        out.append((m.as_subclass(torch.Tensor).clone(), list(_RECORDED)))
    monkeypatch.undo()
    return out


def _check_blocks(rows, cols, count, min_block, draws):
    """Replay each draw's blocks and check the BEiT rules; returns every block's (h, w)."""
    shapes = []
    for mask, blocks in draws:
        if not blocks:  # a first round of 10 rejected tries (possible on tiny grids): empty mask
            assert float(mask.sum()) == 0
            continue
        replay, covered = torch.zeros(rows, cols), 0
        for top, bottom, left, right in blocks:
            h, w = bottom - top, right - left
            assert 0 < h < rows and 0 < w < cols, (h, w)  # strictly smaller than the grid
            assert 0 <= top and bottom <= rows and 0 <= left and right <= cols
            # h = round(sqrt(a r)), w = round(sqrt(a / r)), r in [0.3, 1/0.3], a in [min_block, remaining]:
            # |h - sqrt(a r)| <= 1/2 and |w - sqrt(a / r)| <= 1/2, and sqrt(a r) / sqrt(a / r) = r
            assert h - 0.5 <= (w + 0.5) / ASPECT + 1e-9, (h, w)
            assert w - 0.5 <= (h + 0.5) / ASPECT + 1e-9, (h, w)
            # a ~ U(min_block, remaining), i.e. within [remaining, min_block] once remaining < min_block
            assert (h - 0.5) * (w - 0.5) <= max(count - covered, min_block) + 1e-9, (h, w, count - covered)
            # the floor is on the drawn area (BEiT): a >= min(min_block, remaining), and a <= (h + 1/2)(w + 1/2)
            assert (h + 0.5) * (w + 0.5) >= min(min_block, count - covered) - 1e-9, (h, w, min_block)
            new = h * w - int(replay[top:bottom, left:right].sum())
            assert 1 <= new <= count - covered  # each block adds 1..remaining new tokens
            replay[top:bottom, left:right] = 1
            covered += new
            shapes.append((h, w))
        torch.testing.assert_close(mask, replay.flatten())  # the recorded blocks are the whole mask
    return shapes


def test_block_shapes_official(monkeypatch):
    torch.manual_seed(0)
    draws = _draw_blocks(monkeypatch, 14, 14, 112, 1, 300)
    shapes = _check_blocks(14, 14, 112, 1, draws)
    ratios = [h / w for h, w in shapes]
    # the whole aspect range is used, in both orientations (a fixed r = 1 would fail here)
    assert max(ratios) >= 3 and min(ratios) <= 1 / 3
    assert max(h for h, _ in shapes) == 13 and max(w for _, w in shapes) == 13  # < 14, but reached
    # non-square and small grids: blocks stay strictly inside the grid in each direction
    draws = _draw_blocks(monkeypatch, 6, 10, 34, 1, 200)
    shapes = _check_blocks(6, 10, 34, 1, draws)
    assert max(h for h, _ in shapes) == 5 and max(w for _, w in shapes) == 9
    _check_blocks(3, 3, 8, 1, _draw_blocks(monkeypatch, 3, 3, 8, 1, 100))


def test_block_shapes_paper_min_block(monkeypatch):
    """Paper: the drawn area of every block is at least m tokens (m = 4 on a 7x7 grid) while m remain."""
    torch.manual_seed(0)
    m = scaled_min_tokens(49)
    assert m == 4
    draws = _draw_blocks(monkeypatch, 7, 7, paper_token_count(49, 0.5), m, 400)
    _check_blocks(7, 7, 24, m, draws)
    first = [blocks[0] for _, blocks in draws if blocks]  # drawn with 24 tokens remaining: a >= 4
    assert min((b - t) * (r - le) for t, b, le, r in first) >= 3  # 1x1, 1x2 ((h+1/2)(w+1/2) < 4) impossible
    # with a floor of 1 the first block is sometimes a single token
    torch.manual_seed(0)
    first1 = [blocks[0] for _, blocks in _draw_blocks(monkeypatch, 7, 7, 24, 1, 400) if blocks]
    assert min((b - t) * (r - le) for t, b, le, r in first1) == 1
    # the paper count is (nearly) reached: the last blocks may go below the floor
    counts = torch.stack([mask for mask, _ in draws]).sum(1)
    assert float(counts.float().mean()) >= 23.0 and int(counts.max()) == 24
    # the method passes the scaled floor for the paper variant and 1 for the official one
    g = TokenGrid(7, 7, 4, 4)
    seen = []
    real = tm.block_mask
    monkeypatch.setattr(tm, "block_mask", lambda rows, cols, count, min_block=1: seen.append(min_block)
                        or real(rows, cols, count, min_block))
    make("paper", g).sample_mask(g)
    make("official", g).sample_mask(g)
    assert seen == [m, 1]
    monkeypatch.undo()


# ---------------------------------------------------------------------------------------------
# random masks

def test_random_mask_exact_count_and_uniform_coverage():
    torch.manual_seed(0)
    n, count, draws = 49, 24, 3000
    masks = torch.stack([random_mask(n, count) for _ in range(draws)])
    assert masks.shape == (draws, n) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert bool((masks.sum(1) == count).all())
    freq = masks.mean(0)  # each token: count / N = 0.49, std 0.009 over 3000 draws
    assert float((freq - count / n).abs().max()) < 0.05
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks[:100]}) == 100
    g = TokenGrid(7, 7, 4, 4)
    assert float(make("official", g, mask="random").sample_mask(g).sum()) == 28  # exact, unlike blocks


# ---------------------------------------------------------------------------------------------
# targets by hand

EPS = 0.1
OWN_MAPS = torch.tensor([[0.4, 0.3, 0.2, 0.1],
                         [0.5, 0.25, 0.15, 0.1]])
PARTNER_MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [0.0, 0.5, 1.0, 0.0]])
# y_own = sum own (1 - M):       0.2 + 0.1 = 0.3            0.5 + 0.25 * 0.5 + 0.1 = 0.725
# y_partner = sum own[par] M:    0.5 + 0.25 = 0.75          0.3 * 0.5 + 0.2 = 0.35
Y_OWN, Y_PAR = torch.tensor([0.3, 0.725]), torch.tensor([0.75, 0.35])


def test_teacher_masses_by_hand():
    y_own, y_par = teacher_masses(OWN_MAPS, PARTNER_MASK, torch.tensor([1, 0]))
    torch.testing.assert_close(y_own, Y_OWN)
    torch.testing.assert_close(y_par, Y_PAR)
    # identity pairing: the partner mass comes from the sample's own map
    _, y_self = teacher_masses(OWN_MAPS, PARTNER_MASK, torch.tensor([0, 1]))
    torch.testing.assert_close(y_self, torch.tensor([0.7, 0.275]))  # 0.4 + 0.3; 0.25 * 0.5 + 0.15


def test_official_target_by_hand():
    y, y_par = torch.tensor([0, 2]), torch.tensor([2, 0])
    t = official_target(y, y_par, Y_OWN, Y_PAR, 3, EPS)
    e = EPS / 3  # eps / K on every class
    expected = torch.tensor([
        [e + (0.3 - 0.05), e, e + (0.75 - 0.05)],  # own class 0, partner class 2
        [e + (0.35 - 0.05), e, e + (0.725 - 0.05)],  # own class 2, partner class 0
    ])
    torch.testing.assert_close(t, expected)
    torch.testing.assert_close(t.sum(1), Y_OWN + Y_PAR)  # 1.05, 1.075: not a distribution
    # same class: the two terms add on it
    same = official_target(torch.tensor([1, 1]), torch.tensor([1, 1]), Y_OWN, Y_PAR, 3, EPS)
    torch.testing.assert_close(same, torch.tensor([[e, e + 0.25 + 0.70, e], [e, e + 0.675 + 0.30, e]]))
    # a small mass makes an entry negative: 1/30 + (0 - 0.05) = -1/60
    neg = official_target(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.0]), torch.tensor([1.0]), 3, EPS)
    torch.testing.assert_close(neg, torch.tensor([[e - 0.05, e + 0.95, e]]))
    assert float(neg[0, 0]) < 0


def test_paper_target_by_hand():
    y, y_par = torch.tensor([0, 2]), torch.tensor([2, 0])
    on, off = 1 - EPS + EPS / 3, EPS / 3  # smoothed one-hot entries
    raw = torch.tensor([
        [0.3 * on + 0.75 * off, (0.3 + 0.75) * off, 0.3 * off + 0.75 * on],
        [0.725 * off + 0.35 * on, (0.725 + 0.35) * off, 0.725 * on + 0.35 * off],
    ])
    t = paper_target(y, y_par, Y_OWN, Y_PAR, 3, EPS)
    torch.testing.assert_close(t, raw / torch.tensor([[1.05], [1.075]]))
    torch.testing.assert_close(t[0], torch.tensor([0.305 / 1.05, 0.035 / 1.05, 0.71 / 1.05]))
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    torch.testing.assert_close(paper_target(y, y_par, Y_OWN, Y_PAR, 3, EPS, normalize=False), raw)
    # zero masses: equal weights of the two smoothed one-hots
    z = paper_target(y, y_par, torch.zeros(2), torch.zeros(2), 3, EPS)
    half = (on + off) / 2
    torch.testing.assert_close(z, torch.tensor([[half, off, half], [half, off, half]]))


# ---------------------------------------------------------------------------------------------
# the method with a stand-in for the teacher cache

class FakeMaps:
    """Any object with ``token_maps``: fixed normalised maps per dataset index; records its calls."""

    def __init__(self, num_images: int, num_tokens: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(num_images, num_tokens, generator=g) ** 3
        self.maps = m / m.sum(1, keepdim=True)
        self.calls: list[dict] = []

    def token_maps(self, index, labels, box, flip, rows, cols, clamp_negative=False):
        self.calls.append(dict(index=index.clone(), labels=labels.clone(), box=box.clone(), flip=flip.clone(),
                               rows=rows, cols=cols, clamp_negative=clamp_negative))
        return self.maps[index]


B = 4
Y = torch.tensor([1, 4, 6, 1])  # samples 0 and 3 (partners) share class 1
META = {"index": torch.tensor([5, 2, 7, 0]), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4) + 0.125,
        "flip": torch.tensor([True, False, False, True])}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 16, generator=g)


def _method_with_maps(variant="official", **kw):
    m = make(variant, **kw)
    m.maps = FakeMaps(8, 16)
    return m


def _expected_masses(fake: FakeMaps, partner_mask: torch.Tensor):
    own = fake.maps[META["index"]]
    y_own = torch.tensor([float(sum(own[b, t] * (1 - partner_mask[b, t]) for t in range(16))) for b in range(B)])
    y_par = torch.tensor([float(sum(own[B - 1 - b, t] * partner_mask[b, t] for t in range(16))) for b in range(B)])
    return y_own, y_par


def _expected_official(y_own, y_par):
    t = torch.full((B, K), EPS / K)
    for b in range(B):
        t[b, Y[b]] += y_own[b] - EPS / 2
        t[b, Y[B - 1 - b]] += y_par[b] - EPS / 2
    return t


@pytest.mark.parametrize("mask", ["block", "random"])
def test_mix_pastes_partner_tokens_and_teacher_target(mask):
    m = _method_with_maps(switch_prob=1.0, mask=mask)
    assert m.needs.sample_meta
    x = _batch()
    torch.manual_seed(3)
    mixed = m.mix(x, Y, meta=META)
    assert mixed.kind == "tokenmix"
    torch.testing.assert_close(mixed.partner_index, torch.tensor([3, 2, 1, 0]))
    torch.testing.assert_close(mixed.y_partner, Y[[3, 2, 1, 0]])
    pm = mixed.partner_mask
    assert pm.shape == (B, 16) and set(pm.unique().tolist()) <= {0.0, 1.0}
    assert bool((pm == pm[0]).all())  # one mask for the whole batch
    count = official_token_count(16)  # 8 + 1
    assert (pm[0].sum() == count) if mask == "random" else (0 < pm[0].sum() <= count)
    torch.testing.assert_close(mixed.lam_area, 1 - pm.mean(1))
    for b in range(B):  # patch by patch: own where 0, partner where 1
        for t in range(16):
            r, c = divmod(t, 4)
            src = x[B - 1 - b] if pm[b, t] == 1 else x[b]
            rows, cols = slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4)
            assert torch.equal(mixed.x[b, :, rows, cols], src[:, rows, cols])
    # the teacher lookup got this batch's metadata and labels on the model's grid
    (call,) = m.maps.calls
    assert torch.equal(call["index"], META["index"]) and torch.equal(call["labels"], Y)
    assert torch.equal(call["box"], META["box"]) and torch.equal(call["flip"], META["flip"])
    assert (call["rows"], call["cols"], call["clamp_negative"]) == (4, 4, True)
    y_own, y_par = _expected_masses(m.maps, pm)
    torch.testing.assert_close(mixed.extras["y_own"], y_own)
    torch.testing.assert_close(mixed.extras["y_partner"], y_par)
    torch.testing.assert_close(mixed.target, _expected_official(y_own, y_par))
    torch.testing.assert_close(mixed.target.sum(1), y_own + y_par)


def test_mix_paper_variant_target_is_normalised():
    m = _method_with_maps("paper", switch_prob=1.0)
    torch.manual_seed(4)
    mixed = m.mix(_batch(), Y, meta=META)
    assert mixed.kind == "tokenmix" and 0 < mixed.partner_mask[0].sum() <= paper_token_count(16, 0.5)
    y_own, y_par = _expected_masses(m.maps, mixed.partner_mask)
    on, off = 1 - EPS + EPS / K, EPS / K
    expected = torch.full((B, K), off)
    for b in range(B):
        yo, yp = Y[b], Y[B - 1 - b]
        t = torch.full((K,), off * (y_own[b] + y_par[b]))
        t[yo] += (on - off) * y_own[b]
        t[yp] += (on - off) * y_par[b]
        expected[b] = t / (y_own[b] + y_par[b])
    torch.testing.assert_close(mixed.target, expected)
    torch.testing.assert_close(mixed.target.sum(1), torch.ones(B))


def test_switch_prob_selects_mixup_or_tokenmix():
    x = _batch()
    m = _method_with_maps(switch_prob=0.0)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed = m.mix(x, Y, meta=META)
        assert mixed.kind == "mixup"
        lam = float(mixed.lam_area[0])
        assert 0.0 <= lam <= 1.0 and bool((mixed.lam_area == lam).all())
        torch.testing.assert_close(mixed.x, lam * x + (1 - lam) * x[[3, 2, 1, 0]])
        torch.testing.assert_close(mixed.partner_mask, torch.full((B, 16), 1 - lam))
        on, off = 1 - EPS + EPS / K, EPS / K
        expected = torch.full((B, K), off)
        for b in range(B):
            expected[b, Y[b]] += lam * (on - off)
            expected[b, Y[B - 1 - b]] += (1 - lam) * (on - off)
        torch.testing.assert_close(mixed.target, expected)  # the standard smoothed Mixup target
    assert m.maps.calls == []  # Mixup batches never look at the teacher
    m = _method_with_maps(switch_prob=1.0)
    kinds = []
    for seed in range(5):
        torch.manual_seed(seed)
        kinds.append(m.mix(x, Y, meta=META).kind)
    assert kinds == ["tokenmix"] * 5
    m = _method_with_maps(switch_prob=0.5)
    torch.manual_seed(0)
    kinds = {m.mix(x, Y, meta=META).kind for _ in range(20)}
    assert kinds == {"tokenmix", "mixup"}


def test_cutmix_mask_with_teacher_labels():
    m = _method_with_maps(switch_prob=1.0, mask="cutmix")
    x = _batch()
    fractional = False
    for seed in range(8):
        torch.manual_seed(seed)
        mixed = m.mix(x, Y, meta=META)
        assert mixed.kind == "cutmix"
        pm = mixed.partner_mask
        assert bool(((pm >= 0) & (pm <= 1)).all())
        fractional |= bool(((pm > 0) & (pm < 1)).any())
        top, bottom, left, right = mixed.extras["box"]
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        expected_x = torch.where(inside, x[[3, 2, 1, 0]], x)
        assert torch.equal(mixed.x, expected_x)
        y_own, y_par = _expected_masses(m.maps, pm)
        torch.testing.assert_close(mixed.extras["y_own"], y_own)
        torch.testing.assert_close(mixed.target, _expected_official(y_own, y_par))
    assert fractional  # tokens cut by the box edge carry fractional partner shares


def test_area_labels_need_no_meta():
    m = make(switch_prob=1.0, labels="area")
    assert not m.needs.sample_meta and m.maps is None
    torch.manual_seed(0)
    mixed = m.mix(_batch(), Y)
    assert mixed.kind == "tokenmix" and "y_own" not in mixed.extras
    lam = mixed.lam_area
    on, off = 1 - EPS + EPS / K, EPS / K
    expected = torch.full((B, K), off)
    for b in range(B):
        expected[b, Y[b]] += lam[b] * (on - off)
        expected[b, Y[B - 1 - b]] += (1 - lam[b]) * (on - off)
    torch.testing.assert_close(mixed.target, expected)  # the area (CutMix-style) target
    loss, info = m.loss(ModelOutputs(logits=torch.randn(B, K)), mixed)
    assert "y_own" not in info and math.isfinite(float(loss))


def test_teacher_labels_without_meta_fail_clearly(tmp_path):
    from tokenmix.methods.teacher_maps import TeacherCacheError
    m = make(switch_prob=1.0, data_dir=str(tmp_path))
    m.maps = FakeMaps(8, 16)
    with pytest.raises(ValueError, match="meta"):
        m.mix(_batch(), Y)
    m.maps = None  # opened lazily at the first teacher-labelled batch: here there is no cache
    with pytest.raises(TeacherCacheError, match="python -m tokenmix teacher"):
        m.mix(_batch(), Y, meta=META)


def test_prepare_training_without_cache_names_the_build_command(tmp_path):
    from tokenmix.methods.teacher_maps import TeacherCacheError
    m = methods.get("tokenmix", num_classes=K, dataset="synthetic", img_size=16, data_dir=str(tmp_path))
    with pytest.raises(TeacherCacheError, match="python -m tokenmix teacher --dataset synthetic --img_size 16"):
        m.prepare_training()
    area = methods.get("tokenmix", num_classes=K, labels="area", data_dir=str(tmp_path))
    area.prepare_training()  # no cache needed
    assert area.maps is None


def test_prepare_training_opens_the_cache(teacher_cache):
    from tokenmix.methods.teacher_maps import TeacherMaps
    data_dir, path = teacher_cache
    m = methods.get("tokenmix", num_classes=K, dataset="synthetic", img_size=32, data_dir=str(data_dir))
    m.prepare_training()
    assert isinstance(m.maps, TeacherMaps) and len(m.maps) == 512
    other = methods.get("tokenmix", num_classes=K, dataset="synthetic", img_size=32, data_dir="nowhere",
                        teacher_cache=str(path))  # an explicit folder wins over data_dir
    other.prepare_training()
    assert len(other.maps) == 512


@pytest.mark.parametrize("variant,loss_kw,kind", [("official", "auto", "bce"), ("paper", "auto", "ce"),
                                                  ("official", "ce", "ce"), ("paper", "bce", "bce")])
def test_loss_bce_or_soft_ce(variant, loss_kw, kind):
    m = _method_with_maps(variant, switch_prob=1.0, loss=loss_kw)
    torch.manual_seed(5)
    mixed = m.mix(_batch(), Y, meta=META)
    logits = torch.randn(B, K)
    loss, info = m.loss(ModelOutputs(logits=logits), mixed)
    label_target = m.label(ModelOutputs(logits=logits), mixed)[0]
    bce = F.binary_cross_entropy_with_logits(logits, label_target)
    ce = -(label_target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert abs(float(bce) - float(ce)) > 1e-3
    torch.testing.assert_close(loss, bce if kind == "bce" else ce)
    assert info["lam"] == pytest.approx(float(mixed.lam_area.mean()))
    assert info["y_own"] == pytest.approx(float(mixed.extras["y_own"].mean()))
    assert info["y_partner"] == pytest.approx(float(mixed.extras["y_partner"].mean()))


@pytest.mark.parametrize("kw,valid", [({"variant": "bogus"}, "official, paper"),
                                      ({"mask": "bogus"}, "block, random, cutmix"),
                                      ({"labels": "bogus"}, "teacher, area"),
                                      ({"loss": "bogus"}, "auto, bce, ce")])
def test_bad_choices_name_the_valid_ones(kw, valid):
    with pytest.raises(ValueError, match=valid):
        methods.get("tokenmix", num_classes=K, **kw)


def test_bad_numbers_rejected():
    for kw in ({"mask_ratio": 0.0}, {"mask_ratio": 1.0}, {"switch_prob": 1.5}, {"tokenmix_alpha": -1.0},
               {"mixup_alpha": 0.0}, {"min_tokens": -1}):
        with pytest.raises(ValueError):
            methods.get("tokenmix", num_classes=K, **kw)


# ---------------------------------------------------------------------------------------------
# end to end through the engine

def test_train_end_to_end_with_teacher_cache(tmp_path, teacher_cache):
    """One official run (the paper variant differs only inside mix / loss, tested above)."""
    data_dir, _ = teacher_cache
    variant = "official"
    cfg = RunConfig(method="tokenmix", variant=variant, dataset="synthetic", img_size=32, data_dir=str(data_dir),
                    train_subset=64, test_subset=32, epochs=1, batch_size=16, warmup_epochs=0, switch_prob=1.0,
                    out_dir=str(tmp_path), progress=False, run_id="tkm", seed=1, device="cpu")
    summary = train(cfg)
    assert summary["status"] == "complete" and summary["method"] == "tokenmix" and summary["variant"] == variant
    assert math.isfinite(summary["final_top1"])
    assert load_run(tmp_path / "tkm").complete
    (rec,) = [json.loads(line) for line in (tmp_path / "tkm" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rec["train_loss"]) and rec["train_loss"] > 0
    assert 0.0 <= rec["y_own"] <= 1.0 and 0.0 <= rec["y_partner"] <= 1.0  # clamped maps: masses in [0, 1]
    assert rec["y_own"] + rec["y_partner"] > 0.2
    assert 0.0 <= rec["lam"] <= 1.0
