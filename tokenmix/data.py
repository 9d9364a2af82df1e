"""Datasets and transforms.

Datasets (``DATASETS``):

- ``fashion_mnist`` — the embedded default: 60k/10k 28x28 grey images, 10 classes. Read from the
  idx files of the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
  installed by ``make setup``), else from ``<data_dir>/FashionMNIST/raw`` (torchvision's layout,
  downloaded there when ``download=True``).
- ``cifar10`` / ``cifar100`` — the python pickle batches under ``<data_dir>/cifar-10-batches-py`` /
  ``<data_dir>/cifar-100-python`` (torchvision's layout; downloaded when ``download=True``).
- ``imagenet`` — an image folder: ``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*``.
- ``synthetic`` — small generated images whose class decides the position of a bright square
  (learnable in a few steps); for tests and smoke runs, no files needed.

The small in-memory datasets are kept as one uint8 tensor, resized (or zero-padded, e.g.
Fashion-MNIST 28 -> 32) once at load, and augmented per sample on tensors: random crop with
zero padding, horizontal flip, optional timm RandAugment (via PIL), normalisation. This is the
DeiT/timm recipe scaled to small images, without PIL round trips unless RandAugment is on.

Sample metadata (for labels that depend on where each pixel came from, e.g. TokenMix's teacher
maps): with ``with_meta=True`` a training set returns ``(image, label, meta)`` where ``meta`` is
``{"index": source index in the full split, "box": (y0, x0, y1, x1), "flip": 0/1}``. ``box`` is
the region of the stored (size-fitted) source image that the output shows, in normalised source
coordinates (it extends past [0, 1] where a padded crop shows padding); ``flip`` says the output
was then mirrored left-right. RandAugment's geometric ops are not recorded (see
:mod:`tokenmix.train.teacher`).
"""
from __future__ import annotations

import copy
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.transforms import Compose, InterpolationMode, RandomResizedCrop

DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    num_train: int = 0  # images of the full training split (0: an image folder, counted when loaded)
    num_test: int = 0


INFO: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES,
                                 num_train=60000, num_test=10000),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           num_train=50000, num_test=10000),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            num_train=50000, num_test=10000),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
    "synthetic": DatasetInfo("synthetic", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                             tuple(f"colour{k}" for k in range(10)), num_train=512, num_test=128),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return INFO[name]


# ---------------------------------------------------------------------------------------------
# raw loaders: uint8 images (N, C, H, W) and int64 labels (N,)

def read_idx(path: str | Path) -> Tensor:
    """Parse an idx file (optionally gzipped), e.g. MNIST/Fashion-MNIST, into a uint8 tensor."""
    path = Path(path)
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return torch.from_numpy(data.reshape(shape).copy())


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for suffix in (".gz", ""):
            p = d / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def fashion_mnist_dirs(data_dir: str | Path) -> list[Path]:
    """Where Fashion-MNIST idx files are looked for, in order."""
    dirs = [Path(os.environ["TOKENMIX_FASHION_MNIST"])] if os.environ.get("TOKENMIX_FASHION_MNIST") else []
    return dirs + [DEBIAN_FASHION_MNIST, Path(data_dir) / "FashionMNIST" / "raw", Path(data_dir) / "fashion_mnist"]


