"""tokenmix: token-level mixing augmentations for vision transformers (TokenMixup, TokenMix,
TransMix, SMMix, TL-Align) beside the Mixup/CutMix baselines, on PyTorch and timm."""
from __future__ import annotations

__version__ = "0.1.0"

from . import data, methods
from .config import ConfigError, RunConfig
from .methods import MixStep, StepOutput
from .models import AttentionCapture, create_model

__all__ = ["AttentionCapture", "ConfigError", "MixStep", "RunConfig", "StepOutput", "__version__", "create_model",
           "data", "methods"]
