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
  it is there for cuDNN under AMP, where NDHWC is the tensor-core layout, and is off by default until measured;
- runs the network under the batch's autocast (``CheckedAutocast``: ``inference.precision``), whose first windows
  are also run in fp32 and compared (argmax agreement); below ``inference.precision_min_agreement`` the rest of the
  batch runs in fp32, with a ``PrecisionWarning`` that the batch runner puts in the case record.

A window batch or stitching buffer that does not fit the GPU (``torch.cuda.OutOfMemoryError``) is retried with
less (``OomFallback``): fewer windows per network call, then the stitching on the CPU; each step is a
``GpuMemoryWarning`` (so it is in the case record) and is kept for the rest of the batch.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict, TypeVar, cast

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from medseg.config import InferenceConfig
from medseg.inference.window_grid import BodyWindows
from medseg.runtime.device import Precision
from medseg.runtime.precision import PrecisionWarning

BACKGROUND_LOGIT = 10.0  # class-0 logit of a skipped (body-free) window; softmax ~0.99995 background
T = TypeVar("T")
log = logging.getLogger("medseg.predict")


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


class CheckedAutocast:
    """The autocast of a prediction batch's network calls, self-checked against fp32 on its first windows.

    The batch's first network call runs its windows both in fp32 and under autocast and compares their argmax
    labels voxel by voxel. Below ``min_agreement`` a ``PrecisionWarning`` says so (inside a case the batch runner
    puts it in that case's record) and every later call of the batch runs in fp32; the checked windows then keep
    their fp32 answer, else their reduced-precision one (every window of a passing batch is computed alike). In
    fp32 (``precision.dtype`` None) calls are plain ``fn(x)``.
    """

    def __init__(self, precision: Precision, min_agreement: float) -> None:
        self.dtype = precision.dtype  # the autocast dtype now; None: fp32 (also after a failed self-check)
        self.min_agreement = min_agreement
        self.agreement: float | None = None  # the self-check's argmax agreement, once measured
        self.checked_windows = 0

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` in the batch's precision (the first call of the batch: the self-check)."""
        if self.dtype is None:
            return fn(x)
        if self.agreement is None:
            return self.check(fn, x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return fn(x)

    def check(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Run the windows ``x`` in fp32 and under autocast, compare the labels, fall back if they differ."""
        dtype = cast(torch.dtype, self.dtype)
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside an outer autocast
            full = fn(x)
        with torch.autocast(x.device.type, dtype=dtype):
            low = fn(x)
        self.agreement = float((full.argmax(1) == low.argmax(1)).float().mean())
        self.checked_windows = int(x.shape[0])
        name = str(dtype).removeprefix("torch.")
        if self.agreement < self.min_agreement:
            warnings.warn(
                f"inference.precision {name}: the self-check on the first {x.shape[0]} window(s) found argmax "
                f"agreement {self.agreement:.4f} with fp32, below inference.precision_min_agreement "
                f"{self.min_agreement}: the rest of the batch runs in fp32",
                PrecisionWarning,
                stacklevel=2,
            )
            self.dtype = None
            return full
        log.info("%s self-check: argmax agreement %.4f with fp32 on %d window(s)", name, self.agreement, len(x))
        return low


class GpuMemoryWarning(UserWarning):
    """Windows or their stitching did not fit the GPU: inference went on with fewer windows per call or the CPU."""


@dataclass
class OomFallback:
    """What sliding windows give up after a CUDA out-of-memory error; kept for the rest of a prediction batch.

    The strategy of MONAI's ``SlidingWindowInfererAdapt`` (stitching on the GPU, then on the CPU; the size of the
    image that failed is remembered, so the next one as large stitches on the CPU at once), reproduced rather than
    used: (1) medseg keeps the scan on the CPU and sends windows to the GPU batch by batch, and Adapt adapts only
    inputs that are on the GPU; (2) Adapt never runs fewer windows per network call, the step that helps when the
    network's activations are what does not fit; (3) it logs to MONAI's logger, and each step must reach the case
    record; (4) memory-bounded mode blends through ``streaming``, not MONAI, and needs the window step too.

    Steps: while the error is in the network, half as many windows per network call (down to one); then (an
    error outside the network, i.e. the stitching buffers, or one window still too many) the stitching on the
    CPU; after that the error stands and the case fails. Only ``torch.cuda.OutOfMemoryError`` is caught.
    """

    windows_per_call: int | None = None  # the most windows per network call found to fit (None: no limit found)
    cpu_stitch_above: int | None = None  # images with more voxels than this stitch on the CPU

    def plan(self, configured: int, stitch: torch.device, voxels: int) -> tuple[int, torch.device]:
        """(windows per network call, stitching device) for an image of ``voxels`` voxels."""
        per_call = min(configured, self.windows_per_call or configured)
        if stitch.type == "cuda" and self.cpu_stitch_above is not None and voxels > self.cpu_stitch_above:
            return per_call, torch.device("cpu")
        return per_call, stitch

    def give_up(self, in_network: bool, per_call: int, stitch: torch.device, voxels: int) -> str | None:
        """Take the next step after an out-of-memory error and say what it is; None when no step is left."""
        if in_network and per_call > 1:
            self.windows_per_call = per_call // 2
            return f"{self.windows_per_call} window(s) per network call"
        if stitch.type == "cuda":
            self.cpu_stitch_above = min(
                voxels - 1, self.cpu_stitch_above if self.cpu_stitch_above is not None else voxels
            )
            return "the stitching on the CPU"
        return None


def release_cuda_memory() -> None:
    """Hand the blocks a failed attempt left in torch's CUDA cache back, so the next attempt can use them."""
    gc.collect()  # the failed attempt's tensors may sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    ``precision`` runs the network calls under the batch's self-checked autocast.
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
        precision: CheckedAutocast | None = None,
    ) -> None:
        self.fn = fn
        self.precision = precision  # the batch's autocast (None: the caller's, around the whole window function)
        self.oom_in_network = False  # set when a network call raised torch.cuda.OutOfMemoryError
        self.oom_windows = 0  # the windows that call had
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
        out = self._call(x)
        for d in self.mirror_dims:  # flips are their own inverse
            out = out + torch.flip(self._call(torch.flip(x, [d])), [d])
        return out / (len(self.mirror_dims) + 1) if self.mirror_dims else out

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.precision(self.fn, x) if self.precision is not None else self.fn(x)
        except torch.cuda.OutOfMemoryError:
            self.oom_in_network, self.oom_windows = True, int(x.shape[0])  # fewer windows per call can help here
            raise

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


def with_oom_fallback(
    run: Callable[[torch.device], T],
    runner: WindowRunner,
    configured: int,
    stitch: torch.device,
    voxels: int,
    memory: OomFallback,
) -> T:
    """``run(stitching device)`` with ``runner``'s windows per network call and the stitching as ``memory`` plans
    them, retried after each ``torch.cuda.OutOfMemoryError`` with ``memory``'s next step (a ``GpuMemoryWarning``
    each, and one when a step kept from an earlier case applies). ``configured``: windows per call asked for."""
    own_limit, counts = runner.net_batch, (runner.windows_run, runner.windows_skipped)
    configured = min(configured, own_limit or configured)
    retried = False
    try:
        while True:
            per_call, where = memory.plan(configured, stitch, voxels)
            runner.net_batch, runner.oom_in_network = (per_call if per_call < configured else own_limit), False
            try:
                out = run(where)
            except torch.cuda.OutOfMemoryError as e:
                tried = min(per_call, runner.oom_windows) if runner.oom_in_network else per_call  # a short batch
                step = memory.give_up(runner.oom_in_network, tried, where, voxels)
                if step is None:
                    raise
                cause = "in the network" if runner.oom_in_network else "stitching the windows"
                message = f"CUDA out of memory {cause} ({str(e).splitlines()[0][:160]}); retrying with {step}"
            else:
                if not retried and (per_call < configured or where != stitch):
                    warnings.warn(
                        f"{per_call} window(s) per network call, stitching on the {where.type}: the CUDA "
                        "out-of-memory fallback of an earlier case of this batch",
                        GpuMemoryWarning,
                        stacklevel=2,
                    )
                return out
            warnings.warn(message, GpuMemoryWarning, stacklevel=2)  # outside ``except``: the error's frames are gone
            retried = True
            runner.windows_run, runner.windows_skipped = counts
            release_cuda_memory()
    finally:
        runner.net_batch = own_limit


def window_logits(
    x: torch.Tensor,
    window: Sequence[int],
    inf: InferenceConfig,
    runner: WindowRunner,
    device: torch.device,
    precision: Precision,
    memory: OomFallback | None = None,
) -> torch.Tensor:
    """Sliding-window logits ``(B, C, *spatial)`` of ``x`` (``(B, C_in, *spatial)``, any device) on ``device``.

    ``runner`` says what each window batch goes through (the network, mirroring, body-window skipping, a
    per-window input transform) and counts the windows run and skipped. MONAI's grid, blending and padding
    (``inference.overlap``, ``sw_batch_size``, ``blend_mode``). The network runs under the runner's own autocast
    (a batch's ``CheckedAutocast``) where it has one, else under ``precision``'s. With ``memory`` (the batch's
    ``OomFallback``) a CUDA out-of-memory error is retried with fewer windows per network call, then with the
    stitching on the CPU (the logits then come back on the CPU); without it, the error propagates.
    """

    def run(stitch: torch.device) -> torch.Tensor:
        with contextlib.nullcontext() if runner.precision is not None else precision.autocast(device):
            out = sliding_window_inference(
                x,
                tuple(window),
                inf.sw_batch_size,
                runner,
                overlap=inf.overlap,
                mode=inf.blend_mode,
                sw_device=device,
                device=stitch,
                with_coord=True,
            )
        return cast(torch.Tensor, out)  # a runner returning one tensor gives one tensor (MONAI types every form)

    if memory is None:
        return run(device)
    return with_oom_fallback(run, runner, inf.sw_batch_size, device, int(x.shape[2:].numel()), memory)
