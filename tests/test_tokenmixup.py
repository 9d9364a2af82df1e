"""TokenMixup pure functions (tokenmix.methods.tokenmixup): saliency, gains, Hungarian matching,
masks (paper / official row-0), Eq. 11 labels, difficulty gate, ScoreNet, HTM on a batch, VTM
helpers.

Expected values are computed independently in the tests (by hand, by brute force or with plain
loops), never copied from the implementation's output.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from tokenmix.methods.base import one_hot
from tokenmix.methods.tokenmixup import (ScoreNet, cross_attention, difficulty, easy_samples, horizontal_mix, htm_label,
                                         htm_mask, match_partners, saliency_from_attention, token_gains,
                                         top_salient_tokens)

K = 5


# ---------------------------------------------------------------------------------------------
# helpers (independent of the implementation)
# ---------------------------------------------------------------------------------------------
def brute_force_best(gain: np.ndarray) -> float:
    """Best total gain over all injective row -> column assignments."""
    m, b = gain.shape
    if m == 0:
        return 0.0
    return max(sum(gain[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(b), m))


def random_batch(b: int, n: int, p: int, d: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, p + n, d, generator=g, dtype=dtype)
    sal = torch.rand(b, n, generator=g, dtype=dtype)
    sal = sal / sal.sum(1, keepdim=True)
    y = torch.randint(0, K, (b,), generator=g)
    target = one_hot(y, K, smoothing=0.1).to(dtype)
    return tokens, sal, target


# ---------------------------------------------------------------------------------------------
# saliency
# ---------------------------------------------------------------------------------------------
def test_saliency_modes_on_hand_made_attention():
    # B=1, H=2, T=3 (CLS + 2 patches); rows are queries, each sums to 1
    h0 = [[0.2, 0.5, 0.3],
          [0.1, 0.6, 0.3],
          [0.4, 0.4, 0.2]]
    h1 = [[0.4, 0.1, 0.5],
          [0.3, 0.3, 0.4],
          [0.2, 0.2, 0.6]]
    attn = torch.tensor([[h0, h1]])
    # cls: row 0, patch columns, head mean: [(0.5+0.1)/2, (0.3+0.5)/2]
    cls = saliency_from_attention(attn, 1, "cls")
    assert torch.allclose(cls, torch.tensor([[0.3, 0.4]]))
    # query_mean: column mean over the 2 patch queries (rows 1, 2), then head mean
    # col1: h0 (0.6+0.4)/2 = 0.5, h1 (0.3+0.2)/2 = 0.25 -> 0.375
    # col2: h0 (0.3+0.2)/2 = 0.25, h1 (0.4+0.6)/2 = 0.5 -> 0.375
    qm = saliency_from_attention(attn, 1, "query_mean")
    assert torch.allclose(qm, torch.tensor([[0.375, 0.375]]))
    assert torch.equal(saliency_from_attention(attn, 1, "auto"), cls)
    # without prefix: auto = query_mean over all three columns
    qm0 = saliency_from_attention(attn, 0)
    expect = torch.tensor([[(0.7 / 3 + 0.9 / 3) / 2, 0.35, (0.8 / 3 + 0.5) / 2]])
    assert torch.allclose(qm0, expect)
    assert qm0.shape == (1, 3) and qm0.dtype == torch.float32


def test_saliency_query_mean_sums_to_one_without_prefix_and_errors():
    attn = torch.randn(4, 3, 7, 7).softmax(-1)
    sal = saliency_from_attention(attn, 0, "query_mean")
    assert sal.shape == (4, 7)
    assert torch.allclose(sal.sum(1), torch.ones(4), atol=1e-6)
    with pytest.raises(ValueError, match="auto.*cls.*query_mean"):
        saliency_from_attention(attn, 0, "rollout")
    with pytest.raises(ValueError):
        saliency_from_attention(attn, 0, "cls")
    # detached, even when the attention carries gradient
    a = torch.randn(2, 2, 5, 5, requires_grad=True).softmax(-1)
    assert not saliency_from_attention(a, 1).requires_grad


# ---------------------------------------------------------------------------------------------
# gains, matching, masks
# ---------------------------------------------------------------------------------------------
def test_token_gains_hand_computed():
    sal_easy = torch.tensor([[0.1, 0.5, 0.4]])
    sal_all = torch.tensor([[0.1, 0.5, 0.4],
                            [0.6, 0.2, 0.2],
                            [0.3, 0.3, 0.4]])
    s = token_gains(sal_easy, sal_all, rho=0.1)
    # j=0: itself -> all max(0 - 0.1, 0) = 0
    # j=1: [0.6-0.1-0.1, 0.2-0.5-0.1, 0.2-0.4-0.1] -> [0.4, 0, 0]
    # j=2: [0.3-0.1-0.1, 0.3-0.5-0.1, 0.4-0.4-0.1] -> [0.1, 0, 0]
    expect = torch.tensor([[[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.1, 0.0, 0.0]]])
    assert s.shape == (1, 3, 3)
    assert torch.allclose(s, expect, atol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_match_partners_is_optimal_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        b = int(rng.integers(1, 7))
        m = int(rng.integers(0, b + 1))
        kind = rng.integers(0, 3)
        if kind == 0:
            g = rng.random((m, b))
        elif kind == 1:  # many ties
            g = rng.integers(0, 3, (m, b)).astype(float)
        else:  # zero rows and ties
            g = rng.integers(0, 2, (m, b)).astype(float)
            if m:
                g[rng.integers(0, m)] = 0.0
        part = match_partners(torch.tensor(g, dtype=torch.float32))
        assert part.dtype == torch.int64 and part.shape == (m,)
        cols = part.tolist()
        assert len(set(cols)) == m and all(0 <= c < b for c in cols)
        got = sum(float(np.float32(g[i, c])) for i, c in enumerate(cols))
        best = brute_force_best(g.astype(np.float32).astype(np.float64))
        assert math.isclose(got, best, rel_tol=1e-6, abs_tol=1e-6)


def test_match_partners_edge_cases():
    assert match_partners(torch.zeros(0, 4)).shape == (0,)
    assert match_partners(torch.zeros(0, 4)).dtype == torch.int64
    assert match_partners(torch.tensor([[0.1, 0.7, 0.3]])).tolist() == [1]
    # greedy would give row 0 column 0 (5) and row 1 column 1 (1) = 6; optimal is 4 + 4 = 8
    assert match_partners(torch.tensor([[5.0, 4.0], [4.0, 1.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError):
        match_partners(torch.zeros(3, 2))


def test_htm_mask_paper_vs_official_row0():
    # M=2 easy rows, B=3 candidates, N=3 tokens; rows 0 and 1 differ on purpose
    s = torch.zeros(2, 3, 3)
    s[0, 1] = torch.tensor([0.2, 0.0, 0.0])
    s[0, 2] = torch.tensor([0.0, 0.3, 0.0])
    s[1, 1] = torch.tensor([0.0, 0.0, 0.5])
    s[1, 2] = torch.tensor([0.1, 0.1, 0.1])
    partners = torch.tensor([1, 2])
    paper = htm_mask(s, partners, "paper")
    official = htm_mask(s, partners, "official")
    assert paper.tolist() == [[True, False, False], [True, True, True]]          # S[m, j*_m] > 0
    assert official.tolist() == [[True, False, False], [False, True, False]]     # S[0, j*_m] > 0
    assert htm_mask(s, partners).tolist() == paper.tolist()                      # default = paper
    assert htm_mask(torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 4)
    with pytest.raises(ValueError, match="official"):
        htm_mask(s, partners, "released")


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def test_htm_label_eq11_hand_computed_and_fallback():
    y_own = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    y_par = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sal_own = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.5]])
    sal_par = torch.tensor([[0.5, 0.1, 0.1, 0.3], [0.2, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    out = htm_label(y_own, y_par, sal_own, sal_par, mask)
    # row 0: s_own = 0.2 + 0.3 = 0.5 (kept), s_par = 0.5 + 0.3 = 0.8 (taken) -> 5/13, 8/13
    # row 1: s_own = 0 + 0 = 0, s_par = 0 + 0 = 0 -> zero mass, keeps y_own
    expect = torch.tensor([[5 / 13, 8 / 13, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(out, expect, atol=1e-6)
    assert torch.isfinite(out).all()


def test_htm_label_sums_to_one():
    g = torch.Generator().manual_seed(3)
    m, n = 8, 10
    y_own = torch.rand(m, K, generator=g).softmax(-1)
    y_par = torch.rand(m, K, generator=g).softmax(-1)
    out = htm_label(y_own, y_par, torch.rand(m, n, generator=g), torch.rand(m, n, generator=g),
                    torch.rand(m, n, generator=g) > 0.5)
    assert torch.allclose(out.sum(1), torch.ones(m), atol=1e-6)
    assert (out >= 0).all()


# ---------------------------------------------------------------------------------------------
# difficulty gate
# ---------------------------------------------------------------------------------------------
def test_difficulty_official_scale_and_detached():
    logits = torch.zeros(3, 4, requires_grad=True)
    target = one_hot(torch.tensor([0, 1, 2]), 4)
    paper = difficulty(logits, target, "paper")
    official = difficulty(logits, target, "official")
    assert torch.allclose(paper, torch.full((3,), math.log(4)))
    assert torch.allclose(official, torch.full((3,), math.log(4) / 10))
    assert not paper.requires_grad and not official.requires_grad
    # soft targets: -sum y log p with p = softmax([2, 0]) and y = [0.3, 0.7]
    lg = torch.tensor([[2.0, 0.0]])
    lp = [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)]
    assert math.isclose(float(difficulty(lg, torch.tensor([[0.3, 0.7]]))), -(0.3 * lp[0] + 0.7 * lp[1]),
                        rel_tol=1e-6)
    with pytest.raises(ValueError):
        difficulty(logits, target, "other")


def test_easy_samples_boundary():
    diff = torch.tensor([0.25, 0.5, 0.75])
    assert easy_samples(diff, 0.5, "paper").tolist() == [True, False, False]     # CE < tau
    assert easy_samples(diff, 0.5, "official").tolist() == [True, True, False]   # CE/10 <= tau
    with pytest.raises(ValueError):
        easy_samples(diff, 0.5, "other")


# ---------------------------------------------------------------------------------------------
# ScoreNet
# ---------------------------------------------------------------------------------------------
def test_scorenet_shapes_and_attention_pooling():
    tokens = torch.randn(3, 1 + 6, 8)
    net = ScoreNet(8, K, "attention", num_prefix_tokens=1)
    assert net(tokens).shape == (3, K)
    w = net.pooling_weights(tokens)
    assert w.shape == (3, 6) and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(3), atol=1e-6)
    # forward = head(weighted sum of the patch tokens)
    pooled = torch.einsum("bn,bnd->bd", w, tokens[:, 1:])
    assert torch.allclose(net(tokens), net.head(pooled), atol=1e-6)
    # the prefix token takes no part
    changed = tokens.clone()
    changed[:, 0] += 100.0
    assert torch.allclose(net(changed), net(tokens))

    avg = ScoreNet(8, K, "avg", num_prefix_tokens=1)
    assert torch.allclose(avg(tokens), avg.head(tokens[:, 1:].mean(1)), atol=1e-6)
    cls = ScoreNet(8, K, "cls", num_prefix_tokens=1)
    assert torch.allclose(cls(tokens), cls.head(tokens[:, 0]))
    assert ScoreNet(8, K)(torch.randn(2, 6, 8)).shape == (2, K)


def test_scorenet_errors():
    with pytest.raises(ValueError):
        ScoreNet(8, K, "cls", num_prefix_tokens=0)
    with pytest.raises(ValueError, match="attention"):
        ScoreNet(8, K, "max")


# ---------------------------------------------------------------------------------------------
# horizontal_mix
# ---------------------------------------------------------------------------------------------
def check_horizontal(tokens, sal, target, easy, rho, p, variant):
    """Run horizontal_mix and check every rule against independent loops; return the outputs."""
    b, t, _ = tokens.shape
    n = t - p
    tok_before, tgt_before, sal_before = tokens.clone(), target.clone(), sal.clone()
    new_tokens, new_target, info = horizontal_mix(tokens, sal, target, easy, rho, p, variant)
    # inputs untouched
    assert torch.equal(tokens, tok_before) and torch.equal(target, tgt_before) and torch.equal(sal, sal_before)
    assert new_tokens.shape == tokens.shape and new_target.shape == target.shape
    partners, mask = info["partners"], info["mask"]
    assert partners.dtype == torch.int64 and partners.shape == (b,)
    assert mask.dtype == torch.bool and mask.shape == (b, n)
    easy_idx = [i for i in range(b) if easy[i]]
    # prefix tokens never change
    assert torch.equal(new_tokens[:, :p], tokens[:, :p])
    for i in range(b):
        if i not in easy_idx:   # hard samples bit-identical, no partner, empty mask
            assert torch.equal(new_tokens[i], tokens[i]) and torch.equal(new_target[i], target[i])
            assert partners[i] == -1 and not mask[i].any()
            continue
        j = int(partners[i])
        assert 0 <= j < b
        for tt in range(n):
            if mask[i, tt]:
                assert torch.equal(new_tokens[i, p + tt], tokens[j, p + tt])
            else:
                assert torch.equal(new_tokens[i, p + tt], tokens[i, p + tt])
        # Eq. 11 with the partner's input target
        s_own = sum(float(sal[i, tt]) for tt in range(n) if not mask[i, tt])
        s_par = sum(float(sal[j, tt]) for tt in range(n) if mask[i, tt])
        expect = target[i] if s_own + s_par == 0 else (s_own * target[i] + s_par * target[j]) / (s_own + s_par)
        assert torch.allclose(new_target[i], expect.to(new_target.dtype), atol=1e-6)
        assert math.isclose(float(new_target[i].sum()), 1.0, rel_tol=1e-5)
    # partners distinct and optimal over the whole batch
    chosen = [int(partners[i]) for i in easy_idx]
    assert len(set(chosen)) == len(chosen)
    gain = np.array([[sum(max(float(sal[j, tt] - sal[i, tt]) - rho, 0.0) for tt in range(n)) for j in range(b)]
                     for i in easy_idx]).reshape(len(easy_idx), b)
    got = sum(gain[r, c] for r, c in enumerate(chosen))
    assert math.isclose(got, brute_force_best(gain), rel_tol=1e-9, abs_tol=1e-9)
    # info consistency
    m = len(easy_idx)
    assert info["n_mixed"] == float(m) and isinstance(info["n_mixed"], float)
    exp_rep = float(mask[easy_idx].sum(1).double().mean()) if m else 0.0
    assert math.isclose(info["tokens_replaced"], exp_rep, abs_tol=1e-9)
    exp_gain = float(np.mean([gain[r, c] for r, c in enumerate(chosen)])) if m else 0.0
    assert math.isclose(info["saliency_gain"], exp_gain, rel_tol=1e-6, abs_tol=1e-9)
    return new_tokens, new_target, info


@pytest.mark.parametrize("seed", range(5))
def test_horizontal_mix_rules_random(seed):
    b, n, p, rho = 6, 9, 1, 0.02
    tokens, sal, target = random_batch(b, n, p, seed=seed)
    easy = torch.Generator().manual_seed(100 + seed)
    easy = torch.rand(b, generator=easy) < 0.6
    _, _, info = check_horizontal(tokens, sal, target, easy, rho, p, "paper")
    # replaced iff the partner's saliency exceeds the own by more than rho (paper rule)
    for i in range(b):
        if not easy[i]:
            continue
        j = int(info["partners"][i])
        diff = sal[j] - sal[i]
        assert torch.equal(info["mask"][i], diff - rho > 0)
        assert (diff[info["mask"][i]] > rho).all() and (diff[~info["mask"][i]] <= rho).all()


def test_horizontal_mix_official_row0_mask():
    b, n, p, rho = 6, 8, 0, 0.01
    found = False
    for seed in range(20):
        tokens, sal, target = random_batch(b, n, p, seed=seed)
        easy = torch.tensor([True, True, True, False, True, False])
        _, _, off = check_horizontal(tokens, sal, target, easy, rho, p, "official")
        _, _, pap = horizontal_mix(tokens, sal, target, easy, rho, p, "paper")
        assert torch.equal(off["partners"], pap["partners"])   # matching does not depend on the variant
        first = 0                                               # the first easy sample in batch order
        for i in range(b):
            if easy[i]:
                j = int(off["partners"][i])
                assert torch.equal(off["mask"][i], sal[j] - sal[first] - rho > 0)
        found |= not torch.equal(off["mask"], pap["mask"])
    assert found, "no case where the official row-0 mask differs from the paper mask"


def test_horizontal_mix_partner_may_be_a_hard_sample():
    # one easy sample (M = 1) whose only useful partner is hard sample 2
    tokens = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    sal = torch.tensor([[0.4, 0.3, 0.2, 0.1],
                        [0.4, 0.3, 0.2, 0.1],
                        [0.0, 0.0, 0.1, 0.9]])
    target = one_hot(torch.tensor([0, 1, 2]), 3)
    easy = torch.tensor([True, False, False])
    new_tokens, new_target, info = check_horizontal(tokens, sal, target, easy, 0.05, 0, "paper")
    assert info["partners"].tolist() == [2, -1, -1]
    # gains vs sample 2: [0, 0, 0.1-0.2-0.05 -> 0, 0.9-0.1-0.05 = 0.75] -> only token 3 moves
    assert info["mask"].tolist() == [[False, False, False, True], [False] * 4, [False] * 4]
    assert torch.equal(new_tokens[0, 3], tokens[2, 3])
    # s_own = 0.4+0.3+0.2 = 0.9, s_par = 0.9 -> 1/2 and 1/2
    assert torch.allclose(new_target[0], torch.tensor([0.5, 0.0, 0.5]))
    assert info["n_mixed"] == 1.0 and info["tokens_replaced"] == 1.0
    assert math.isclose(info["saliency_gain"], 0.75, rel_tol=1e-5)
    # official variant with M = 1 is the same (row 0 is the only row)
    _, _, off = horizontal_mix(tokens, sal, target, easy, 0.05, 0, "official")
    assert torch.equal(off["mask"], info["mask"])


def test_horizontal_mix_no_easy_sample():
    tokens, sal, target = random_batch(4, 6, 1, seed=7)
    easy = torch.zeros(4, dtype=torch.bool)
    new_tokens, new_target, info = check_horizontal(tokens, sal, target, easy, 0.01, 1, "paper")
    assert torch.equal(new_tokens, tokens) and torch.equal(new_target, target)
    assert info["n_mixed"] == 0.0 and info["tokens_replaced"] == 0.0 and info["saliency_gain"] == 0.0
    assert (info["partners"] == -1).all() and not info["mask"].any()
    horizontal_mix(tokens, sal, target, easy, 0.01, 1, "official")


def test_horizontal_mix_all_easy_and_float32():
    tokens, sal, target = random_batch(5, 7, 2, seed=11, dtype=torch.float32)
    check_horizontal(tokens, sal, target, torch.ones(5, dtype=torch.bool), 0.0, 2, "paper")


def test_horizontal_mix_is_differentiable():
    b, n, p = 4, 5, 1
    tokens, sal, target = random_batch(b, n, p, seed=2, dtype=torch.float32)
    tokens.requires_grad_(True)
    easy = torch.tensor([True, False, True, True])
    new_tokens, _, info = horizontal_mix(tokens, sal, target, easy, 0.0, p)
    assert new_tokens.requires_grad
    new_tokens.sum().backward()
    # d(sum)/d(token) = number of output positions reading it (own kept + borrowed by others)
    expect = torch.zeros(b, p + n)
    expect[:, :p] = 1
    for i in range(b):
        for tt in range(n):
            src = int(info["partners"][i]) if info["mask"][i, tt] else i
            expect[src, p + tt] += 1
    assert info["mask"].any()
    assert torch.equal(tokens.grad, expect[..., None].expand_as(tokens))


def test_horizontal_mix_validates_inputs():
    tokens, sal, target = random_batch(3, 4, 1)
    with pytest.raises(ValueError):
        horizontal_mix(tokens, sal[:, :3], target, torch.ones(3, dtype=torch.bool), 0.0, 1)
    with pytest.raises(ValueError):
        horizontal_mix(tokens, sal, target, torch.ones(3), 0.0, 1)
    with pytest.raises(ValueError):
        horizontal_mix(tokens, sal, target, torch.ones(3, dtype=torch.bool), 0.0, 1, "released")


# ---------------------------------------------------------------------------------------------
# VTM helpers
# ---------------------------------------------------------------------------------------------
def test_top_salient_tokens():
    tokens = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)   # prefix + 4 patches
    sal = torch.tensor([[0.1, 0.4, 0.2, 0.3],
                        [0.7, 0.1, 0.05, 0.15]])
    top = top_salient_tokens(tokens, sal, 2, num_prefix_tokens=1)
    # sample 0: patches 1 (0.4) then 3 (0.3) -> token rows 2, 4; sample 1: patches 0, 3 -> rows 1, 4
    expect = torch.stack([tokens[0, [2, 4]], tokens[1, [1, 4]]])
    assert torch.equal(top, expect)
    assert top_salient_tokens(tokens, sal, 4, 1).shape == (2, 4, 2)
    with pytest.raises(ValueError):
        top_salient_tokens(tokens, sal, 5, 1)


def test_vtm_store_official_gathers_the_token_before_each_salient_patch():
    """The released ViT code ranks the patches by the CLS row but gathers the top-kappa indices from
    the full sequence (CLS included), so it stores the token before each salient patch."""
    tokens = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1)  # x[:, t] = t, t = 0 is CLS
    sal = torch.tensor([[0.5, 0.1, 0.1, 0.1]])                        # patch 0 is the most salient
    assert top_salient_tokens(tokens, sal, 1, 1, "paper").flatten().tolist() == [1.0]     # patch 0 = token 1
    assert top_salient_tokens(tokens, sal, 1, 1, "official").flatten().tolist() == [0.0]  # the CLS token
    sal2 = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert top_salient_tokens(tokens, sal2, 2, 1, "paper").flatten().tolist() == [1.0, 3.0]
    assert top_salient_tokens(tokens, sal2, 2, 1, "official").flatten().tolist() == [0.0, 2.0]
    # without a class token (CCT's CIFAR models, CaiT's patch blocks) both variants store the same
    plain = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1)
    for s_ in (sal, sal2):
        for k in (1, 2, 4):
            assert torch.equal(top_salient_tokens(plain, s_, k, 0, "official"), top_salient_tokens(plain, s_, k, 0, "paper"))
    with pytest.raises(ValueError, match="valid: official, paper"):
        top_salient_tokens(tokens, sal, 1, 1, "released")


@pytest.mark.parametrize("model_name, prefix", [("vit_cpu", 1), ("cct_7_3x1", 0)])
def test_vtm_variants_store_by_the_backbone_s_class_token(model_name, prefix):
    """In the method: with a CLS token the official store holds, for the same saliency ranking, the
    block-input row before the paper's row; without one the two stores are equal."""
    torch.manual_seed(0)
    img = 16 if model_name == "vit_cpu" else 32
    base = create_model(model_name, 10, img, 1)
    x, y = torch.randn(3, 1, img, img), torch.arange(3)
    stores, inputs = {}, {}
    for variant in ("paper", "official"):
        method = methods.get("tokenmixup", num_classes=10, tokenmixup_mode="vtm", input_mix="none", variant=variant,
                             vertical_layer=1, kappa=3)
        model = method.prepare_model(copy.deepcopy(base)).train()
        blocks = model.blocks if hasattr(model, "blocks") else model.transformer.blocks
        seen = []
        handle = blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        _, extras = forward_in_context(model, method, method.mix(x, y))
        handle.remove()
        stores[variant], inputs[variant] = extras["vtm_store"][0].detach(), seen[0]
        assert method.num_prefix_tokens == prefix
    torch.testing.assert_close(inputs["paper"], inputs["official"])
    block_in = inputs["paper"]  # (B, T, D), the tokens the layer-0 store is drawn from
    if prefix == 0:
        torch.testing.assert_close(stores["official"], stores["paper"])
        return
    for b in range(3):
        for k in range(3):
            rows = [r for r in range(block_in.shape[1]) if torch.equal(block_in[b, r], stores["paper"][b, k])]
            assert rows and rows[0] >= 1  # a patch token
            torch.testing.assert_close(stores["official"][b, k], block_in[b, rows[0] - 1])  # the row before it


