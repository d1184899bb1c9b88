"""FCN-8s (Long et al. 2015), small, in 2D and 3D.

encoder  5 VGG-like stages (3x3 conv -> norm -> ReLU, repeated), each ending in a 2x max pool;
head     "fc6" (k x k conv) and "fc7" (1x1 conv) with dropout, then a 1x1 score layer (stride 32);
fusion   score x2 + score(pool4), x2 + score(pool3), x8 to the input: the FCN-8s skip architecture;
         upsampling by transposed conv or resize + conv (``upsample.make_upsample``).

Pools use ``ceil_mode`` so every upsampled map is at least as large as its skip and the input; maps
are cropped (top-left, as the receptive fields are aligned there) to the skip / input size, as the
paper's crop layers do. Any input size works, with no need for the paper's 100-voxel input padding.

Differences from the paper: channels are configurable and small by default, convs are normalised
(``norm=None`` restores the unnormalised original), fc6 is 3x3 by default (7x7 in VGG-16), and the
transposed convs start from PyTorch's default init rather than bilinear weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool

from medseg.models.registry import MODELS
from medseg.models.upsample import crop_to, make_upsample


class FCN8s(nn.Module):
    """Fully convolutional network with FCN-8s skip fusion; see the module docstring."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        convs_per_stage: Sequence[int],
        fc_channels: int,
        fc_kernel_size: int,
        norm: str | tuple | None,
        dropout: float,
        upsample: str,
    ) -> None:
        super().__init__()
        stages, cin = [], in_channels
        for cout, n in zip(channels, convs_per_stage):
            convs = [
                Convolution(
                    dims,
                    cin if i == 0 else cout,
                    cout,
                    kernel_size=3,
                    norm=norm,
                    act="relu",
                    adn_ordering="NA",
                    bias=norm is None,
                )
                for i in range(n)
            ]
            stages.append(nn.Sequential(*convs, Pool[Pool.MAX, dims](kernel_size=2, stride=2, ceil_mode=True)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        conv = Conv[Conv.CONV, dims]
        # fc6/fc7 act on the stride-32 map, which may be 1 voxel: no norm there (and none in the paper).
        self.fc = nn.Sequential(
            conv(channels[-1], fc_channels, kernel_size=fc_kernel_size, padding=fc_kernel_size // 2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            conv(fc_channels, fc_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.score_fr = conv(fc_channels, out_channels, kernel_size=1)
        self.score_pool4 = conv(channels[3], out_channels, kernel_size=1)
        self.score_pool3 = conv(channels[2], out_channels, kernel_size=1)
        # Paper: deconv kernels 4, 4, 16 (twice the stride).
        self.up2 = make_upsample(dims, out_channels, out_channels, 2, upsample, kernel_size=4)
        self.up2_pool4 = make_upsample(dims, out_channels, out_channels, 2, upsample, kernel_size=4)
        self.up8 = make_upsample(dims, out_channels, out_channels, 8, upsample, kernel_size=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, *S) -> logits (B, out, *S) for any S."""
        size = x.shape[2:]
        pools = []
        for stage in self.stages:
            x = stage(x)
            pools.append(x)
        pool3, pool4 = pools[2], pools[3]
        score = self.score_fr(self.fc(x))
        score = self.score_pool4(pool4) + crop_to(self.up2(score), pool4.shape[2:])
        score = self.score_pool3(pool3) + crop_to(self.up2_pool4(score), pool3.shape[2:])
        return crop_to(self.up8(score), size)


@MODELS.register("fcn")
def build_fcn(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (32, 64, 128, 256, 256),
    convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
    fc_channels: int = 512,
    fc_kernel_size: int = 3,
    norm: str | tuple | None = "batch",
    dropout: float = 0.5,
    upsample: str = "deconv",
) -> nn.Module:
    """FCN-8s for 2D or 3D; any input size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        channels: channels of the 5 encoder stages (VGG-16 halved by default).
        convs_per_stage: 3x3 convs per stage (VGG-16: 2, 2, 3, 3, 3).
        fc_channels: channels of fc6 and fc7 (4096 in the paper).
        fc_kernel_size: fc6 kernel (odd; 7 in the paper).
        norm: normalisation of the encoder convs, name or (name, kwargs); ``None`` as in the paper.
        dropout: after fc6 and fc7 (0.5 in the paper).
        upsample: ``"deconv"`` (transposed conv, as in the paper) or ``"resize_conv"`` (nearest + 3x3 conv).
    """
    if len(channels) != 5 or len(convs_per_stage) != 5:
        raise ValueError("fcn needs 5 channels and 5 convs_per_stage (one per pooling stage)")
    if fc_kernel_size % 2 != 1:
        raise ValueError(f"fcn fc_kernel_size must be odd, got {fc_kernel_size}")
    return FCN8s(
        spatial_dims,
        in_channels,
        out_channels,
        channels,
        convs_per_stage,
        fc_channels,
        fc_kernel_size,
        norm,
        dropout,
        upsample,
    )
