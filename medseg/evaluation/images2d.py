"""``medseg evaluate`` for 2D natural images: ``<id>.png`` class-index predictions vs the manifest's labels.

The numbers are those of training-time validation (``medseg.engine.validation.validate_images``): one
confusion matrix pooled over every non-void pixel of every evaluated image (``medseg.metrics.confusion``),
then pixel accuracy, per-class IoU / Dice by class name, mIoU and mean Dice over the classes of the label map
(every class, index 0 included: in natural images it is a real class such as VOC's background). Ground-truth
pixels equal to ``ignore_index`` (void, VOC's 255) are left out, whatever was predicted there; where the label
map itself lists void (SegNet CamVid's 11), that entry is no class either (``Manifest.class_labels``).

Predictions are matched to labelled manifest cases by id, as for volumes (``report.match_cases``): a case
without a prediction is listed in ``missing_predictions`` and a note; no match at all is an ``InputError``.
Every pair's size is checked from the PNG headers before any metric is computed; a mismatch, or a value
outside the label map, is an ``InputError`` naming the file.

Outputs in ``out_dir`` (each written atomically):

* ``metrics_per_image.csv``: per image ``pixel_accuracy``, ``miou``, ``dice_mean``, ``iou_<class>``,
  ``dice_<class>`` (NaN where a class is in neither the image's truth nor its prediction);
* ``summary.json``: ``pooled`` (the numbers above from the pooled matrix), ``per_image`` (mean, median,
  std, 95% bootstrap CI, n, n_nan of the per-image pixel accuracy, mIoU and mean Dice; ``stats.summarize``),
  ``confusion_matrix`` (counts, rows = truth, columns = prediction, classes in index order), ``notes``;
* ``plots/confusion_matrix.png``: the row-normalised confusion matrix with class names on the axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg.errors import InputError
from medseg.evaluation.outputs import json_safe, rows_to_csv, safe_name
from medseg.evaluation.progress import Progress
from medseg.evaluation.report import match_cases
from medseg.io.atomic import atomic_path, remove_stale_temps, write_json_atomic, write_text_atomic
from medseg.io.images2d.common import INDEX_MODES, VOID, open_image, read_index_label
from medseg.io.manifest import Manifest, load_manifest
from medseg.metrics.confusion import cm_scores, confusion_matrix
from medseg.metrics.stats import summarize

PER_IMAGE_SUMMARIZED = ("pixel_accuracy", "miou", "dice_mean")
"""Per-image metrics whose distribution over images is summarized in ``summary.json`` and MLflow."""


# ---- matching and sizes ---------------------------------------------------------------------------
def match_images(
    pred_dir: Path, manifest: Manifest, split: str | None
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``(pairs, missing)`` as ``report.match_cases``, for ``<case id>.png`` predictions."""
    return match_cases(pred_dir, manifest, split, suffix=".png")


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header only: ``open_image`` decodes every pixel, which a size check
    of a whole folder before any metric does not need."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(path, f"not a readable image ({e.__class__.__name__}: {str(e)[:80]})") from None


def check_size(case_id: str, pred: Path, truth: Path) -> None:
    """``InputError`` naming the prediction unless it has its label's width and height (never resized)."""
    (pw, ph), (tw, th) = _header_size(pred), _header_size(truth)
    if (pw, ph) != (tw, th):
        raise InputError(
            pred,
            f"case {case_id}: prediction size {pw}x{ph} != ground truth size {tw}x{th} "
            "(not resized; predict at the image's own size)",
        )


# ---- one image ------------------------------------------------------------------------------------
def read_prediction(path: Path) -> np.ndarray:
    """A class-index prediction PNG (palette or greyscale, as ``medseg predict`` writes) as an int64 array."""
    im = open_image(path)
    if im.mode not in INDEX_MODES:
        raise InputError(path, f"prediction has mode {im.mode}; expected a class-index PNG (palette or greyscale)")
    return np.asarray(im).astype(np.int64)


