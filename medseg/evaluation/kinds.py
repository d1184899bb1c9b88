"""Evaluation per data kind (``medseg evaluate``): ``EVALUATORS`` maps a kind name (``data.kinds.DATA_KINDS``)
to its evaluator, so the caller looks the manifest's kind up instead of branching on it::

    kind = manifest_kind(load_manifest(path)).name
    evaluator = EVALUATORS.get(kind)()
    evaluator.check(options)  # options this kind cannot honour: MedsegError, before any work
    doc = evaluator.evaluate(pred_dir, path, out_dir, options)

* ``volume``: per-case per-organ metrics, summaries, plots, ``--compare`` and ``--lesions``
  (``evaluation.report.evaluate``);
* ``image2d``: pooled confusion-matrix scores of 2D images (``evaluation.images2d.evaluate_images``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.images2d.common import VOID
from medseg.registry import Registry

DEFAULT_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class EvaluationOptions:
    """What ``medseg evaluate`` can ask for; None means "this kind's default" (and "not given" to ``check``)."""

    split: str | None = None
    tolerance_mm: float | None = None  # volumes: NSD tolerance (default 2 mm)
    workers: int = 1
    compare: Path | None = None  # volumes: second prediction folder for paired tests
    lesions: bool = False  # volumes: lesion-wise detection metrics
    ignore_index: int | None = None  # 2D images: void label value (default 255)
    progress: bool = False


class Evaluator(ABC):
    """The evaluation of one data kind."""

    name: str

    def check(self, options: EvaluationOptions) -> None:
        """``MedsegError`` if ``options`` asks for something this kind cannot do (checked before any work)."""

    @abstractmethod
    def evaluate(
        self, pred_dir: Path, manifest_path: Path, out_dir: Path, options: EvaluationOptions
    ) -> dict[str, Any]:
        """Score ``pred_dir`` against the manifest, write the outputs to ``out_dir``, return the summary."""


EVALUATORS: Registry = Registry("evaluator")


@EVALUATORS.register("volume")
class VolumeEvaluator(Evaluator):
    """3D scans: ``evaluation.report.evaluate``."""

    name = "volume"

    def check(self, options: EvaluationOptions) -> None:
        if options.ignore_index is not None:
            raise MedsegError("--ignore-index applies to 2D image manifests only")

    def evaluate(
        self, pred_dir: Path, manifest_path: Path, out_dir: Path, options: EvaluationOptions
    ) -> dict[str, Any]:
        from medseg.evaluation.report import evaluate

        tolerance = DEFAULT_TOLERANCE_MM if options.tolerance_mm is None else options.tolerance_mm
        return evaluate(
            pred_dir,
            manifest_path,
            out_dir,
            split=options.split,
            tolerance_mm=tolerance,
            workers=options.workers,
            lesions=options.lesions,
            compare_dir=options.compare,
            progress=options.progress,
        )


@EVALUATORS.register("image2d")
class ImageEvaluator(Evaluator):
    """2D natural images: ``evaluation.images2d.evaluate_images``."""

    name = "image2d"

    def check(self, options: EvaluationOptions) -> None:
        if options.compare or options.lesions or options.tolerance_mm is not None:
            raise MedsegError("--compare, --lesions and --tolerance-mm are not supported for 2D image manifests")

    def evaluate(
        self, pred_dir: Path, manifest_path: Path, out_dir: Path, options: EvaluationOptions
    ) -> dict[str, Any]:
        from medseg.evaluation.images2d import evaluate_images

        return evaluate_images(
            pred_dir,
            manifest_path,
            out_dir,
            split=options.split,
            ignore_index=VOID if options.ignore_index is None else options.ignore_index,
            progress=options.progress,
        )


def evaluator_for(kind: str) -> Evaluator:
    """The evaluator of a data kind name (``KeyError`` listing the valid names)."""
    return EVALUATORS.get(kind)()
