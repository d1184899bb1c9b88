"""Validation during training: sliding-window logits of whole preprocessed cases, scored per data kind.

One loop (``validate``) serves every data kind; what is measured is the kind's scorer, chosen by name from
``SCORERS`` (the ``data.kind`` names): volumes get per-case, per-organ Dice / IoU (and HD95 in mm) averaged over
cases; 2D natural images get pixel accuracy, per-class IoU / Dice and mIoU pooled over every pixel of every image.

Each DDP rank validates its own share of the cases; the per-case rows are gathered so every rank returns
the same summary over *all* validation cases.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from medseg.config import InferenceConfig
from medseg.engine.plots import middle_slices
from medseg.inference.sliding import WindowRunner, window_logits
from medseg.io.nifti import voxel_spacing
from medseg.metrics.confusion import cm_scores, confusion_matrix, nanmean
from medseg.metrics.volumetric import hd95
from medseg.registry import Registry
from medseg.runtime import distributed as dist_utils
from medseg.runtime.device import Precision

View = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, truth, prediction slices for an overlay figure
SCORERS: Registry = Registry("validation scorer")
CM_KEY = "_confusion"  # per-case confusion matrix carried with an image row until the pooled summary


@dataclass
class ValResult:
    """Summary over all validation cases, per-case rows, and slices for overlay figures."""

    summary: dict[str, float]
    rows: list[dict[str, Any]]
    views: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    worst: list[tuple[int, float, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    """The lowest-scoring cases (``case_score``), worst first: (index in the split, score, image, truth, pred)."""


def case_score(row: Mapping[str, Any]) -> float:
    """A validation row's mean Dice (``dice_mean`` of an image row, else the mean of its per-organ Dice); a row
    with none (every organ absent from truth and prediction) counts as perfect, so it is never among the worst."""
    if "dice_mean" in row:
        value = float(row["dice_mean"])
    else:
        value = nanmean([float(v) for k, v in row.items() if k.startswith("dice_")])
    return value if np.isfinite(value) else 1.0


@dataclass(frozen=True)
class CaseInference:
    """How a validation case becomes logits: the network, the callable windows go through, window and settings."""

    model: torch.nn.Module
    network: Callable[[torch.Tensor], torch.Tensor]
    window: tuple[int, ...]
    inf: InferenceConfig
    device: torch.device
    precision: Precision
    num_classes: int

    def logits(self, item: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 sliding-window logits (1, C, ...) of one case, and its label (1, 1, ...) on the device."""
        image = item["image"].unsqueeze(0).to(self.device)
        label = item["label"].unsqueeze(0).to(self.device)
        runner = WindowRunner(self.network, self.num_classes)
        return window_logits(image, self.window, self.inf, runner, self.device, self.precision).float(), label


