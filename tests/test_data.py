"""Datasets and transforms (tokenmix.data), on files generated in tmp_path."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmix import data as D

# ---------------------------------------------------------------------------------------------
# file writers (the formats, written from their specifications)


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """idx format: 0x00 0x00 0x08 (ubyte) ndim, then ndim big-endian uint32 sizes, then the bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def write_fashion(root: Path, rng: np.random.Generator, n_train: int = 12, n_test: int = 6, gz_train: bool = True):
    """Fashion-MNIST idx files (train gzipped, test raw, to cover both)."""
    xs = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", n_train), ("t10k", n_test))}
    ys = {s: rng.integers(0, 10, (n,), dtype=np.uint8) for s, n in (("train", n_train), ("t10k", n_test))}
    for split in ("train", "t10k"):
        suf = ".gz" if (split == "train") == gz_train else ""
        write_idx(root / f"{split}-images-idx3-ubyte{suf}", xs[split])
        write_idx(root / f"{split}-labels-idx1-ubyte{suf}", ys[split])
    return xs, ys


def write_cifar(root: Path, num_classes: int, rng: np.random.Generator, per_file: int = 3):
    """torchvision's python layout: pickled dicts with b"data" (N, 3072) uint8 and the label list."""
    if num_classes == 10:
        sub, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        sub, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    sub.mkdir(parents=True)
    content = {}
    for f in files:
        x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        y = rng.integers(0, num_classes, per_file).tolist()
        d = {b"data": x, key: y, b"batch_label": f.encode()}
        if num_classes == 100:
            d[b"coarse_labels"] = [v // 5 for v in y]
        with open(sub / f, "wb") as fh:
            pickle.dump(d, fh)
        content[f] = (x, y)
    return content


# ---------------------------------------------------------------------------------------------
# read_idx

@pytest.mark.parametrize("shape", [(5,), (3, 4, 5), (2, 28, 28), (0, 3)])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, rng, shape, gz):
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    p = write_idx(tmp_path / ("f.idx.gz" if gz else "f.idx"), arr)
    out = D.read_idx(p)
    assert out.dtype == torch.uint8 and tuple(out.shape) == shape
    assert np.array_equal(out.numpy(), arr)


@pytest.mark.parametrize("header", [bytes([0, 0, 0x0D, 1]), bytes([1, 0, 8, 1]), bytes([0, 0, 9, 1]), b"\x00"])
def test_read_idx_bad_magic(tmp_path, header):
    p = tmp_path / "bad"
    p.write_bytes(header + struct.pack(">I", 2) + b"\x01\x02")
    with pytest.raises(ValueError, match="idx"):
        D.read_idx(p)


