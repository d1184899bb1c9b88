"""Serialising evaluation results: rows to CSV text, documents to strict JSON (NaN/inf become null), safe names."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

import numpy as np


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text, columns in the first row's order (NaN written as ``nan``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["case", "organ"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars made plain and non-finite floats made ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def safe_name(name: str) -> str:
    """A metric or organ name reduced to ``[A-Za-z0-9_.-]`` for file and MLflow metric names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unnamed"