def _outside(values: np.ndarray, allowed: set[int]) -> list[int]:
    """Distinct values not in ``allowed`` (at most 10; ``bincount``: linear time, ``np.unique`` sorts)."""
    if values.size == 0:
        return []
    if values.min() < 0:
        return sorted({int(v) for v in np.unique(values) if int(v) not in allowed})[:10]
    present = np.flatnonzero(np.bincount(values.ravel()))
    return [int(v) for v in present if int(v) not in allowed][:10]


def image_confusion(
    case_id: str, pred_path: Path, truth_path: Path, labels: Mapping[str, int], ignore_index: int | None
) -> np.ndarray:
    """Confusion matrix of one image over its non-void pixels; ``InputError`` naming the file on bad values."""
    truth = read_index_label(truth_path)  # the importers' reader
    pred = read_prediction(pred_path)
    if pred.shape != truth.shape:  # headers agreed, pixels must too
        raise InputError(
            pred_path,
            f"case {case_id}: prediction size {pred.shape[1]}x{pred.shape[0]} != "
            f"ground truth size {truth.shape[1]}x{truth.shape[0]}",
        )
    classes = set(labels.values())
    bad = _outside(truth, classes | ({ignore_index} if ignore_index is not None else set()))
    if bad:
        raise InputError(
            truth_path,
            f"label values {bad} not in the label map {sorted(classes)}"
            + (f" or void {ignore_index}" if ignore_index is not None else ""),
        )
    scored = pred[truth != ignore_index] if ignore_index is not None else pred
    bad = _outside(scored, classes)
    if bad:
        raise InputError(
            pred_path,
            f"case {case_id}: prediction values {bad} (on non-void pixels) not in the label map {sorted(classes)}",
        )
    return confusion_matrix(pred, truth, max(classes) + 1, ignore_index)


