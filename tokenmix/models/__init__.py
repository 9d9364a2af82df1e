"""Model creation (timm ViT/DeiT families and the named CPU presets) and attention capture."""
from __future__ import annotations

import re
from typing import Any

import timm
import torch.nn as nn

from tokenmix.models.attention import (AttentionCapture, QKCapture, attention_apply, attention_from_qk,
                                        attention_modules, reduce_attention, self_attention_map)
from tokenmix.models.backbones import FAMILIES, Backbone, Site, SiteMap
from tokenmix.models.cct import CCT, CCT_PRESETS, CCTPreset, CCTTokenizer, SequencePooling, build_cct
from tokenmix.models.cnn import CNN_PRESETS, SmallCNN, build_cnn
from tokenmix.models.vit import PRESETS, ConvStemEmbed, ViTPreset

#: timm families the methods support (name prefixes): plain ViTs, CaiT, Swin and PVT v2
#: (see :mod:`tokenmix.models.backbones` for how each is read).
TIMM_FAMILIES: tuple[str, ...] = ("vit_", "deit_", "cait_", "swin_", "pvt_v2_")
#: PVT v2's stem: a 7x7 convolution with stride 4 (its token cells are 4x4 px).
PVT_STRIDE: int = 4
#: Swin's window size (the papers' 224 px models); smaller grids get the largest divisor below it.
SWIN_WINDOW: int = 7
#: below this image size timm models are built with ``patch_size=4`` unless one is given.
SMALL_IMAGE: int = 64


#: Tiny models of every backbone family (``tiny_<family>``), for tests and smoke runs at 32 px (a
#: patch-4 grid of 8x8 tokens; the hierarchical ones keep a 4x4 last stage so SMMix's windows fit):
#: the timm architecture and the constructor arguments that shrink it.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit": ("deit_tiny_patch16_224", dict(embed_dim=32, depth=4, num_heads=2)),
    "cait": ("cait_xxs24_224", dict(embed_dim=32, depth=4, num_heads=2, depth_token_only=1)),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 1), num_heads=(1, 2))),
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(2, 1),
                                 mlp_ratios=(2.0, 2.0))),
    "cct": ("cct_7_3x1", dict()),
}
TINY_MODELS: tuple[str, ...] = tuple(f"tiny_{f}" for f in TINY_CONFIGS)


def available_models() -> list[str]:
    """The presets (ViT, CCT, CNN, tiny test models) plus every timm model of the supported families."""
    return (sorted(PRESETS) + sorted(CCT_PRESETS) + sorted(CNN_PRESETS) + list(TINY_MODELS)
            + sorted(timm.list_models([f"{p}*" for p in TIMM_FAMILIES])))