def load_fashion_mnist(data_dir: str | Path, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    prefix = "train" if train else "t10k"
    dirs = fashion_mnist_dirs(data_dir)
    img, lab = _find_idx(dirs, f"{prefix}-images-idx3-ubyte"), _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if (img is None or lab is None) and download:
        try:
            FashionMNIST(str(data_dir), train=train, download=True)
        except Exception as e:  # network errors and the like
            raise FileNotFoundError(f"Fashion-MNIST download into {data_dir} failed ({e}); install the Debian "
                               f"package dataset-fashion-mnist (`make setup` does it as root)") from e
        img, lab = _find_idx(dirs, f"{prefix}-images-idx3-ubyte"), _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise FileNotFoundError(
            "Fashion-MNIST idx files not found in " + ", ".join(map(str, dirs)) +
            "; run `make setup` (installs the Debian package dataset-fashion-mnist as root) or pass download=True")
    return read_idx(img).unsqueeze(1), read_idx(lab).long()


def check_dataset(dataset: str, data_dir: str | Path = "data", download: bool = True) -> None:
    """Check that a dataset can be loaded, without loading it: its files are where
    :func:`build_datasets` looks (or ``download`` will fetch them). Raises FileNotFoundError
    naming the expected layout."""
    info, root = dataset_info(dataset), Path(data_dir)
    if dataset == "fashion_mnist":
        dirs = fashion_mnist_dirs(root)
        found = all(_find_idx(dirs, f"{s}-{k}-idx{d}-ubyte") for s in ("train", "t10k")
                    for k, d in (("images", 3), ("labels", 1)))
        if not found and not download:
            raise FileNotFoundError(f"Fashion-MNIST idx files (train/t10k-images-idx3-ubyte[.gz], ...-labels-idx1-ubyte"
                                    f"[.gz]) not found in {', '.join(map(str, dirs))}; install the Debian package "
                                    f"dataset-fashion-mnist (`make setup`) or pass download=True")
    elif dataset in ("cifar10", "cifar100"):
        sub = root / ("cifar-10-batches-py" if info.num_classes == 10 else "cifar-100-python")
        if not sub.is_dir() and not download:
            raise FileNotFoundError(f"{dataset} folder {sub} not found (torchvision's python layout: "
                                    f"{sub.name}/{'data_batch_1..5, test_batch' if info.num_classes == 10 else 'train, test'}); "
                                    f"set data_dir to its parent or pass download=True")
    elif dataset == "imagenet":
        for split in ("train", "val"):
            d = root / split
            if not d.is_dir() or not any(c.is_dir() for c in d.iterdir()):
                raise FileNotFoundError(f"ImageNet folder {d} not found or without class folders; set data_dir to "
                                        f"a folder with train/<class>/*.JPEG and val/<class>/*.JPEG "
                                        f"(e.g. data_dir=/data/imagenet)")


def load_cifar(data_dir: str | Path, num_classes: int, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """CIFAR-10/100 from torchvision's python pickle layout (no checksum: generated files work)."""
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    root = Path(data_dir) / sub
    if not root.is_dir() and download:
        try:
            (CIFAR10 if num_classes == 10 else CIFAR100)(str(data_dir), train=train, download=True)
        except Exception as e:  # noqa: BLE001 -- network errors and the like
            raise FileNotFoundError(f"CIFAR-{num_classes} download into {data_dir} failed ({e}); put torchvision's "
                                    f"python archive, extracted, at {root}") from e
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found; pass download=True (needs internet) or put the "
                                f"torchvision CIFAR-{num_classes} python archive there")
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = b"labels"
    else:
        files, key = (["train"] if train else ["test"]), b"fine_labels"
    xs, ys = [], []
    for f in files:
        with open(root / f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(d[key])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


def make_synthetic(n: int, num_classes: int = 10, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Noise images with a square at a random position whose colour encodes the class (so crops
    and flips keep the label). Returns (n, 3, size, size) uint8 images and (n,) labels.

    At most 28 classes: 7 hues x 4 brightness levels above the noise (255, 195, 135, 75)."""
    if not 1 <= num_classes <= 28:
        raise ValueError(f"make_synthetic supports 1..28 classes (7 hues x 4 brightness levels), got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randint(0, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
    palette = torch.tensor([[(k >> b) & 1 for b in range(3)] for k in range(1, 8)] * (num_classes // 7 + 1))
    level = 255 - 60 * (torch.arange(len(palette)) // 7)  # (P,) brightness tells repeated colours apart
    side = max(size // 3, 2)
    pos = torch.randint(0, size - side + 1, (n, 2), generator=g)
    for i in range(n):
        k = int(y[i])
        colour = (palette[k] * level[k]).to(torch.uint8).view(3, 1, 1)
        x[i, :, pos[i, 0]:pos[i, 0] + side, pos[i, 1]:pos[i, 1] + side] = colour
    return x, y


# ---------------------------------------------------------------------------------------------
# transforms

def fit_size(images: Tensor, img_size: int) -> Tensor:
    """Bring uint8 images (N, C, h, w) to ``img_size``: zero-pad symmetrically when larger by an even
    margin of at most 1/4 (Fashion-MNIST 28 -> 32), else bilinear resize."""
    h = images.shape[-1]
    if h == img_size:
        return images
    if img_size > h and (img_size - h) % 2 == 0 and img_size - h <= h // 4:
        p = (img_size - h) // 2
        return F.pad(images, (p, p, p, p))
    out = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


class TensorTransform:
    """Per-sample augmentation of a uint8 (C, H, W) tensor -> normalised float32 (C, H, W).

    Args:
        train: apply random crop / flip / RandAugment.
        mean, std: normalisation per channel.
        crop_padding: zero padding of the random crop (0 = no crop).
        hflip: flip probability 0.5 when True.
        randaugment: a timm RandAugment string (``"rand-m9-mstd0.5-inc1"``) or "" for none.
    """

    def __init__(self, train: bool, mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int = 4,
                 hflip: bool = True, randaugment: str = "") -> None:
        self.train, self.crop_padding, self.hflip = train, crop_padding, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255  # float32 even for numpy stats
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
        self.randaugment: Callable | None = None
        if randaugment and train:
            # fill colour of the geometric ops; a grey ("L") image needs a one-element fill
            fill = (124, 116, 104) if len(mean) != 1 else (round(255 * mean[0]),)
            self.randaugment = rand_augment_transform(randaugment, {"img_mean": fill})

    def __call__(self, img: Tensor) -> Tensor:
        return self.apply(img)[0]

    def apply(self, img: Tensor) -> tuple[Tensor, tuple[float, float, float, float], bool]:
        """Augment ``img`` and return ``(image, box, flipped)``; ``box`` = (y0, x0, y1, x1), the
        shown region of the input in normalised coordinates (see the module docstring)."""
        box, flipped = (0.0, 0.0, 1.0, 1.0), False
        if self.train:
            if self.randaugment is not None:
                arr = img.permute(1, 2, 0).numpy()
                pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
                arr = np.asarray(self.randaugment(pil))
                img = torch.from_numpy(arr.copy()).reshape(img.shape[1], img.shape[2], -1).permute(2, 0, 1)
            p = self.crop_padding
            if p > 0:
                h, w = img.shape[-2:]
                top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
                img = F.pad(img, (p, p, p, p))[:, top:top + h, left:left + w]
                box = ((top - p) / h, (left - p) / w, (top - p + h) / h, (left - p + w) / w)
            if self.hflip and bool(torch.rand(()) < 0.5):
                img, flipped = img.flip(-1), True
        return (img.float() - self.mean) / self.std, box, flipped


def sample_meta(index: int, box: tuple[float, float, float, float], flipped: bool) -> dict[str, Tensor]:
    """One sample's metadata (collates into a dict of batched tensors)."""
    return {"index": torch.tensor(index, dtype=torch.long), "box": torch.tensor(box, dtype=torch.float32),
            "flip": torch.tensor(bool(flipped))}


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) + labels (N,) with a per-sample transform.

    Args:
        source_index: (N,) index of each image in its full split (a subset keeps the original
            indices, so caches built for the whole split stay valid); default ``arange(N)``.
        with_meta: return ``(image, label, meta)`` (see the module docstring); needs a
            :class:`TensorTransform`.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor],
                 classes: tuple[str, ...] = (), source_index: Tensor | None = None, with_meta: bool = False) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 (N, C, H, W) images and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images, self.labels, self.transform, self.classes = images, labels.long(), transform, classes
        self.source_index = torch.arange(len(labels)) if source_index is None else source_index.long()
        if with_meta and not hasattr(transform, "apply"):
            raise ValueError("with_meta=True needs a transform that reports its geometry (TensorTransform)")
        self.with_meta = with_meta

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | tuple[Tensor, int, dict[str, Tensor]]:
        if not self.with_meta:
            return self.transform(self.images[i]), int(self.labels[i])
        img, box, flipped = self.transform.apply(self.images[i])  # type: ignore[attr-defined]
        return img, int(self.labels[i]), sample_meta(int(self.source_index[i]), box, flipped)


