"""nnU-Net-style dynamic U-Net (Isensee et al. 2021) from MONAI ``DynUNet``.

Deep supervision and the trainer
--------------------------------
With ``deep_supervision=True`` the output depends on the module's mode:

- ``model.train()``: a tensor of shape (B, 1 + deep_supr_num, C, *spatial). Index 0 along dim 1 is the
  full-resolution output; the others are the heads of the next-coarser decoder levels, already
  interpolated by MONAI to full resolution. The trainer should ``torch.unbind(out, dim=1)``, compute
  the loss of each head against the same target and take a weighted mean (nnU-Net halves the weight
  per level: 1, 1/2, 1/4, ..., normalised to sum to 1).
- ``model.eval()``: a single tensor (B, C, *spatial), like every other medseg model, so validation and
  inference need no special case.

With the default ``deep_supervision=False`` the output is always (B, C, *spatial).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import DynUNet

from medseg.models.registry import MODELS

DEFAULT_DEPTH = 5


@MODELS.register("dynunet")
def build_dynunet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    depth: int | None = None,
    kernel_size: Sequence[int | Sequence[int]] | None = None,
    strides: Sequence[int | Sequence[int]] | None = None,
    filters: Sequence[int] | None = None,
    norm: str | tuple = ("instance", {"affine": True}),
    dropout: float | None = None,
    res_block: bool = False,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
) -> nn.Module:
    """MONAI ``DynUNet``; see the module docstring for the deep-supervision output shapes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        depth: number of resolution levels (>= 3) when ``strides`` is not given: strides become
            ``[1, 2, ..., 2]`` (``depth - 1`` halvings) and kernels 3. Defaults to 5. Must equal
            ``len(strides)`` if both are given.
        kernel_size: per-level kernel sizes (int or per-axis list); defaults to 3 at every level.
        strides: per-level strides (int or per-axis list, e.g. ``[1, [2, 2, 1], 2]`` for anisotropic
            data); the first is usually 1. Inputs must be divisible by the product of the strides per axis.
        filters: channels per level; ``None`` uses nnU-Net's rule ``min(32 * 2**i, 320 (3D) / 512 (2D))``.
        norm: normalisation name or (name, kwargs).
        dropout: dropout probability in every conv block (``None``: none).
        res_block: residual conv blocks instead of plain ones.
        deep_supervision: return deep-supervision heads in training mode (see module docstring).
        deep_supr_num: number of extra heads, 1 <= deep_supr_num < depth - 1.
    """
    if strides is None:
        depth = DEFAULT_DEPTH if depth is None else depth
        if depth < 3:
            raise ValueError(f"dynunet depth must be >= 3, got {depth}")
        strides = [1] + [2] * (depth - 1)
    elif depth is not None and depth != len(strides):
        raise ValueError(f"dynunet depth={depth} but strides has {len(strides)} levels; give one or make them agree")
    strides = [s if isinstance(s, int) else list(s) for s in strides]
    if kernel_size is None:
        kernel_size = [3] * len(strides)
    kernel_size = [k if isinstance(k, int) else list(k) for k in kernel_size]
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=None if filters is None else list(filters),
        dropout=dropout,
        norm_name=norm,
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        res_block=res_block,
    )
