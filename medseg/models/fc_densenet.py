"""FC-DenseNet, "the one hundred layers tiramisu" (Jégou et al. 2017), in 2D and 3D.

dense block      layers of BN -> ReLU -> 3x3 conv (``growth_rate`` maps) -> dropout, each fed the block
                 input and every earlier layer's output; the block returns input + new maps (concatenated);
transition down  BN -> ReLU -> 1x1 conv -> dropout -> 2x max pool;
bottleneck       a dense block whose new maps alone go up;
transition up    a 3x3 stride-2 transposed conv of only the previous dense block's new maps (or
                 resize + conv), concatenated with the skip of the same resolution; the up-path dense
                 blocks mirror the down path, and only the last one passes input + new maps to the
                 final 1x1 conv.

Pools use ``ceil_mode`` and upsampled maps are cropped to their skip (the paper crops too), so any
input size works. Jégou et al.'s models: FC-DenseNet56 (growth 12, 4 layers everywhere, the default),
FC-DenseNet67 (growth 16, 5 layers), FC-DenseNet103 (growth 16, layers (4, 5, 7, 10, 12), bottleneck 15).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_norm_layer

from medseg.models.registry import MODELS
from medseg.models.upsample import crop_to, make_upsample


def _bn_relu_conv(dims: int, cin: int, cout: int, kernel: int, norm: str | tuple | None, dropout: float) -> nn.Module:
    """Pre-activation unit: norm -> ReLU -> conv -> dropout."""
    return nn.Sequential(
        get_norm_layer(norm, dims, cin) if norm is not None else nn.Identity(),
        nn.ReLU(),
        Conv[Conv.CONV, dims](cin, cout, kernel_size=kernel, padding=kernel // 2),
        nn.Dropout(dropout),
    )


class DenseBlock(nn.Module):
    """``n_layers`` densely connected layers adding ``growth_rate`` maps each."""

    def __init__(self, dims: int, cin: int, growth_rate: int, n_layers: int, norm: str | tuple | None, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            _bn_relu_conv(dims, cin + i * growth_rate, growth_rate, 3, norm, dropout) for i in range(n_layers)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input and new maps, new maps only), both concatenated along channels."""
        new: list[torch.Tensor] = []
        for layer in self.layers:
            new.append(layer(torch.cat([x, *new], dim=1)))
        return torch.cat([x, *new], dim=1), torch.cat(new, dim=1)


class FCDenseNet(nn.Module):
    """Tiramisu encoder-decoder; see the module docstring."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        growth_rate: int,
        layers_per_block: Sequence[int],
        bottleneck_layers: int,
        first_channels: int,
        norm: str | tuple | None,
        dropout: float,
        upsample: str,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, dims]
        self.first_conv = conv(in_channels, first_channels, kernel_size=3, padding=1)
        self.down_blocks, self.transitions_down, skip_channels = nn.ModuleList(), nn.ModuleList(), []
        c = first_channels
        for n in layers_per_block:
            self.down_blocks.append(DenseBlock(dims, c, growth_rate, n, norm, dropout))
            c += growth_rate * n
            skip_channels.append(c)
            self.transitions_down.append(
                nn.Sequential(_bn_relu_conv(dims, c, c, 1, norm, dropout), Pool[Pool.MAX, dims](2, ceil_mode=True))
            )
        self.bottleneck = DenseBlock(dims, c, growth_rate, bottleneck_layers, norm, dropout)
        self.transitions_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        new = growth_rate * bottleneck_layers
        for n, skip in zip(reversed(layers_per_block), reversed(skip_channels)):
            self.transitions_up.append(make_upsample(dims, new, new, 2, upsample, kernel_size=3))
            self.up_blocks.append(DenseBlock(dims, new + skip, growth_rate, n, norm, dropout))
            c, new = new + skip + growth_rate * n, growth_rate * n
        self.final_conv = conv(c, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, *S) -> logits (B, out, *S) for any S."""
        x = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            x, _ = block(x)
            skips.append(x)
            x = down(x)
        _, new = self.bottleneck(x)
        for up, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips)):
            x = torch.cat([crop_to(up(new), skip.shape[2:]), skip], dim=1)
            x, new = block(x)
        return self.final_conv(x)


@MODELS.register("fc_densenet")
def build_fc_densenet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    growth_rate: int = 12,
    layers_per_block: Sequence[int] = (4, 4, 4, 4, 4),
    bottleneck_layers: int = 4,
    first_channels: int = 48,
    norm: str | tuple | None = "batch",
    dropout: float = 0.2,
    upsample: str = "deconv",
) -> nn.Module:
    """FC-DenseNet (Tiramisu) for 2D or 3D; any input size. Defaults: FC-DenseNet56.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes).
        growth_rate: maps added by each dense layer (k).
        layers_per_block: layers of each down-path dense block (one pooling each); the up path mirrors it.
        bottleneck_layers: layers of the dense block at the lowest resolution.
        first_channels: channels of the first 3x3 conv (48 in the paper).
        norm: normalisation name or (name, kwargs); ``None`` for none. Batch norm in the paper.
        dropout: after every conv except the first and last (0.2 in the paper).
        upsample: ``"deconv"`` (3x3 stride-2 transposed conv, as in the paper) or ``"resize_conv"``
            (nearest + 3x3 conv).
    """
    if not layers_per_block or min(layers_per_block) < 1 or bottleneck_layers < 1:
        raise ValueError("fc_densenet needs >= 1 dense block, each (and the bottleneck) with >= 1 layer")
    return FCDenseNet(
        spatial_dims,
        in_channels,
        out_channels,
        growth_rate,
        layers_per_block,
        bottleneck_layers,
        first_channels,
        norm,
        dropout,
        upsample,
    )
