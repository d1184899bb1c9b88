"""Sliding-window validation of whole preprocessed volumes: per-case, per-organ Dice / IoU (and HD95 in mm);
``validate_images`` does the same for whole 2D natural images with pooled pixel accuracy, IoU, mIoU, Dice.

Each DDP rank validates its own share of the cases; the per-case rows are gathered so every rank returns
the same summary over *all* validation cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from medseg.config import InferenceConfig
from medseg.engine import distributed as dist_utils
from medseg.engine.device import Precision
from medseg.engine.plots import middle_slices
from medseg.evaluation.metrics import hd95
from medseg.io.nifti import voxel_spacing


@dataclass
class ValResult:
    """Summary over all validation cases, per-case rows, and slices for overlay figures."""

    summary: dict[str, float]
    rows: list[dict[str, Any]]
    views: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass(frozen=True)
class CaseInference:
    """How a validation case becomes logits: the network, its sliding-window predictor, window and settings."""

    model: torch.nn.Module
    predictor: Callable[[torch.Tensor], torch.Tensor]
    window: tuple[int, ...]
    inf: InferenceConfig
    device: torch.device
    precision: Precision

    def logits(self, item: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 sliding-window logits (1, C, ...) of one case, and its label (1, 1, ...) on the device."""
        image = item["image"].unsqueeze(0).to(self.device)
        label = item["label"].unsqueeze(0).to(self.device)
        with self.precision.autocast(self.device):
            logits = sliding_window_inference(image, self.window, self.inf.sw_batch_size, self.predictor,
                                              overlap=self.inf.overlap, mode=self.inf.blend_mode)
        return logits.float(), label


@torch.inference_mode()
def validate(
    run: CaseInference,
    cases: Iterable[Mapping[str, Any]],
    labels: Mapping[str, int],
    num_classes: int,
    loss_fn: torch.nn.Module,
    with_hd95: bool = False,
    n_views: int = 0,
) -> ValResult:
    """Validate this rank's ``cases`` (dicts with image, label, id, index) and gather over ranks."""
    run.model.eval()
    rows: list[dict[str, Any]] = []
    views: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for item in cases:
        logits, label = run.logits(item)
        arg = logits.argmax(1, keepdim=True)
        pred, truth = one_hot(arg, num_classes), one_hot(label.long(), num_classes)
        dice = compute_dice(pred, truth, include_background=False, ignore_empty=False)[0].cpu().numpy()
        iou = compute_iou(pred, truth, include_background=False, ignore_empty=False)[0].cpu().numpy()
        row: dict[str, Any] = {"case": item["id"], "val_loss": float(loss_fn(logits, label))}
        pred_np, truth_np = arg[0, 0].cpu().numpy(), label[0, 0].cpu().numpy()
        spacing = voxel_spacing(np.asarray(item["image"].affine))[: pred_np.ndim]
        for name, value in labels.items():
            row[f"dice_{name}"] = float(dice[value - 1])
            row[f"iou_{name}"] = float(iou[value - 1])
            if with_hd95:
                row[f"hd95_{name}"] = hd95(pred_np == value, truth_np == value, spacing)
        rows.append(row)
        if int(item["index"]) < n_views:
            img = item["image"][0].cpu().numpy()
            views.append((int(item["index"]), *middle_slices(img, truth_np, pred_np)))
    all_rows = [r for part in dist_utils.all_gather_objects(rows) for r in part]  # type: ignore[union-attr]
    all_views = sorted((v for part in dist_utils.all_gather_objects(views) for v in part), key=lambda v: v[0])  # type: ignore[union-attr]
    return ValResult(summarize(all_rows, list(labels), with_hd95), all_rows, all_views)


def summarize(rows: list[dict[str, Any]], organs: list[str], with_hd95: bool) -> dict[str, float]:
    """Mean over cases per organ (NaN-aware) and the mean over organs, keyed ``val_<metric>_<organ>``."""
    summary: dict[str, float] = {}
    if not rows:
        return summary
    summary["val_loss"] = float(np.mean([r["val_loss"] for r in rows]))
    for metric in ("dice", "iou", *(("hd95",) if with_hd95 else ())):
        per = [_nanmean([r[f"{metric}_{n}"] for r in rows]) for n in organs]
        for name, v in zip(organs, per, strict=True):
            summary[f"val_{metric}_{name}"] = v
        summary[f"val_{metric}_mean"] = _nanmean(per)
    return summary


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


@torch.inference_mode()
def validate_images(
    run: CaseInference,
    cases: Iterable[Mapping[str, Any]],
    labels: Mapping[str, int],
    num_classes: int,
    loss_fn: torch.nn.Module,
    ignore_index: int | None = None,
    n_views: int = 0,
) -> ValResult:
    """Validate whole 2D images (``(C, H, W)``): metrics pooled over all pixels of all validation images.

    Summary keys (every class counts, index 0 included: in natural images it is a real class such as
    VOC's background): ``val_pixel_accuracy``, ``val_iou_<class>``, ``val_dice_<class>``, ``val_miou``
    (= ``val_iou_mean``) and ``val_dice_mean`` (the model-selection score), all from one confusion
    matrix over the non-void pixels (see ``medseg.evaluation.confusion``). Per-image rows carry the same
    metrics per image (NaN for a class absent from both the image and its prediction).
    """
    from medseg.evaluation.confusion import cm_scores, confusion_matrix

    run.model.eval()
    rows: list[dict[str, Any]] = []
    cms: list[np.ndarray] = []
    views: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for item in cases:
        logits, label = run.logits(item)
        pred_np = logits.argmax(1)[0].cpu().numpy()
        truth_np = label[0, 0].cpu().numpy()
        cm = confusion_matrix(pred_np, truth_np, num_classes, ignore_index)
        cms.append(cm)
        rows.append({"case": item["id"], "val_loss": float(loss_fn(logits, label)), **cm_scores(cm, labels)})
        if int(item["index"]) < n_views:  # overlay() shows arrays rotated by 90 degrees (volume convention)
            grey = item["image"].float().mean(0).cpu().numpy()
            shown_truth = np.where(truth_np == ignore_index, 0, truth_np) if ignore_index is not None else truth_np
            views.append((int(item["index"]), *(np.rot90(a, -1) for a in (grey, shown_truth, pred_np))))
    all_rows = [r for part in dist_utils.all_gather_objects(rows) for r in part]  # type: ignore[union-attr]
    all_cms = [c for part in dist_utils.all_gather_objects(cms) for c in part]  # type: ignore[union-attr]
    all_views = sorted((v for part in dist_utils.all_gather_objects(views) for v in part), key=lambda v: v[0])  # type: ignore[union-attr]
    summary: dict[str, float] = {}
    if all_rows:
        summary["val_loss"] = float(np.mean([r["val_loss"] for r in all_rows]))
        summary.update(cm_scores(np.sum(all_cms, axis=0), labels, "val_"))
    return ValResult(summary, all_rows, all_views)
