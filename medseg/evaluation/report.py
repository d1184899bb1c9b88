"""``medseg evaluate``: predictions vs ground truth, per case and per organ, with summaries.

Predictions are matched to manifest cases by id (``<id>.nii.gz``) and must have the ground truth's exact
geometry (shape, and affine within ``AFFINE_ATOL``): a mismatch is an error naming the case, never a
silent resample. Outputs (atomic): ``metrics_per_case.csv``, ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.validation import AFFINE_ATOL
from medseg.errors import InputError
from medseg.evaluation.metrics import per_class_metrics
from medseg.evaluation.stats import summarize
from medseg.io.atomic import write_json_atomic, write_text_atomic
from medseg.io.manifest import Manifest, load_manifest
from medseg.io.nifti import load_nifti, read_array, voxel_spacing

DEFAULT_METRICS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "volume_abs_error_ml", "volume_rel_error")


@dataclass(frozen=True)
class EvalJob:
    """One case to evaluate (picklable, for worker processes)."""

    case_id: str
    pred: Path
    truth: Path
    labels: tuple[tuple[str, int], ...]
    metrics: tuple[str, ...]
    tolerance_mm: float


def _evaluate_case(job: EvalJob) -> list[dict[str, Any]]:
    pred_img, truth_img = load_nifti(job.pred), load_nifti(job.truth)
    if pred_img.shape[:3] != truth_img.shape[:3]:
        raise InputError(job.pred, f"case {job.case_id}: prediction shape {pred_img.shape[:3]} != ground truth {truth_img.shape[:3]}")
    if not np.allclose(pred_img.affine, truth_img.affine, atol=AFFINE_ATOL):
        raise InputError(job.pred, f"case {job.case_id}: prediction affine differs from the ground truth's (different geometry)")
    pred = np.rint(read_array(pred_img, job.pred)).astype(np.int32)
    truth = np.rint(read_array(truth_img, job.truth)).astype(np.int32)
    spacing = voxel_spacing(truth_img.affine)[: truth.ndim]
    res = per_class_metrics(pred, truth, dict(job.labels), spacing, job.metrics, job.tolerance_mm)
    return [{"case": job.case_id, "organ": organ, **vals} for organ, vals in res.items()]


def match_cases(pred_dir: Path, manifest: Manifest, split: str | None) -> list[tuple[str, Path, Path]]:
    """(case id, prediction, truth) for every labelled manifest case that has a prediction."""
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "prediction folder not found")
    pairs = []
    for c in manifest.cases:
        if c.label is None or (split is not None and c.split != split):
            continue
        p = pred_dir / f"{c.id}.nii.gz"
        if p.is_file():
            pairs.append((c.id, p, manifest.label_path(c)))
    if not pairs:
        raise InputError(pred_dir, f"no predictions named <case id>.nii.gz match labelled cases of {manifest.path}")
    return pairs  # type: ignore[return-value]


def evaluate(pred_dir: str | Path, manifest_path: str | Path, out_dir: str | Path | None = None, split: str | None = None,
             metrics: Sequence[str] = DEFAULT_METRICS, tolerance_mm: float = 2.0, workers: int = 1) -> dict[str, Any]:
    """Evaluate a prediction folder; write CSV + JSON; return the summary dict."""
    pred_dir = Path(pred_dir)
    manifest = load_manifest(manifest_path)
    out = Path(out_dir) if out_dir else pred_dir / "evaluation"
    labels = tuple(manifest.foreground.items())
    jobs = [EvalJob(cid, p, t, labels, tuple(metrics), tolerance_mm) for cid, p, t in match_cases(pred_dir, manifest, split)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_evaluate_case, jobs))
    else:
        results = [_evaluate_case(j) for j in jobs]
    rows = [r for case_rows in results for r in case_rows]
    summary = summarize_rows(rows, metrics)
    summary_doc = {"manifest": str(manifest.path), "predictions": str(pred_dir.resolve()), "split": split,
                   "n_cases": len(jobs), "tolerance_mm": tolerance_mm, "organs": summary}
    write_text_atomic(out / "metrics_per_case.csv", rows_to_csv(rows))
    write_json_atomic(out / "summary.json", _json_safe(summary_doc))
    return summary_doc


def summarize_rows(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per organ, per metric: mean, median, std, 95% bootstrap CI, n (NaNs counted separately)."""
    organs = list(dict.fromkeys(r["organ"] for r in rows))
    return {o: {m: summarize([r[m] for r in rows if r["organ"] == o]) for m in metrics} for o in organs}


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a ``summary.json``."""
    return json.loads(Path(path).read_text())
