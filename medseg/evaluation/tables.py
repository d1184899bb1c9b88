"""Terminal tables (rich) of an evaluation summary and of a paired comparison."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

SHOWN = ("dice", "iou", "hd95", "assd", "nsd", "volume_abs_error_ml", "lesion_f1")
"""Metrics shown in the terminal when evaluated (all of them are in the CSV/JSON)."""


def _num(v: float | None) -> str:
    if v is None or v != v:
        return "nan"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def summary_table(doc: dict[str, Any], shown: Sequence[str] = SHOWN) -> Table:
    """Per organ: mean [95% CI] of each shown metric, with the count of undefined (NaN) cases."""
    metrics = [m for m in shown if m in doc.get("metrics", shown)]
    table = Table(title=f"per-organ metrics over {doc['n_cases']} cases: mean [95% CI] (NaN cases)")
    table.add_column("organ")
    for m in metrics:
        table.add_column(m, justify="right")
    for organ, per_metric in doc["organs"].items():
        cells = []
        for m in metrics:
            s = per_metric.get(m)
            if not s or s["mean"] is None or s["mean"] != s["mean"]:
                cells.append(f"- ({int(s['n_nan'])} NaN)" if s else "-")
                continue
            cell = f"{_num(s['mean'])} [{_num(s['ci_low'])}, {_num(s['ci_high'])}]"
            cells.append(cell + (f" ({int(s['n_nan'])} NaN)" if s.get("n_nan") else ""))
        table.add_row(organ, *cells)
    return table


def comparison_table(rows: Sequence[dict[str, Any]], shown: Sequence[str] = SHOWN) -> Table:
    """Per organ and shown metric: paired mean difference (pred - compare) [95% CI], p-value, n."""
    table = Table(title="paired comparison, --pred minus --compare: mean difference [95% CI], Wilcoxon p")
    for col, just in (
        ("organ", "left"),
        ("metric", "left"),
        ("pred", "right"),
        ("compare", "right"),
        ("difference [95% CI]", "right"),
        ("p", "right"),
        ("n (NaN)", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]  # the literals above are rich JustifyMethods
    for r in rows:
        if r["metric"] not in shown:
            continue
        p = r["p_value"]
        p_text = "nan" if p is None or p != p else (f"{p:.2g}" if p >= 1e-4 else "<1e-4")
        table.add_row(
            r["organ"],
            r["metric"],
            _num(r["mean_pred"]),
            _num(r["mean_compare"]),
            f"{_num(r['mean_diff'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]",
            p_text,
            f"{r['n']}" + (f" ({r['n_nan']})" if r["n_nan"] else ""),
        )
    return table


def print_summary(doc: dict[str, Any]) -> None:
    """Print an evaluation summary (volumes or 2D images), its comparison and its notes to stdout."""
    import sys

    from rich.console import Console

    from medseg.evaluation.images2d import summary_table as image_table

    console = Console() if sys.stdout.isatty() else Console(width=200)  # logs and pipes: do not wrap at 80
    console.print(image_table(doc) if doc.get("kind") == "image2d" else summary_table(doc))
    if doc.get("comparison"):
        console.print(comparison_table(doc["comparison"]))
    for note in doc.get("notes", []):
        console.print(f"note: {note}", highlight=False)
