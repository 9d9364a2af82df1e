"""Model creation: presets, timm ViT/DeiT at small sizes, the conv tokenizer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from tokenmix.models import (CCT_PRESETS, CNN_PRESETS, PRESETS, TINY_MODELS, ConvStemEmbed, available_models,
                              count_parameters, create_model, patch_size_for)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_at_32px(name):
    preset = PRESETS[name]
    model = create_model(name, 10, 32, 3).eval()
    assert tuple(model.patch_embed.patch_size) == (4, 4) and tuple(model.patch_embed.grid_size) == (8, 8)
    assert model.embed_dim == preset.embed_dim and len(model.blocks) == preset.depth
    assert model.blocks[0].attn.num_heads == preset.num_heads
    assert isinstance(model.patch_embed, ConvStemEmbed) == (preset.stem == "conv")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert tokens.shape == (2, 1 + 64, preset.embed_dim)


def test_deit_tiny_at_32px(deit_tiny_32):
    assert tuple(deit_tiny_32.patch_embed.patch_size) == (4, 4)
    assert tuple(deit_tiny_32.patch_embed.grid_size) == (8, 8)
    with torch.no_grad():
        assert deit_tiny_32(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_vit_tiny_at_32px_one_channel():
    model = create_model("vit_tiny_patch16_224", 7, 32, 1, depth=2).eval()  # depth cut for speed
    assert tuple(model.patch_embed.patch_size) == (4, 4) and tuple(model.patch_embed.grid_size) == (8, 8)
    assert model.patch_embed.proj.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("img", [28, 16])
def test_one_channel_preset(img):
    model = create_model("vit_cpu", 10, img, 1).eval()
    assert tuple(model.patch_embed.grid_size) == (img // 4, img // 4)
    first_conv = next(m for m in model.patch_embed.proj.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, img, img)).shape == (2, 10)


def test_patch_size_override():
    model = create_model("vit_cpu_patch", 5, 32, 3, patch_size=8)
    assert tuple(model.patch_embed.grid_size) == (4, 4)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_drop_path_rate_reaches_the_blocks():
    model = create_model("vit_cpu", 10, 16, 1, drop_path_rate=0.2)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert isinstance(create_model("vit_cpu", 10, 16, 1).blocks[-1].drop_path1, nn.Identity)


@pytest.mark.parametrize("name", ["nosuch", "resnet50", "vit_nosuch_model", "swin_nosuch", "convnext_tiny"])
def test_unknown_model_raises_naming_presets(name):
    with pytest.raises(ValueError, match="unknown model") as e:
        create_model(name, 10, 32)
    for preset in PRESETS:
        assert preset in str(e.value)
    assert "vit_*" in str(e.value) and "deit_*" in str(e.value)


@pytest.mark.parametrize("name, img, valid", [
    ("vit_cpu", 30, ["28", "32"]), ("deit_tiny_patch16_224", 30, ["28", "32"]),
    ("vit_cpu", 34, ["32", "36"]), ("deit_tiny_patch16_224", 200, ["192", "208"]),
])
def test_img_size_not_divisible_names_valid_sizes(name, img, valid):
    with pytest.raises(ValueError, match=f"img_size {img} is not divisible") as e:
        create_model(name, 10, img)
    listed = str(e.value).split("valid nearby sizes:")[1].replace(",", " ").split()
    for v in valid:
        assert v in listed
    p = patch_size_for(name, img)
    assert all(int(s) % p == 0 for s in listed)


def test_preset_refuses_pretrained():
    with pytest.raises(ValueError, match="pretrained"):
        create_model("vit_cpu", 10, 32, pretrained=True)


@pytest.mark.parametrize("name, img, patch, expected", [
    ("vit_cpu", 28, None, 4), ("vit_cpu_wide", 32, None, 4), ("vit_cpu", 32, 8, 8),
    ("deit_tiny_patch16_224", 32, None, 4), ("deit_tiny_patch16_224", 64, None, 4),
    ("deit_tiny_patch16_224", 224, None, 16), ("vit_base_patch32_224", 224, None, 32),
    ("vit_base_patch32_224", 224, 14, 14), ("deit_small_patch16_224", 96, None, 16),
])
def test_patch_size_for(name, img, patch, expected):
    assert patch_size_for(name, img, patch) == expected


def test_patch_size_for_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model"):
        patch_size_for("bogus", 32)


def test_available_models():
    names = available_models()
    assert set(PRESETS) <= set(names)
    assert "deit_tiny_patch16_224" in names and "vit_tiny_patch16_224" in names
    assert all(n in PRESETS or n in CNN_PRESETS or n in CCT_PRESETS or n in TINY_MODELS
               or n.startswith(("vit_", "deit_", "cait_", "swin_", "pvt_v2_")) for n in names)
    assert {"cait_xxs24_224", "swin_tiny_patch4_window7_224", "pvt_v2_b0", *TINY_MODELS} <= set(names)
    assert set(CNN_PRESETS) <= set(names)


def test_cnn_teacher_preset():
    """cnn_small: a classifier without a token grid, feature stride 4 (TokenMix's teacher)."""
    from tokenmix.methods.base import TokenGrid
    m = create_model("cnn_small", 10, 28, 1)
    x = torch.randn(2, 1, 28, 28)
    assert m(x).shape == (2, 10) and m.forward_features(x).shape[-2:] == (7, 7)
    assert patch_size_for("cnn_small", 28) == 4
    with pytest.raises(ValueError, match="token grid"):
        TokenGrid.from_model(m)
    with pytest.raises(ValueError, match="pretrained"):
        create_model("cnn_small", 10, 28, 1, pretrained=True)


def test_count_parameters():
    m = nn.Linear(3, 4)
    assert count_parameters(m) == 3 * 4 + 4


# ---------------------------------------------------------------------------------------------
# conv tokenizer

@pytest.mark.parametrize("patch", [2, 4, 8, 16])
def test_conv_stem_total_stride_is_the_patch_size(patch):
    emb = ConvStemEmbed(img_size=32, patch_size=patch, in_chans=3, embed_dim=16, stem_width=8)
    assert tuple(emb.grid_size) == (32 // patch, 32 // patch)
    strides = [m.stride[0] for m in emb.proj.modules() if isinstance(m, nn.Conv2d)]
    assert strides.count(2) == int(math.log2(patch)) and math.prod(strides) == patch
    assert isinstance(emb, PatchEmbed)
    out = emb(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, (32 // patch) ** 2, 16)


def test_conv_stem_width_doubles():
    emb = ConvStemEmbed(img_size=32, patch_size=8, in_chans=1, embed_dim=20, stem_width=6)
    convs = [m for m in emb.proj.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6, 12, 24, 20]
    assert convs[0].in_channels == 1 and convs[-1].kernel_size == (1, 1)


@pytest.mark.parametrize("patch", [3, 6, 12, (4, 8)])
def test_conv_stem_rejects_non_power_of_two_or_non_square(patch):
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStemEmbed(img_size=48, patch_size=patch, in_chans=3, embed_dim=16)


def test_conv_stem_token_depends_only_on_nearby_pixels():
    """Each token is computed from its own cell plus a small halo (3x3 convs), never from far away."""
    torch.manual_seed(0)
    emb = ConvStemEmbed(img_size=16, patch_size=4, in_chans=1, embed_dim=8).eval()
    x = torch.randn(1, 1, 16, 16, requires_grad=True)
    out = emb(x)  # (1, 16, 8)
    (g,) = torch.autograd.grad(out[0, 0].sum(), x)  # token (0, 0) covers pixels [0, 4) x [0, 4)
    assert g[0, 0, :4, :4].abs().sum() > 0
    assert torch.all(g[0, 0, 8:, :] == 0) and torch.all(g[0, 0, :, 8:] == 0)
