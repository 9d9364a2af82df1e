"""Shared test setup: offline hub, headless matplotlib, two CPU threads, seeded RNGs, tiny models."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

# environment for every test (offline hub, headless plots, subprocess temp folder): ../conftest.py

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package need not be pip-installed to be tested
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("TOKENMIX_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same torch / numpy / random state."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator for building random cases."""
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def vit_cpu_gray():
    """The CPU preset on 1-channel 16 px images: 4x4 tokens (+CLS), 4 blocks, 3 heads. Eval mode."""
    from tokenmix.models import create_model
    torch.manual_seed(0)
    return create_model("vit_cpu", 10, 16, 1).eval()


@pytest.fixture(scope="session")
def deit_tiny_32():
    """timm's deit_tiny at 32 px (patch 4, 8x8 tokens), random weights. Eval mode."""
    from tokenmix.models import create_model
    torch.manual_seed(0)
    return create_model("deit_tiny_patch16_224", 10, 32, 3, pretrained=False).eval()


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    """A TokenMix teacher-map cache for ``synthetic`` at 32 px (cnn_small, 1 epoch on 128 images; maps
    of the whole train (512) and test (128) splits), built once per session: ``(data_dir, cache folder)``.
    Tests that modify a cache must work on a copy."""
    from tokenmix.train.teacher import build_teacher_maps
    data_dir = tmp_path_factory.mktemp("teacher_data")
    path = build_teacher_maps("synthetic", 32, data_dir=data_dir, epochs=1, train_subset=128, progress=False,
                              device="cpu")
    return data_dir, path
