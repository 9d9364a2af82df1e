"""Attention capture from timm blocks (tokenmix.models.attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tokenmix.models import AttentionCapture, attention_modules, create_model, reduce_attention


def x_gray(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16)


def manual_attention(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) recomputed from the module's own qkv / q_norm / k_norm."""
    b, t, _ = x.shape
    h = attn_mod.num_heads
    qkv = attn_mod.qkv(x).reshape(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
    return torch.softmax((q @ k.transpose(-2, -1)) * attn_mod.scale, dim=-1)  # (B, H, T, T)


@pytest.fixture(scope="module")
def vit_qknorm():
    torch.manual_seed(1)
    return create_model("vit_cpu_patch", 10, 16, 1, qk_norm=True).eval()


@pytest.fixture(scope="module")
def vit_no_cls():
    torch.manual_seed(2)
    return create_model("vit_cpu", 10, 16, 1, class_token=False, global_pool="avg").eval()


# ---------------------------------------------------------------------------------------------
# the captured map

@pytest.mark.parametrize("model_name", ["vit_cpu_gray", "vit_qknorm", "deit_tiny_32"])
def test_capture_equals_manual_softmax_from_qkv(request, model_name):
    model = request.getfixturevalue(model_name)
    mods = attention_modules(model)
    x = torch.randn(2, 1, 16, 16) if model_name != "deit_tiny_32" else torch.randn(2, 3, 32, 32)
    inputs: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
               for i, m in enumerate(mods)]
    try:
        with torch.no_grad(), AttentionCapture(model, blocks=None, reduce="none") as cap:
            model(x)
    finally:
        for h in handles:
            h.remove()
    t = 1 + model.patch_embed.num_patches
    for i, m in enumerate(mods):
        a = cap[i]
        assert a.shape == (2, m.num_heads, t, t)
        with torch.no_grad():
            torch.testing.assert_close(a, manual_attention(m, inputs[i]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block", [0, 2, -1])
def test_rows_sum_to_one(vit_cpu_gray, block):
    with AttentionCapture(vit_cpu_gray, blocks=[block], reduce="none") as cap:
        vit_cpu_gray(x_gray(3))
    a = cap[block]
    assert a.dtype == torch.float32 and torch.all(a >= 0)
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduce", ["head_mean", "cls", "query_mean"])
def test_reductions_equal_manual_reductions_of_the_full_map(vit_cpu_gray, reduce):
    x = x_gray(3)
    with AttentionCapture(vit_cpu_gray, blocks=[1, -1], reduce="none") as full:
        vit_cpu_gray(x)
    with AttentionCapture(vit_cpu_gray, blocks=[1, -1], reduce=reduce) as red:
        vit_cpu_gray(x)
    n = vit_cpu_gray.patch_embed.num_patches
    for blk in (1, -1):
        a = full[blk]  # (B, H, 1 + N, 1 + N)
        manual = {"head_mean": a.mean(1), "cls": a[:, :, 0, 1:].mean(1),
                  "query_mean": a[:, :, 1:, 1:].mean(1).mean(1)}[reduce]
        expected_shape = {"head_mean": (3, n + 1, n + 1), "cls": (3, n), "query_mean": (3, n)}[reduce]
        assert red[blk].shape == expected_shape
        torch.testing.assert_close(red[blk], manual, atol=1e-6, rtol=0)


def test_reduce_attention_by_loops():
    b, h, p, n = 2, 3, 2, 4
    a = torch.softmax(torch.randn(b, h, p + n, p + n), -1)
    cls = reduce_attention(a, "cls", p)
    qm = reduce_attention(a, "query_mean", p)
    for i in range(b):
        for j in range(n):
            assert cls[i, j] == pytest.approx(sum(float(a[i, k, 0, p + j]) for k in range(h)) / h, abs=1e-6)
            tot = sum(float(a[i, k, q, p + j]) for k in range(h) for q in range(p, p + n))
            assert qm[i, j] == pytest.approx(tot / (h * n), abs=1e-6)
    assert reduce_attention(a, "none", p) is a
    with pytest.raises(ValueError, match="class token"):
        reduce_attention(a, "cls", 0)
    with pytest.raises(ValueError, match="head_mean"):
        reduce_attention(a, "bogus", p)


def test_maps_follow_the_latest_forward(vit_cpu_gray):
    x1, x2 = x_gray(), x_gray()
    with AttentionCapture(vit_cpu_gray, blocks=[0], reduce="none") as cap:
        vit_cpu_gray(x1)
        vit_cpu_gray(x2)
        second = cap[0]
    with AttentionCapture(vit_cpu_gray, blocks=[0], reduce="none") as cap2:
        vit_cpu_gray(x2)
    torch.testing.assert_close(second, cap2[0])
    with AttentionCapture(vit_cpu_gray, blocks=[0], reduce="none") as cap1:
        vit_cpu_gray(x1)
    assert not torch.allclose(second, cap1[0])


# ---------------------------------------------------------------------------------------------
# side effects

@pytest.mark.parametrize("model_name", ["vit_cpu_gray", "deit_tiny_32"])
def test_logits_unchanged_by_capture(request, model_name):
    model = request.getfixturevalue(model_name)
    x = x_gray(4) if model_name == "vit_cpu_gray" else torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with AttentionCapture(model, blocks=None, reduce="head_mean"):
            out = model(x)
    assert all(m.fused_attn for m in attention_modules(model))  # reference ran fused (SDPA)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _state(model):
    mods = attention_modules(model)
    return [m.fused_attn for m in mods], [len(m.attn_drop._forward_pre_hooks) for m in mods]


@pytest.mark.parametrize("blocks", [[0], [1, 3], None, [-1, 3], [0, -4, 2]])
def test_flags_restored_and_hooks_removed(vit_cpu_gray, blocks):
    mods = attention_modules(vit_cpu_gray)
    mods[1].fused_attn = False  # a mixed starting state must come back exactly
    try:
        before = _state(vit_cpu_gray)
        with AttentionCapture(vit_cpu_gray, blocks=blocks) as cap:
            vit_cpu_gray(x_gray())
            during = _state(vit_cpu_gray)
        assert _state(vit_cpu_gray) == before
        chosen = {i % 4 for i in (blocks if blocks is not None else range(4))}
        assert during[0] == [False if i in chosen else before[0][i] for i in range(4)]
        idx = blocks if blocks is not None else range(4)
        assert during[1] == [sum(1 for b in idx if b % 4 == i) for i in range(4)]  # one hook per index
        assert set(cap.maps) == set(cap.blocks)
    finally:
        mods[1].fused_attn = True


def test_flags_restored_when_the_body_raises(vit_cpu_gray):
    before = _state(vit_cpu_gray)
    with pytest.raises(KeyError, match="boom"):
        with AttentionCapture(vit_cpu_gray, blocks=[0, 2], reduce="none"):
            vit_cpu_gray(x_gray())
            raise KeyError("boom")
    assert _state(vit_cpu_gray) == before
    assert before[1] == [0, 0, 0, 0] and all(before[0])


def test_only_the_chosen_blocks_are_unfused_during_the_forward(vit_cpu_gray):
    mods = attention_modules(vit_cpu_gray)
    seen: dict[int, bool] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, mod.fused_attn))
               for i, m in enumerate(mods)]
    try:
        with AttentionCapture(vit_cpu_gray, blocks=[0, 2]) as cap:
            vit_cpu_gray(x_gray())
    finally:
        for h in handles:
            h.remove()
    assert seen == {0: False, 1: True, 2: False, 3: True}
    assert sorted(cap.maps) == [0, 2]


