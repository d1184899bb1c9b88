"""``window_grid`` against MONAI itself: the scan interval, the window starts, the crop that keeps the grid, and
the body-window test, each checked on the windows ``sliding_window_inference`` really produces (recorded with
``with_coord=True``) or against hand-computed values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from medseg.inference.window_grid import BodyWindows, aligned_box, body_extent, grid_starts, roi_padding, scan_interval


def monai_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float,
                  image: torch.Tensor | None = None) -> list[tuple[tuple[int, int], ...]]:
    """The spatial ``(start, stop)`` of every window MONAI slides over an image of ``shape`` (padded coordinates);
    with ``image`` ((1, 1, *shape)) also records whether each window's (padded) content has any non-zero value."""
    seen: list = []

    def predictor(x: torch.Tensor, coords) -> torch.Tensor:
        for i, c in enumerate(coords):
            box = tuple((int(s.start), int(s.stop)) for s in c[2:])
            seen.append(box if image is None else (box, bool(x[i].any())))
        return torch.zeros_like(x)

    x = image if image is not None else torch.zeros((1, 1, *shape))
    sliding_window_inference(x, roi, 3, predictor, overlap=overlap, mode="constant", with_coord=True)
    return seen


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99])
def test_scan_interval_equals_monais_private_one(overlap: float) -> None:
    for size, roi in itertools.product([1, 7, 16, 17, 31, 64, 97, 160], [1, 3, 10, 16, 32, 64, 96]):
        if size < roi:  # MONAI computes the interval on the padded image: never smaller than the ROI
            continue
        for dims in (1, 3):
            sizes, rois = (size, max(size, roi + 5), roi)[:dims], (roi, roi, roi)[:dims]
            want = _get_scan_interval(sizes, rois, dims, (overlap,) * dims)
            assert scan_interval(sizes, rois, overlap) == list(want), (sizes, rois, overlap)


def test_scan_interval_by_hand() -> None:
    assert scan_interval([100, 32, 50], [32, 32, 10], 0.5) == [16, 32, 5]  # the ROI's own size: one step of the ROI
    assert scan_interval([100], [3], 0.9) == [1]  # int(0.3) = 0 -> at least 1
    assert scan_interval([100], [10], 0.0) == [10]


@pytest.mark.parametrize(("shape", "roi", "overlap"), [
    ((100, 40, 12), (32, 16, 12), 0.5),
    ((50, 33, 9), (16, 16, 4), 0.25),
    ((20, 10, 7), (32, 16, 8), 0.5),  # every axis shorter than the ROI: padded, one window
    ((37, 29, 11), (10, 7, 3), 0.7),
    ((24, 24, 5), (12, 12, 1), 0.5),  # (H, W, 1) windows of a 2D net on a volume
])
def test_grid_starts_are_the_windows_monai_uses(shape, roi, overlap) -> None:
    windows = monai_windows(shape, roi, overlap)
    starts = grid_starts(shape, roi, overlap)
    for axis in range(3):
        assert starts[axis] == sorted({w[axis][0] for w in windows}), axis
    want = {tuple((s, s + r) for s, r in zip(combo, roi)) for combo in itertools.product(*starts)}
    assert set(windows) == want and len(windows) == len(want)  # a full product, every window once


def test_grid_starts_by_hand() -> None:
    # 100 with ROI 32 at overlap 0.5: step 16, the last window moved back to end at the edge (68 + 32 = 100)
    assert grid_starts([100, 32, 20], [32, 32, 32], 0.5) == [[0, 16, 32, 48, 64, 68], [0], [0]]


def test_roi_padding_by_hand() -> None:
    # last axis first, symmetric, the odd voxel after
    assert roi_padding((5, 10, 3), (8, 8, 8)) == [2, 3, 0, 0, 1, 2]
    assert roi_padding((9, 9), (8, 8)) == [0, 0, 0, 0]


def test_body_extent() -> None:
    m = np.zeros((6, 7, 8), bool)
    assert body_extent(m) is None
    m[1, 2, 3] = m[4, 5, 3] = m[2, 2, 7] = True
    assert body_extent(m) == [(1, 5), (2, 6), (3, 8)]
    assert body_extent(torch.as_tensor(m[..., 3])) == [(1, 5), (2, 6)]
    assert body_extent(np.array([0, 0, 1, 0, 1, 0], bool)) == [(2, 5)]


def test_aligned_box_by_hand() -> None:
    # starts 0, 16, 32, 48, 64, 68 (ROI 32): windows meeting [40, 50) start at 16..48 -> box [16, 80)
    box = aligned_box([100, 20, 64], [32, 32, 32], 0.5, [(40, 50), (3, 9), (0, 64)])
    assert box == (slice(16, 80), slice(0, 20), slice(0, 64))  # a short axis (MONAI pads it) is not cropped
    # reaching the last voxel keeps the clamped last window: the box ends at the image edge
    assert aligned_box([100], [32], 0.5, [(99, 100)]) == (slice(68, 100),)  # only 68 + 32 > 99


@pytest.mark.parametrize("seed", range(6))
def test_aligned_box_gets_the_whole_volume_windows_inside_it(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape, roi = (int(rng.integers(40, 90)), int(rng.integers(20, 50)), int(rng.integers(6, 20))), (16, 12, 8)
    overlap = float(rng.choice([0.25, 0.5, 0.6]))
    lo = [int(rng.integers(0, n - 2)) for n in shape]
    extent = [(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, shape)]
    box = aligned_box(shape, roi, overlap, extent)
    whole = monai_windows(shape, roi, overlap)
    cropped = monai_windows(tuple(b.stop - b.start for b in box), roi, overlap)
    assert all(b == slice(0, n) for b, n, r in zip(box, shape, roi) if n <= r)
    box = [slice(0, r) if n < r else b for b, n, r in zip(box, shape, roi)]  # padded axes: MONAI's coordinates
    inside = {tuple((s - b.start, e - b.start) for (s, e), b in zip(w, box)) for w in whole
              if all(b.start <= s and e <= b.stop for (s, e), b in zip(w, box))}
    assert set(cropped) == inside
    meeting = [w for w in whole if all(s < hi and e > lo_ for (s, e), (lo_, hi) in zip(w, extent))]
    assert meeting and all(all(b.start <= s and e <= b.stop for (s, e), b in zip(w, box)) for w in meeting)


@pytest.mark.parametrize(("shape", "roi"), [((30, 26, 14), (12, 10, 6)), ((9, 26, 5), (12, 10, 6)),
                                            ((20, 18, 6), (8, 8, 1))])
def test_body_windows_skip_exactly_the_windows_without_body(shape, roi) -> None:
    rng = np.random.default_rng(1)
    body = np.zeros(shape, bool)
    body[2:7, 3:9, 1:4] = True  # a blob in one corner, plus a few stray voxels
    body[tuple(rng.integers(0, n, 3) for n in shape)] = True
    bw = BodyWindows(body, roi)
    # MONAI pads the image itself: the windows it hands out tell whether they hold body
    recorded = monai_windows(shape, roi, 0.5, image=torch.as_tensor(body, dtype=torch.float32)[None, None])
    assert any(has for _, has in recorded) and not all(has for _, has in recorded)
    for window, has_body in recorded:
        assert bw.skips([slice(s, e) for s, e in window]) == (not has_body), window