class Scorer(ABC):
    """What validation measures on one case and how the cases' rows become the summary."""

    def __init__(
        self,
        labels: Mapping[str, int],
        num_classes: int,
        loss_fn: torch.nn.Module,
        ignore_index: int | None = None,
        with_hd95: bool = False,
    ) -> None:
        self.labels, self.num_classes, self.loss_fn = dict(labels), num_classes, loss_fn
        self.ignore_index, self.with_hd95 = ignore_index, with_hd95

    @abstractmethod
    def score(self, item: Mapping[str, Any], logits: torch.Tensor, label: torch.Tensor) -> tuple[dict[str, Any], View]:
        """The case's row (``case``, ``val_loss`` and metrics) and the slices an overlay of it would show."""

    @abstractmethod
    def summary(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Summary over every validation case's row (all ranks)."""


@SCORERS.register("volume")
class OrganScorer(Scorer):
    """Volumes: Dice / IoU (and HD95 in mm) per organ and case, background excluded; summary = mean over cases."""

    def score(self, item: Mapping[str, Any], logits: torch.Tensor, label: torch.Tensor) -> tuple[dict[str, Any], View]:
        arg = logits.argmax(1, keepdim=True)
        pred, truth = one_hot(arg, self.num_classes), one_hot(label.long(), self.num_classes)
        dice = compute_dice(pred, truth, include_background=False, ignore_empty=False)[0].cpu().numpy()
        iou = compute_iou(pred, truth, include_background=False, ignore_empty=False)[0].cpu().numpy()
        row: dict[str, Any] = {"case": item["id"], "val_loss": float(self.loss_fn(logits, label))}
        pred_np, truth_np = arg[0, 0].cpu().numpy(), label[0, 0].cpu().numpy()
        spacing = voxel_spacing(np.asarray(item["image"].affine))[: pred_np.ndim]
        for name, value in self.labels.items():
            row[f"dice_{name}"] = float(dice[value - 1])
            row[f"iou_{name}"] = float(iou[value - 1])
            if self.with_hd95:
                row[f"hd95_{name}"] = hd95(pred_np == value, truth_np == value, spacing)
        return row, middle_slices(item["image"][0].cpu().numpy(), truth_np, pred_np)

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return summarize_organs(rows, list(self.labels), self.with_hd95)


@SCORERS.register("image2d")
class PixelScorer(Scorer):
    """2D images: one confusion matrix over the non-void pixels (``medseg.metrics.confusion``).

    Summary keys (every class counts, index 0 included: in natural images it is a real class such as VOC's
    background): ``val_pixel_accuracy``, ``val_iou_<class>``, ``val_dice_<class>``, ``val_miou`` (=
    ``val_iou_mean``) and ``val_dice_mean`` (the model-selection score), pooled over all validation pixels.
    Per-image rows carry the same metrics per image (NaN for a class absent from both image and prediction).
    """

    def score(self, item: Mapping[str, Any], logits: torch.Tensor, label: torch.Tensor) -> tuple[dict[str, Any], View]:
        pred_np = logits.argmax(1)[0].cpu().numpy()
        truth_np = label[0, 0].cpu().numpy()
        cm = confusion_matrix(pred_np, truth_np, self.num_classes, self.ignore_index)
        row = {
            "case": item["id"],
            "val_loss": float(self.loss_fn(logits, label)),
            **cm_scores(cm, self.labels),
            CM_KEY: cm,
        }
        grey = item["image"].float().mean(0).cpu().numpy()
        void = self.ignore_index
        shown_truth = np.where(truth_np == void, 0, truth_np) if void is not None else truth_np
        # overlay() shows arrays rotated by 90 degrees (the volume convention): undo it for photos
        return row, (np.rot90(grey, -1), np.rot90(shown_truth, -1), np.rot90(pred_np, -1))

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        if rows:
            out["val_loss"] = float(np.mean([r["val_loss"] for r in rows]))
            out.update(cm_scores(np.sum([r[CM_KEY] for r in rows], axis=0), self.labels, "val_"))
        return out


@torch.inference_mode()
def validate(run: CaseInference, cases: Iterable[Mapping[str, Any]], scorer: Scorer, n_views: int = 0) -> ValResult:
    """Score this rank's ``cases`` (dicts with image, label, id, index) and gather rows and views over ranks.

    Views (slices for overlay figures) are kept for the first ``n_views`` cases of the split and for the
    ``n_views`` lowest-scoring ones (``case_score``); only those stay in memory, never one per case.
    """
    run.model.eval()
    rows: list[dict[str, Any]] = []
    views: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    worst: list[tuple[float, int, View]] = []  # a max-heap by score (negated) of the n_views worst so far
    for item in cases:
        logits, label = run.logits(item)
        row, view = scorer.score(item, logits, label)
        rows.append(row)
        index = int(item["index"])
        if index < n_views:
            views.append((index, *view))
        if n_views:
            heapq.heappush(worst, (-case_score(row), -index, view))
            if len(worst) > n_views:
                heapq.heappop(worst)  # drops the best of the kept ones
    all_rows = [r for part in dist_utils.all_gather_objects(rows) for r in part]
    all_views = sorted((v for part in dist_utils.all_gather_objects(views) for v in part), key=lambda v: v[0])
    kept = [(-i, -s, *v) for part in dist_utils.all_gather_objects(worst) for s, i, v in part]
    all_worst = sorted(kept, key=lambda w: (w[1], w[0]))[:n_views]
    summary = scorer.summary(all_rows)
    return ValResult(summary, [{k: v for k, v in r.items() if k != CM_KEY} for r in all_rows], all_views, all_worst)


def summarize_organs(rows: list[dict[str, Any]], organs: list[str], with_hd95: bool) -> dict[str, float]:
    """Mean over cases per organ (NaN-aware) and the mean over organs, keyed ``val_<metric>_<organ>``."""
    summary: dict[str, float] = {}
    if not rows:
        return summary
    summary["val_loss"] = float(np.mean([r["val_loss"] for r in rows]))
    for metric in ("dice", "iou", *(("hd95",) if with_hd95 else ())):
        per = [nanmean([r[f"{metric}_{n}"] for r in rows]) for n in organs]
        for name, v in zip(organs, per, strict=True):
            summary[f"val_{metric}_{name}"] = v
        summary[f"val_{metric}_mean"] = nanmean(per)
    return summary
