"""Engine: schedule, evaluation, run folders, resume equality, run records."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tokenmix.train.config import RunConfig
from tokenmix.train.engine import evaluate, load_model, lr_at, open_run_dir, train
from tokenmix.train.runs import CHECKPOINT, RunExistsError, atomic_write_json, load_run


def tiny_cfg(tmp_path, **kw) -> RunConfig:
    base = dict(dataset="synthetic", img_size=32, train_subset=128, test_subset=64, epochs=2, batch_size=32,
                out_dir=str(tmp_path), progress=False, warmup_epochs=0.5, seed=3)
    base.update(kw)
    return RunConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [lr_at(s, total, warm, 1.0, 0.01, 0.0) for s in range(total + 1)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)
    assert lrs[warm] == pytest.approx(1.0)
    assert lrs[total] == pytest.approx(0.01)
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-9)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # monotone after warmup


def test_evaluate_matches_manual_top1_top5():
    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 7, (50,))
    model = nn.Linear(4, 7)
    res = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16), torch.device("cpu"))
    logits = model(x)
    top5 = logits.topk(5, 1).indices
    assert res["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert res["top5"] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert res["test_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert model.training  # mode restored


def test_train_writes_record_and_learns(tmp_path):
    cfg = tiny_cfg(tmp_path, run_id="rec", epochs=3, train_subset=256, method="none", lr=3e-3)
    summary = train(cfg)
    run = load_run(tmp_path / "rec")
    assert run.complete and summary["status"] == "complete"
    assert run.config == cfg.to_dict()
    assert [m["epoch"] for m in run.metrics] == [1, 2, 3]
    for key in ("train_loss", "top1", "top5", "test_loss", "epoch_time", "images_per_s", "lr"):
        assert all(math.isfinite(m[key]) for m in run.metrics), key
    assert summary["final_top1"] == run.metrics[-1]["top1"]
    assert summary["best_top1"] == max(m["top1"] for m in run.metrics)
    assert summary["final_top1"] > 30.0  # synthetic colours are learnable; chance is 10 %
    assert (tmp_path / "rec" / CHECKPOINT).is_file()
    model, cfg2 = load_model(tmp_path / "rec")
    assert cfg2 == cfg and not model.training


def test_existing_run_is_never_overwritten(tmp_path):
    cfg = tiny_cfg(tmp_path, run_id="x", epochs=1)
    first = train(cfg)
    before = (tmp_path / "x" / "metrics.jsonl").read_bytes()
    with pytest.raises(RunExistsError, match="resume=True"):
        train(cfg)
    assert train(cfg.replace(resume=True)) == first  # finished: returned, not re-run
    assert (tmp_path / "x" / "metrics.jsonl").read_bytes() == before
    with pytest.raises(RunExistsError, match="lr"):
        open_run_dir(cfg.replace(resume=True, lr=1e-4))


def test_folder_with_only_a_notebook_counts_as_new(tmp_path):
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "10_train.ipynb").write_text("{}")
    assert open_run_dir(tiny_cfg(tmp_path, run_id="nb"))[1] == "new"


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    method = "mixup_cutmix"
    full = train(tiny_cfg(tmp_path, run_id="full", method=method))

    class Crash(RuntimeError):
        pass

    def crash_after_first(epoch, record):
        if epoch == 1:
            raise Crash

    cfg = tiny_cfg(tmp_path, run_id="cut", method=method)
    with pytest.raises(Crash):
        train(cfg, callbacks=[crash_after_first])
    assert len(load_run(tmp_path / "cut").metrics) == 1 and not load_run(tmp_path / "cut").complete
    with pytest.raises(RunExistsError, match="unfinished"):
        train(cfg)
    resumed = train(cfg.replace(resume=True))
    a, b = load_run(tmp_path / "full").metrics, load_run(tmp_path / "cut").metrics
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("train_loss", "top1", "top5", "test_loss", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), key
    assert resumed["final_top1"] == pytest.approx(full["final_top1"])
    wa = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)["model"]
    wb = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_metrics_file_follows_checkpoint_history(tmp_path):
    cfg = tiny_cfg(tmp_path, run_id="h", epochs=2)
    train(cfg)
    hist = torch.load(tmp_path / "h" / CHECKPOINT, weights_only=False)["history"]
    lines = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(hist))


def test_resume_rejects_changed_config(tmp_path):
    atomic_write_json(tmp_path / "r" / "config.json", tiny_cfg(tmp_path, run_id="r").to_dict())
    with pytest.raises(RunExistsError, match="method"):
        open_run_dir(tiny_cfg(tmp_path, run_id="r", method="mixup", resume=True))
    assert open_run_dir(tiny_cfg(tmp_path, run_id="r", resume=True, progress=True))[1] == "resume"


def test_global_batch_sampler_splits_the_single_process_batches():
    from torch.utils.data import RandomSampler

    from tokenmix.train.engine import GlobalBatchSampler
    n, batch, world = 53, 8, 2
    single = list(RandomSampler(range(n), generator=torch.Generator().manual_seed(11)))
    one = GlobalBatchSampler(n, 0, 1, batch, torch.Generator().manual_seed(11))
    assert list(one) == single[: (n // batch) * batch]  # world 1: RandomSampler's order, whole batches
    ranks = [list(GlobalBatchSampler(n, r, world, batch, torch.Generator().manual_seed(11))) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == (n // batch) * batch // world
    per = batch // world
    for step in range(n // batch):  # each step: the ranks' batches together are the single-process batch
        together = sorted(ranks[0][step * per:(step + 1) * per] + ranks[1][step * per:(step + 1) * per])
        assert together == sorted(single[step * batch:(step + 1) * batch])


def test_clean_train_accuracy_and_kept_epoch_checkpoints(tmp_path):
    from tokenmix.data import build_datasets, clean_train_view

    cfg = tiny_cfg(tmp_path, run_id="gap", epochs=2, eval_train=40, checkpoint_every=1, method="cutmix")
    summary = train(cfg)
    run = load_run(tmp_path / "gap")
    assert all("train_top1" in m and "train_eval_loss" in m for m in run.metrics)
    assert summary["final_train_top1"] == run.metrics[-1]["train_top1"]
    # the logged number is the final model's accuracy on the first 40 training images, un-augmented
    train_ds, test_ds, _ = build_datasets("synthetic", 32, str(tmp_path / "d"), False, 128, 64)
    clean = clean_train_view(train_ds, test_ds, 40)
    assert len(clean) == 40 and torch.equal(clean[3][0], test_ds.transform(train_ds.images[3]))
    model, _ = load_model(tmp_path / "gap")
    res = evaluate(model, DataLoader(clean, batch_size=16), torch.device("cpu"))
    assert res["top1"] == pytest.approx(summary["final_train_top1"])
    kept = run.epoch_checkpoints()
    assert sorted(kept) == [1, 2]
    final = torch.load(tmp_path / "gap" / CHECKPOINT, weights_only=False)["model"]
    last = torch.load(kept[2], weights_only=False)["model"]
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_methods_with_one_seed_start_from_the_same_weights(tmp_path):
    """The paired study's premise: the seed, not the method, decides the initial weights (and the
    data order, drawn from a generator seeded by seed and epoch only). With a learning rate of
    1e-12 the trained parameters are the initial ones to within 1e-9."""
    tiny_lr = dict(lr=1e-12, min_lr=1e-12, warmup_lr=1e-12, epochs=1, warmup_epochs=0.0, weight_decay=0.0)
    w = {}
    for method in ("none", "cutmix", "transmix"):
        train(tiny_cfg(tmp_path, run_id=method, method=method, **tiny_lr))
        w[method] = torch.load(tmp_path / method / CHECKPOINT, weights_only=False)["model"]
    for k, v in w["none"].items():
        if "running_" in k or "num_batches_tracked" in k:
            continue  # batch-norm statistics follow the (mixed) inputs, not the learning rate
        assert torch.allclose(v, w["cutmix"][k], atol=1e-9) and torch.allclose(v, w["transmix"][k], atol=1e-9), k
    other = tiny_cfg(tmp_path, run_id="seed4", method="none", seed=4, **tiny_lr)
    train(other)
    w4 = torch.load(tmp_path / "seed4" / CHECKPOINT, weights_only=False)["model"]
    assert not torch.allclose(w4["head.weight"], w["none"]["head.weight"])
