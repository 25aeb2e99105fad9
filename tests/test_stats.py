"""Paired statistics checked against scipy and against values worked out by hand."""

import math

import numpy as np
import pytest
from scipy import stats

from raysynth.analysis.stats import holm, paired_comparison


def sample(n=10, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.80, 0.03, n)
    return a, a + rng.normal(0.02, 0.02, n)


def test_matches_scipy_t_test_interval_and_wilcoxon():
    a, b = sample()
    r = paired_comparison(a, b, n_boot=2000)
    ref = stats.ttest_rel(b, a)
    assert r["t"] == pytest.approx(ref.statistic) and r["t_p"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    w = stats.wilcoxon(b - a)
    assert r["wilcoxon_statistic"] == w.statistic and r["wilcoxon_p"] == pytest.approx(w.pvalue)
    assert r["mean_diff"] == pytest.approx(np.mean(b - a))
    assert r["mean_a"] == pytest.approx(a.mean()) and r["mean_b"] == pytest.approx(b.mean())
    assert math.isnan(r["nb_t"])  # no sizes given: no correction


def test_nadeau_bengio_and_effect_size_hand_computed():
    a = np.zeros(5)
    b = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, var 2.5; factor 1/5 + 20/80 = 0.45; se = sqrt(0.45 * 2.5) = sqrt(1.125); t = 3/se = 2 sqrt 2.
    r = paired_comparison(a, b, n_train=80, n_test=20, n_boot=1000)
    assert r["nb_t"] == pytest.approx(2 * math.sqrt(2))
    assert r["nb_p"] == pytest.approx(0.04742, abs=1e-4)  # two-sided t(4) at 2.8284
    assert r["t"] == pytest.approx(3 / math.sqrt(2.5 / 5))  # plain: 4.243, more confident
    half = stats.t.ppf(0.975, 4) * math.sqrt(1.125)
    assert (r["nb_ci_low"], r["nb_ci_high"]) == pytest.approx((3 - half, 3 + half))
    assert r["cohen_dz"] == pytest.approx(3 / math.sqrt(2.5))
    assert r["hedges_gz"] == pytest.approx(0.8 * 3 / math.sqrt(2.5))  # J = 1 - 3/15


def test_bootstrap_is_seeded_and_brackets_the_mean():
    a, b = sample(12, seed=3)
    r1 = paired_comparison(a, b, n_boot=2000, seed=7)
    r2 = paired_comparison(a, b, n_boot=2000, seed=7)
    r3 = paired_comparison(a, b, n_boot=2000, seed=8)
    assert (r1["boot_ci_low"], r1["boot_ci_high"]) == (r2["boot_ci_low"], r2["boot_ci_high"])
    assert r1["boot_ci_low"] != r3["boot_ci_low"]
    assert r1["boot_ci_low"] < r1["mean_diff"] < r1["boot_ci_high"]


@pytest.mark.parametrize(
    "a,b,expect_note",
    [
        (np.ones(6), np.ones(6), "zero"),            # identical arms
        (np.zeros(4), np.full(4, 0.1), "variance"),  # a constant shift
        (np.array([0.5]), np.array([0.7]), "n = 1"),
        (np.array([]), np.array([]), "n = 0"),
    ],
)
def test_degenerate_inputs_give_nan_with_a_note(a, b, expect_note):
    r = paired_comparison(a, b, n_train=40, n_test=10, n_boot=200)
    assert math.isnan(r["t_p"]) and math.isnan(r["nb_p"])
    assert any(expect_note in note for note in r["notes"])


def test_constant_shift_still_has_a_wilcoxon_p_and_a_point_bootstrap():
    r = paired_comparison(np.zeros(6), np.full(6, 0.1), n_boot=200)
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(np.full(6, 0.1)).pvalue)
    assert r["boot_ci_low"] == r["boot_ci_high"] == pytest.approx(0.1)


def test_nan_pairs_are_dropped():
    a, b = sample(8)
    a[2] = np.nan
    r = paired_comparison(a, b, n_boot=200)
    assert r["n"] == 7 and r["n_dropped"] == 1
    assert r["t_p"] == pytest.approx(stats.ttest_rel(np.delete(b, 2), np.delete(a, 2)).pvalue)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"a": np.zeros(3), "b": np.zeros(4)}, "shapes"),
        ({"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, "1-D"),
        ({"confidence": 1.5}, "confidence"),
        ({"n_train": 10}, "n_train"),
        ({"n_train": 0, "n_test": 5}, "n_train"),
        ({"n_boot": 10}, "n_boot"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"a": np.zeros(4), "b": np.ones(4)} | kwargs
    with pytest.raises(ValueError, match=match):
        paired_comparison(args.pop("a"), args.pop("b"), **args)


def test_holm_textbook_example():
    # Sorted: d .005, a .01, c .03, b .04 -> 4*.005=.02, 3*.01=.03, 2*.03=.06, max(.06, 1*.04)=.06.
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert list(adjusted) == ["a", "b", "c", "d"]  # caller's order kept


def test_holm_is_nan_safe_capped_and_validated():
    adjusted = holm({"x": 0.4, "y": float("nan"), "z": 0.3})
    assert math.isnan(adjusted["y"])
    assert adjusted["z"] == pytest.approx(0.6) and adjusted["x"] == pytest.approx(0.6)  # m = 2
    assert holm({"p": 0.9, "q": 0.8})["p"] == 1.0
    assert holm({}) == {}
    with pytest.raises(ValueError, match="'bad'"):
        holm({"bad": 1.5})


def test_intervals_of_bounded_metrics_stay_within_their_bounds():
    from raysynth.analysis.aggregate import clip_intervals

    cell = clip_intervals({"mean": 0.9, "nb_ci_low": 0.61, "nb_ci_high": 1.04, "ci_low": 0.7, "ci_high": 1.1}, "auc")
    assert cell["nb_ci_high"] == 1.0 and cell["ci_high"] == 1.0 and cell["nb_ci_low"] == 0.61
    assert cell["clipped"] == [0.0, 1.0]
    diff = clip_intervals({"mean_diff": 0.5, "nb_ci_low": -0.4, "nb_ci_high": 1.3}, "sensitivity", difference=True)
    assert diff["nb_ci_high"] == 1.0 and diff["clipped"] == [-1.0, 1.0]
    hd = clip_intervals({"nb_ci_low": -3.0, "nb_ci_high": 40.0}, "mean_hd95")  # unbounded: untouched
    assert hd == {"nb_ci_low": -3.0, "nb_ci_high": 40.0}
    inside = clip_intervals({"nb_ci_low": 0.2, "nb_ci_high": 0.8}, "auc")
    assert "clipped" not in inside
