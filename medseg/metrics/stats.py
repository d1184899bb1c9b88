"""Summary statistics over cases: bootstrap confidence intervals and paired comparisons.

NaN values (e.g. HD95 of a case with an empty mask) are dropped and counted in ``n_nan``. Bootstrap
intervals are percentile intervals (2.5th and 97.5th percentiles of the resampled means) from
``numpy.random.default_rng(seed)``, so the same inputs and seed always give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

__all__ = ["bootstrap_mean_ci", "paired_comparison", "summarize"]

_CHUNK_ELEMENTS = 2_000_000  # resample indices drawn per chunk, to bound memory for large n


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (no NaNs): ``(low, high)``.

    Empty input gives ``(nan, nan)``; a single value ``v`` gives ``(v, v)``.
    """
    values = np.asarray(values, dtype=float)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = values.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    means = np.concatenate(
        [values[rng.integers(0, n, size=(min(rows, n_boot - i), n))].mean(axis=1) for i in range(0, n_boot, rows)]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean, median, sample std (ddof=1), 95% bootstrap CI of the mean, and counts, ignoring NaNs.

    Returns keys ``mean``, ``median``, ``std``, ``ci_low``, ``ci_high``, ``n`` (non-NaN values) and
    ``n_nan``. With no non-NaN values every statistic is NaN; with one, ``std`` is NaN and the CI is that
    value. ``inf`` is kept (and makes the mean inf), so callers should pass NaN for undefined cases.
    """
    arr = np.asarray(values, dtype=float).reshape(-1)
    nan = np.isnan(arr)
    x = arr[~nan]
    out = {"n": float(x.size), "n_nan": float(np.count_nonzero(nan))}
    if x.size == 0:
        return {"mean": np.nan, "median": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan, **out}
    low, high = bootstrap_mean_ci(x, n_boot=n_boot, seed=seed)
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "std": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
        **out,
    }


def paired_comparison(a: ArrayLike, b: ArrayLike, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Compare two methods scored on the same cases: paired difference ``a - b``.

    Pairs where either value is NaN are dropped (counted in ``n_nan``). Returns ``mean_diff``,
    ``median_diff``, ``ci_low`` / ``ci_high`` (95% percentile bootstrap of the mean paired difference,
    resampling cases), ``p_value`` (two-sided Wilcoxon signed-rank test, ``scipy.stats.wilcoxon`` with
    its default handling of zero differences), ``n`` and ``n_nan``. If every difference is zero the
    p-value is 1.0; with no usable pairs everything except the counts is NaN.

    Raises:
        ValueError: if ``a`` and ``b`` differ in length.
    """
    x, y = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired values must have the same length, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    out = {"n": float(d.size), "n_nan": float(np.count_nonzero(~keep))}
    if d.size == 0:
        nan = float("nan")
        return {"mean_diff": nan, "median_diff": nan, "ci_low": nan, "ci_high": nan, "p_value": nan, **out}
    low, high = bootstrap_mean_ci(d, n_boot=n_boot, seed=seed)
    # scipy warns (and in older versions raises) when every difference is zero; the answer is p = 1.
    p_value = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    return {
        "mean_diff": float(d.mean()),
        "median_diff": float(np.median(d)),
        "ci_low": low,
        "ci_high": high,
        "p_value": p_value,
        **out,
    }
