"""The overhead benchmark: spec parsing, the kind-weighted median, the CPU memory meter, tiny
interleaved runs, the suite's targets, files and README block."""
import math
import statistics

import pytest
import torch

from tokenmix.analysis.bench import (SALIENCY_SPEEDUP_TARGET, TARGETS, BenchResult, BenchSetting, LiveTensorBytes,
                                      SuiteResult, bench_teacher_maps, format_results, kind_weighted_median, parse_spec,
                                      run_suite, step_time_ratios)


def test_parse_spec_converts_types():
    assert parse_spec("tl_align:path=kdim,variant=paper") == ("tl_align", {"path": "kdim", "variant": "paper"})
    assert parse_spec("smmix:switch_prob=1.0,w_con=0") == ("smmix", {"switch_prob": 1.0, "w_con": 0})
    assert parse_spec("tokenmix:clamp_negative=false") == ("tokenmix", {"clamp_negative": False})
    assert parse_spec("cutmix") == ("cutmix", {})


def test_kind_weighted_median_hand_case():
    times = [1.0, 1.2, 1.1, 3.0, 2.0, 10.0]
    kinds = ["a", "a", "a", "b", "b", "b"]
    typ, per = kind_weighted_median(times, kinds)
    assert per == {"a": (1.1, 0.5), "b": (3.0, 0.5)}
    assert typ == pytest.approx(0.5 * 1.1 + 0.5 * 3.0)
    # single kind: the plain median
    assert kind_weighted_median([3.0, 1.0, 2.0], ["x"] * 3)[0] == 2.0
    # unequal shares are weighted by frequency
    assert kind_weighted_median([1.0, 1.0, 1.0, 5.0], ["a", "a", "a", "b"])[0] == pytest.approx(0.75 + 1.25)


def test_kind_weighted_median_is_stable_where_the_plain_median_jumps():
    """Two clusters of equal size: the plain median depends on one sample, the weighted one does not."""
    a, b = [1.0] * 10, [2.0] * 10
    t1, k1 = a + b + [1.0], ["m"] * 11 + ["s"] * 10
    t2, k2 = a + b + [2.0], ["m"] * 10 + ["s"] * 11
    assert statistics.median(t1) == 1.0 and statistics.median(t2) == 2.0
    assert abs(kind_weighted_median(t1, k1)[0] - kind_weighted_median(t2, k2)[0]) < 0.1


def test_kind_weighted_median_rejects_mismatch():
    with pytest.raises(ValueError, match="one kind per time"):
        kind_weighted_median([1.0, 2.0], ["a"])


def test_step_time_ratios_records_kinds_and_reference():
    res = step_time_ratios(["smmix"], warmup=1, repeats=4, batch_size=8)
    by = {r.label: r for r in res}
    assert set(by) == {"cutmix", "smmix"}
    assert by["cutmix"].ratio == pytest.approx(1.0) and by["cutmix"].median_ratio == pytest.approx(1.0)
    assert set(by["cutmix"].kinds) == {"cutmix"}
    assert set(by["smmix"].kinds) <= {"smmix", "mixup"} and len(by["smmix"].kinds) == 4
    assert sum(w for _, w in by["smmix"].kind_medians.values()) == pytest.approx(1.0)
    table = format_results(res)
    assert "`smmix`" in table and "vs cutmix" in table



# ---------------------------------------------------------------------------------------------
# peak memory on the CPU

def test_live_tensor_bytes_hand_case():
    with LiveTensorBytes() as m:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000)  # 8000 B -> 12000 live
        v = b[:10]  # a view allocates nothing
        del a
        c = torch.empty(500)  # 2000 B -> 10000 live
        b.add_(1.0)  # in place: nothing new
    assert m.peak == 12000 and m.now == 10000
    del b, c, v


def test_live_tensor_bytes_sees_backward_and_the_optimiser():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(100, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))
    x = torch.randn(64, 100)
    opt = torch.optim.AdamW(net.parameters())

    def step():
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()  # the optimiser state exists before the measured step
    with LiveTensorBytes() as m:
        step()
    grads = 4 * sum(p.numel() for p in net.parameters())
    assert m.now == grads  # what outlives the step: the new .grad tensors
    hidden = 64 * 1000 * 4  # one (64, 1000) float32 activation
    assert m.peak >= grads + 2 * hidden  # pre- and post-ReLU activations live with the gradients


# ---------------------------------------------------------------------------------------------
# step rows with the method's own time and memory

