"""Predictors for MONAI's ``sliding_window_inference``.

A 2D network runs slice-wise on a volume by sliding a (H, W, 1) window: the adapter drops the singleton
axis before the network and restores it after, so 2D and 3D models share one inference path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class SliceWise(nn.Module):
    """Run a 2D network on (B, C, H, W, 1) windows."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.squeeze(-1)).unsqueeze(-1)


def _first_output(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        if isinstance(out, (list, tuple)):  # deep-supervision heads: the full-resolution one is first
            out = out[0]
        return out

    return run


def predictor_for(model: nn.Module, spatial_dims: int, volume_dims: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Callable for sliding_window_inference: slice-wise for 2D nets on volumes, the net itself otherwise."""
    net = SliceWise(model) if spatial_dims == 2 and volume_dims == 3 else model
    return _first_output(net)
