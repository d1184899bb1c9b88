"""Evaluation per data kind (``medseg.evaluation.kinds``): one evaluator per data kind, and the options each kind
refuses before any work (volumes: ``--ignore-index``; 2D images: ``--compare``, ``--lesions``, ``--tolerance-mm``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.data.kinds import DATA_KINDS
from medseg.errors import MedsegError
from medseg.evaluation.kinds import (
    EVALUATORS,
    EvaluationOptions,
    ImageEvaluator,
    VolumeEvaluator,
    evaluator_for,
)

IMAGE_ONLY = "--compare, --lesions and --tolerance-mm are not supported for 2D image manifests"


def test_one_evaluator_per_data_kind() -> None:
    assert EVALUATORS.names() == DATA_KINDS.names() == ["image2d", "volume"]
    for name in DATA_KINDS.names():
        assert evaluator_for(name).name == name
    assert isinstance(evaluator_for("volume"), VolumeEvaluator) and isinstance(evaluator_for("image2d"), ImageEvaluator)
    with pytest.raises(KeyError, match="unknown evaluator 'points'; valid names: image2d, volume"):
        evaluator_for("points")


@pytest.mark.parametrize("options", [
    EvaluationOptions(compare=Path("other_preds")),
    EvaluationOptions(lesions=True),
    EvaluationOptions(tolerance_mm=2.0),  # even the volumes' default: it was given
    EvaluationOptions(tolerance_mm=0.0),
], ids=["compare", "lesions", "tolerance", "tolerance_zero"])
def test_image_evaluation_refuses_volume_options(options: EvaluationOptions) -> None:
    with pytest.raises(MedsegError, match=f"^{IMAGE_ONLY}$"):
        ImageEvaluator().check(options)


def test_image_evaluation_takes_its_own_options() -> None:
    ImageEvaluator().check(EvaluationOptions(split="val", workers=4, ignore_index=11, progress=True))
    ImageEvaluator().check(EvaluationOptions())


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_volume_evaluation_refuses_ignore_index(ignore_index: int) -> None:
    with pytest.raises(MedsegError, match="^--ignore-index applies to 2D image manifests only$"):
        VolumeEvaluator().check(EvaluationOptions(ignore_index=ignore_index))


def test_volume_evaluation_takes_its_own_options() -> None:
    VolumeEvaluator().check(EvaluationOptions(split="val", tolerance_mm=1.0, workers=2, compare=Path("b"), lesions=True))
    VolumeEvaluator().check(EvaluationOptions())