def with_sample_meta(ds: Dataset) -> Dataset | None:
    """A copy of an in-memory training set that also returns sample metadata; None for other
    datasets (rebuild them with ``build_datasets(..., train_meta=True)``)."""
    if isinstance(ds, InMemoryImages):
        if not hasattr(ds.transform, "apply"):
            raise ValueError("sample metadata needs a transform that reports its geometry (TensorTransform)")
        out = copy.copy(ds)
        out.with_meta = True
        return out
    return ds if isinstance(ds, ImageFolderWithMeta) else None


def subset_indices(n: int, k: int, seed: int = 0) -> Tensor:
    """A fixed random subset of ``k`` of ``n`` indices (all when k <= 0 or k >= n), sorted."""
    if k <= 0 or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def random_meta(batch_size: int, num_images: int, img_size: int, padding: int) -> dict[str, Tensor]:
    """Sample metadata as the training set with ``train_meta=True`` produces it, drawn at random:
    ``index`` (B,) in ``[0, num_images)``, padded-crop ``box`` (B, 4) as normalised
    (y0, x0, y1, x1) and ``flip`` (B,) bool (for benchmarks and the engine's dry step)."""
    off = (torch.randint(0, 2 * padding + 1, (batch_size, 2)).float() - padding) / img_size  # (B, 2)
    box = torch.cat([off, off + 1.0], dim=1)
    return {"index": torch.randint(0, num_images, (batch_size,)), "box": box,
            "flip": torch.rand(batch_size) < 0.5}


