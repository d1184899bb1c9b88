"""MLflow metric names grouped into the sections MLflow's UI shows together.

medseg computes metrics under flat names (``train_loss``, ``val_dice_liver``, ``eval_hd95_kidney_mean``: the
columns of ``history.csv`` and the keys of every summary). MLflow's run page groups charts by the part of a metric
key before its last ``/``, so a flat name is one chart in one long list. At the tracking boundary each flat name is
given a section (``mlflow_key``):

=============================  ==============================  =========================
flat (history.csv, summaries)   MLflow                          UI section
=============================  ==============================  =========================
``train_loss``, ``val_loss``    ``loss/train``, ``loss/val``    loss
``lr``, ``time_epoch_s``        ``train/lr``, ...               train
``val_dice_liver``              ``val_dice/liver``              val_dice (one per metric)
``val_pixel_accuracy``          ``val/pixel_accuracy``          val
``eval_hd95_liver_mean``        ``eval_hd95/liver_mean``        eval_hd95
``eval_compare_dice_liver_..``  ``eval_compare_dice/liver_..``  eval_compare_dice
``eval_per_image_miou_mean``    ``eval_per_image/miou_mean``    eval_per_image
=============================  ==============================  =========================

Runs logged before sections existed carry the flat names; readers (``medseg runs compare``, the review notebook)
look a metric up under both (``run_metric``, ``metric_history``), and a resumed old run logs its epochs again
under the new names (its ``logged_steps`` finds none of them), so it migrates itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCALARS: dict[str, str] = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "train/lr",
    "time_epoch_s": "train/time_epoch_s",
    "time_data_fraction": "train/time_data_fraction",
    "val_pixel_accuracy": "val/pixel_accuracy",
    "val_miou": "val/miou",
    "eval_pixel_accuracy": "eval/pixel_accuracy",
    "eval_miou": "eval/miou",
}
"""Flat names with a fixed MLflow name."""

METRIC_TOKENS: tuple[str, ...] = (
    "volume_abs_error_ml",
    "volume_truth_ml",
    "volume_pred_ml",
    "volume_rel_error",
    "precision",
    "recall",
    "dice",
    "iou",
    "hd95",
    "assd",
    "nsd",
)
"""Metric names that may carry underscores, longest first (``medseg.metrics.volumetric.METRICS``, checked by a
test): ``val_<metric>_<rest>`` is cut after the metric, not after its first word."""

PHASES = ("val", "eval")
_FLAT_OF = {v: k for k, v in SCALARS.items()}


def _sectioned(prefix: str, rest: str) -> str | None:
    """``<prefix>_<metric>/<rest after the metric>`` when ``rest`` starts with a known metric, else None."""
    for token in METRIC_TOKENS:
        if rest.startswith(f"{token}_") and len(rest) > len(token) + 1:
            return f"{prefix}_{token}/{rest[len(token) + 1 :]}"
    return None


def mlflow_key(flat: str) -> str:
    """The MLflow name of a flat metric name (names with a ``/`` and names of no section are returned as given)."""
    if "/" in flat:
        return flat
    if flat in SCALARS:
        return SCALARS[flat]
    for phase in PHASES:
        if not flat.startswith(f"{phase}_"):
            continue
        rest = flat[len(phase) + 1 :]
        if rest.startswith("per_image_"):  # statistics over images of 2D evaluation: one section
            return f"{phase}_per_image/{rest.removeprefix('per_image_')}"
        if rest.startswith("compare_"):  # evaluation's paired comparison: a section per metric
            inner = rest.removeprefix("compare_")
            return _sectioned(f"{phase}_compare", inner) or f"{phase}_compare/{inner}"
        return _sectioned(phase, rest) or flat
    return flat


def flat_key(key: str) -> str:
    """The flat name of an MLflow metric name, old (flat) or new (sectioned)."""
    if key in _FLAT_OF:
        return _FLAT_OF[key]
    return key.replace("/", "_", 1)


def flat_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's ``data.metrics`` under flat names, whichever names it was logged with (sectioned wins)."""
    out = {flat_key(k): v for k, v in metrics.items() if "/" not in k}
    out.update({flat_key(k): v for k, v in metrics.items() if "/" in k})
    return out


def run_metric(metrics: Mapping[str, float], flat: str) -> float | None:
    """The latest value of the flat metric ``flat`` in a run's ``data.metrics`` (new name first, then old)."""
    for key in (mlflow_key(flat), flat):
        if key in metrics:
            return float(metrics[key])
    return None


def metric_history(client: Any, run_id: str, flat: str) -> list[Any]:
    """``client.get_metric_history`` of the flat metric ``flat`` under its new name, else its old one."""
    history = client.get_metric_history(run_id, mlflow_key(flat))
    if not history and mlflow_key(flat) != flat:
        history = client.get_metric_history(run_id, flat)
    return list(history)