def test_read_idx_size_mismatch(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(bytes([0, 0, 8, 2]) + struct.pack(">II", 3, 3) + b"\x00" * 8)
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(p)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST

@pytest.mark.parametrize("gz_train", [True, False])
def test_load_fashion_mnist_from_env_dir(tmp_path, rng, monkeypatch, gz_train):
    xs, ys = write_fashion(tmp_path / "fm", rng, gz_train=gz_train)
    monkeypatch.setenv("TOKENMIX_FASHION_MNIST", str(tmp_path / "fm"))
    for train, split in ((True, "train"), (False, "t10k")):
        x, y = D.load_fashion_mnist(tmp_path / "nodata", train=train, download=False)
        assert x.dtype == torch.uint8 and x.shape == (len(ys[split]), 1, 28, 28)
        assert y.dtype == torch.int64
        assert np.array_equal(x[:, 0].numpy(), xs[split]) and np.array_equal(y.numpy(), ys[split])


def test_fashion_mnist_torchvision_layout(tmp_path, rng, monkeypatch):
    monkeypatch.delenv("TOKENMIX_FASHION_MNIST", raising=False)
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    xs, ys = write_fashion(tmp_path / "data" / "FashionMNIST" / "raw", rng)
    x, y = D.load_fashion_mnist(tmp_path / "data", train=False)
    assert np.array_equal(x[:, 0].numpy(), xs["t10k"]) and np.array_equal(y.numpy(), ys["t10k"])


def test_fashion_mnist_missing_raises_naming_paths(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("TOKENMIX_FASHION_MNIST", str(tmp_path / "env"))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with pytest.raises(FileNotFoundError) as e:
        D.load_fashion_mnist(tmp_path / "dd", train=True, download=False)
    msg = str(e.value)
    assert "make setup" in msg
    for d in D.fashion_mnist_dirs(tmp_path / "dd"):
        assert str(d) in msg
    assert str(tmp_path / "env") in msg and str(tmp_path / "debian") in msg


@pytest.mark.skipif(not D.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("TOKENMIX_FASHION_MNIST", raising=False)
    for train, n in ((True, 60000), (False, 10000)):
        x, y = D.load_fashion_mnist("/nonexistent", train=train, download=False)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (n,)
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), n // 10))
        assert 0.25 < x.float().mean().item() / 255 < 0.32  # INFO's mean 0.2860


# ---------------------------------------------------------------------------------------------
# CIFAR

@pytest.mark.parametrize("k", [10, 100])
def test_load_cifar(tmp_path, rng, k):
    content = write_cifar(tmp_path, k, rng)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if k == 10 else ["train"]
    test_files = ["test_batch"] if k == 10 else ["test"]
    for train, files in ((True, train_files), (False, test_files)):
        x, y = D.load_cifar(tmp_path, k, train=train, download=False)
        exp_x = np.concatenate([content[f][0] for f in files]).reshape(-1, 3, 32, 32)
        exp_y = sum((content[f][1] for f in files), [])
        assert x.dtype == torch.uint8 and x.shape == (3 * len(files), 3, 32, 32)
        assert np.array_equal(x.numpy(), exp_x) and y.tolist() == exp_y and y.dtype == torch.int64
        # channel-major rows: the first 1024 bytes are the red plane
        assert np.array_equal(x[0, 0].numpy().ravel(), content[files[0]][0][0, :1024])


@pytest.mark.parametrize("k", [10, 100])
def test_load_cifar_missing(tmp_path, k):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py" if k == 10 else "cifar-100-python"):
        D.load_cifar(tmp_path, k, train=True, download=False)


@pytest.mark.parametrize("name, k", [("cifar10", 10), ("cifar100", 100)])
def test_build_datasets_cifar(tmp_path, rng, name, k):
    content = write_cifar(tmp_path, k, rng, per_file=4)
    train, test, info = D.build_datasets(name, 32, data_dir=tmp_path, download=False)
    assert info.num_classes == k and info.in_chans == 3 and D.num_classes_of(train, info) == k
    assert len(train) == (20 if k == 10 else 4) and len(test) == 4
    raw = content["test_batch" if k == 10 else "test"]
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    for i in range(len(test)):
        img, label = test[i]
        assert img.dtype == torch.float32 and img.shape == (3, 32, 32) and label == raw[1][i]
        expected = (torch.from_numpy(raw[0][i].reshape(3, 32, 32)).float() / 255 - mean) / std
        torch.testing.assert_close(img, expected, atol=1e-5, rtol=1e-5)
    img, label = train[0]
    assert img.shape == (3, 32, 32) and isinstance(label, int) and 0 <= label < k
    sub, _, _ = D.build_datasets(name, 32, data_dir=tmp_path, download=False, train_subset=3)
    assert len(sub) == 3


def test_build_datasets_fashion_mnist_pads_to_32(tmp_path, rng, monkeypatch):
    xs, ys = write_fashion(tmp_path / "fm", rng)
    monkeypatch.setenv("TOKENMIX_FASHION_MNIST", str(tmp_path / "fm"))
    train, test, info = D.build_datasets("fashion_mnist", 32, data_dir=tmp_path, download=False)
    assert len(train) == 12 and len(test) == 6 and info.in_chans == 1
    img, label = test[2]
    assert img.shape == (1, 32, 32) and label == int(ys["t10k"][2])
    padded = np.zeros((32, 32), np.float32)
    padded[2:30, 2:30] = xs["t10k"][2]
    expected = (torch.from_numpy(padded) / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(img[0], expected, atol=1e-5, rtol=1e-5)


def test_image_folder(tmp_path):
    from PIL import Image
    rs = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("ant", "bee"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rs.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    train, test, info = D.build_datasets("imagenet", 32, data_dir=tmp_path)
    assert len(train) == 6 and len(test) == 4 and train.classes == ["ant", "bee"]
    assert D.num_classes_of(train, info) == 2
    for ds in (train, test):
        img, label = ds[0]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label in (0, 1)
    assert sorted(lbl for _, lbl in test.samples) == [0, 0, 1, 1]


def test_image_folder_with_sample_meta(tmp_path):
    """ImageNet-style folders: the training set reports the RandomResizedCrop box and the flip it applied."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    rs = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rs.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    train, test, _ = D.build_datasets("imagenet", 32, data_dir=tmp_path, train_meta=True)
    assert isinstance(train, D.ImageFolderWithMeta) and D.with_sample_meta(train) is train
    assert D.with_sample_meta(D.build_datasets("imagenet", 32, data_dir=tmp_path)[0]) is None
    img, label, meta = train[3]
    assert img.shape == (3, 32, 32) and label == 1 and int(meta["index"]) == 3
    y0, x0, y1, x1 = meta["box"].tolist()
    assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
    assert len(test[0]) == 2  # the test set is untouched
    # the recorded box and flip reproduce the primary transform's output exactly
    src = Image.fromarray(rs.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    prim = D.CropFlipWithMeta(24)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, (y0, x0, y1, x1), flipped = prim(src)
        top, left, h, w = round(y0 * 40), round(x0 * 48), round((y1 - y0) * 40), round((x1 - x0) * 48)
        ref = TF.resized_crop(src, top, left, h, w, [24, 24], prim.rrc.interpolation)
        ref = TF.hflip(ref) if flipped else ref
        assert np.array_equal(np.asarray(out), np.asarray(ref))
        seen.add(flipped)
    assert seen == {True, False}


def test_image_folder_missing_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        D.build_datasets("imagenet", 32, data_dir=tmp_path)


def test_build_datasets_synthetic():
    train, test, info = D.build_datasets("synthetic", 16, synthetic_size=32)
    assert len(train) == 32 and len(test) == 8 and info.num_classes == 10
    assert train[0][0].shape == (3, 16, 16)


def test_dataset_info_unknown():
    with pytest.raises(ValueError) as e:
        D.dataset_info("mnist")
    for name in D.DATASETS:
        assert name in str(e.value)


# ---------------------------------------------------------------------------------------------
# fit_size and the tensor transform

def test_fit_size_pads_28_to_32_symmetrically():
    x = torch.randint(1, 256, (3, 1, 28, 28), dtype=torch.uint8)
    out = D.fit_size(x, 32)
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, :, 2:30, 2:30], x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(out[:, :, border] == 0)


def test_fit_size_identity_and_resize():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert D.fit_size(x, 32) is x
    for size in (16, 28, 64, 48):  # shrink, shrink, large margin, odd-ratio growth
        out = D.fit_size(x, size)
        assert out.shape == (2, 3, size, size) and out.dtype == torch.uint8
    flat = torch.full((1, 1, 28, 28), 123, dtype=torch.uint8)
    assert torch.all(D.fit_size(flat, 64) == 123) and torch.all(D.fit_size(flat, 14) == 123)
    # a 28 -> 31 growth (odd margin) is a resize, not a pad: no zero border
    assert torch.all(D.fit_size(flat, 31) == 123)


@pytest.mark.parametrize("c", [1, 3])
def test_eval_transform_is_exact_normalisation(c):
    mean, std = tuple(np.linspace(0.3, 0.5, c)), tuple(np.linspace(0.2, 0.3, c))
    tf = D.TensorTransform(False, mean, std, crop_padding=4, hflip=True, randaugment="rand-m9-mstd0.5-inc1")
    img = torch.randint(0, 256, (c, 20, 20), dtype=torch.uint8)
    out = tf(img)
    assert out.dtype == torch.float32 and out.shape == img.shape
    expected = (img.double() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def _denorm(out: torch.Tensor, mean, std) -> torch.Tensor:
    return (out * torch.tensor(std).view(-1, 1, 1) * 255 + torch.tensor(mean).view(-1, 1, 1) * 255).round()


@pytest.mark.parametrize("pad", [1, 4])
def test_train_crop_is_a_shifted_window_of_the_padded_image(pad):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tf = D.TensorTransform(True, mean, std, crop_padding=pad, hflip=False)
    img = torch.randint(1, 256, (3, 12, 12), dtype=torch.uint8)
    padded = torch.nn.functional.pad(img.float(), (pad, pad, pad, pad))
    windows = torch.stack([padded[:, t:t + 12, le:le + 12] for t in range(2 * pad + 1)
                           for le in range(2 * pad + 1)])  # every possible crop, row-major offsets
    offsets = set()
    for _ in range(150):
        out = _denorm(tf(img), mean, std)
        assert out.shape == img.shape
        hits = (windows == out).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(hits) == 1
        offsets.add(divmod(hits[0], 2 * pad + 1))
    # every shift from -pad to +pad is reachable, in both directions
    assert {t for t, _ in offsets} == set(range(2 * pad + 1)) == {le for _, le in offsets}


def test_flip_happens_about_half_the_time():
    mean, std = (0.0,), (1.0,)
    tf = D.TensorTransform(True, mean, std, crop_padding=0, hflip=True)
    img = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    flips, n = 0, 600
    for _ in range(n):
        out = _denorm(tf(img), mean, std)
        if torch.equal(out, img.flip(-1).float()):
            flips += 1
        else:
            assert torch.equal(out, img.float())
    assert abs(flips / n - 0.5) < 0.08
    tf_off = D.TensorTransform(True, mean, std, crop_padding=0, hflip=False)
    assert all(torch.equal(_denorm(tf_off(img), mean, std), img.float()) for _ in range(20))


def test_train_transform_deterministic_under_seed():
    tf = D.TensorTransform(True, (0.5,) * 3, (0.2,) * 3, crop_padding=4, hflip=True)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(5)
    a = [tf(img) for _ in range(5)]
    torch.manual_seed(5)
    b = [tf(img) for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert any(not torch.equal(a[0], u) for u in a[1:])


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("ra", ["rand-m9-mstd0.5-inc1", "rand-m9-n4-mstd0.5"])
def test_randaugment_on_one_and_three_channels(c, ra):
    import random
    tf = D.TensorTransform(True, (0.5,) * c, (0.25,) * c, crop_padding=0, hflip=False, randaugment=ra)
    assert tf.randaugment is not None
    changed = 0
    for s in range(40):  # enough draws to hit the geometric ops that take a fill colour
        torch.manual_seed(s)
        random.seed(s)
        img = torch.randint(0, 256, (c, 28, 28), dtype=torch.uint8)
        out = tf(img)
        assert out.shape == (c, 28, 28) and out.dtype == torch.float32 and torch.isfinite(out).all()
        changed += int(not torch.equal(out, (img.float() - 127.5) / 63.75))
    assert changed > 0


# ---------------------------------------------------------------------------------------------
# subsets, synthetic data, the in-memory dataset

@pytest.mark.parametrize("n, k", [(10, 0), (10, -1), (10, 10), (10, 50)])
def test_subset_indices_all(n, k):
    assert torch.equal(D.subset_indices(n, k), torch.arange(n))


@pytest.mark.parametrize("n, k", [(100, 7), (1000, 999), (5, 1)])
def test_subset_indices_subset(n, k):
    idx = D.subset_indices(n, k, seed=3)
    assert len(idx) == k and len(set(idx.tolist())) == k
    assert torch.equal(idx, idx.sort().values) and int(idx.min()) >= 0 and int(idx.max()) < n
    assert torch.equal(idx, D.subset_indices(n, k, seed=3))
    if k < n - 1 and k > 1:
        assert not torch.equal(idx, D.subset_indices(n, k, seed=4))


@pytest.mark.parametrize("k", [2, 10, 28])
def test_make_synthetic(k):
    x, y = D.make_synthetic(64, k, 24, seed=3)
    x2, y2 = D.make_synthetic(64, k, 24, seed=3)
    x3, _ = D.make_synthetic(64, k, 24, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert x.shape == (64, 3, 24, 24) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < k
    side = 24 // 3
    colour_of: dict[int, tuple[int, ...]] = {}
    for i in range(64):
        bright = (x[i] >= 60).any(0)  # noise is < 60, the square has a channel >= 75
        assert int(bright.sum()) == side * side
        rows, cols = bright.nonzero(as_tuple=True)
        assert int(rows.max() - rows.min()) == side - 1 and int(cols.max() - cols.min()) == side - 1
        colours = {tuple(x[i, :, r, c].tolist()) for r, c in zip(rows.tolist(), cols.tolist())}
        assert len(colours) == 1
        colour_of.setdefault(int(y[i]), colours.pop())
        assert colour_of[int(y[i])] == tuple(x[i, :, rows[0], cols[0]].tolist())
    assert len(set(colour_of.values())) == len(colour_of)  # the colour identifies the class


@pytest.mark.parametrize("k", [0, 29, 100])
def test_make_synthetic_rejects_unsupported_class_counts(k):
    with pytest.raises(ValueError, match="28"):
        D.make_synthetic(4, k)


def test_in_memory_images_validation():
    tf = D.TensorTransform(False, (0.5,), (0.5,))
    with pytest.raises(ValueError):
        D.InMemoryImages(torch.zeros(4, 1, 8, 8), torch.zeros(4), tf)  # float images
    with pytest.raises(ValueError):
        D.InMemoryImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3), tf)
    ds = D.InMemoryImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]), tf)
    img, label = ds[2]
    assert len(ds) == 4 and label == 2 and torch.all(img == -1.0)
