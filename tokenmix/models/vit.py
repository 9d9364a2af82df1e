"""Small ViTs for quick CPU runs: timm's ``VisionTransformer`` with an optional convolutional
tokenizer (a stack of stride-2 3x3 convs, total stride = patch size), as in "Early Convolutions
Help Transformers See Better" (Xiao et al., NeurIPS 2021) and CCT (Hassani et al., 2021).

The tokenizer subclasses timm's ``PatchEmbed`` and only replaces its ``proj``, so the model keeps
every timm attribute (``patch_embed.grid_size``, ``patch_size``, ``num_prefix_tokens``) that the
methods read, and each token still owns one ``patch x patch`` cell of the input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer


class ConvStemEmbed(PatchEmbed):
    """``log2(patch)`` stride-2 [conv3x3 - BatchNorm - GELU] layers then a 1x1 projection.

    Input (B, C, H, W) -> tokens (B, H/p * W/p, D). Width doubles at each stride-2 layer,
    starting from ``stem_width``.
    """

    def __init__(self, *args: Any, stem_width: int = 24, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p & (p - 1):
            raise ValueError(f"the conv tokenizer needs a square power-of-two patch size, got {self.patch_size}")
        c_in, dim = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        c, w = c_in, stem_width
        for _ in range(int(math.log2(p))):
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            c, w = w, w * 2
        layers.append(nn.Conv2d(c, dim, 1))
        self.proj = nn.Sequential(*layers)


@dataclass(frozen=True)
class ViTPreset:
    """A named small ViT configuration."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    stem: str = "conv"  # "conv" (ConvStemEmbed) or "patch" (timm's linear patchify)
    stem_width: int = 24
    description: str = ""

    def build(self, num_classes: int, img_size: int, in_chans: int, **kwargs: Any) -> VisionTransformer:
        embed_layer: Any = PatchEmbed
        if self.stem == "conv":
            width = self.stem_width

            def embed_layer(**kw: Any) -> ConvStemEmbed:
                return ConvStemEmbed(stem_width=width, **kw)

        return VisionTransformer(
            img_size=img_size, patch_size=kwargs.pop("patch_size", None) or self.patch_size,
            in_chans=in_chans, num_classes=num_classes, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, embed_layer=embed_layer, **kwargs,
        )


PRESETS: dict[str, ViTPreset] = {
    "vit_cpu": ViTPreset(96, 4, 3, 2.0, 4, "conv", 24,
                         "CPU preset: conv tokenizer (stride 4), dim 96, depth 4, 3 heads, MLP x2"),
    "vit_cpu_patch": ViTPreset(96, 4, 3, 2.0, 4, "patch", 24,
                               "as vit_cpu with timm's linear patchify tokenizer (for comparison)"),
    "vit_cpu_wide": ViTPreset(128, 6, 4, 2.0, 4, "conv", 32,
                              "larger CPU model: conv tokenizer, dim 128, depth 6, 4 heads"),
}
