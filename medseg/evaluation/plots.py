"""Box plots of per-case metrics: one PNG per metric, one box per organ (matplotlib, Agg canvas).

Undefined values (NaN) are left out of the box and counted under the organ's name, so a reader sees how
many cases each box stands on. PNGs are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.evaluation.outputs import safe_name
from medseg.io.atomic import atomic_path

_UNITS = {"hd95": "mm", "assd": "mm", "volume_pred_ml": "ml", "volume_truth_ml": "ml", "volume_abs_error_ml": "ml"}


def boxplot_png(rows: Sequence[dict[str, Any]], metric: str, path: str | Path, title: str | None = None) -> Path:
    """Write one box plot of ``metric`` over cases, a box per organ (organs in first-seen order)."""
    # The object API with an explicit Agg canvas, not pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    organs = list(dict.fromkeys(r["organ"] for r in rows))
    data, ticks = [], []
    for organ in organs:
        vals = np.asarray([r[metric] for r in rows if r["organ"] == organ], dtype=float)
        finite = vals[np.isfinite(vals)]
        n_nan = vals.size - finite.size
        data.append(finite)
        ticks.append(f"{organ}\nn={finite.size}" + (f", {n_nan} NaN" if n_nan else ""))
    fig = Figure(figsize=(max(4.0, 1.3 * len(organs) + 1.5), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(1, len(organs) + 1)
    keep = [i for i, d in enumerate(data) if d.size]  # matplotlib cannot draw a box of nothing
    if keep:
        ax.boxplot([data[i] for i in keep], positions=positions[keep], widths=0.5, showmeans=True)
        for i in keep:  # the cases themselves, jittered, over the box
            jitter = np.random.default_rng(i).uniform(-0.12, 0.12, data[i].size)
            ax.plot(positions[i] + jitter, data[i], "o", ms=3, alpha=0.5, color="0.3")
    ax.set_xticks(positions, ticks)
    ax.set_xlim(0.4, len(organs) + 0.6)
    unit = _UNITS.get(metric)
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
    ax.set_title(title or f"{metric} per case")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_boxplots(rows: Sequence[dict[str, Any]], metrics: Sequence[str], out_dir: str | Path) -> list[Path]:
    """``out_dir/boxplot_<metric>.png`` for every metric; returns the paths."""
    return [boxplot_png(rows, m, Path(out_dir) / f"boxplot_{safe_name(m)}.png") for m in metrics]