def make_attention(qkv_bias: bool, qk_norm: bool, fused: bool):
    from timm.models.vision_transformer import Attention

    attn = Attention(16, num_heads=4, qkv_bias=qkv_bias, qk_norm=qk_norm,
                     norm_layer=nn.LayerNorm if qk_norm else None, attn_drop=0.1, proj_drop=0.1)
    attn.fused_attn = fused
    if qkv_bias:
        nn.init.normal_(attn.qkv.bias)
    return attn.eval()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qkv_bias,qk_norm", [(True, False), (False, False), (True, True)])
def test_cross_attention_equals_self_attention(fused, qkv_bias, qk_norm):
    attn = make_attention(qkv_bias, qk_norm, fused)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert torch.allclose(cross_attention(attn, x, x), attn(x), atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_with_extra_keys(fused):
    attn = make_attention(True, False, fused)
    params_before = [(name, p.data_ptr(), p.shape) for name, p in attn.named_parameters()]
    buffers_before = [name for name, _ in attn.named_buffers()]
    x, extra = torch.randn(2, 7, 16), torch.randn(2, 3, 16)
    kv = torch.cat([x, extra], 1)
    out = cross_attention(attn, x, kv)
    assert out.shape == (2, 7, 16)
    # independent Eq. 13 per head: softmax(q k^T / sqrt(d)) v, then proj
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = x @ w[:16].T + bias[:16]
    k = kv @ w[16:32].T + bias[16:32]
    v = kv @ w[32:].T + bias[32:]
    heads = []
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        a = (q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0).softmax(-1)
        heads.append(a @ v[..., sl])
    expect = attn.proj(torch.cat(heads, -1))
    assert torch.allclose(out, expect, atol=1e-5)
    # the extra keys matter (it is not self-attention)
    assert not torch.allclose(out, attn(x), atol=1e-4)
    # no parameter or buffer created or replaced
    assert [(name, p.data_ptr(), p.shape) for name, p in attn.named_parameters()] == params_before
    assert [name for name, _ in attn.named_buffers()] == buffers_before
    # gradients reach the module's own weights and the stored tokens
    extra.requires_grad_(True)
    cross_attention(attn, x, torch.cat([x, extra], 1)).sum().backward()
    assert attn.qkv.weight.grad is not None and extra.grad is not None and extra.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the method: hooks on a real model
# ---------------------------------------------------------------------------------------------
import copy  # noqa: E402

from tokenmix import RunConfig, methods  # noqa: E402
from tokenmix.methods import ModelOutputs  # noqa: E402
from tokenmix.methods.base import soft_target_cross_entropy  # noqa: E402
from tokenmix.methods.tokenmixup import VerticalAttention  # noqa: E402
from tokenmix.models import create_model  # noqa: E402


def forward_in_context(model, method, mixed):
    """The model's forward on ``mixed.x`` inside the method's forward context -> (logits, extras)."""
    with method.forward_context(mixed) as extras:
        logits = model(mixed.x)
    return logits, extras


def _model_and_method(mode: str, **kw):
    torch.manual_seed(0)
    base = create_model("vit_cpu", 10, 16, 1)  # 4x4 tokens + CLS, 4 blocks
    method = methods.get("tokenmixup", num_classes=10, tokenmixup_mode=mode, input_mix="none", **kw)
    model = method.prepare_model(copy.deepcopy(base))
    return base, model, method


@pytest.mark.parametrize("mode", ["htm", "vtm", "hvtm"])
def test_eval_mode_is_unaffected(mode):
    base, model, _ = _model_and_method(mode)
    x = torch.randn(4, 1, 16, 16)
    base.eval(), model.eval()
    torch.testing.assert_close(model(x), base(x))


def test_vtm_adds_no_parameters_and_wraps_one_attention():
    base, model, _ = _model_and_method("vtm", vertical_layer=2)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    assert isinstance(model.blocks[2].attn, VerticalAttention)
    assert not any(isinstance(b.attn, VerticalAttention) for i, b in enumerate(model.blocks) if i != 2)


def test_htm_attaches_a_scorenet_to_the_model():
    base, model, method = _model_and_method("htm")
    assert isinstance(model.tokenmixup_scorenet, ScoreNet)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == sum(p.numel() for p in model.tokenmixup_scorenet.parameters()) > 0


def test_htm_with_no_easy_sample_changes_nothing_but_adds_the_scorenet_loss():
    base, model, method = _model_and_method("htm", tau=0.0)  # CE / 10 <= 0 never holds
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    base.train(), model.train()
    mixed = method.mix(x, y)
    logits, extras = forward_in_context(model, method, mixed)
    torch.testing.assert_close(logits, base(x))  # no dropout / drop path in the preset
    state = extras["htm"]
    loss, info = method.loss(ModelOutputs(logits=logits, extras=extras), mixed)
    assert info["n_mixed"] == 0
    expect = soft_target_cross_entropy(logits, mixed.target) + 0.001 * soft_target_cross_entropy(
        state["scorenet_logits"], state["target_pre"])
    torch.testing.assert_close(loss, expect)


def test_htm_mixes_easy_samples_and_relabels_them():
    _, model, method = _model_and_method("htm", tau=1e9, rho=0.0, horizontal_layer=1)  # everything easy
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    model.train()
    mixed = method.mix(x, y)
    logits, extras = forward_in_context(model, method, mixed)
    state = extras["htm"]
    info = state["info"]
    assert info["n_mixed"] == 6 and info["tokens_replaced"] > 0
    partners = info["partners"]
    assert not torch.equal(state["target"], mixed.target)  # relabelled
    torch.testing.assert_close(state["target"].sum(1), torch.ones(6))
    before = {k: v.clone() for k, v in vars(mixed).items() if isinstance(v, torch.Tensor)}
    loss, info2 = method.loss(ModelOutputs(logits=logits, extras=extras), mixed)
    assert all(torch.equal(getattr(mixed, k), v) for k, v in before.items())  # loss changes no input
    torch.testing.assert_close(method.label(ModelOutputs(logits=logits, extras=extras), mixed)[0], state["target"])
    assert info2["n_mixed"] == 6 and loss.requires_grad
    loss.backward()
    assert model.tokenmixup_scorenet.head.weight.grad is not None
    assert partners.shape == (6,)


def test_htm_block_input_is_the_partner_token_where_masked():
    _, model, method = _model_and_method("htm", tau=1e9, rho=0.0, horizontal_layer=2)
    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    model.train()
    before, after = {}, {}
    model.blocks[1].register_forward_hook(lambda m, a, out: before.__setitem__("x", out))  # block 2's raw input
    model.blocks[2].register_forward_pre_hook(lambda m, a: after.__setitem__("x", a[0]))  # after HTM's hook
    _, extras = forward_in_context(model, method, method.mix(x, y))
    info = extras["htm"]["info"]
    raw, mixed = before["x"], after["x"]
    assert torch.equal(mixed[:, 0], raw[:, 0])  # CLS never mixed
    for i in range(4):
        j = int(info["partners"][i])
        m = info["mask"][i]
        assert torch.equal(mixed[i, 1:][m], raw[j, 1:][m])
        assert torch.equal(mixed[i, 1:][~m], raw[i, 1:][~m])


def test_vtm_changes_the_training_forward_and_stores_kappa_tokens_per_earlier_layer():
    base, model, method = _model_and_method("vtm", vertical_layer=3, kappa=2)
    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    base.train(), model.train()
    out, extras = forward_in_context(model, method, method.mix(x, y))
    store = extras["vtm_store"]
    assert len(store) == 3 and all(t.shape == (4, 2, 96) for t in store)
    assert method._active is None  # nothing of the batch is kept on the method
    assert out.shape == (4, 10) and not torch.allclose(out, base(x))
    # the stored tokens carry gradient to the earlier layers (not detached)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_bad_layers_and_choices_raise():
    with pytest.raises(ValueError, match="valid: 0..3"):
        methods.get("tokenmixup", num_classes=10, horizontal_layer=4).prepare_model(create_model("vit_cpu", 10, 16, 1))
    with pytest.raises(ValueError, match="vertical_layer 0"):
        methods.get("tokenmixup", num_classes=10, tokenmixup_mode="vtm", vertical_layer=0).prepare_model(
            create_model("vit_cpu", 10, 16, 1))
    with pytest.raises(ValueError, match="valid: htm, vtm, hvtm"):
        methods.get("tokenmixup", num_classes=10, tokenmixup_mode="both")


@pytest.mark.parametrize("gate, expect", [("official", 6), ("paper", 0)])
def test_difficulty_gate(gate, expect):
    """An untrained ScoreNet has CE ~ ln 10 = 2.3: CE / 10 <= 0.5 (official gate) holds for all, CE < 0.5 for none."""
    _, model, method = _model_and_method("htm", tau=0.5, gate=gate)
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    model.train()
    _, extras = forward_in_context(model, method, method.mix(x, y))
    assert extras["htm"]["info"]["n_mixed"] == expect


def test_default_variant_is_paper():
    assert methods.parameters("tokenmixup")["variant"] == "paper"
    assert RunConfig(method="tokenmixup").variant == "paper" and RunConfig().variant == "official"


def test_works_on_timm_deit_with_a_cls_token(deit_tiny_32):
    """HTM + VTM on timm's DeiT-Tiny (CLS token: CLS-row saliency, CLS never mixed); eval unaffected."""
    base = copy.deepcopy(deit_tiny_32)
    method = methods.get("tokenmixup", num_classes=10, tokenmixup_mode="hvtm", tau=1e9, rho=0.0, horizontal_layer=3,
                         vertical_layer=5, input_mix="none")
    model = method.prepare_model(copy.deepcopy(base))
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    model.eval(), base.eval()
    torch.testing.assert_close(model(x), base(x))
    model.train()
    logits, extras = forward_in_context(model, method, method.mix(x, y))
    assert logits.shape == (4, 10) and len(extras["vtm_store"]) == 5
    assert extras["htm"]["info"]["n_mixed"] == 4 and extras["htm"]["info"]["mask"].shape == (4, 64)


@pytest.mark.parametrize("mode", ["htm", "vtm", "hvtm"])
def test_engine_trains_every_mode(tmp_path, mode):
    from tokenmix.train.engine import train
    s = train(RunConfig(method="tokenmixup", method_kwargs={"tokenmixup_mode": mode}, dataset="synthetic", img_size=32,
                        train_subset=64, test_subset=32, epochs=1, batch_size=16, warmup_epochs=0.0,
                        out_dir=str(tmp_path), run_id=mode, progress=False))
    assert s["status"] == "complete"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian Fashion-MNIST not installed")
@pytest.mark.parametrize("model", ["cct_7_3x1", "vit_cpu"])
def test_cli_trains_cct_and_the_vit_preset_on_fashion_mnist(tmp_path, model):
    """`python -m tokenmix train --method tokenmixup` (HTM + VTM) on CCT-7/3x1 and the CPU ViT."""
    from tokenmix.__main__ import main
    rc = main(["train", "--method", "tokenmixup", "--model", model, "--method_kwargs", '{"tokenmixup_mode": "hvtm"}',
               "--train_subset", "64", "--test_subset", "32", "--epochs", "1", "--batch_size", "32",
               "--warmup_epochs", "0", "--out_dir", str(tmp_path), "--run_id", "r", "--progress", "false"])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["variant"] == "paper"
    assert "n_mixed" in json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])


