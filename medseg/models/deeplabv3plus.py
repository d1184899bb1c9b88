"""DeepLabv3+ (Chen et al. 2018) in 2D and 3D, written here because no library has a 3D one.

encoder  a small ResNet (basic blocks) whose last stages trade stride for dilation, so features stay at
         1/``output_stride`` of the input (8 or 16);
ASPP     1x1 conv + three atrous depthwise-separable 3x3 convs + image pooling, concatenated and projected;
decoder  ASPP output upsampled to the stride-4 low-level features (``upsample.make_upsample``), concatenated
         with their 1x1 reduction, refined by two separable 3x3 convs, classified by a 1x1 conv;
logits   interpolated (bi/trilinear, as in the paper) to the exact input size, so any size >= 1 works.

Simplifications: no Xception backbone or multi-grid; the image-pooling branch has no normalisation so a
batch of one trains (batch/instance norm on a 1x1 map is undefined).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool

from medseg.models.registry import MODELS
from medseg.models.upsample import make_upsample

# output stride -> (stride, dilation) of encoder stages 1..4 (the stem already divides by 4)
STAGE_GEOMETRY = {16: ((1, 1), (2, 1), (2, 1), (1, 2)), 8: ((1, 1), (2, 1), (1, 2), (1, 4))}
DEFAULT_ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # doubled at output stride 8, as in the paper
LINEAR = {2: "bilinear", 3: "trilinear"}


def _conv(
    dims: int,
    cin: int,
    cout: int,
    norm: str | tuple | None,
    kernel: int = 3,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: bool = True,
) -> nn.Module:
    """Conv -> norm -> ReLU (ReLU optional); 'same' padding, so stride s gives ceil(size / s)."""
    return Convolution(
        dims,
        cin,
        cout,
        strides=stride,
        kernel_size=kernel,
        dilation=dilation,
        groups=groups,
        norm=norm,
        act="relu" if act else None,
        adn_ordering="NA",
        bias=norm is None,
    )


def _separable(dims: int, cin: int, cout: int, norm: str | tuple | None, dilation: int = 1) -> nn.Module:
    """Depthwise 3x3 (dilated) conv -> norm -> ReLU -> pointwise 1x1 conv -> norm -> ReLU."""
    return nn.Sequential(
        _conv(dims, cin, cin, norm, dilation=dilation, groups=cin), _conv(dims, cin, cout, norm, kernel=1)
    )


class BasicBlock(nn.Module):
    """ResNet basic block with optional stride and dilation."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int, dilation: int, norm: str | tuple | None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(dims, cin, cout, norm, stride=stride, dilation=dilation),
            _conv(dims, cout, cout, norm, dilation=dilation, act=False),
        )
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else _conv(dims, cin, cout, norm, kernel=1, stride=stride, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum then ReLU."""
        return F.relu(self.body(x) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with separable atrous branches and an image-pooling branch."""

    def __init__(
        self, dims: int, cin: int, cout: int, rates: Sequence[int], norm: str | tuple | None, dropout: float
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv(dims, cin, cout, norm, kernel=1)] + [_separable(dims, cin, cout, norm, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, dims](1), Conv[Conv.CONV, dims](cin, cout, kernel_size=1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(_conv(dims, cout * (len(rates) + 2), cout, norm, kernel=1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate all branches (pooled features broadcast to x's size) and project."""
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """Encoder (dilated ResNet) + ASPP + low-level decoder; see the module docstring."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        output_stride: int,
        encoder_channels: Sequence[int],
        blocks_per_stage: Sequence[int],
        aspp_rates: Sequence[int],
        aspp_channels: int,
        low_level_channels: int,
        decoder_channels: int,
        norm: str | tuple | None,
        dropout: float,
        upsample: str,
    ) -> None:
        super().__init__()
        c = list(encoder_channels)
        self.stem = nn.Sequential(
            _conv(dims, in_channels, c[0], norm, stride=2),
            _conv(dims, c[0], c[0], norm),
            Pool[Pool.MAX, dims](kernel_size=3, stride=2, padding=1),
        )
        stages, cin = [], c[0]
        for cout, n, (stride, dilation) in zip(c, blocks_per_stage, STAGE_GEOMETRY[output_stride]):
            blocks = [BasicBlock(dims, cin, cout, stride, dilation, norm)]
            blocks += [BasicBlock(dims, cout, cout, 1, dilation, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.aspp = ASPP(dims, c[-1], aspp_channels, aspp_rates, norm, dropout)
        self.up = make_upsample(dims, aspp_channels, aspp_channels, output_stride // 4, upsample, interp="linear")
        self.low_level = _conv(dims, c[0], low_level_channels, norm, kernel=1)
        self.refine = nn.Sequential(
            _separable(dims, aspp_channels + low_level_channels, decoder_channels, norm),
            _separable(dims, decoder_channels, decoder_channels, norm),
        )
        self.classifier = Conv[Conv.CONV, dims](decoder_channels, out_channels, kernel_size=1)
        self.linear = LINEAR[dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, *S) -> logits (B, out, *S) for any S."""
        size = x.shape[2:]
        low = x = self.stages[0](self.stem(x))  # stride-4 low-level features
        for stage in self.stages[1:]:
            x = stage(x)
        x = self.up(self.aspp(x))
        if x.shape[2:] != low.shape[2:]:  # odd sizes: ceil-rounding in the encoder
            x = F.interpolate(x, size=low.shape[2:], mode=self.linear, align_corners=False)
        x = self.classifier(self.refine(torch.cat([x, self.low_level(low)], dim=1)))
        return F.interpolate(x, size=size, mode=self.linear, align_corners=False)


@MODELS.register("deeplabv3plus")
def build_deeplabv3plus(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    output_stride: int = 16,
    encoder_channels: Sequence[int] = (32, 64, 128, 256),
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
    aspp_rates: Sequence[int] | None = None,
    aspp_channels: int = 256,
    low_level_channels: int = 48,
    decoder_channels: int = 256,
    norm: str | tuple | None = "batch",
    dropout: float = 0.1,
    upsample: str = "resize_conv",
) -> nn.Module:
    """DeepLabv3+ for 2D or 3D; any input size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        output_stride: 16 (stages 3-4 strided/dilated 1/2) or 8 (dilations 2/4): encoder resolution.
        encoder_channels: channels of the 4 residual stages (the stem uses the first).
        blocks_per_stage: basic blocks per stage.
        aspp_rates: atrous rates (three in the paper); ``None``: (6, 12, 18) at stride 16, (12, 24, 36) at stride 8.
            For small 3D patches smaller rates (e.g. (2, 4, 6)) fit the feature map better.
        aspp_channels: channels of every ASPP branch and of its projection.
        low_level_channels: 1x1 reduction of the stride-4 features (48 in the paper).
        decoder_channels: channels of the two separable refinement convs.
        norm: normalisation name or (name, kwargs); ``None`` for none.
        dropout: after the ASPP projection.
        upsample: ``"resize_conv"`` (bi/trilinear resize + 3x3 conv) or ``"deconv"`` for the ASPP output.
    """
    if output_stride not in STAGE_GEOMETRY:
        raise ValueError(f"deeplabv3plus output_stride must be one of {sorted(STAGE_GEOMETRY)}, got {output_stride}")
    rates = DEFAULT_ASPP_RATES[output_stride] if aspp_rates is None else tuple(aspp_rates)
    if not rates or len(encoder_channels) != 4 or len(blocks_per_stage) != 4 or min(blocks_per_stage) < 1:
        raise ValueError("deeplabv3plus needs >= 1 aspp_rates, 4 encoder_channels and 4 blocks_per_stage (each >= 1)")
    return DeepLabV3Plus(
        spatial_dims,
        in_channels,
        out_channels,
        output_stride,
        encoder_channels,
        blocks_per_stage,
        rates,
        aspp_channels,
        low_level_channels,
        decoder_channels,
        norm,
        dropout,
        upsample,
    )
