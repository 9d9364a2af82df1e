"""TokenMix teacher maps (tokenmix.train.teacher): alignment with the applied crop / flip, normalisation,
class activation maps, the versioned cache, the CLI, and the sample metadata of tokenmix.data.

Expected values come from independent computations: pixel-level brute force (upsample, pad, crop,
flip, sum-pool), hand-made numbers, or the teacher network re-run on the images.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tokenmix.__main__ import main
from tokenmix.data import (InMemoryImages, TensorTransform, build_datasets, load_split, make_synthetic, subset_indices,
                           with_sample_meta)
from tokenmix.methods.teacher_maps import (CACHE_FORMAT, TeacherCacheError, align_maps, cache_dir,
                                           class_activation_maps, load_teacher_maps, normalise_over_space)
from tokenmix.models import create_model
from tokenmix.train.teacher import build_teacher_maps

CMD = "python -m tokenmix teacher"


# ---------------------------------------------------------------------------------------------
# align_maps

def brute_align(m: torch.Tensor, box, flip: bool, rows: int, cols: int, factor: int) -> torch.Tensor:
    """Token masses by pixels: spread each cell's mass over factor x factor pixels, zero-pad, crop the
    box (must fall on whole pixels), mirror, sum-pool onto rows x cols. (rows, cols) float64."""
    h, w = m.shape
    px = m.double().repeat_interleave(factor, 0).repeat_interleave(factor, 1) / factor ** 2  # (H, W)
    big_h, big_w = h * factor, w * factor
    y0, x0, y1, x1 = (v * s for v, s in zip(box, (big_h, big_w, big_h, big_w)))
    assert all(abs(v - round(v)) < 1e-9 for v in (y0, x0, y1, x1)), "box must fall on whole pixels"
    y0, x0, y1, x1 = (int(round(v)) for v in (y0, x0, y1, x1))
    pad = max(0, -y0, -x0, y1 - big_h, x1 - big_w)
    padded = torch.nn.functional.pad(px, (pad, pad, pad, pad))
    crop = padded[y0 + pad:y1 + pad, x0 + pad:x1 + pad]
    if flip:
        crop = crop.flip(-1)
    ch, cw = crop.shape
    assert ch % rows == 0 and cw % cols == 0
    return crop.reshape(rows, ch // rows, cols, cw // cols).sum((1, 3))


def _align1(m, box, flip, rows, cols):
    return align_maps(m[None].double(), torch.tensor([box], dtype=torch.float64), torch.tensor([flip]), rows, cols)[0]


def test_align_identity_downsample_upsample():
    torch.manual_seed(0)
    maps = torch.rand(3, 4, 4)
    full, no = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3), torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(align_maps(maps, full, no, 4, 4), maps)
    down = align_maps(maps, full, no, 2, 2)  # each token sums a 2x2 block of cells
    torch.testing.assert_close(down, maps.reshape(3, 2, 2, 2, 2).sum((2, 4)))
    up = align_maps(maps, full, no, 8, 8)  # each cell's mass is split over 4 tokens
    torch.testing.assert_close(up, maps.repeat_interleave(2, 1).repeat_interleave(2, 2) / 4)
    # total mass is kept for boxes covering the image, whatever the grid (3 x 5 does not divide 4)
    torch.testing.assert_close(align_maps(maps, full, no, 3, 5).sum((1, 2)), maps.sum((1, 2)))
    torch.testing.assert_close(align_maps(maps, full, torch.ones(3, dtype=torch.bool), 3, 5).sum((1, 2)),
                               maps.sum((1, 2)))
    # a box inside the image keeps exactly the mass of the cells it shows: the top-left 2x2 cells
    inner = align_maps(maps, torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 3), no, 3, 2)
    torch.testing.assert_close(inner.sum((1, 2)), maps[:, :2, :2].sum((1, 2)))
    # padding carries no mass: the top half of this box is above the image
    pad = align_maps(maps, torch.tensor([[-0.5, 0.0, 0.5, 1.0]] * 3), no, 4, 4)
    assert bool((pad[:, :2] == 0).all())
    torch.testing.assert_close(pad[:, 2:], maps[:, :2].reshape(3, 2, 4))


@pytest.mark.parametrize("map_hw,box,rows,cols,factor", [
    ((4, 4), (0.0, 0.25, 0.5, 1.0), 2, 3, 8),        # wide crop from the top right
    ((4, 4), (0.0, 0.25, 0.5, 1.0), 2, 2, 8),        # the same on a square grid (as roi_align's 14x14)
    ((4, 4), (0.25, 0.0, 1.0, 0.5), 3, 2, 8),        # tall crop from the bottom left
    ((4, 4), (-0.125, 0.25, 0.875, 1.25), 4, 4, 8),  # padded crop (random crop with zero padding)
    ((3, 5), (0.2, 0.1, 0.8, 0.7), 3, 5, 10),        # non-square map, cells cut by the box
])
@pytest.mark.parametrize("flip", [False, True])
def test_align_matches_pixel_brute_force_on_asymmetric_maps(map_hw, box, rows, cols, factor, flip):
    h, w = map_hw
    m = torch.arange(1.0, h * w + 1).reshape(h, w) ** 1.5  # no symmetry at all
    m[0, 0] = 100.0  # and a hot cell in the top-left corner
    expected = brute_align(m, box, flip, rows, cols, factor)
    torch.testing.assert_close(_align1(m, box, flip, rows, cols), expected)
    # the check is sensitive to the x / y transposition of the official roi_align call
    if rows != cols or h != w:
        return
    swapped = brute_align(m, (box[1], box[0], box[3], box[2]), flip, rows, cols, factor)
    assert not torch.allclose(swapped, expected)


def test_align_follows_the_real_crop_and_flip():
    """Images whose pixels are their own map (constant over 2x2 cells): the aligned source map must
    equal the sum-pooled augmented image for every recorded (box, flip), padding counting as 0."""
    g = torch.Generator().manual_seed(0)
    n, h, w, cell = 16, 16, 24, 2  # non-square images, 8 x 12 map cells
    cells = torch.randint(1, 256, (n, 1, h // cell, w // cell), generator=g, dtype=torch.uint8)
    images = cells.repeat_interleave(cell, 2).repeat_interleave(cell, 3)  # (n, 1, 16, 24)
    source_maps = cells[:, 0].double() * cell * cell  # mass of each cell
    tf = TensorTransform(True, (0.0,), (1 / 255,), crop_padding=3, hflip=True)
    ds = InMemoryImages(images, torch.zeros(n), tf, source_index=torch.arange(100, 100 + n), with_meta=True)
    rows, cols = 4, 6  # 4 px tokens
    flips, boxes = set(), set()
    torch.manual_seed(0)
    for _ in range(3):
        for img, _, meta in DataLoader(ds, batch_size=8, shuffle=True):
            assert meta["box"].shape == (8, 4) and meta["flip"].dtype == torch.bool
            src = source_maps[meta["index"] - 100]
            aligned = align_maps(src, meta["box"].double(), meta["flip"], rows, cols)
            pooled = img[:, 0].double().reshape(-1, rows, h // rows, cols, w // cols).sum((2, 4))
            torch.testing.assert_close(aligned, pooled, rtol=1e-5, atol=1e-3)
            flips |= set(meta["flip"].tolist())
            boxes |= {tuple(b) for b in meta["box"].tolist()}
    assert flips == {False, True} and len(boxes) > 10
    assert any(b[0] < 0 or b[1] < 0 for b in boxes) and any(b[2] > 1 or b[3] > 1 for b in boxes)


FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_align_follows_the_crop_and_flip_of_real_fashion_mnist_images():
    """On real training images with the study's crop (padding 3) and flip: a map that *is* the
    source image (pixel resolution), aligned with each sample's recorded (box, flip), equals the
    augmented image sum-pooled on the 7x7 token grid -- the teacher maps land where the pixels do."""
    x, y, idx = load_split("fashion_mnist", 28, True, str(FMNIST_DIR), False, subset=64)
    tf = TensorTransform(True, (0.0,), (1 / 255,), crop_padding=3, hflip=True)
    ds = InMemoryImages(x, y, tf, source_index=idx, with_meta=True)
    pos = {int(i): k for k, i in enumerate(idx)}
    torch.manual_seed(1)
    flips = set()
    for img, _, meta in DataLoader(ds, batch_size=32, shuffle=True):
        src = x[[pos[int(i)] for i in meta["index"]], 0].double()  # (B, 28, 28) the source pixels
        aligned = align_maps(src, meta["box"].double(), meta["flip"], 7, 7)
        pooled = img[:, 0].double().reshape(-1, 7, 4, 7, 4).sum((2, 4))  # cell masses up to 16 * 255
        torch.testing.assert_close(aligned, pooled, rtol=1e-5, atol=1e-2)
        flips |= set(meta["flip"].tolist())
    assert flips == {False, True}


# ---------------------------------------------------------------------------------------------
# normalisation

def test_normalise_over_space():
    torch.manual_seed(0)
    pos = torch.rand(5, 16)
    for clamp in (False, True):
        torch.testing.assert_close(normalise_over_space(pos, clamp).sum(1), torch.ones(5))
    m = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                      [-1.0, -2.0, 0.0, 0.0]])
    # clamped: negatives dropped, then sums to 1; a row with nothing positive becomes uniform
    torch.testing.assert_close(normalise_over_space(m, True),
                               torch.tensor([[1 / 4.5, 0.0, 3 / 4.5, 0.5 / 4.5], [0.25, 0.25, 0.25, 0.25]]))
    # official: m / (sum m + 1e-8), negatives kept (sum 2.5; sum -3)
    torch.testing.assert_close(normalise_over_space(m, False),
                               torch.tensor([[0.4, -0.8, 1.2, 0.2], [1 / 3, 2 / 3, 0.0, 0.0]]))
    near_zero = normalise_over_space(torch.tensor([[1.0, -1.0 + 1e-4]]), False)
    assert float(near_zero.abs().max()) > 1e3  # the official normaliser explodes near a zero sum


# ---------------------------------------------------------------------------------------------
# class activation maps

def test_cnn_class_activation_maps_average_to_the_logits():
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 28, 1).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        cam, logits = class_activation_maps(model, x), model(x)
    assert cam.shape == (3, 10, 7, 7)
    torch.testing.assert_close(cam.mean((2, 3)), logits, rtol=1e-4, atol=1e-5)
    assert float(cam.std((2, 3)).min()) > 0  # really spatial, not a broadcast logit


def test_vit_class_activation_maps_shape():
    torch.manual_seed(0)
    model = create_model("vit_cpu", 10, 28, 1).eval()
    with torch.no_grad():
        cam = class_activation_maps(model, torch.randn(2, 1, 28, 28))
    assert cam.shape == (2, 10, 7, 7) and bool(torch.isfinite(cam).all())


# ---------------------------------------------------------------------------------------------
# the cache

def test_cache_contents(teacher_cache):
    data_dir, path = teacher_cache
    assert path == cache_dir("synthetic", 32, "cnn_small", data_dir)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == CACHE_FORMAT and meta["dataset"] == "synthetic" and meta["img_size"] == 32
    assert meta["top_k"] == 5 and meta["splits"]["train"]["num_images"] == 512
    for split, n in (("train", 512), ("test", 128)):
        maps = load_teacher_maps("synthetic", 32, split=split, data_dir=data_dir)
        assert len(maps) == n
        assert isinstance(maps.values, np.memmap) and isinstance(maps.classes, np.memmap)
        assert maps.values.shape == maps.classes.shape == (n, 5, 8, 8)
        assert maps.values.dtype == np.float16 and maps.classes.dtype == np.int16
        v = np.asarray(maps.values, dtype=np.float32)
        assert bool((np.diff(v, axis=1) <= 0).all())  # top-k: descending along k
        c = np.sort(np.asarray(maps.classes), axis=1)
        assert c.min() >= 0 and c.max() < 10 and bool((np.diff(c, axis=1) > 0).all())  # distinct classes


def test_cache_holds_the_teachers_maps_of_each_image_in_order(teacher_cache):
    data_dir, path = teacher_cache
    maps = load_teacher_maps("synthetic", 32, data_dir=data_dir)
    model = create_model("cnn_small", 10, 32, 3)
    model.load_state_dict(torch.load(path / "teacher.pt", weights_only=False)["model"])
    model.eval()
    x, _, _ = load_split("synthetic", 32, True, data_dir)
    idx = torch.tensor([0, 1, 7, 200, 511])
    xn = (x[idx].float() / 255 - 0.5) / 0.25  # synthetic: mean 0.5, std 0.25
    with torch.no_grad():
        cam = class_activation_maps(model, xn)
    top = cam.topk(5, dim=1)
    torch.testing.assert_close(torch.from_numpy(np.asarray(maps.values[idx.numpy()], dtype=np.float32)),
                               top.values, rtol=2e-3, atol=2e-2)  # stored as float16


def test_ground_truth_and_token_maps(teacher_cache):
    data_dir, _ = teacher_cache
    maps = load_teacher_maps("synthetic", 32, data_dir=data_dir)
    idx = torch.tensor([3, 0, 511, 42])
    labels = torch.tensor([2, 7, 0, 9])
    gt = maps.ground_truth_maps(idx, labels)
    assert gt.shape == (4, 8, 8) and gt.dtype == torch.float32
    for b in range(4):
        v = np.asarray(maps.values[int(idx[b])], dtype=np.float32)
        c = np.asarray(maps.classes[int(idx[b])])
        expected = np.zeros((8, 8), np.float32)
        for k in range(5):
            expected += np.where(c[k] == int(labels[b]), v[k], 0)
        np.testing.assert_allclose(gt[b].numpy(), expected)
        absent = ~(c == int(labels[b])).any(0)
        assert bool((gt[b].numpy()[absent] == 0).all())  # zero where the label is not in the top-k
    absent_somewhere = any(not (np.asarray(maps.classes[int(i)]) == int(y)).any(0).all() for i, y in zip(idx, labels))
    assert absent_somewhere  # the zero rule was exercised
    # on the map's own grid with the identity box, token maps are the clamped, normalised gt maps
    box, no = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4), torch.zeros(4, dtype=torch.bool)
    tok = maps.token_maps(idx, labels, box, no, 8, 8, clamp_negative=True)
    assert tok.shape == (4, 64)
    torch.testing.assert_close(tok, normalise_over_space(gt.flatten(1), True))
    torch.testing.assert_close(tok.sum(1), torch.ones(4))
    coarse = maps.token_maps(idx, labels, box, torch.ones(4, dtype=torch.bool), 4, 4, clamp_negative=True)
    e = gt.reshape(4, 4, 2, 4, 2).sum((2, 4)).flip(-1).flatten(1).clamp_min(0)  # pool, mirror, then clamp
    s = e.sum(1, keepdim=True)
    torch.testing.assert_close(coarse, torch.where(s > 0, e / s.clamp_min(1e-12), torch.full_like(e, 1 / 16)))
    for bad in (512, -1):
        with pytest.raises(IndexError, match="outside the teacher cache"):
            maps.ground_truth_maps(torch.tensor([0, bad]), torch.tensor([0, 0]))


def _copy(path, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(path, dst)
    return dst


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_missing_cache_names_the_build_command(tmp_path):
    with pytest.raises(TeacherCacheError, match=f"{CMD} --dataset synthetic --img_size 32") as e:
        load_teacher_maps("synthetic", 32, data_dir=tmp_path / "empty")
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("spoil", ["img_size", "format", "teacher", "dataset", "weights", "split_file", "top_k"])
def test_stale_cache_names_the_build_command(teacher_cache, tmp_path, spoil):
    _, path = teacher_cache
    cache = _copy(path, tmp_path)
    load_teacher_maps("synthetic", 32, path=cache)  # the copy itself is valid
    kw = {"path": cache}
    if spoil == "img_size":
        args = ("synthetic", 28)
    else:
        args = ("synthetic", 32)
    if spoil == "format":
        _edit_meta(cache, format=CACHE_FORMAT + 1)
    elif spoil == "teacher":
        _edit_meta(cache, teacher="resnet26")
    elif spoil == "dataset":
        _edit_meta(cache, dataset="cifar10")
    elif spoil == "weights":
        state = torch.load(cache / "teacher.pt", weights_only=False)
        state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save(state, cache / "teacher.pt")
    elif spoil == "split_file":
        (cache / "test_values.npy").unlink()
        load_teacher_maps(*args, split="train", **kw)  # the other split is still fine
        kw["split"] = "test"
    elif spoil == "top_k":
        kw["top_k"] = 3
    with pytest.raises(TeacherCacheError, match=CMD):
        load_teacher_maps(*args, **kw)


def test_build_reuses_a_valid_cache_and_force_rebuilds_a_stale_one(teacher_cache, tmp_path):
    data_dir, path = teacher_cache
    stamps = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    again = build_teacher_maps("synthetic", 32, data_dir=data_dir, epochs=1, train_subset=128, progress=False,
                               device="cpu")
    assert again == path and {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == stamps
    cache = _copy(path, tmp_path)
    _edit_meta(cache, format=CACHE_FORMAT + 1)
    with pytest.raises(TeacherCacheError):
        load_teacher_maps("synthetic", 32, path=cache)
    out = build_teacher_maps("synthetic", 32, path=cache, epochs=1, train_subset=32, progress=False, device="cpu",
                             splits=("train",), force=True)
    assert out == cache
    maps = load_teacher_maps("synthetic", 32, path=cache)
    assert maps.meta["format"] == CACHE_FORMAT and maps.values.shape == (512, 5, 8, 8)


# ---------------------------------------------------------------------------------------------
# command line

def test_cli_teacher_builds_and_train_without_cache_fails_clearly(tmp_path, capsys):
    data = tmp_path / "data"
    rc = main(["teacher", "--dataset", "synthetic", "--img_size", "32", "--data_dir", str(data), "--epochs", "1",
               "--train_subset", "64", "--device", "cpu"])
    assert rc == 0
    maps = load_teacher_maps("synthetic", 32, data_dir=data)
    assert (cache_dir("synthetic", 32, "cnn_small", data) / "meta.json").is_file() and len(maps) == 512
    capsys.readouterr()
    empty, runs = tmp_path / "empty", tmp_path / "runs"
    rc = main(["train", "--method", "tokenmix", "--dataset", "synthetic", "--img_size", "32", "--data_dir", str(empty),
               "--out_dir", str(runs), "--run_id", "nocache", "--epochs", "1", "--train_subset", "32",
               "--test_subset", "16", "--batch_size", "16", "--warmup_epochs", "0", "--progress", "false",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{CMD} --dataset synthetic --img_size 32 --teacher cnn_small" in err and str(empty) in err
    assert not (runs / "nocache").exists()  # no half-made run folder


# ---------------------------------------------------------------------------------------------
# sample metadata of the data pipeline

def test_build_datasets_train_meta():
    torch.manual_seed(0)
    train, test, info = build_datasets("synthetic", 32, train_meta=True, train_subset=50, test_subset=10)
    full_x, full_y = make_synthetic(512, 10, 32, seed=0)
    sub = subset_indices(512, 50)
    assert torch.equal(train.source_index, sub) and not torch.equal(sub, torch.arange(50))
    pad = 32 // 8
    for i in (0, 1, 17, 49):
        img, label, meta = train[i]
        assert set(meta) == {"index", "box", "flip"}
        assert int(meta["index"]) == int(sub[i]) and label == int(full_y[sub[i]])
        assert meta["box"].shape == (4,) and meta["box"].dtype == torch.float32
        assert meta["flip"].dtype == torch.bool and meta["flip"].dim() == 0
        # the recorded box and flip reproduce the image from the full split's source image
        y0, x0 = (round(float(v) * 32) for v in meta["box"][:2])
        assert float(meta["box"][2] - meta["box"][0]) == 1.0 and float(meta["box"][3] - meta["box"][1]) == 1.0
        src = torch.nn.functional.pad(full_x[sub[i]], (pad,) * 4)[:, y0 + pad:y0 + pad + 32, x0 + pad:x0 + pad + 32]
        if bool(meta["flip"]):
            src = src.flip(-1)
        expected = (src.float() - 0.5 * 255) / (0.25 * 255)
        torch.testing.assert_close(img, expected)
    assert len(test[0]) == 2  # the test set has no metadata
    batch = next(iter(DataLoader(train, batch_size=8)))
    assert batch[2]["index"].shape == (8,) and batch[2]["box"].shape == (8, 4) and batch[2]["flip"].shape == (8,)


def test_with_sample_meta_copies():
    train, _, _ = build_datasets("synthetic", 32, train_subset=20, test_subset=10)
    assert len(train[0]) == 2
    withm = with_sample_meta(train)
    assert withm is not train and withm.with_meta and not train.with_meta
    assert len(withm[3]) == 3 and len(train[3]) == 2  # the original is unchanged
    assert withm.images is train.images and int(withm[3][2]["index"]) == int(train.source_index[3])
    assert with_sample_meta(TensorDataset(torch.zeros(4, 1))) is None
    with pytest.raises(ValueError, match="TensorTransform"):
        InMemoryImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), lambda t: t.float(), with_meta=True)


def test_build_from_a_state_dict_checkpoint_reproduces_the_maps(teacher_cache, tmp_path):
    """``checkpoint=<teacher.pt>`` loads the teacher instead of training it: same weights, same maps."""
    data_dir, path = teacher_cache
    out = build_teacher_maps("synthetic", 32, data_dir=data_dir, path=tmp_path / "again",
                             checkpoint=str(path / "teacher.pt"), progress=False, device="cpu", splits=("train",))
    a = load_teacher_maps("synthetic", 32, data_dir=data_dir, path=path)
    b = load_teacher_maps("synthetic", 32, data_dir=data_dir, path=out)
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_array_equal(np.asarray(a.classes), np.asarray(b.classes))
    assert b.meta["checkpoint"].endswith("teacher.pt")
    assert b.meta["teacher_metrics"]["top1"] == a.meta["teacher_metrics"]["top1"]  # evaluated, not retrained


def test_build_from_a_vit_run_folder(tmp_path):
    """A tokenmix run folder (a ViT trained by the engine) as the teacher: maps on its token grid."""
    from tokenmix import RunConfig
    from tokenmix.train.engine import train
    train(RunConfig(method="cutmix", dataset="synthetic", img_size=32, train_subset=64, test_subset=32, epochs=1,
                    batch_size=32, warmup_epochs=0.0, out_dir=str(tmp_path / "runs"), run_id="vit", progress=False))
    out = build_teacher_maps("synthetic", 32, "vit_cpu", data_dir=tmp_path, checkpoint=str(tmp_path / "runs" / "vit"),
                             top_k=3, progress=False, device="cpu", splits=("train",))
    maps = load_teacher_maps("synthetic", 32, "vit_cpu", data_dir=tmp_path, top_k=3)
    assert out == cache_dir("synthetic", 32, "vit_cpu", tmp_path)
    assert maps.values.shape == (512, 3, 8, 8)  # 32 px, patch 4: 8x8 tokens
    assert np.all(np.diff(np.asarray(maps.values, dtype=np.float32), axis=1) <= 0)  # top-k, descending
