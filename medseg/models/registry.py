"""The model registry: architectures register a builder here by name (one module each).

Builder contract: ``build(spatial_dims: int, in_channels: int, out_channels: int, **params) -> nn.Module``
returning raw logits of shape (B, out_channels, *spatial). ``params`` come from ``model.params`` in config.
"""

from __future__ import annotations

from medseg.registry import Registry

MODELS: Registry = Registry("model")
RESERVED_PARAMS = ("spatial_dims", "in_channels", "out_channels")
