"""Model registry: one architecture per module, each registering a builder by name.

Builder contract: ``build(spatial_dims: int, in_channels: int, out_channels: int, **params) -> nn.Module``
returning raw logits of shape (B, out_channels, *spatial). ``params`` come from ``model.params`` in config.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from medseg.registry import Registry

MODELS: Registry = Registry("model")
RESERVED_PARAMS = ("spatial_dims", "in_channels", "out_channels")

# Architectures register themselves on import (one module each).
from medseg.models import unet, vnet  # noqa: E402,F401
# -- helper-registered architectures below this line --
from medseg.models import deeplabv3plus, dynunet, fc_densenet, fcn, unet_resnet  # noqa: E402,F401


def build_model(name: str, spatial_dims: int, in_channels: int, out_channels: int, params: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered model by name."""
    params = dict(params or {})
    MODELS.check_params(name, params, RESERVED_PARAMS)
    return MODELS.get(name)(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **params)