def test_step_time_ratios_splits_the_step_and_measures_memory():
    maps = bench_teacher_maps(100, 10, 7)
    res = step_time_ratios(["transmix", "tokenmix"], warmup=1, repeats=3, batch_size=8, memory=True, teacher_maps=maps)
    by = {r.label: r for r in res}
    assert by["cutmix"].memory_ratio == pytest.approx(1.0)
    for r in res:
        assert 0 < r.mix_s < r.median_s and 0 < r.loss_s < r.median_s
        assert r.peak_bytes > 0 and math.isfinite(r.memory_ratio)
    table = format_results(res)
    assert "peak memory (MB)" in table and table.count("\n") == 1 + len(res)


# ---------------------------------------------------------------------------------------------
# the suite

def fake_suite(transmix_ratio: float, gradient_s: float) -> SuiteResult:
    st = BenchSetting("tiny", "tiny_deit", 32, 3, 10, 8, 1, 2)
    rows = [BenchResult("cutmix", 0.1, 1.0, [0.1], ["cutmix"], 0.1, 1.0, 1.0, {}, 0.001, 0.002, 2**20, 1.0),
            BenchResult("transmix", 0.1, transmix_ratio, [0.1], ["cutmix"], 0.1, 1.0, 1.0, {}, 0.001, 0.003,
                        1.5 * 2**20, 1.5)]
    sal = {"gradient": gradient_s, "attention": 0.001, "attention_with_forward": 0.01, "random": 0.0001}
    return SuiteResult({"tiny": rows}, (st,), sal, "tiny_deit, batch 8, block 2", {"tiny": "random maps"},
                       "a machine", "2026-11-23 10:00", 12.0)


def test_suite_targets_and_report(tmp_path):
    ok = fake_suite(1.02, 0.05)
    assert ok.missed() == [] and "All targets met." in ok.markdown()
    row = {r["method"]: r for r in ok.table()}["transmix"]
    assert row["target"] == TARGETS["transmix"] and row["met"] is True and row["peak_mb"] == 1.5
    bad = fake_suite(1.04, 0.005)
    assert bad.saliency_speedup == pytest.approx(5.0) and bad.saliency_speedup < SALIENCY_SPEEDUP_TARGET
    missed = bad.missed()
    assert len(missed) == 2 and missed[0].startswith("transmix 1.040x > 1.03x") and "5.0x" in missed[1]
    md = bad.markdown()
    assert "**missed**" in md and "a machine" in md and "| `transmix` | 100.0 | 1.040× | ≤ 1.03× **missed**" in md
    paths = bad.write(tmp_path / "figs")
    assert [p.name for p in paths] == ["bench.csv", "bench_saliency.csv", "bench.md"]
    import pandas as pd
    csv = pd.read_csv(paths[0])
    assert list(csv["method"]) == ["cutmix", "transmix"] and csv.loc[1, "vs_cutmix"] == pytest.approx(1.04)


def test_run_suite_tiny(tmp_path):
    st = BenchSetting("tiny", "tiny_deit", 32, 3, 10, 8, 1, 2)
    suite = run_suite((st,), ("cutmix", "tokenmix", "tokenmixup:tokenmixup_mode=htm"), data_dir=tmp_path, saliency_repeats=1,
                      log=lambda m: None)
    assert [r["method"] for r in suite.table()] == ["cutmix", "tokenmix", "tokenmixup:tokenmixup_mode=htm"]
    assert suite.maps_note["tiny"].startswith("random maps")  # no cache in tmp_path
    assert set(suite.saliency) == {"gradient", "attention", "attention_with_forward", "random"}
    assert all(math.isfinite(r["peak_mb"]) and r["peak_mb"] > 0 for r in suite.table())


def test_readme_gets_the_bench_block(tmp_path):
    from tokenmix.report import fill_readme
    figs = tmp_path / "figs"
    fake_suite(1.02, 0.05).write(figs)
    readme = tmp_path / "README.md"
    readme.write_text("# r\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    assert fill_readme(readme, figs, tmp_path / "runs")
    text = readme.read_text()
    assert "| `transmix` | 100.0 | 1.020× | ≤ 1.03× ✓" in text and "old" not in text
    assert "# Step cost" not in text  # the file's title is dropped
    assert not fill_readme(readme, figs, tmp_path / "runs")  # unchanged: not rewritten


def test_cli_bench_methods_prints_a_table(capsys):
    from tokenmix.__main__ import main
    assert main(["bench", "--methods", "cutmix,mixup", "--repeats", "1", "--warmup", "0", "--batch_size", "8",
                 "--memory"]) == 0
    out = capsys.readouterr().out
    assert "`mixup`" in out and "peak memory (MB)" in out
    assert main(["bench", "--methods", "nosuch", "--repeats", "1", "--warmup", "0"]) == 2
    assert "nosuch" in capsys.readouterr().err
