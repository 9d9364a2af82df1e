"""The step-time benchmark: spec parsing, the kind-weighted median, and one tiny interleaved run."""
import statistics

import pytest

from tokenmix.bench import format_results, kind_weighted_median, parse_spec, step_time_ratios


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
