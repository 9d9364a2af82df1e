"""tokenmix: token-level mixing augmentations for vision transformers (TokenMixup, TokenMix,
TransMix, SMMix, TL-Align) beside the Mixup/CutMix baselines, on PyTorch and timm."""
from __future__ import annotations

__version__ = "0.1.0"

from tokenmix import data, methods
from tokenmix.methods import MixStep, StepOutput
from tokenmix.models import AttentionCapture, create_model
from tokenmix.train.config import ConfigError, RunConfig

__all__ = ["AttentionCapture", "ConfigError", "MixStep", "RunConfig", "StepOutput", "__version__", "create_model",
           "data", "methods"]
