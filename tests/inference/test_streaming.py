"""Window grid, body-window skipping and the streaming stitcher against MONAI's own sliding_window_inference."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.inference.sliding import WindowRunner, channels_last, model_channels_last
from medseg.inference.streaming import streaming_sliding_window
from medseg.inference.window_grid import BodyWindows, aligned_box, body_extent, grid_starts


def _net(cin: int = 1, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    # Two 3x3x3 convolutions: every output voxel depends on its neighbourhood, so a wrong window position or
    # a window cut at the wrong place changes the output.
    return torch.nn.Sequential(torch.nn.Conv3d(cin, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, classes, 3, padding=1)).eval()


def _stream(x: torch.Tensor, roi, overlap, net, classes: int = 3, mode: str = "gaussian", body=None) -> torch.Tensor:
    out = torch.full((classes, *x.shape[2:]), float("nan"))
    seen = torch.zeros(x.shape[-1], dtype=torch.int64)

    def emit(z0: int, logits: torch.Tensor) -> None:
        out[..., z0:z0 + logits.shape[-1]] = logits
        seen[z0:z0 + logits.shape[-1]] += 1

    streaming_sliding_window(x[0], roi, 3, WindowRunner(net, classes, body=body), classes, emit, overlap=overlap, mode=mode)
    assert torch.equal(seen, torch.ones_like(seen)), "every slice is emitted exactly once"
    return out


@pytest.mark.parametrize(("shape", "roi", "overlap", "mode"), [
    ((1, 1, 37, 30, 41), (16, 12, 10), 0.25, "gaussian"),
    ((1, 1, 20, 33, 9), (16, 16, 16), 0.5, "gaussian"),  # last axis shorter than the ROI: padded like MONAI
    ((1, 1, 25, 25, 30), (8, 8, 7), 0.0, "constant"),
])
def test_streaming_equals_monai_whole_volume(shape, roi, overlap, mode) -> None:
    torch.manual_seed(1)
    x = torch.randn(shape)
    net = _net()
    with torch.inference_mode():
        ref = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode=mode)[0]
    got = _stream(x, roi, overlap, net, mode=mode)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), float((got - ref).abs().max())


def test_grid_starts_are_monais_windows() -> None:
    size, roi = (100, 37, 64), (32, 37, 20)
    starts = grid_starts(size, roi, 0.25)
    assert starts == [[0, 24, 48, 68], [0], [0, 15, 30, 44]]  # 68 = 100 - 32 and 44 = 64 - 20: clamped last windows
    seen = []

    def record(x: torch.Tensor, coords) -> torch.Tensor:
        seen.extend(tuple(s.start for s in c[2:]) for c in coords)
        return x

    sliding_window_inference(torch.zeros(1, 1, *size), roi, 4, record, overlap=0.25, with_coord=True)
    assert sorted(seen) == sorted((a, b, c) for a in starts[0] for b in starts[1] for c in starts[2])


def _body_image(shape=(1, 1, 90, 80, 60)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    x = torch.randn(shape)
    body = torch.zeros(shape[2:], dtype=torch.bool)
    body[30:38, 28:34, 20:25] = True  # two blobs on a diagonal: the box around them has body-free windows
    body[52:60, 46:54, 36:42] = True
    x[0, 0][~body] = -3.0  # "air"
    return x, body


def test_aligned_crop_with_skipping_equals_whole_volume_inside_the_body() -> None:
    x, body = _body_image()
    roi, overlap, net = (16, 16, 12), 0.25, _net()
    with torch.inference_mode():
        ref = sliding_window_inference(x, roi, 4, net, overlap=overlap, mode="gaussian")[0]
        box = aligned_box(x.shape[2:], roi, overlap, body_extent(body))
        assert all(b.stop - b.start < n for b, n in zip(box, x.shape[2:])), "the body is small: every axis is cropped"
        crop = x[(slice(None), slice(None), *box)]
        wp = WindowRunner(net, 3, body=BodyWindows(body[box], roi))
        got = sliding_window_inference(crop, roi, 4, wp, overlap=overlap, mode="gaussian", with_coord=True)[0]
    assert wp.windows_skipped > 0 and wp.windows_run > 0
    inside = ref[(slice(None), *box)][:, body[box]]
    assert torch.allclose(got[:, body[box]], inside, atol=1e-6), float((got[:, body[box]] - inside).abs().max())
    # ... while a crop that is not on the grid (the plain body box) gives different windows and different numbers.
    tight = tuple(slice(lo, hi) for lo, hi in body_extent(body))
    with torch.inference_mode():
        other = sliding_window_inference(x[(slice(None), slice(None), *tight)], roi, 4, net, overlap=overlap)[0]
    assert not torch.allclose(other.flatten(1), ref[(slice(None), *tight)].flatten(1), atol=1e-4)


def test_streaming_with_skipping_equals_monai_inside_the_body() -> None:
    x, body = _body_image()
    roi, net = (16, 16, 12), _net()
    with torch.inference_mode():
        ref = sliding_window_inference(x, roi, 4, net, overlap=0.5, mode="gaussian")[0]
    got = _stream(x, roi, 0.5, net, body=BodyWindows(body, roi))
    assert torch.allclose(got[:, body], ref[:, body], atol=1e-5)
    assert not torch.allclose(got[:, ~body], ref[:, ~body], atol=1e-3), "windows outside the body were skipped"


def test_mirror_tta_per_window_matches_whole_image_flip_for_a_pointwise_net() -> None:
    # A 1x1x1 network commutes with flips: per-window mirroring must give back exactly the un-mirrored output.
    torch.manual_seed(3)
    net = torch.nn.Conv3d(1, 2, 1).eval()
    x = torch.randn(1, 1, 20, 18, 16)
    with torch.inference_mode():
        ref = sliding_window_inference(x, (8, 8, 8), 2, net, overlap=0.25)
        got = sliding_window_inference(x, (8, 8, 8), 2, WindowRunner(net, 2, mirror_axes=[0, 2]), overlap=0.25, with_coord=True)
    assert torch.allclose(got, ref, atol=1e-6)


def test_channels_last_network_gives_the_same_logits() -> None:
    net, x = _net(), torch.randn(2, 1, 16, 16, 12)
    with torch.inference_mode():
        ref = net(x)
        got = model_channels_last(_net(), 3)(channels_last(x))
    assert got.is_contiguous(memory_format=torch.channels_last_3d) or got.shape[1] == 1
    assert torch.allclose(got, ref, atol=1e-5)


def test_body_windows_pad_like_monai() -> None:
    body = torch.zeros(10, 20, 5, dtype=torch.bool)
    body[0, 0, 0] = True
    bw = BodyWindows(body, (16, 16, 8))  # axis 0 padded 3+3, axis 2 padded 1+2
    assert bw.body.shape == (16, 20, 8) and bool(bw.body[3, 0, 1])
    assert not bw.skips([slice(0, 16), slice(0, 16), slice(0, 8)]) and bw.skips([slice(0, 16), slice(4, 20), slice(0, 8)])


def test_body_window_test_and_extent_match_the_direct_reading() -> None:
    """The separable window test (a plane per last-axis range) and the two-pass extent agree with reading
    each window's block / each axis directly, for 3D windows and slice-wise (depth 1) windows."""
    g = torch.Generator().manual_seed(0)
    body = torch.rand(40, 30, 20, generator=g) < 0.002
    bw = BodyWindows(body, (16, 16, 8))
    answers = set()
    for x0, y0, z0 in itertools.product(range(0, 25, 3), range(0, 15, 3), range(0, 13, 2)):
        for depth in (1, 8):
            window = (slice(x0, x0 + 16), slice(y0, y0 + 16), slice(z0, z0 + depth))
            answers.add(bw.skips(window))
            assert bw.skips(window) == (not bool(body[window].any()))
    assert answers == {True, False}
    for shape, p in [((7, 9), 0.05), ((6, 8, 10), 0.01), ((6, 8, 10), 0.0), ((3, 6, 8, 10), 0.02)]:
        b = torch.rand(shape, generator=g) < p
        direct = []
        for axis in range(b.ndim):
            hit = torch.nonzero(b.any(dim=[a for a in range(b.ndim) if a != axis])).flatten()
            direct.append((int(hit[0]), int(hit[-1]) + 1) if hit.numel() else None)
        assert body_extent(b) == (None if None in direct else direct)
