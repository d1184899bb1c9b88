"""V-Net (Milletari et al. 2016) from MONAI."""

from __future__ import annotations

import torch.nn as nn
from monai.networks.nets import VNet

from medseg.models.registry import MODELS


@MODELS.register("vnet")
def build_vnet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    dropout_prob_down: float = 0.0,
    dropout_prob_up: tuple[float, float] = (0.0, 0.0),
    act: str = "elu",
) -> nn.Module:
    """MONAI ``VNet``. Input spatial sizes must be divisible by 16."""
    return VNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        act=(act, {"inplace": True}),
        dropout_prob_down=dropout_prob_down,
        dropout_prob_up=tuple(dropout_prob_up),
    )
