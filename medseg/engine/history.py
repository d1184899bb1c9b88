"""Per-epoch metric history and per-case rows as CSV, always written whole and atomically.

``history.csv`` is rebuilt from the checkpoint's history every epoch instead of appended to, so a run that
was killed after logging an epoch but before checkpointing it never shows that epoch twice.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from medseg.io.atomic import write_text_atomic


def write_rows_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write dict rows as CSV; columns are the union of the rows' keys in first-seen order."""
    if not rows:
        return
    fields: dict[str, None] = {}
    for r in rows:
        fields.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), restval="")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(Path(path), buf.getvalue())


def read_rows_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by ``write_rows_csv``; numeric cells become floats, empty cells NaN, others stay text."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def _cell(v: str | None) -> Any:
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except ValueError:
        return v
