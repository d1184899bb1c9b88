"""Pure metric functions (arrays + voxel spacing in, numbers out) and case statistics.

``volumetric`` holds overlap, surface-distance and volume metrics and ``per_class_metrics``; ``lesions`` holds
lesion-wise detection metrics; ``stats`` summarizes per-case values with bootstrap intervals.
"""

from medseg.metrics.lesions import label_lesions, lesion_metrics
from medseg.metrics.stats import bootstrap_mean_ci, paired_comparison, summarize
from medseg.metrics.volumetric import (
    METRICS,
    assd,
    dice,
    hd95,
    iou,
    nsd,
    per_class_metrics,
    pixel_accuracy,
    precision,
    recall,
    surface_distances,
    surface_voxels,
    volume_error,
    volume_ml,
)

__all__ = [
    "METRICS",
    "assd",
    "bootstrap_mean_ci",
    "dice",
    "hd95",
    "iou",
    "label_lesions",
    "lesion_metrics",
    "nsd",
    "paired_comparison",
    "per_class_metrics",
    "pixel_accuracy",
    "precision",
    "recall",
    "summarize",
    "surface_distances",
    "surface_voxels",
    "volume_error",
    "volume_ml",
]
