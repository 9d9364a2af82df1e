"""A small CNN classifier: TokenMix's default teacher on small images.

The TokenMix paper (Table 6) shows that even a weak teacher's activation maps give better mixed
targets than area ratios, so the default teacher is a few-minute CPU model rather than the
official NFNet-F6. Its last feature map has stride 4 (7x7 at 28 px, 8x8 at 32 px), the token grid
of the CPU ViT presets, and the classifier is one linear layer after global average pooling, so
applying it at every location gives class activation maps whose spatial mean is the image logit.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv(w) -> conv(2w, /2) -> conv(2w) -> conv(4w, /2) -> conv(4w) -> avg pool -> linear.

    Args:
        num_classes: K.
        in_chans: input channels.
        width: channels of the first stage (w).
    Shapes: ``forward_features`` (B, C, H, W) -> (B, 4w, H/4, W/4); ``forward`` -> (B, K).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, drop_rate: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(*_conv(in_chans, w, 1), *_conv(w, 2 * w, 2), *_conv(2 * w, 2 * w, 1),
                                      *_conv(2 * w, 4 * w, 2), *_conv(4 * w, 4 * w, 1))
        self.num_features = 4 * w
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(4 * w, num_classes)

    def get_classifier(self) -> nn.Linear:
        return self.head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.head(self.drop(feats.mean((2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


#: CNN classifiers by name (no token grid: teachers, not students).
CNN_PRESETS: dict[str, tuple[int, str]] = {
    "cnn_small": (32, "CNN teacher: 5 conv layers (32-64-64-128-128), stride 4, avg pool + linear"),
}


def build_cnn(name: str, num_classes: int, in_chans: int) -> SmallCNN:
    width, _ = CNN_PRESETS[name]
    return SmallCNN(num_classes, in_chans, width)
