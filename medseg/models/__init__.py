"""Segmentation architectures, one per module, each registering its builder in ``models.registry.MODELS``.

Importing the package imports every architecture module, so ``MODELS`` lists them all; ``build_model`` builds
one by name. The contract of a builder is in ``medseg.models.registry``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from medseg.models import deeplabv3plus, dynunet, fc_densenet, fcn, unet, unet_resnet, vnet
from medseg.models.registry import MODELS, RESERVED_PARAMS

ARCHITECTURES = (deeplabv3plus, dynunet, fc_densenet, fcn, unet, unet_resnet, vnet)  # registered on import
__all__ = ["ARCHITECTURES", "MODELS", "RESERVED_PARAMS", "build_model"]


def build_model(
    name: str, spatial_dims: int, in_channels: int, out_channels: int, params: dict[str, Any] | None = None
) -> nn.Module:
    """Build a registered model by name (``KeyError`` listing the valid names for an unknown one)."""
    params = dict(params or {})
    MODELS.check_params(name, params, RESERVED_PARAMS)
    return MODELS.get(name)(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **params)
