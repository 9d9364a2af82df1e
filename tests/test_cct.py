"""CCT-7/3x1 (Compact Convolutional Transformer, TokenMixup's CIFAR backbone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from tokenmix.methods.base import TokenGrid
from tokenmix.models import (CCT, CCT_PRESETS, AttentionCapture, QKCapture, SequencePooling, available_models,
                             count_parameters, create_model, patch_size_for)
from tokenmix.models.cct import CCTTokenizer, sinusoidal_embedding

NAMES = sorted(CCT_PRESETS)


@pytest.fixture(scope="module")
def cct32():
    """cct_7_3x1 at 32 px, 3 channels, 10 classes, default (create_model) regularisation. Eval mode."""
    torch.manual_seed(0)
    return create_model("cct_7_3x1", 10, 32, 3).eval()


# ---------------------------------------------------------------------------------------------
# shapes, grid, registry

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("img, chans", [(32, 3), (32, 1), (28, 1), (28, 3)])
def test_shapes_and_token_grid(name, img, chans):
    model = create_model(name, 7, img, chans).eval()
    g = img // 2
    assert TokenGrid.from_model(model) == TokenGrid(g, g, 2, 2)
    assert isinstance(model.patch_embed, (CCTTokenizer, PatchEmbed)) and model.patch_embed.num_patches == g * g
    x = torch.randn(2, chans, img, img)
    with torch.no_grad():
        emb = model.patch_embed(x)
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
        out = model(x)
    assert emb.shape == (2, g * g, 256) and tokens.shape == (2, g * g, 256)
    assert logits.shape == out.shape == (2, 7)
    torch.testing.assert_close(out, logits)
    assert model.num_prefix_tokens == 0 and model.num_classes == 7 and model.embed_dim == 256
    assert isinstance(model.blocks, nn.Sequential) and len(model.blocks) == 7
    assert all(isinstance(b, Block) and b.attn.num_heads == 4 for b in model.blocks)
    assert model.blocks[0].mlp.fc1.out_features == 512  # MLP ratio 2
    assert model.blocks[0].attn.qkv.bias is None  # CCT: no qkv bias
    assert isinstance(model.norm, nn.LayerNorm) and model.get_classifier() is model.head
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7


def test_tokenizer_layers_and_stride():
    emb = CCTTokenizer(32, 3, 16)
    conv, act, pool = emb.proj
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert conv.padding == (1, 1) and conv.bias is None and conv.in_channels == 3 and conv.out_channels == 16
    assert isinstance(act, nn.ReLU)
    assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 3 and pool.stride == 2 and pool.padding == 1
    assert tuple(emb.patch_size) == (2, 2) and tuple(emb.grid_size) == (16, 16)


def test_token_depends_only_on_its_cell_and_a_small_halo():
    """Token (r, c) sees pixels within [2r - 2, 2r + 2] (pool 3x3 on conv 3x3): a 2x2 cell plus a halo."""
    emb = CCTTokenizer(16, 1, 8).eval()
    x = torch.randn(1, 1, 16, 16, requires_grad=True)
    out = emb(x)  # (1, 64, 8)
    r, c = 3, 4
    (g,) = torch.autograd.grad(out[0, r * 8 + c].sum(), x)
    nz = g[0, 0].abs() > 0
    rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
    assert rows.min() >= 2 * r - 2 and rows.max() <= 2 * r + 2
    assert cols.min() >= 2 * c - 2 and cols.max() <= 2 * c + 2


def test_parameter_count_matches_the_paper():
    """TokenMixup Table 1: CCT-7/3x1 3.76 M (CCT paper) / 3.78 M (retrained), CIFAR-100 models."""
    n = count_parameters(create_model("cct_7_3x1", 100, 32, 3))
    assert n == pytest.approx(3.77e6, rel=0.02)
    assert n == 3_783_269  # conv 6912 + pos 65536 + 7 x 526336 + norm 512 + pool 257 + head 25700
    # the sine embedding is not a parameter
    assert count_parameters(create_model("cct_7_3x1_sine", 100, 32, 3)) == n - 256 * 256


def test_registry_and_patch_size():
    names = available_models()
    assert set(CCT_PRESETS) <= set(names) and "cct_7_3x1" in names and "cct_7_3x1_sine" in names
    assert patch_size_for("cct_7_3x1", 32) == 2 and patch_size_for("cct_7_3x1_sine", 28) == 2
    assert patch_size_for("cct_7_3x1", 32, 2) == 2
    with pytest.raises(ValueError, match="fixed tokenizer stride"):
        patch_size_for("cct_7_3x1", 32, 4)


@pytest.mark.parametrize("img, valid", [(31, ["30", "32"]), (27, ["26", "28"])])
def test_odd_img_size_names_valid_sizes(img, valid):
    with pytest.raises(ValueError, match=f"img_size {img} is not divisible") as e:
        create_model("cct_7_3x1", 10, img)
    listed = str(e.value).split("valid nearby sizes:")[1].replace(",", " ").split()
    assert set(valid) <= set(listed) and all(int(s) % 2 == 0 for s in listed)
    with pytest.raises(ValueError, match="even image size"):
        CCT(img_size=img)


def test_refuses_pretrained_and_unknown_pos_embed():
    with pytest.raises(ValueError, match="pretrained"):
        create_model("cct_7_3x1", 10, 32, pretrained=True)
    with pytest.raises(ValueError, match="positional embedding"):
        CCT(32, 10, pos_embed="rope")


def test_wrong_input_size_is_rejected(cct32):
    with pytest.raises(AssertionError, match="doesn't match"):
        cct32(torch.randn(1, 3, 28, 28))


def test_config_accepts_cct():
    from tokenmix.train.config import ConfigError, RunConfig
    RunConfig(model="cct_7_3x1", dataset="synthetic", img_size=32)
    with pytest.raises(ConfigError, match="not divisible"):
        RunConfig(model="cct_7_3x1", dataset="synthetic", img_size=31)
    with pytest.raises(ConfigError, match="fixed tokenizer stride"):
        RunConfig(model="cct_7_3x1", dataset="synthetic", img_size=32, patch_size=4)


# ---------------------------------------------------------------------------------------------
# regularisation, positional embedding, pooling

def test_drop_path_and_attention_dropout():
    m = create_model("cct_7_3x1", 10, 32, 3, drop_path_rate=0.1)
    rates = [0.0 if isinstance(b.drop_path1, nn.Identity) else b.drop_path1.drop_prob for b in m.blocks]
    assert rates == pytest.approx([0.1 * i / 6 for i in range(7)])
    assert all(b.attn.attn_drop.p == pytest.approx(0.1) for b in m.blocks)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in create_model("cct_7_3x1", 10, 32, 3).blocks)
    assert create_model("cct_7_3x1", 10, 32, 3, attn_drop_rate=0.0).blocks[0].attn.attn_drop.p == 0.0
    # the class itself has the paper's defaults
    paper = CCT(32, 10)
    assert paper.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_learnable_pos_embed():
    m = create_model("cct_7_3x1", 10, 32, 3)
    assert isinstance(m.pos_embed, nn.Parameter) and m.pos_embed.shape == (1, 256, 256)
    assert 0.15 < m.pos_embed.std().item() < 0.22  # trunc-normal std 0.2 (truncated at +-2)
    assert m.no_weight_decay() == {"pos_embed"} and "pos_embed" in m.state_dict()


def test_sine_pos_embed_is_fixed_and_deterministic():
    a = create_model("cct_7_3x1_sine", 10, 28, 1)
    torch.manual_seed(123)
    b = create_model("cct_7_3x1_sine", 10, 28, 1)
    assert not isinstance(a.pos_embed, nn.Parameter) and not a.pos_embed.requires_grad
    assert "pos_embed" not in dict(a.named_parameters()) and "pos_embed" not in a.state_dict()
    assert a.pos_embed.shape == (1, 196, 256)
    torch.testing.assert_close(a.pos_embed, b.pos_embed, rtol=0, atol=0)
    pe = sinusoidal_embedding(196, 256)[0]
    torch.testing.assert_close(a.pos_embed[0], pe, rtol=0, atol=0)
    assert torch.all(pe[0, 0::2] == 0) and torch.all(pe[0, 1::2] == 1)  # position 0: sin 0, cos 0
    torch.testing.assert_close(pe[5, 0], torch.tensor(5.0).sin())
    torch.testing.assert_close(pe[5, 3], torch.tensor(5.0 / 10000 ** (2 / 256)).cos())
    # the state dict loads into a fresh model (no pos-embed key expected)
    create_model("cct_7_3x1_sine", 10, 28, 1).load_state_dict(a.state_dict())


def test_sequence_pooling_weights_sum_to_one():
    pool = SequencePooling(16)
    x = torch.randn(3, 10, 16)
    w = pool.weights(x)
    assert w.shape == (3, 10) and torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    torch.testing.assert_close(pool(x), (w[..., None] * x).sum(1))
    # identical tokens pool to that token
    same = torch.randn(2, 1, 16).expand(2, 7, 16)
    torch.testing.assert_close(pool(same), same[:, 0], atol=1e-6, rtol=1e-6)


def test_forward_head_pre_logits(cct32):
    t = torch.randn(2, 256, 256)
    with torch.no_grad():
        feats = cct32.forward_head(t, pre_logits=True)
        torch.testing.assert_close(cct32.head(feats), cct32.forward_head(t))
    assert feats.shape == (2, 256)


def test_reset_classifier():
    m = create_model("cct_7_3x1_sine", 10, 16, 1)
    m.reset_classifier(3)
    assert m.num_classes == 3 and m.head.out_features == 3
    with torch.no_grad():
        assert m(torch.randn(1, 1, 16, 16)).shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# attention capture, block wrappers, training

def test_attention_capture(cct32):
    x = torch.randn(2, 3, 32, 32)
    fused = [b.attn.fused_attn for b in cct32.blocks]
    with torch.no_grad(), AttentionCapture(cct32, (0, -1), "none") as cap:
        out = cct32(x)
    for blk in (0, -1):
        a = cap[blk]
        assert a.shape == (2, 4, 256, 256)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 256))
    assert [b.attn.fused_attn for b in cct32.blocks] == fused
    with torch.no_grad():
        torch.testing.assert_close(cct32(x), out, atol=1e-5, rtol=1e-5)  # fused and unfused agree
    with torch.no_grad(), AttentionCapture(cct32, (-1,), "query_mean") as cap:
        cct32(x)
    assert cap[-1].shape == (2, 256)
    torch.testing.assert_close(cap[-1].sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="class token"):
        AttentionCapture(cct32, (-1,), "cls")
    with torch.no_grad(), QKCapture(cct32, [-1]) as qk:
        cct32(x)
    q, k, _ = qk.all()[0]
    assert q.shape == k.shape == (2, 4, 256, 64)


def test_blocks_are_called_in_order_and_can_be_wrapped(cct32):
    calls = []

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module, i: int) -> None:
            super().__init__()
            self.inner, self.i = inner, i

        def forward(self, x):
            calls.append(self.i)
            return self.inner(x)

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = cct32(x)
    orig = list(cct32.blocks)
    try:
        for i in range(len(cct32.blocks)):
            cct32.blocks[i] = Wrap(orig[i], i)
        with torch.no_grad():
            torch.testing.assert_close(cct32(x), ref)
    finally:
        for i, b in enumerate(orig):
            cct32.blocks[i] = b
    assert calls == list(range(7))
    # _pos_embed + blocks + norm is forward_features
    with torch.no_grad():
        t = cct32.norm(cct32.blocks(cct32._pos_embed(cct32.patch_embed(x))))
        torch.testing.assert_close(t, cct32.forward_features(x))


@pytest.mark.parametrize("name", NAMES)
def test_training_step_reaches_every_parameter(name):
    m = create_model(name, 5, 16, 1, drop_path_rate=0.1).train()
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    params = dict(m.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in params.values())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = m.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m.head.weight)


def test_eval_is_deterministic_and_train_is_stochastic():
    m = create_model("cct_7_3x1", 5, 16, 1, drop_path_rate=0.1)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
        m.train()
        assert not torch.equal(m(x), m(x))  # attention dropout 0.1 + stochastic depth


def test_engine_smoke_run(tmp_path):
    from tokenmix.train.config import RunConfig
    from tokenmix.train.engine import train
    cfg = RunConfig(model="cct_7_3x1", method="cutmix", dataset="synthetic", img_size=32, train_subset=32,
                    test_subset=16, epochs=1, batch_size=16, warmup_epochs=0.0, out_dir=str(tmp_path),
                    progress=False)
    summary = train(cfg)
    assert summary
    assert any(tmp_path.rglob("*.json"))
