"""Boxes, mixing ratios and per-token partner shares (tokenmix.methods.masks)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch

from tokenmix.methods.base import TokenGrid
from tokenmix.methods.masks import (box_lam, box_token_share, paste_box, paste_token_mask, pixel_mask_token_share,
                                    rand_bbox, sample_lam, token_mask_to_pixels)

GRIDS = [TokenGrid(8, 8, 4, 4), TokenGrid(7, 7, 4, 4), TokenGrid(4, 6, 3, 2), TokenGrid(5, 3, 2, 5),
         TokenGrid(3, 4, 5, 3)]


def fix_centre(monkeypatch, *values: int) -> list[tuple[int, int]]:
    """Make torch.randint return ``values`` in order (the box centre); records the (low, high) asked."""
    queue, calls = list(values), []

    def fake_randint(low, high, size, *args, **kwargs):
        calls.append((low, high))
        v = queue.pop(0)
        assert low <= v < high
        return torch.tensor(v)

    monkeypatch.setattr(torch, "randint", fake_randint)
    return calls


def pixel_box_mask(box, h: int, w: int) -> torch.Tensor:
    top, bottom, left, right = box
    m = torch.zeros(h, w)
    m[top:bottom, left:right] = 1
    return m


def brute_token_share(pixel_mask: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Mean of the pixel mask over each token's cell, by explicit loops (row-major)."""
    out = torch.empty(grid.rows * grid.cols)
    for r in range(grid.rows):
        for c in range(grid.cols):
            cell = pixel_mask[r * grid.patch_h:(r + 1) * grid.patch_h, c * grid.patch_w:(c + 1) * grid.patch_w]
            out[r * grid.cols + c] = cell.float().mean()
    return out


def random_boxes(rng: np.random.Generator, h: int, w: int, n: int):
    for _ in range(n):
        t, b = sorted(rng.integers(0, h + 1, 2).tolist())
        le, r = sorted(rng.integers(0, w + 1, 2).tolist())
        yield t, b, le, r


# ---------------------------------------------------------------------------------------------
# rand_bbox

@pytest.mark.parametrize("h, w, lam, centre, expected", [
    # side int(28 * sqrt(0.7)) = 23 (odd) -> half 11 each way, 22 pixels
    (28, 28, 0.3, (14, 14), (3, 25, 3, 25)),
    (28, 28, 0.3, (0, 27), (0, 11, 16, 28)),
    # side int(32 * sqrt(0.5)) = 22 -> half 11
    (32, 32, 0.5, (16, 5), (5, 27, 0, 16)),
    # 7 x 5 image, lam 0.5: sides int(4.95) = 4, int(3.54) = 3 (odd -> 2)
    (7, 5, 0.5, (3, 2), (1, 5, 1, 3)),
    # lam 0: side = full size, centre in the middle covers everything
    (8, 8, 0.0, (4, 4), (0, 8, 0, 8)),
    # lam 1: empty box at the centre
    (8, 6, 1.0, (5, 2), (5, 5, 2, 2)),
])
def test_rand_bbox_hand_computed(monkeypatch, h, w, lam, centre, expected):
    fix_centre(monkeypatch, *centre)
    assert rand_bbox(h, w, lam) == expected


@pytest.mark.parametrize("h, w, lam", [(28, 28, 0.3), (32, 32, 0.5), (7, 5, 0.5), (14, 14, 0.75),
                                       (8, 8, 0.25), (12, 20, 0.1), (9, 9, 0.9)])
