"""History and per-case CSV rows (``medseg.engine.history``): written whole, atomically, and read back."""

from __future__ import annotations

import math
from pathlib import Path

from medseg.engine.history import read_rows_csv, write_rows_csv


def test_history_csv_is_whole_and_rereadable(tmp_path: Path) -> None:
    rows = [{"epoch": 0, "train_loss": 1.5}, {"epoch": 1, "train_loss": 1.2, "val_dice_liver": 0.5}]
    write_rows_csv(tmp_path / "h.csv", rows)
    write_rows_csv(tmp_path / "h.csv", rows)  # rewriting (a resumed epoch) never duplicates rows
    back = read_rows_csv(tmp_path / "h.csv")
    assert [r["epoch"] for r in back] == [0.0, 1.0] and back[1]["val_dice_liver"] == 0.5
    assert math.isnan(back[0]["val_dice_liver"])
    assert not list(tmp_path.glob(".*tmp*"))