def load_split(dataset: str, img_size: int, train: bool, data_dir: str | Path = "data", download: bool = True,
               synthetic_size: int = 512, subset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A split of an in-memory dataset, size-fitted: uint8 (n, C, img_size, img_size), labels (n,) and
    their indices in the full split (n,) — all of it, or the fixed random ``subset`` of
    :func:`subset_indices` when ``subset > 0``."""
    info = dataset_info(dataset)
    if dataset == "imagenet":
        raise ValueError("imagenet is an image folder, not an in-memory dataset; use build_datasets")
    if dataset == "fashion_mnist":
        x, y = load_fashion_mnist(data_dir, train, download)
    elif dataset in ("cifar10", "cifar100"):
        x, y = load_cifar(data_dir, info.num_classes, train, download)
    else:
        n = max(synthetic_size, 16)
        x, y = make_synthetic(n, info.num_classes, 32, seed=0) if train else make_synthetic(n // 4, info.num_classes, 32, seed=1)
    idx = subset_indices(len(y), subset)
    return fit_size(x[idx], img_size), y[idx], idx


def build_datasets(dataset: str, img_size: int, data_dir: str | Path = "data", download: bool = True,
                   train_subset: int = 0, test_subset: int = 0, crop_padding: int = -1, hflip: bool = True,
                   randaugment: str = "", synthetic_size: int = 512,
                   train_meta: bool = False) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build (train, test, info). ``crop_padding=-1`` means ``img_size // 8``; ``train_meta`` makes
    the training set return ``(image, label, meta)`` (see the module docstring)."""
    info = dataset_info(dataset)
    if dataset == "imagenet":
        return _image_folder(Path(data_dir), img_size, randaugment, info, train_meta) + (info,)
    pad = img_size // 8 if crop_padding < 0 else crop_padding
    out = []
    for train, k in ((True, train_subset), (False, test_subset)):
        x, y, idx = load_split(dataset, img_size, train, data_dir, download, synthetic_size, subset=k)
        tf = TensorTransform(train, info.mean, info.std, pad, hflip, randaugment)
        out.append(InMemoryImages(x, y, tf, info.classes, source_index=idx,
                                  with_meta=train and train_meta))
    return out[0], out[1], info


def clean_train_view(train: InMemoryImages, test: InMemoryImages, n: int) -> InMemoryImages:
    """The first ``n`` training images (all if fewer) with the test transform (no augmentation):
    what the model's training accuracy is measured on, for the train/test gap."""
    if not isinstance(train, InMemoryImages) or not isinstance(test, InMemoryImages):
        raise TypeError(f"clean_train_view needs in-memory datasets, got {type(train).__name__}")
    n = min(n, len(train))
    return InMemoryImages(train.images[:n], train.labels[:n], test.transform, train.classes, train.source_index[:n])


class CropFlipWithMeta:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip on a PIL image that
    also reports the crop box (normalised (y0, x0, y1, x1)) and the flip — timm's primary train
    transform, made observable."""

    def __init__(self, img_size: int, hflip: float = 0.5) -> None:
        self.rrc = RandomResizedCrop(img_size, interpolation=InterpolationMode.BICUBIC)
        self.hflip = hflip

    def __call__(self, img):  # PIL image -> (PIL image, box, flipped)
        w, h = img.size
        top, left, ch, cw = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        out = TF.resized_crop(img, top, left, ch, cw, self.rrc.size, self.rrc.interpolation)
        flipped = bool(torch.rand(()) < self.hflip)
        if flipped:
            out = TF.hflip(out)
        return out, (top / h, left / w, (top + ch) / h, (left + cw) / w), flipped


class ImageFolderWithMeta(Dataset):
    """An image folder whose training samples are ``(image, label, meta)`` (see the module docstring)."""

    def __init__(self, folder: Dataset, primary: CropFlipWithMeta, rest: Callable) -> None:
        self.folder, self.primary, self.rest = folder, primary, rest
        self.classes = getattr(folder, "classes", ())

    def __len__(self) -> int:
        return len(self.folder)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int, dict[str, Tensor]]:
        img, label = self.folder[i]
        img, box, flipped = self.primary(img)
        return self.rest(img), int(label), sample_meta(i, box, flipped)


def _image_folder(root: Path, img_size: int, randaugment: str, info: DatasetInfo,
                  train_meta: bool = False) -> tuple[Dataset, Dataset]:
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"ImageNet folder {root / split} not found; set data_dir to a folder "
                                    f"with train/<class>/* and val/<class>/*")
    tr_tf = create_transform(img_size, is_training=True, auto_augment=randaugment or None,
                             interpolation="bicubic", mean=info.mean, std=info.std)
    te_tf = create_transform(img_size, is_training=False, interpolation="bicubic", mean=info.mean,
                             std=info.std, crop_pct=0.875)
    test = ImageFolder(str(root / "val"), te_tf)
    if not train_meta:
        return ImageFolder(str(root / "train"), tr_tf), test
    parts = create_transform(img_size, is_training=True, auto_augment=randaugment or None, interpolation="bicubic",
                             mean=info.mean, std=info.std, separate=True)
    rest = Compose([t for part in parts[1:] for t in getattr(part, "transforms", [part])])
    return ImageFolderWithMeta(ImageFolder(str(root / "train")), CropFlipWithMeta(img_size), rest), test


def num_classes_of(ds: Dataset, info: DatasetInfo) -> int:
    """Classes actually present for an image folder (small test folders), else the info's count."""
    classes = getattr(ds, "classes", None)
    return len(classes) if info.name == "imagenet" and classes else info.num_classes
