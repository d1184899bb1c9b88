"""Figures for the experiment record: learning curves and validation overlays (matplotlib, Agg backend).

Written as PNG files atomically into the run folder, then uploaded to MLflow by the trainer. matplotlib is
imported lazily with the non-interactive Agg backend, so a head-less GPU server never needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def learning_curve(history: Sequence[dict[str, float]], organs: Sequence[str], path: str | Path) -> Path:
    """Losses (left) and per-organ validation Dice with their mean (right) against the epoch number."""
    plt = _pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        pts = [(int(r["epoch"]) + 1, r[key]) for r in history if _finite(r.get(key))]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="o", ms=3, label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    if ax_loss.lines:
        ax_loss.legend(loc="best")
    for organ in [*organs, "mean"]:
        pts = [(int(r["epoch"]) + 1, r[f"val_dice_{organ}"]) for r in history if _finite(r.get(f"val_dice_{organ}"))]
        if pts:
            ax_dice.plot(*zip(*pts, strict=True), marker="o", ms=3, label=organ, lw=2.5 if organ == "mean" else 1.2)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice per organ", ylim=(0.0, 1.0))
    if ax_dice.lines:  # no validation yet: an empty panel, not a legend warning
        ax_dice.legend(loc="best")
    return _save(fig, Path(path))


def overlay(
    image: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int, path: str | Path, title: str = ""
) -> Path:
    """Three panels of one 2D slice: image, ground truth over it, prediction over it (one colour per class)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    shown = np.rot90(image)  # array axes (x, y) -> display rows/cols with anterior up
    for ax, mask, name in zip(axes, (None, truth, pred), ("image", "ground truth", "prediction"), strict=True):
        ax.imshow(shown, cmap="gray")
        if mask is not None:
            m = np.rot90(mask).astype(float)
            ax.imshow(
                np.ma.masked_where(m == 0, m),
                cmap=cmap,
                vmin=0,
                vmax=max(num_classes - 1, 1),
                alpha=0.45,
                interpolation="nearest",
            )
            for value in range(1, num_classes):
                if (m == value).any():
                    ax.contour(m == value, levels=[0.5], colors=[cmap(value)], linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def middle_slices(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial slice (last axis) with the most ground-truth foreground (middle slice if none) of 3D arrays."""
    fg = (truth > 0).reshape(-1, truth.shape[-1]).sum(0)
    z = int(fg.argmax()) if fg.any() else truth.shape[-1] // 2
    return image[..., z], truth[..., z], pred[..., z]


def _finite(v: Any) -> bool:
    try:
        return v is not None and bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False