# ---------------------------------------------------------------------------------------------
# errors

def test_block_that_captured_nothing_raises(vit_cpu_gray):
    with AttentionCapture(vit_cpu_gray, blocks=[0, 1]) as cap:
        pass
    with pytest.raises(RuntimeError, match="no attention was captured"):
        cap[0]
    with pytest.raises(RuntimeError):
        cap.all()
    with AttentionCapture(vit_cpu_gray, blocks=[0]) as cap:
        vit_cpu_gray(x_gray())
    assert set(cap.all()) == {0}
    with pytest.raises(RuntimeError, match="block 3"):
        cap[3]  # not requested


@pytest.mark.parametrize("blocks", [[4], [-5], [0, 7]])
def test_out_of_range_block_raises(vit_cpu_gray, blocks):
    with pytest.raises(IndexError, match="has 4 attention modules"):
        AttentionCapture(vit_cpu_gray, blocks=blocks)


def test_extreme_valid_indices_accepted(vit_cpu_gray):
    with AttentionCapture(vit_cpu_gray, blocks=[-4, 3], reduce="cls") as cap:
        vit_cpu_gray(x_gray())
    # CLS -> patch row without CLS -> CLS: N entries summing to less than one
    assert cap[-4].shape == (2, 16) and torch.all(cap[-4].sum(1) < 1) and torch.all(cap[3].sum(1) < 1)


