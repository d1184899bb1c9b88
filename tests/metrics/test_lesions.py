"""Tests for medseg.metrics.lesions: connectivity, split and merged lesions, min_overlap, empty cases."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.metrics.lesions import label_lesions, lesion_metrics

SHAPE = (20, 20, 20)


def _set(mask: np.ndarray, *ranges: tuple[int, int]) -> None:
    mask[tuple(slice(a, b) for a, b in ranges)] = True


@pytest.fixture
def case() -> tuple[np.ndarray, np.ndarray]:
    """Four truth lesions, four predicted components.

    T1 (4x4x6 = 96 voxels) is split into P1a (covers 64 = 2/3 of T1) and P1b (16 = 1/6 of T1), both
    inside T1. T2 and T3 (27 voxels each, two voxels apart) are merged by P2 (72 voxels: both plus the
    gap), so each is 3/8 of P2. T4 is missed. P5 is a false positive.
    """
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    _set(truth, (2, 6), (2, 6), (2, 8))  # T1
    _set(pred, (2, 6), (2, 6), (2, 6))  # P1a
    _set(pred, (2, 6), (2, 6), (7, 8))  # P1b, one empty slice away from P1a
    _set(truth, (10, 13), (2, 5), (2, 5))  # T2
    _set(truth, (15, 18), (2, 5), (2, 5))  # T3
    _set(pred, (10, 18), (2, 5), (2, 5))  # P2
    _set(truth, (10, 12), (10, 12), (10, 12))  # T4, missed
    _set(pred, (2, 4), (14, 16), (14, 16))  # P5, false positive
    return pred, truth


def test_split_and_merged_lesions_with_any_overlap(case: tuple[np.ndarray, np.ndarray]) -> None:
    pred, truth = case
    out = lesion_metrics(pred, truth)
    assert out["n_truth"] == 4 and out["n_pred"] == 4 and out["count_error"] == 0
    assert out["n_detected"] == 3  # T1 (split), T2, T3 (merged)
    assert out["n_correct"] == 3  # P1a, P1b, P2; not P5
    assert out["recall"] == pytest.approx(0.75)
    assert out["precision"] == pytest.approx(0.75)
    assert out["f1"] == pytest.approx(0.75)
    assert out["n_split"] == 1 and out["n_merged"] == 1


def test_min_overlap_fraction(case: tuple[np.ndarray, np.ndarray]) -> None:
    pred, truth = case
    half = lesion_metrics(pred, truth, min_overlap=0.5)
    assert half["recall"] == pytest.approx(3 / 4)  # T1 via P1a (2/3); T2, T3 fully covered by P2
    assert half["precision"] == pytest.approx(2 / 4)  # P2 is only 3/8 inside either truth lesion
    assert half["f1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    strict = lesion_metrics(pred, truth, min_overlap=0.7)
    assert strict["recall"] == pytest.approx(2 / 4)  # neither piece of the split T1 covers 70% of it
    assert strict["precision"] == pytest.approx(2 / 4)
    assert strict["n_split"] == 1 and strict["n_merged"] == 1  # counted from any overlap


def test_split_and_merge_show_in_count_error() -> None:
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    _set(truth, (2, 8), (2, 5), (2, 5))
    _set(pred, (2, 4), (2, 5), (2, 5))
    _set(pred, (6, 8), (2, 5), (2, 5))
    split = lesion_metrics(pred, truth)
    assert split["count_error"] == 1 and split["precision"] == 1.0 and split["recall"] == 1.0
    merged = lesion_metrics(truth, pred)  # roles swapped: two truths, one prediction
    assert merged["count_error"] == -1 and merged["n_merged"] == 1 and merged["f1"] == 1.0


def test_full_connectivity() -> None:
    corner = np.zeros((4, 4, 4), bool)
    corner[1, 1, 1] = corner[2, 2, 2] = True  # touch only at a corner: one lesion with 26-connectivity
    assert label_lesions(corner)[1] == 1
    diag = np.zeros((4, 4), bool)
    diag[0, 0] = diag[1, 1] = True  # 8-connectivity in 2D
    assert label_lesions(diag)[1] == 1
    apart = np.zeros((4, 4), bool)
    apart[0, 0] = apart[2, 2] = True
    out = lesion_metrics(apart, diag)
    assert out["n_pred"] == 2 and out["n_truth"] == 1 and out["n_correct"] == 1 and out["recall"] == 1.0


def test_empty_cases() -> None:
    empty = np.zeros((5, 5, 5), bool)
    one = empty.copy()
    one[2, 2, 2] = True
    both = lesion_metrics(empty, empty)
    assert both["precision"] == both["recall"] == both["f1"] == 1.0 and both["n_truth"] == 0
    for pred, truth in ((one, empty), (empty, one)):
        out = lesion_metrics(pred, truth)
        assert out["precision"] == out["recall"] == out["f1"] == 0.0
    assert lesion_metrics(one, empty)["count_error"] == 1


def test_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="min_overlap"):
        lesion_metrics(np.zeros((3, 3)), np.zeros((3, 3)), min_overlap=1.5)