def create_tiny_model(family: str, num_classes: int = 10, img_size: int = 32, in_chans: int = 3) -> nn.Module:
    """A tiny model of ``family`` (a key of :data:`TINY_CONFIGS`) for tests and smoke runs."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; valid: {', '.join(TINY_CONFIGS)}")
    name, kw = TINY_CONFIGS[family]
    return create_model(name, num_classes, img_size, in_chans, **kw)


def _check_name(name: str) -> None:
    if name in PRESETS or name in CCT_PRESETS or name in CNN_PRESETS or name in TINY_MODELS:
        return
    if name.startswith(TIMM_FAMILIES) and timm.is_model(name):
        return
    raise ValueError(
        f"unknown model {name!r}; valid: the presets "
        f"{', '.join(sorted(PRESETS) + sorted(CCT_PRESETS) + sorted(CNN_PRESETS) + list(TINY_MODELS))}, or a timm model of "
        f"the families {', '.join(p + '*' for p in TIMM_FAMILIES)} (e.g. deit_tiny_patch16_224; "
        f"list them with tokenmix.models.available_models())"
    )


def patch_size_for(name: str, img_size: int, patch_size: int | None = None) -> int:
    """The (effective) patch size ``create_model`` will use; validates the name."""
    _check_name(name)
    if name in TINY_MODELS:
        name = TINY_CONFIGS[name[len("tiny_"):]][0]
    if name in CCT_PRESETS:
        stride = CCT_PRESETS[name].patch_size
        if patch_size and int(patch_size) != stride:
            raise ValueError(f"model {name!r} has a fixed tokenizer stride (patch size) of {stride}; "
                             f"got patch_size={patch_size}")
        return stride
    if name.startswith("pvt_v2_"):
        if patch_size and int(patch_size) != PVT_STRIDE:
            raise ValueError(f"model {name!r} has a fixed stem stride (patch size) of {PVT_STRIDE}; "
                             f"got patch_size={patch_size}")
        return PVT_STRIDE
    if patch_size:
        return int(patch_size)
    if name in PRESETS:
        return PRESETS[name].patch_size
    if name in CNN_PRESETS:
        return 4  # total stride of the feature map
    if img_size <= SMALL_IMAGE:
        return 4
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 16


def create_model(name: str, num_classes: int, img_size: int, in_chans: int = 3, *,
                 patch_size: int | None = None, drop_path_rate: float = 0.0,
                 pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create a model by name.

    Args:
        name: a preset (``vit_cpu``, ...; ``cct_7_3x1`` / ``cct_7_3x1_sine``, the Compact
            Convolutional Transformer of TokenMixup's CIFAR runs; ``cnn_small`` is a CNN without a
            token grid, used as TokenMix's teacher) or a timm model of :data:`TIMM_FAMILIES`
            (``vit_*``, ``deit_*``, ``cait_*``, ``swin_*``, ``pvt_v2_*``). Swin gets the largest
            ``window_size`` <= 7 that divides its first grid unless given (7 at 224 px, 4 at 32 px); PVT v2 has a fixed stem stride of 4 and records
            the image size as ``model.tokenmix_img_size``. ``kwargs`` go to the model constructor
            (e.g. ``embed_dim``, ``depth`` / ``depths`` for tiny test configurations).
        num_classes, img_size, in_chans: task shape. timm models at ``img_size <= 64`` use
            ``patch_size=4`` unless one is given (a 32 px image then has an 8x8 token grid).
        patch_size: override the patch size (the tokenizer's total stride for presets; CCT
            presets have a fixed stride of 2 and accept only 2 or None).
        drop_path_rate: stochastic depth rate (CCT: the rate of the last layer, linear from 0;
            TokenMixup uses 0.1). CCT also takes ``attn_drop_rate`` (default 0.1, as CCT).
        pretrained: timm pretrained weights (needs network access; keep False in tests).
    Raises:
        ValueError: unknown name, ``img_size`` not divisible by the patch size (CCT: odd sizes),
            a patch size other than 2 for CCT, or ``pretrained`` for a preset.
    """
    p = patch_size_for(name, img_size, patch_size)
    if img_size % p:
        valid = [s for s in range(max(p, img_size - 2 * p), img_size + 2 * p + 1) if s % p == 0]
        raise ValueError(f"img_size {img_size} is not divisible by the patch size {p} of {name!r}; "
                         f"valid nearby sizes: {', '.join(map(str, valid))}")
    if name in TINY_MODELS:
        if pretrained:
            raise ValueError(f"tiny model {name!r} has no pretrained weights")
        base, kw = TINY_CONFIGS[name[len("tiny_"):]]
        return create_model(base, num_classes, img_size, in_chans, patch_size=patch_size,
                            drop_path_rate=drop_path_rate, **{**kw, **kwargs})
    if name in CNN_PRESETS:
        if pretrained:
            raise ValueError(f"preset {name!r} has no pretrained weights")
        return build_cnn(name, num_classes, in_chans)
    if name in CCT_PRESETS:
        if pretrained:
            raise ValueError(f"preset {name!r} has no pretrained weights")
        return build_cct(name, num_classes, img_size, in_chans, drop_path_rate=drop_path_rate, **kwargs)
    if name in PRESETS:
        if pretrained:
            raise ValueError(f"preset {name!r} has no pretrained weights")
        return PRESETS[name].build(num_classes, img_size, in_chans, patch_size=p,
                                   drop_path_rate=drop_path_rate, **kwargs)
    if name.startswith("pvt_v2_"):  # no img_size / patch_size arguments: any size, stride 4
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                  drop_path_rate=drop_path_rate, **kwargs)
        model.tokenmix_img_size = (img_size, img_size)  # read by Backbone.of (the token grid)
        Backbone.of(model)  # fails now, with the reason, if the image is too small for its stages
        return model
    if name.startswith("swin_") and "window_size" not in kwargs:
        # the largest window <= 7 (Swin's) that divides the first stage's grid: timm then needs no
        # padding at any stage (later stages shrink the window to their grid), which TL-Align needs
        grid = img_size // p
        kwargs["window_size"] = max(w for w in range(1, SWIN_WINDOW + 1) if grid % w == 0)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
                             in_chans=in_chans, patch_size=p, drop_path_rate=drop_path_rate, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Backbone", "FAMILIES", "Site", "SiteMap", "CCT", "CCT_PRESETS", "CCTPreset", "CCTTokenizer", "SequencePooling", "build_cct",
           "CNN_PRESETS", "SmallCNN", "AttentionCapture", "QKCapture", "attention_apply", "attention_from_qk", "ConvStemEmbed", "PRESETS", "TIMM_FAMILIES", "ViTPreset", "attention_modules",
           "available_models", "count_parameters", "create_model", "create_tiny_model", "TINY_CONFIGS", "TINY_MODELS", "patch_size_for", "reduce_attention",
           "self_attention_map"]
