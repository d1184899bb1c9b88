"""Upsampling layers shared by the hand-written decoders (DeepLabv3+, FCN, FC-DenseNet).

Two modes, chosen by name in config:

- ``"deconv"``: a transposed convolution (learned upsampling).
- ``"resize_conv"``: nearest (or linear) resize followed by a 3x3 convolution. Every output voxel gets
  the same number of kernel contributions, which avoids the checkerboard artefacts of transposed
  convolutions (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").

``crop_to`` trims an upsampled map to its skip connection's size.

Both modes are MONAI ``UpSample`` blocks: ``mode="deconv"`` is the transposed convolution, and
``mode="nontrainable"`` with ``post_conv`` is resize-then-convolve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import EllipsisType

import torch
import torch.nn as nn
from monai.networks.blocks import UpSample
from monai.networks.layers.factories import Conv

INTERP_MODES = ("nearest", "linear")


def _deconv(
    spatial_dims: int, in_ch: int, out_ch: int, scale: int | Sequence[int], kernel_size: int | None, interp: str
) -> nn.Module:
    # kernel_size=None gives kernel == stride (no overlap); MONAI pads other kernels to an exact x`scale`.
    return UpSample(spatial_dims, in_ch, out_ch, scale_factor=scale, kernel_size=kernel_size, mode="deconv")


def _resize_conv(
    spatial_dims: int, in_ch: int, out_ch: int, scale: int | Sequence[int], kernel_size: int | None, interp: str
) -> nn.Module:
    conv = Conv[Conv.CONV, spatial_dims](in_ch, out_ch, kernel_size=3, padding=1)
    return UpSample(
        spatial_dims,
        in_ch,
        in_ch,  # in this mode UpSample's out_channels only sizes a pre-conv; post_conv maps in_ch -> out_ch
        scale_factor=scale,
        mode="nontrainable",
        pre_conv=None,
        post_conv=conv,
        interp_mode=interp,
        # torch only accepts align_corners for the linear modes.
        align_corners=None if interp == "nearest" else False,
    )


UPSAMPLE_MODES: dict[str, Callable[..., nn.Module]] = {"deconv": _deconv, "resize_conv": _resize_conv}


def make_upsample(
    spatial_dims: int,
    in_ch: int,
    out_ch: int,
    scale: int | Sequence[int] = 2,
    mode: str = "deconv",
    kernel_size: int | None = None,
    interp: str = "nearest",
) -> nn.Module:
    """Return a module mapping (B, in_ch, *S) to (B, out_ch, *(S * scale)).

    Args:
        spatial_dims: 2 or 3.
        in_ch: input channels.
        out_ch: output channels.
        scale: integer upsampling factor, one for all axes or one per axis.
        mode: ``"deconv"`` (transposed convolution) or ``"resize_conv"`` (resize + 3x3 conv).
        kernel_size: transposed-convolution kernel (``"deconv"`` only); ``None`` means equal to ``scale``.
            Any kernel still gives exactly ``S * scale`` voxels.
        interp: ``"nearest"`` (Odena et al.) or ``"linear"`` (bi-/trilinear) resize for ``"resize_conv"``.

    Raises:
        ValueError: unknown ``mode`` or ``interp`` (the message lists the valid ones).
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; valid: {', '.join(UPSAMPLE_MODES)}")
    if interp not in INTERP_MODES:
        raise ValueError(f"unknown upsample interp {interp!r}; valid: {', '.join(INTERP_MODES)}")
    return UPSAMPLE_MODES[mode](spatial_dims, in_ch, out_ch, scale, kernel_size, interp)


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the first ``size`` voxels of every spatial axis of ``x`` (B, C, *S).

    Decoders upsample stride-s maps whose sizes were rounded up (ceil-mode pooling), so the result can
    be a voxel larger than the skip or input it must match; cropping at the origin keeps it aligned.
    """
    index: tuple[EllipsisType | slice, ...] = (..., *(slice(0, s) for s in size))
    return x[index]
