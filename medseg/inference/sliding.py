"""The one sliding-window function of medseg: validation, volume prediction and 2D image prediction all call
``window_logits`` (memory-bounded mode drives the same ``WindowRunner`` through ``streaming``).

A 2D network runs slice-wise on a volume by sliding a (H, W, 1) window: the adapter drops the singleton
axis before the network and restores it after, so 2D and 3D models share one inference path.

``WindowRunner`` is what inference slides: per window batch it

- skips windows holding no body voxel (``BodyWindows``), answering them with a constant background logit
  instead of running the network: exact for every body voxel (see ``window_grid``);
- applies a per-window input transform when the caller keeps the scan raw (memory-bounded mode normalises
  intensities window by window instead of holding a float copy of the whole scan);
- averages mirrored copies per window (test-time augmentation as nnU-Net does it: ``flip(net(flip(x)))``),
  which keeps the window grid, so mirroring needs no mirrored copy of the scan;
- feeds the network channels-last tensors when asked (``inference.channels_last``; outputs equal to ~1e-5).
  On this project's 2-core CPU it gained nothing (0.30-0.37 s vs 0.37 s per batch of four 96x96x64 windows);
  it is there for cuDNN under AMP, where NDHWC is the tensor-core layout, and is off by default until measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict, cast

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from medseg.config import InferenceConfig
from medseg.inference.window_grid import BodyWindows
from medseg.runtime.device import Precision

BACKGROUND_LOGIT = 10.0  # class-0 logit of a skipped (body-free) window; softmax ~0.99995 background


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout for its rank (4D: NHWC, 5D: NDHWC); other ranks unchanged."""
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def model_channels_last(model: nn.Module, spatial_dims: int) -> nn.Module:
    """Convert a network's weights to the channels-last layout of its dimensionality (in place)."""
    layout = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    return model.to(memory_format=layout)  # type: ignore[call-overload]  # Module.to takes it; torch's stubs omit it


class SliceWise(nn.Module):
    """Run a 2D network on (B, C, H, W, 1) windows."""

    def __init__(self, net: nn.Module, layout_channels_last: bool = False) -> None:
        super().__init__()
        self.net = net
        self.layout_channels_last = layout_channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.squeeze(-1)
        out = self.net(channels_last(x) if self.layout_channels_last else x)
        if isinstance(out, (list, tuple)):  # deep-supervision heads: the full-resolution one is first
            out = out[0]
        return out.unsqueeze(-1)


def _first_output(
    net: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]],
    layout_channels_last: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        out = net(channels_last(x) if layout_channels_last else x)
        if isinstance(out, (list, tuple)):  # deep-supervision heads: the full-resolution one is first
            out = out[0]
        return out

    return run


def network_fn(
    model: nn.Module, spatial_dims: int, input_dims: int = 3, layout_channels_last: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as windows see it: slice-wise for 2D nets on volumes, the net itself otherwise; always one
    tensor (the full-resolution head of deep-supervision nets).

    ``layout_channels_last`` converts each window to the channels-last layout the network's weights should
    then also have (``model_channels_last``).
    """
    if spatial_dims == 2 and input_dims == 3:
        return _first_output(SliceWise(model, layout_channels_last))
    return _first_output(model, layout_channels_last)


class WindowOptions(TypedDict, total=False):
    """``WindowRunner``'s keyword options besides the mirroring (what ``Predictor.window_runner`` passes on)."""

    body: BodyWindows | None
    body_above: float | None
    prepare: Callable[[torch.Tensor], torch.Tensor] | None
    net_batch: int | None


class WindowRunner:
    """A ``with_coord=True`` predictor: body-window skipping, per-window input transform, mirrored TTA.

    ``mirror_axes`` are spatial axes (0 = first spatial axis); ``prepare`` maps a raw window batch to network
    input (e.g. int16 -> normalised float32); ``net_batch`` caps the windows per network call (on the CPU the
    activations count against the process's memory). Body windows come from a mask (``body``) or, for raw windows, from
    their own values (``body_above``: the same test the foreground crop uses); with neither, every window runs.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int,
        *,
        body: BodyWindows | None = None,
        body_above: float | None = None,
        mirror_axes: Sequence[int] = (),
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
        net_batch: int | None = None,
    ) -> None:
        self.fn = fn
        self.net_batch = net_batch  # at most this many windows per network call (None: the whole batch)
        self.num_classes = num_classes
        self.body = body
        self.body_above = body_above  # raw windows: body = any value (any channel) above this (no mask held)
        self.mirror_dims = [2 + int(a) for a in mirror_axes]
        self.prepare = prepare
        self.windows_run = 0
        self.windows_skipped = 0

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        if self.net_batch is not None and x.shape[0] > self.net_batch:  # eval-mode nets: batching changes no output
            return torch.cat([self._net(x[i : i + self.net_batch]) for i in range(0, x.shape[0], self.net_batch)])
        out = self.fn(x)
        for d in self.mirror_dims:  # flips are their own inverse
            out = out + torch.flip(self.fn(torch.flip(x, [d])), [d])
        return out / (len(self.mirror_dims) + 1) if self.mirror_dims else out

    def __call__(self, x: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
        if self.body is not None:
            keep = [i for i, c in enumerate(coords) if not self.body.skips(c[2:])]
        elif self.body_above is not None:
            keep = torch.nonzero((x > self.body_above).flatten(1).any(1)).flatten().tolist()
        else:
            keep = list(range(len(coords)))
        self.windows_run += len(keep)
        self.windows_skipped += len(coords) - len(keep)
        if len(keep) == len(coords):
            return self._net(self.prepare(x) if self.prepare else x)
        out = torch.zeros((x.shape[0], self.num_classes, *x.shape[2:]), dtype=torch.float32, device=x.device)
        out[:, 0] = BACKGROUND_LOGIT
        if keep:
            idx = torch.tensor(keep, device=x.device)
            sub = x.index_select(0, idx)
            out.index_copy_(0, idx, self._net(self.prepare(sub) if self.prepare else sub).float())
        return out


def window_logits(
    x: torch.Tensor,
    window: Sequence[int],
    inf: InferenceConfig,
    runner: WindowRunner,
    device: torch.device,
    precision: Precision,
) -> torch.Tensor:
    """Sliding-window logits ``(B, C, *spatial)`` of ``x`` (``(B, C_in, *spatial)``, any device) on ``device``.

    ``runner`` says what each window batch goes through (the network, mirroring, body-window skipping, a
    per-window input transform) and counts the windows run and skipped. MONAI's grid, blending and padding
    (``inference.overlap``, ``sw_batch_size``, ``blend_mode``); autocast as ``precision`` says.
    """
    with precision.autocast(device):
        out = sliding_window_inference(
            x,
            tuple(window),
            inf.sw_batch_size,
            runner,
            overlap=inf.overlap,
            mode=inf.blend_mode,
            sw_device=device,
            device=device,
            with_coord=True,
        )
    return cast(torch.Tensor, out)  # a runner returning one tensor gives one tensor (MONAI types every output form)
