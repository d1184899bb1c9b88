"""``sliding``: the window function against MONAI's plain ``sliding_window_inference`` on the same input, mirrored
TTA against flips done by hand, body-window skipping exact on body voxels, and the 2D-net-on-volume adapter
against a slice-by-slice 2D call."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference

from medseg.config import InferenceConfig
from medseg.inference.sliding import BACKGROUND_LOGIT, SliceWise, WindowRunner, channels_last, network_fn, window_logits
from medseg.inference.window_grid import BodyWindows
from medseg.runtime.device import Precision

CPU, FP32 = torch.device("cpu"), Precision(None, False)


def conv3d(cin: int = 1, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A random 3x3x3 convolution: not mirror-symmetric, so a flip not undone shows."""
    torch.manual_seed(seed)
    return torch.nn.Conv3d(cin, classes, 3, padding=1).eval()


def image(shape=(1, 1, 30, 26, 14), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class CountingNet(torch.nn.Module):
    """Records the batch size of every call of the wrapped network."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.net(x)


def test_channels_last_layouts() -> None:
    x5, x4, x3 = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4)
    assert channels_last(x5).is_contiguous(memory_format=torch.channels_last_3d)
    assert channels_last(x4).is_contiguous(memory_format=torch.channels_last)
    assert not x5.is_contiguous(memory_format=torch.channels_last_3d)  # the check above means something
    assert torch.equal(channels_last(x5), x5) and torch.equal(channels_last(x4), x4)
    assert channels_last(x3) is x3


def test_slicewise_runs_the_2d_net_on_each_window_slice() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 9, 7, 1)
    out = SliceWise(net)(x)
    assert out.shape == (4, 3, 9, 7, 1)
    assert torch.allclose(out[..., 0], net(x[..., 0]), atol=1e-6)
    assert torch.allclose(SliceWise(net, layout_channels_last=True)(x), out, atol=1e-5)


class Deep(torch.nn.Module):
    """Deep-supervision style output: a list of heads, the full-resolution one first."""

    def forward(self, x):
        return [x + 1, x[..., ::2]]


def test_network_fn_takes_the_full_resolution_head() -> None:
    x = torch.zeros(1, 1, 4, 4, 4)
    assert torch.equal(network_fn(Deep(), 3)(x), x + 1)
    assert torch.equal(network_fn(Deep(), 2, input_dims=2)(x[..., 0]), x[..., 0] + 1)
    net = torch.nn.Conv2d(1, 2, 1)
    assert torch.allclose(network_fn(net, 2, input_dims=3)(x[..., :1]), net(x[..., 0]).unsqueeze(-1))  # SliceWise


def test_network_fn_takes_the_full_resolution_head_of_a_2d_net_on_volumes() -> None:
    x = torch.zeros(1, 1, 4, 4, 1)
    assert torch.equal(network_fn(Deep(), 2, input_dims=3)(x), x + 1)


def test_window_logits_equal_monais_plain_call() -> None:
    net, x = conv3d(), image()
    for inf in (InferenceConfig(), InferenceConfig(overlap=0.25, sw_batch_size=3, blend_mode="constant")):
        runner = WindowRunner(network_fn(net, 3), 3)
        with torch.no_grad():
            got = window_logits(x, (16, 12, 8), inf, runner, CPU, FP32)
            want = sliding_window_inference(x, (16, 12, 8), inf.sw_batch_size, net, overlap=inf.overlap,
                                            mode=inf.blend_mode)
        assert got.shape == (1, 3, 30, 26, 14)
        assert torch.allclose(got, want, atol=1e-6)
        assert runner.windows_skipped == 0 and runner.windows_run > 1


def test_mirrored_tta_is_the_mean_of_flipped_back_predictions() -> None:
    net, x = conv3d(), image((2, 1, 12, 10, 8))
    runner = WindowRunner(network_fn(net, 3), 3, mirror_axes=(0, 2))
    with torch.no_grad():  # one window covering the image: the runner's output is the TTA mean itself
        got = window_logits(x, (12, 10, 8), InferenceConfig(), runner, CPU, FP32)
        want = (net(x) + net(x.flip(2)).flip(2) + net(x.flip(4)).flip(4)) / 3
        plain = net(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the net is not flip-invariant: mirroring changed something


def test_body_window_skipping_is_exact_on_body_voxels() -> None:
    net, x = conv3d(), image((1, 1, 32, 30, 16))
    body = torch.zeros(32, 30, 16, dtype=torch.bool)
    body[3:10, 4:12, 2:7] = True
    inf, roi = InferenceConfig(sw_batch_size=4), (12, 12, 8)
    runner = WindowRunner(network_fn(net, 3), 3, body=BodyWindows(body, roi))
    with torch.no_grad():
        got = window_logits(x, roi, inf, runner, CPU, FP32)
        want = sliding_window_inference(x, roi, inf.sw_batch_size, net, overlap=inf.overlap, mode=inf.blend_mode)
    assert runner.windows_skipped > 0 and runner.windows_run > 0
    assert torch.allclose(got[:, :, body], want[:, :, body], atol=1e-5)
    # far from the body every window covering a voxel was skipped: the constant background logit
    far = got[0, :, 24:, 22:, 12:]
    assert torch.allclose(far[0], torch.full_like(far[0], BACKGROUND_LOGIT)) and torch.all(far[1:] == 0)

    # the raw-window test (any value above a threshold) skips the same windows as the mask of those values
    raw = torch.where(body, 5.0, -1.0)[None, None]
    by_mask = WindowRunner(network_fn(net, 3), 3, body=BodyWindows(raw[0, 0] > 0, roi))
    by_value = WindowRunner(network_fn(net, 3), 3, body_above=0.0)
    with torch.no_grad():
        a = window_logits(raw, roi, inf, by_mask, CPU, FP32)
        b = window_logits(raw, roi, inf, by_value, CPU, FP32)
    assert (by_value.windows_run, by_value.windows_skipped) == (by_mask.windows_run, by_mask.windows_skipped)
    assert torch.allclose(a, b, atol=1e-6)


def test_prepare_and_net_batch_change_nothing_but_how_windows_are_fed() -> None:
    net, x = conv3d(), image()
    inf, roi = InferenceConfig(sw_batch_size=4), (16, 12, 8)
    counted = CountingNet(net)
    runner = WindowRunner(network_fn(counted, 3), 3, prepare=lambda w: w * 2.0 - 1.0, net_batch=2)
    with torch.no_grad():
        got = window_logits(x, roi, inf, runner, CPU, FP32)
        want = sliding_window_inference(x * 2.0 - 1.0, roi, 4, net, overlap=inf.overlap, mode=inf.blend_mode)
    assert torch.allclose(got, want, atol=1e-5)
    assert max(counted.batches) == 2 and sum(counted.batches) == runner.windows_run


def test_2d_net_on_a_volume_equals_a_2d_sliding_window_per_slice() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    x = image((1, 1, 30, 26, 5))
    inf = InferenceConfig()
    runner = WindowRunner(network_fn(net, 2, input_dims=3), 3)
    with torch.no_grad():
        got = window_logits(x, (16, 12, 1), inf, runner, CPU, FP32)
        want = torch.stack([sliding_window_inference(x[..., z], (16, 12), inf.sw_batch_size, net, overlap=inf.overlap,
                                                     mode=inf.blend_mode) for z in range(5)], dim=-1)
    assert got.shape == (1, 3, 30, 26, 5)
    assert torch.allclose(got, want, atol=1e-5)