# ---------------------------------------------------------------------------------------------
# CaiT (talking-heads self-attention blocks, no prefix token there) and unsupported backbones
# ---------------------------------------------------------------------------------------------
def _tiny_cait():
    import os

    import timm
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    return timm.create_model("cait_xxs24_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                             embed_dim=48, depth=3, num_heads=2, depth_token_only=1)


def test_self_attention_map_of_talking_heads_is_the_proj_w_input():
    from tokenmix.models.attention import self_attention_map
    model = _tiny_cait().eval()
    blk = model.blocks[1]
    seen = {}
    blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    blk.attn.proj_w.register_forward_pre_hook(lambda m, a: seen.__setitem__("map", a[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        got = self_attention_map(blk.attn, blk.norm1(seen["x"]))
    assert got.shape == (2, 2, 64, 64) and got.dtype == torch.float32  # (B, H, T, T), no CLS token
    torch.testing.assert_close(got, seen["map"].permute(0, 3, 1, 2))
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 64))


@pytest.mark.parametrize("train", [True, False])
def test_cross_attention_equals_talking_heads_self_attention(train):
    model = _tiny_cait()
    attn = model.blocks[0].attn.train(train)
    nn.init.normal_(attn.proj_l.weight), nn.init.normal_(attn.proj_w.weight)  # real head mixing
    x = torch.randn(2, 64, 48)
    assert attn.attn_drop.p == 0 and attn.proj_drop.p == 0
    with torch.no_grad():
        assert torch.equal(cross_attention(attn, x, x), attn(x))
        # a copy of x goes through the sliced projections: same up to rounding
        torch.testing.assert_close(cross_attention(attn, x, x.clone()), attn(x), rtol=1e-5, atol=1e-5)
        # extra keys: independent talking-heads computation over the T2 keys
        extra = torch.randn(2, 3, 48)
        kv = torch.cat([x, extra], 1)
        w = attn.qkv.weight
        q = (x @ w[:48].T).reshape(2, 64, 2, 24).transpose(1, 2)
        k = (kv @ w[48:96].T).reshape(2, 67, 2, 24).transpose(1, 2)
        v = (kv @ w[96:].T).reshape(2, 67, 2, 24).transpose(1, 2)
        logits = torch.einsum("bhtd,bhsd->bhts", q, k) / 24 ** 0.5
        logits = torch.einsum("gh,bhts->bgts", attn.proj_l.weight, logits) + attn.proj_l.bias[:, None, None]
        a = torch.einsum("gh,bhts->bgts", attn.proj_w.weight, logits.softmax(-1)) + attn.proj_w.bias[:, None, None]
        expect = attn.proj((a @ v).transpose(1, 2).reshape(2, 64, 48))
        torch.testing.assert_close(cross_attention(attn, x, kv), expect, rtol=1e-4, atol=1e-5)


def test_tokenmixup_hvtm_trains_on_cait():
    from tokenmix.methods import MixStep
    base = _tiny_cait()
    method = methods.get("tokenmixup", num_classes=10, tokenmixup_mode="hvtm", tau=100.0, horizontal_layer=1,
                         vertical_layer=2, kappa=2)
    model = method.prepare_model(copy.deepcopy(base))
    assert method.num_prefix_tokens == 0  # CaiT's self-attention blocks carry no CLS token
    assert isinstance(model.blocks[2].attn, VerticalAttention)
    assert sum(p.numel() for p in model.blocks.parameters()) == sum(p.numel() for p in base.blocks.parameters())
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6)
    model.train()
    res = MixStep(model, method)(x, y)
    target, store, loss, info = res.outputs.extras["htm"]["target"], res.outputs.extras["vtm_store"], res.loss, res.info
    assert len(store) == 2 and all(t.shape == (6, 2, 48) for t in store)
    assert torch.isfinite(loss) and info["n_mixed"] > 0
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.tokenmixup_scorenet.head.weight.grad is not None
    # the class-attention blocks are untouched; eval is plain CaiT
    assert not isinstance(model.blocks_token_only[0].attn, VerticalAttention)
    model.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    # the backbone description still works on the prepared model (the wrapper exposes proj_w)
    from tokenmix.models.backbones import Backbone
    assert Backbone.of(model).sites[2].capture is model.blocks[2].attn.attn.proj_w


def test_tokenmixup_rejects_swin():
    import timm
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=4, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2))
    with pytest.raises(ValueError, match="Swin") as err:
        methods.get("tokenmixup", num_classes=10).prepare_model(swin)
    assert "CaiT" in str(err.value) and "window" in str(err.value)