def test_rand_bbox_every_centre_follows_the_rule(monkeypatch, h, w, lam):
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    for cy in range(h):
        for cx in range(w):
            calls = fix_centre(monkeypatch, cy, cx)
            top, bottom, left, right = rand_bbox(h, w, lam)
            assert calls == [(0, h), (0, w)]  # centre drawn over the whole image
            assert (top, left) == (max(cy - cut_h // 2, 0), max(cx - cut_w // 2, 0))
            assert (bottom, right) == (min(cy + cut_h // 2, h), min(cx + cut_w // 2, w))
            assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
            if cut_h // 2 <= cy <= h - cut_h // 2:  # unclipped rows: odd sides lose one
                assert bottom - top == 2 * (cut_h // 2)
            if cut_w // 2 <= cx <= w - cut_w // 2:
                assert right - left == 2 * (cut_w // 2)


@pytest.mark.parametrize("h, w, lam", [(32, 32, 0.5), (28, 28, 0.3), (8, 8, 0.25), (7, 5, 0.5), (14, 14, 0.75),
                                       (12, 20, 0.1)])
def test_rand_bbox_against_timm_same_centre(monkeypatch, h, w, lam):
    """Even sides agree exactly with the installed timm's ``rand_bbox``. For odd sides recent timm
    ends the box at ``centre + (side + 1) // 2`` while the package (like the timm the official
    codes vendor) ends it at ``centre + side // 2``: one pixel less unless clipped."""
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    for cy in range(h):
        for cx in range(w):
            fix_centre(monkeypatch, cy, cx)
            ours = rand_bbox(h, w, lam)
            monkeypatch.undo()
            centres = iter([cy, cx])
            monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: next(centres))
            theirs = tuple(int(v) for v in timm_mixup.rand_bbox((3, h, w), lam))
            monkeypatch.undo()
            yl, yh, xl, xh = theirs
            assert ours[0] == yl and ours[2] == xl
            exp_bottom = yh if cut_h % 2 == 0 or cy + cut_h // 2 >= h else yh - 1
            exp_right = xh if cut_w % 2 == 0 or cx + cut_w // 2 >= w else xh - 1
            assert ours[1] == exp_bottom and ours[3] == exp_right


def test_rand_bbox_centre_is_uniform():
    # lam = 1 gives an empty box sitting exactly on the centre
    h, w, n = 8, 5, 4000
    tops, lefts = np.zeros(h), np.zeros(w)
    for _ in range(n):
        t, b, le, r = rand_bbox(h, w, 1.0)
        assert t == b and le == r
        tops[t] += 1
        lefts[le] += 1
    assert np.all(np.abs(tops / n - 1 / h) < 0.25 / h)
    assert np.all(np.abs(lefts / n - 1 / w) < 0.25 / w)


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.9])
def test_rand_bbox_area_never_exceeds_the_requested_share(lam):
    h, w = 28, 20
    for _ in range(200):
        box = rand_bbox(h, w, lam)
        area = (box[1] - box[0]) * (box[3] - box[2])
        assert area <= int(h * math.sqrt(1 - lam)) * int(w * math.sqrt(1 - lam))


# ---------------------------------------------------------------------------------------------
# box_lam

@pytest.mark.parametrize("box, h, w, expected", [
    ((0, 4, 0, 8), 8, 8, 0.5), ((0, 0, 0, 8), 8, 8, 1.0), ((0, 8, 0, 8), 8, 8, 0.0),
    ((1, 4, 2, 7), 10, 5, 1 - 15 / 50), ((3, 3, 1, 5), 6, 6, 1.0),
])
def test_box_lam_hand_computed(box, h, w, expected):
    assert box_lam(box, h, w) == pytest.approx(expected)


def test_box_lam_equals_kept_pixel_share(rng):
    for h, w in [(32, 32), (28, 28), (12, 20)]:
        for box in random_boxes(rng, h, w, 50):
            assert box_lam(box, h, w) == pytest.approx(1 - float(pixel_box_mask(box, h, w).sum()) / (h * w), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# per-token shares

@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_box_token_share_equals_brute_force(grid, rng):
    h, w = grid.img_size
    boxes = list(random_boxes(rng, h, w, 150))
    # boxes straddling token edges by one pixel, and boxes on token edges
    boxes += [(1, h - 1, 1, w - 1), (grid.patch_h - 1, grid.patch_h + 1, grid.patch_w - 1, grid.patch_w + 1),
              (0, grid.patch_h, 0, grid.patch_w), (0, h, 0, w), (0, 0, 0, 0)]
    for box in boxes:
        share = box_token_share(box, grid)
        assert share.shape == (grid.num_tokens,) and share.dtype == torch.float32
        mask = pixel_box_mask(box, h, w)
        torch.testing.assert_close(share, brute_token_share(mask, grid), atol=1e-6, rtol=0)
        area = (box[1] - box[0]) * (box[3] - box[2])
        assert float(share.sum()) == pytest.approx(area / (grid.patch_h * grid.patch_w), abs=1e-5)
        assert float(share.min()) >= 0 and float(share.max()) <= 1


def test_box_token_share_hand_computed():
    grid = TokenGrid(2, 2, 4, 4)
    # a 4x4 box centred on the grid corner covers a quarter of each token
    torch.testing.assert_close(box_token_share((2, 6, 2, 6), grid), torch.full((4,), 0.25))
    # non-square patches: 2 rows x 3 cols of 3x2-pixel tokens; box rows 0..3 (token row 0 whole),
    # cols 1..4 (half of token col 0, all of col 1, half of col 2)
    grid = TokenGrid(2, 3, 3, 2)
    expected = torch.tensor([0.5, 1.0, 0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(box_token_share((0, 3, 1, 5), grid), expected)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("three_dim", [False, True])
def test_pixel_mask_token_share_equals_brute_force(grid, three_dim):
    h, w = grid.img_size
    masks = torch.rand(3, 1, h, w) < 0.4
    inp = masks[:, 0] if three_dim else masks
    share = pixel_mask_token_share(inp, grid)
    assert share.shape == (3, grid.num_tokens)
    for b in range(3):
        torch.testing.assert_close(share[b], brute_token_share(masks[b, 0], grid), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_token_mask_to_pixels_brute_force(grid):
    b = 2
    tm = torch.rand(b, grid.num_tokens)
    px = token_mask_to_pixels(tm, grid)
    h, w = grid.img_size
    assert px.shape == (b, 1, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                assert px[i, 0, y, x] == tm[i, (y // grid.patch_h) * grid.cols + x // grid.patch_w]
    # pooling the upsampled mask gives the token mask back
    torch.testing.assert_close(pixel_mask_token_share(px, grid), tm, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", GRIDS[:3], ids=str)
def test_paste_box_copies_exactly_the_partner_pixels(grid, rng):
    h, w = grid.img_size
    x, xp = torch.randn(3, 2, h, w), torch.randn(3, 2, h, w)
    x_before = x.clone()
    for box in random_boxes(rng, h, w, 30):
        out = paste_box(x, xp, box)
        inside = pixel_box_mask(box, h, w).bool().expand_as(x)
        assert torch.equal(out[inside], xp[inside])
        assert torch.equal(out[~inside], x[~inside])
        assert torch.equal(x, x_before)  # the input is not modified


@pytest.mark.parametrize("grid", GRIDS[:3], ids=str)
def test_paste_token_mask_copies_whole_patches(grid):
    h, w = grid.img_size
    x, xp = torch.randn(4, 3, h, w), torch.randn(4, 3, h, w)
    tm = (torch.rand(4, grid.num_tokens) < 0.5).float()
    out = paste_token_mask(x, xp, tm, grid)
    for i in range(4):
        for y in range(h):
            for xx in range(w):
                src = xp if tm[i, (y // grid.patch_h) * grid.cols + xx // grid.patch_w] else x
                assert torch.equal(out[i, :, y, xx], src[i, :, y, xx])
    # the partner share of the pasted image per token is the token mask itself
    from_partner = (out == xp).all(1) & (out != x).all(1)
    torch.testing.assert_close(pixel_mask_token_share(from_partner, grid), tm)


# ---------------------------------------------------------------------------------------------
# sample_lam

@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_sample_lam_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="> 0"):
        sample_lam(alpha)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 2.0])
def test_sample_lam_is_beta(alpha):
    draws = np.array([sample_lam(alpha) for _ in range(3000)])
    assert np.all((draws >= 0) & (draws <= 1))
    assert draws.mean() == pytest.approx(0.5, abs=0.03)
    assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.012)


def test_sample_lam_follows_torch_seed():
    torch.manual_seed(7)
    a = [sample_lam(1.0) for _ in range(5)]
    torch.manual_seed(7)
    b = [sample_lam(1.0) for _ in range(5)]
    assert a == b and len(set(a)) == 5
