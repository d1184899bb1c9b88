"""Tests for medseg.metrics.stats: summaries, bootstrap intervals, paired Wilcoxon comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics.stats import bootstrap_mean_ci, paired_comparison, summarize


def test_summarize_hand_values_and_nan_count() -> None:
    out = summarize([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert out["mean"] == pytest.approx(2.5)
    assert out["median"] == pytest.approx(2.5)
    assert out["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof=1
    assert out["n"] == 4 and out["n_nan"] == 1
    assert 1.0 <= out["ci_low"] <= out["mean"] <= out["ci_high"] <= 4.0


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    values = np.random.default_rng(3).normal(size=50)
    assert summarize(values, seed=7) == summarize(values, seed=7)
    assert summarize(values, seed=7)["ci_low"] != summarize(values, seed=8)["ci_low"]


def test_bootstrap_ci_is_an_interval_for_the_mean() -> None:
    # For n = 400 standard normal values the 95% interval of the mean is about 2 * 1.96 / 20 = 0.196 wide
    # (an interval for the data themselves would be ~3.9 wide).
    values = np.random.default_rng(0).normal(loc=5.0, size=400)
    low, high = bootstrap_mean_ci(values)
    assert low < values.mean() < high
    assert 0.15 < high - low < 0.25


def test_bootstrap_in_chunks_for_many_values() -> None:
    values = np.random.default_rng(1).normal(size=5000)  # more than one chunk of resamples
    low, high = bootstrap_mean_ci(values, n_boot=500)
    assert low < values.mean() < high
    assert 0.03 < high - low < 0.08  # 2 * 1.96 / sqrt(5000) = 0.055


def test_summarize_degenerate_inputs() -> None:
    none = summarize([float("nan"), float("nan")])
    assert none["n"] == 0 and none["n_nan"] == 2 and math.isnan(none["mean"]) and math.isnan(none["ci_low"])
    one = summarize([0.8])
    assert one["mean"] == one["ci_low"] == one["ci_high"] == 0.8 and math.isnan(one["std"])


def test_paired_comparison_clear_shift() -> None:
    rng = np.random.default_rng(0)
    b = rng.uniform(0.6, 0.8, size=30)
    a = b + 0.05 + rng.normal(scale=0.01, size=30)
    out = paired_comparison(a, b)
    assert out["p_value"] < 1e-6  # all 30 differences positive: exact p = 2 / 2**30
    assert out["mean_diff"] == pytest.approx(np.mean(a - b))
    assert 0.0 < out["ci_low"] < out["mean_diff"] < out["ci_high"]
    assert out["n"] == 30


def test_paired_comparison_hand_computed_wilcoxon_and_nan_pairs() -> None:
    a = [2.0, 4.0, 6.0, 8.0, 10.0, float("nan")]
    b = [1.0, 2.0, 3.0, 4.0, 5.0, 1.0]
    out = paired_comparison(a, b)
    # differences 1..5 all positive: exact two-sided p = 2 * (1 / 2**5)
    assert out["p_value"] == pytest.approx(2 / 32)
    assert out["mean_diff"] == pytest.approx(3.0) and out["median_diff"] == pytest.approx(3.0)
    assert out["n"] == 5 and out["n_nan"] == 1


def test_paired_comparison_identical_scores() -> None:
    out = paired_comparison([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert out["p_value"] == 1.0 and out["mean_diff"] == 0.0
    assert out["ci_low"] == out["ci_high"] == 0.0


def test_paired_comparison_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1.0, 2.0], [1.0])