# ---- a folder ---------------------------------------------------------------------------------------
def evaluate_images(
    pred_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path | None = None,
    split: str | None = None,
    ignore_index: int | None = VOID,
    plots: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a folder of ``<id>.png`` predictions against a 2D-image manifest; write the outputs (see the
    module docstring) and return ``summary.json``'s content plus ``outputs`` (files written)."""
    pred_dir = Path(pred_dir)
    manifest = load_manifest(manifest_path)
    out = Path(out_dir) if out_dir else pred_dir / "evaluation"
    labels = dict(sorted(manifest.class_labels(ignore_index).items(), key=lambda kv: kv[1]))  # void is no class
    pairs, missing = match_images(pred_dir, manifest, split)
    for cid, p, t in pairs:  # headers only: a mismatch fails before any metric is computed
        check_size(cid, p, t)
    total = np.zeros((max(labels.values()) + 1,) * 2, np.int64)
    rows: list[dict[str, Any]] = []
    with Progress(progress, f"evaluating {pred_dir.name}", len(pairs)) as bar:
        for cid, p, t in pairs:
            cm = image_confusion(cid, p, t, labels, ignore_index)
            total += cm
            rows.append({"case": cid, **cm_scores(cm, labels)})
            bar.advance()
    pooled = cm_scores(total, labels)
    doc = {
        "kind": "image2d",
        "dataset_name": manifest.name,
        "dataset_fingerprint": manifest.fingerprint(),
        "manifest": str(manifest.path),
        "predictions": str(pred_dir.resolve()),
        "split": split,
        "n_images": len(rows),
        "n_cases": len(rows),
        "ignore_index": ignore_index,
        "metrics": ["pixel_accuracy", "miou", "dice_mean", "iou", "dice"],
        "classes": labels,
        "pooled": {
            "pixel_accuracy": pooled["pixel_accuracy"],
            "miou": pooled["miou"],
            "dice_mean": pooled["dice_mean"],
            "iou": {n: pooled[f"iou_{n}"] for n in labels},
            "dice": {n: pooled[f"dice_{n}"] for n in labels},
        },
        "per_image": {m: summarize([r[m] for r in rows]) for m in PER_IMAGE_SUMMARIZED},
        "confusion_matrix": total[np.ix_(list(labels.values()), list(labels.values()))].tolist(),
        "missing_predictions": missing,
        "notes": _notes(total, labels, missing),
    }
    remove_stale_temps(out, ["metrics_per_image.csv", "summary.json"])  # temp files of a killed evaluation
    remove_stale_temps(out / "plots", None)
    outputs = [
        write_text_atomic(out / "metrics_per_image.csv", rows_to_csv(rows)),
        write_json_atomic(out / "summary.json", json_safe(doc)),
    ]
    if plots:
        outputs.append(
            confusion_png(
                doc["confusion_matrix"],
                list(labels),
                out / "plots" / "confusion_matrix.png",
                title=f"confusion matrix over {len(rows)} images (rows: truth, normalised; grey: not in truth)",
            )
        )
    doc["outputs"] = [str(p) for p in outputs]
    return doc


def _notes(cm: np.ndarray, labels: Mapping[str, int], missing: list[str]) -> list[str]:
    notes = (
        [
            f"{len(missing)} labelled case(s) have no prediction and are not evaluated: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        ]
        if missing
        else []
    )
    truth_px, pred_px = cm.sum(1), cm.sum(0)
    absent = [n for n, v in labels.items() if truth_px[v] == 0]
    predicted = [n for n in absent if pred_px[labels[n]] > 0]
    if absent:
        notes.append(
            f"{len(absent)} class(es) absent from every evaluated ground truth: {', '.join(absent[:10])}"
            + (" ..." if len(absent) > 10 else "")
            + "; IoU/Dice NaN and left out of the means unless predicted"
            + (f" (predicted, so IoU 0 and counted: {', '.join(predicted[:10])})" if predicted else "")
        )
    return notes


# ---- plot, terminal table, MLflow names -------------------------------------------------------------
def confusion_png(cm: Any, names: list[str], path: str | Path, title: str = "confusion matrix") -> Path:
    """Write the row-normalised confusion matrix (rows truth, columns prediction) with class names on both
    axes; rows without truth pixels are grey. Cell values are printed up to 25 classes."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # object API: no global pyplot state
    from matplotlib.figure import Figure

    counts = np.asarray(cm, dtype=float)
    rows = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, counts / rows, np.nan)
    n = len(names)
    side = min(max(5.0, 0.32 * n + 3.0), 40.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["Blues"].with_extremes(bad="0.85")  # NaN rows (class not in any truth): grey
    im = ax.imshow(norm, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the truth row")
    font = 8 if n <= 30 else 5
    ax.set_xticks(np.arange(n), names, rotation=90, fontsize=font)
    ax.set_yticks(np.arange(n), names, fontsize=font)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if np.isfinite(norm[i, j]) and counts[i, j] > 0:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def summary_table(doc: dict[str, Any]) -> Any:
    """A rich table: pooled per-class IoU and Dice, then mIoU / mean Dice and pixel accuracy."""
    from rich.table import Table

    def num(v: float | None) -> str:
        return "nan" if v is None or v != v else f"{v:.3f}"

    p = doc["pooled"]
    table = Table(title=f"pooled over {doc['n_images']} images (void excluded)")
    for col in ("class", "IoU", "Dice"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name in doc["classes"]:
        table.add_row(name, num(p["iou"][name]), num(p["dice"][name]))
    table.add_section()
    table.add_row("mean (mIoU, mean Dice)", num(p["miou"]), num(p["dice_mean"]))
    table.add_row("pixel accuracy", num(p["pixel_accuracy"]), "")
    return table


def mlflow_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics of an image evaluation: ``eval_pixel_accuracy``, ``eval_miou``, ``eval_dice_mean``,
    ``eval_iou_<class>``, ``eval_dice_<class>`` (pooled) and ``eval_per_image_<metric>_<stat>``; NaN left out."""
    p = doc["pooled"]
    flat = {"eval_pixel_accuracy": p["pixel_accuracy"], "eval_miou": p["miou"], "eval_dice_mean": p["dice_mean"]}
    for m in ("iou", "dice"):
        flat.update({f"eval_{m}_{safe_name(name)}": v for name, v in p[m].items()})
    for m, stats in doc["per_image"].items():
        flat.update({f"eval_per_image_{m}_{stat}": v for stat, v in stats.items()})
    return {k: float(v) for k, v in flat.items() if v is not None and v == v}
