"""Compact Convolutional Transformer (CCT-7/3x1), the CIFAR backbone of TokenMixup.

CCT (Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers", 2021) replaces
ViT's patchify by a small convolutional tokenizer and the class token by *sequence pooling*
(an attention-weighted average of the output tokens). CCT-7/3x1 has one 3x3 conv layer in the
tokenizer and 7 transformer layers (dim 256, 4 heads, MLP ratio 2); TokenMixup trains it on
CIFAR-100 with a learned positional embedding and on CIFAR-10 with a sinusoidal one.

This implementation keeps the timm-ViT attributes the rest of the package reads:

* ``patch_embed`` is a timm ``PatchEmbed`` whose ``proj`` is the tokenizer
  (conv3x3 stride 1, no bias -> ReLU -> max-pool 3x3 stride 2 pad 1), so ``patch_size`` is the
  total stride (2, 2) and ``grid_size`` is (H/2, W/2): a 32 px image gives 16x16 = 256 tokens and
  each token owns one 2x2 pixel cell (plus the small halo of the 3x3 kernels).
* ``blocks`` is an ``nn.Sequential`` of timm ``Block``s (pre-norm), so
  :class:`~tokenmix.models.AttentionCapture` and :class:`~tokenmix.models.QKCapture` work unchanged
  and block wrappers may replace ``blocks[i]``.
* ``num_prefix_tokens = 0`` (no class token); ``forward_features`` returns the final normalised
  tokens (B, N, D) and ``forward_head`` applies sequence pooling and the linear head.

Differences from the reference CCT layer (documented, deliberate): the reference MLP sub-layer
normalises the residual stream itself (``src = norm1(src)`` before the MLP); timm's ``Block`` is
the standard pre-norm layer (``x + mlp(norm2(x))``). Parameter count is the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor

POS_EMBED_TYPES: tuple[str, ...] = ("learnable", "sine")


class CCTTokenizer(PatchEmbed):
    """CCT's convolutional tokenizer as a timm ``PatchEmbed`` of total stride 2.

    ``proj`` = Conv2d(in_chans, embed_dim, 3, stride 1, pad 1, no bias) -> ReLU ->
    MaxPool2d(3, stride 2, pad 1). Input (B, C, H, W) with H, W even and equal to ``img_size``
    -> tokens (B, H/2 * W/2, D), row-major over the (H/2, W/2) grid.
    """

    def __init__(self, img_size: int | tuple[int, int], in_chans: int = 3, embed_dim: int = 256) -> None:
        super().__init__(img_size=img_size, patch_size=2, in_chans=in_chans, embed_dim=embed_dim, bias=False)
        h, w = self.img_size
        if h % 2 or w % 2:
            raise ValueError(f"the CCT tokenizer needs an even image size (total stride 2), got {self.img_size}")
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=3, stride=1, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )


class SequencePooling(nn.Module):
    """CCT's sequence pooling: ``softmax_N(x w + b)`` weights, then the weighted sum of the tokens.

    Shapes: ``weights`` (B, N, D) -> (B, N), rows summing to 1; ``forward`` (B, N, D) -> (B, D).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Linear(dim, 1)

    def weights(self, x: Tensor) -> Tensor:
        return self.attention(x).squeeze(-1).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bn,bnd->bd", self.weights(x), x)


def sinusoidal_embedding(num_tokens: int, dim: int) -> Tensor:
    """Fixed 1-D sinusoidal embedding over the token sequence, (1, num_tokens, dim).

    Entry (p, i) is ``sin(p / 10000^(2*floor(i/2)/dim))`` for even i and ``cos(...)`` for odd i
    (Vaswani et al., as used by CCT's ``sine`` variant).
    """
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    pe = torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return pe.float().unsqueeze(0)


class CCT(nn.Module):
    """Compact Convolutional Transformer with a one-layer conv tokenizer and sequence pooling.

    Args:
        img_size: input size (even; the learned positional embedding is tied to it).
        num_classes: K.
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio: transformer shape (CCT-7: 256, 7, 4, 2).
        pos_embed: ``"learnable"`` (trunc-normal, std 0.2, a Parameter) or ``"sine"`` (fixed,
            a non-persistent buffer, not trained).
        drop_rate: dropout after the positional embedding and in the MLP/projection (CCT: 0).
        attn_drop_rate: attention dropout (CCT/TokenMixup: 0.1).
        drop_path_rate: stochastic depth, linearly increasing over the layers up to this value
            (CCT/TokenMixup: 0.1).
        qkv_bias: bias in the qkv projection (CCT: none).
    """

    def __init__(self, img_size: int = 32, num_classes: int = 10, in_chans: int = 3, *, embed_dim: int = 256,
                 depth: int = 7, num_heads: int = 4, mlp_ratio: float = 2.0, pos_embed: str = "learnable",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.1, drop_path_rate: float = 0.1,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"unknown positional embedding {pos_embed!r}; valid: {', '.join(POS_EMBED_TYPES)}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 0
        self.has_class_token = False
        self.global_pool = "seqpool"
        self.pos_embed_type = pos_embed

        self.patch_embed = CCTTokenizer(img_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        if pos_embed == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        else:
            self.register_buffer("pos_embed", sinusoidal_embedding(n, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm, act_layer=nn.GELU)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.pool = SequencePooling(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if pos_embed == "learnable":
            trunc_normal_(self.pos_embed, std=0.2)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)

    # -- timm-like API ----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            self._init_weights(self.head)

    # -- forward ------------------------------------------------------------------------------------
    def _pos_embed(self, x: Tensor) -> Tensor:
        """Add the positional embedding (B, N, D) -> (B, N, D), then dropout."""
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> final normalised tokens (B, N, D)."""
        x = self._pos_embed(self.patch_embed(x))
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N, D) -> logits (B, K) (sequence pooling, then the head)."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@dataclass(frozen=True)
class CCTPreset:
    """A named CCT configuration (the tokenizer's total stride is always 2)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    pos_embed: str
    description: str = ""
    patch_size: int = 2

    def build(self, num_classes: int, img_size: int, in_chans: int, **kwargs: Any) -> CCT:
        return CCT(img_size, num_classes, in_chans, embed_dim=self.embed_dim, depth=self.depth,
                   num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, pos_embed=self.pos_embed, **kwargs)


CCT_PRESETS: dict[str, CCTPreset] = {
    "cct_7_3x1": CCTPreset(256, 7, 4, 2.0, "learnable",
                           "CCT-7/3x1 (TokenMixup CIFAR-100): conv3x3+maxpool tokenizer (stride 2), dim 256, "
                           "7 layers, 4 heads, MLP x2, seq pooling, learned pos embed"),
    "cct_7_3x1_sine": CCTPreset(256, 7, 4, 2.0, "sine",
                                "as cct_7_3x1 with a fixed sinusoidal pos embed (TokenMixup CIFAR-10)"),
}


def build_cct(name: str, num_classes: int, img_size: int, in_chans: int, **kwargs: Any) -> CCT:
    """Build a CCT preset (``kwargs``: ``drop_path_rate``, ``attn_drop_rate``, ``drop_rate``, ``qkv_bias``)."""
    return CCT_PRESETS[name].build(num_classes, img_size, in_chans, **kwargs)


__all__ = ["CCT", "CCTPreset", "CCTTokenizer", "CCT_PRESETS", "POS_EMBED_TYPES", "SequencePooling", "build_cct",
           "sinusoidal_embedding"]