def test_unknown_reduce_raises(vit_cpu_gray):
    with pytest.raises(ValueError, match="query_mean"):
        AttentionCapture(vit_cpu_gray, reduce="mean")


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_cls_reduction_needs_a_class_token(reg_tokens):
    torch.manual_seed(0)
    model = create_model("vit_cpu", 10, 16, 1, class_token=False, global_pool="avg", reg_tokens=reg_tokens).eval()
    assert model.num_prefix_tokens == reg_tokens
    with pytest.raises(ValueError, match="class token"):
        AttentionCapture(model, reduce="cls")
    assert _state(model)[1] == [0, 0, 0, 0]
    # query_mean works and covers exactly the patch tokens
    with AttentionCapture(model, blocks=[-1], reduce="query_mean") as cap:
        model(x_gray())
    assert cap[-1].shape == (2, 16)
    total = cap[-1].sum(1)  # column means over patch queries: sum to 1 only without prefix tokens
    if reg_tokens == 0:
        torch.testing.assert_close(total, torch.ones(2), atol=1e-5, rtol=0)
    else:
        assert torch.all(total < 1)


def test_attention_modules_rejects_models_without_attention():
    with pytest.raises(ValueError, match="no timm-style attention"):
        attention_modules(nn.Sequential(nn.Linear(2, 2)))


def test_attention_modules_in_forward_order(deit_tiny_32):
    mods = attention_modules(deit_tiny_32)
    assert mods == [blk.attn for blk in deit_tiny_32.blocks]


# ---------------------------------------------------------------------------------------------
# gradients and precision

def test_maps_are_detached_by_default(vit_cpu_gray):
    x = x_gray().requires_grad_(True)
    with AttentionCapture(vit_cpu_gray, blocks=[-1], reduce="cls") as cap:
        out = vit_cpu_gray(x)
    assert out.requires_grad and not cap[-1].requires_grad
    with AttentionCapture(vit_cpu_gray, blocks=[-1], reduce="cls", detach=False) as cap:
        vit_cpu_gray(x)
    assert cap[-1].requires_grad
    (g,) = torch.autograd.grad(cap[-1].sum(), x)
    assert g.abs().sum() > 0


def test_autocast_bfloat16_returns_float32(vit_cpu_gray):
    with torch.autocast("cpu", dtype=torch.bfloat16), AttentionCapture(vit_cpu_gray, blocks=[0, -1],
                                                                      reduce="none") as cap:
        out = vit_cpu_gray(x_gray())
    assert out.dtype == torch.bfloat16  # autocast really was on
    for blk in (0, -1):
        assert cap[blk].dtype == torch.float32
        torch.testing.assert_close(cap[blk].sum(-1), torch.ones(cap[blk].shape[:-1]), atol=2e-2, rtol=0)
    assert _state(vit_cpu_gray)[0] == [True] * 4


def test_self_attention_map_equals_the_captured_map():
    """``self_attention_map`` (a recomputation from the module's weights) equals the map the block computes."""
    from tokenmix.models import self_attention_map
    torch.manual_seed(0)
    m = create_model("vit_cpu", 10, 16, 1).eval()
    x = torch.randn(2, 1, 16, 16)
    seen = {}
    h = m.blocks[2].register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    with AttentionCapture(m, (2,), "none") as cap:
        m(x)
    h.remove()
    with torch.no_grad():
        mine = self_attention_map(m.blocks[2].attn, m.blocks[2].norm1(seen["x"]))
    torch.testing.assert_close(mine, cap[2], atol=1e-5, rtol=1e-5)
    assert mine.shape == (2, 3, 17, 17)