@pytest.mark.parametrize("model_name", ["vit_cpu", "tiny_deit", "cct_7_3x1", "tiny_cait"])
def test_htm_with_a_single_easy_sample_on_every_backbone(model_name, monkeypatch):
    """B_M = 1 (one easy sample; the released CCT code runs it): HTM mixes at most that sample,
    its partner is one of the batch, the target still sums to one and the step trains."""
    import tokenmix.methods.tokenmixup as TM
    from tokenmix.methods import MixStep

    def only_sample_1(d, tau, gate):
        easy = torch.zeros(d.shape[0], dtype=torch.bool)
        easy[1] = True
        return easy

    monkeypatch.setattr(TM, "easy_samples", only_sample_1)
    torch.manual_seed(0)
    model = create_model(model_name, 10, 32, 3)
    method = methods.get("tokenmixup", num_classes=10, tokenmixup_mode="hvtm", input_mix="none", rho=0.0,
                         horizontal_layer=1, vertical_layer=2)
    step = MixStep(model, method).train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    out = step(x, y)
    info = out.outputs.extras["htm"]["info"]
    partners = info["partners"]
    assert [int(p) >= 0 for p in partners] == [False, True, False, False]  # only the easy sample is matched
    assert info["n_mixed"] <= 1 and not info["mask"][[0, 2, 3]].any()
    target = out.outputs.extras["htm"]["target"]
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    torch.testing.assert_close(target[[0, 2, 3]], out.mixed.target[[0, 2, 3]])  # the others keep their labels
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in step.parameters())
