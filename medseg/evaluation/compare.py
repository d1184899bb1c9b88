"""Paired comparison of two prediction folders scored on the same cases (``medseg evaluate --compare``).

Cases are paired by id. For each organ and metric the difference is ``pred - compare`` (positive Dice
difference: ``--pred`` overlaps better; positive HD95 difference: ``--pred`` is further off), with a 95%
bootstrap CI of the mean difference and a two-sided Wilcoxon signed-rank p-value
(``medseg.metrics.stats.paired_comparison``). Pairs where either value is NaN are dropped and counted
in ``n_nan``. p-values are per test, not corrected for the number of organs x metrics compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.evaluation.outputs import json_safe, rows_to_csv
from medseg.io.atomic import write_json_atomic, write_text_atomic
from medseg.metrics.confusion import nanmean
from medseg.metrics.stats import paired_comparison

COLUMNS = (
    "organ",
    "metric",
    "n",
    "n_nan",
    "mean_pred",
    "mean_compare",
    "mean_diff",
    "median_diff",
    "ci_low",
    "ci_high",
    "p_value",
)


@dataclass
class Comparison:
    """Rows of ``compare.csv`` and how the cases paired up."""

    rows: list[dict[str, Any]]
    n_paired_cases: int
    only_a: list[str]
    only_b: list[str]


def compare_rows(
    rows_a: Sequence[dict[str, Any]],
    rows_b: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Paired differences ``a - b`` per organ and metric over the cases both row sets have."""
    index_b = {(r["case"], r["organ"]): r for r in rows_b}
    cases_a = list(dict.fromkeys(r["case"] for r in rows_a))
    cases_b = list(dict.fromkeys(r["case"] for r in rows_b))
    common = set(cases_a) & set(cases_b)
    organs = list(dict.fromkeys(r["organ"] for r in rows_a))
    out = []
    for organ in organs:
        pairs = [
            (r, index_b[(r["case"], organ)])
            for r in rows_a
            if r["organ"] == organ and r["case"] in common and (r["case"], organ) in index_b
        ]
        for m in metrics:
            a = np.asarray([ra[m] for ra, _ in pairs], dtype=float)
            b = np.asarray([rb[m] for _, rb in pairs], dtype=float)
            res = paired_comparison(a, b, n_boot=n_boot, seed=seed)
            both = ~(np.isnan(a) | np.isnan(b))
            out.append(
                {
                    "organ": organ,
                    "metric": m,
                    "n": int(res["n"]),
                    "n_nan": int(res["n_nan"]),
                    "mean_pred": nanmean(a[both]),
                    "mean_compare": nanmean(b[both]),
                    **{k: res[k] for k in ("mean_diff", "median_diff", "ci_low", "ci_high", "p_value")},
                }
            )
    return Comparison(
        out, len(common), [c for c in cases_a if c not in common], [c for c in cases_b if c not in common]
    )


def write_comparison(out_dir: str | Path, comparison: Comparison, pred: str, compare: str) -> list[Path]:
    """``compare.csv`` (one row per organ x metric) and ``compare.json`` (the same plus how cases paired)."""
    out_dir = Path(out_dir)
    doc = {
        "difference": "pred - compare",
        "predictions": pred,
        "compare_predictions": compare,
        "n_paired_cases": comparison.n_paired_cases,
        "only_in_pred": comparison.only_a,
        "only_in_compare": comparison.only_b,
        "test": "two-sided Wilcoxon signed-rank (scipy), 95% percentile bootstrap CI of the mean difference",
        "rows": comparison.rows,
    }
    return [
        write_text_atomic(out_dir / "compare.csv", rows_to_csv(comparison.rows)),
        write_json_atomic(out_dir / "compare.json", json_safe(doc)),
    ]
