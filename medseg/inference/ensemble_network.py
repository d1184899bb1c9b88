"""The network of an ensemble package: the members' softmax probabilities averaged (nnU-Net's fold ensembling).

Every medseg predictor takes a network's output as logits and applies softmax itself, so the ensemble returns
``log(mean_k softmax(member_k(x)))``: its softmax is exactly the mean probability (the probabilities sum to one), and
the predictor, sliding window, mirror TTA, reduced precision and export run it like any single network.

The mean is taken per window, before overlapping windows are blended (and before mirrored copies are averaged), so
where windows overlap it differs slightly from averaging the members' finished predictions; in exchange, the scan is
read, preprocessed and tiled once for all members, and no per-member probability volume is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

# The smallest probability kept before the log: a class every member gives exactly 0 stays ~0 after softmax
# (exp(log(1e-12)) / 1) instead of -inf logits, which ONNX exporters and fp16 handle badly.
PROBABILITY_FLOOR = 1e-12


class EnsembleNetwork(nn.Module):
    """Mean-probability ensemble of networks with the same input and classes; outputs log-probabilities."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        """``members``: at least one network (each in eval mode for inference), all with the same output classes."""
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member network")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the members' mean softmax over the class axis (dim 1) for a batch ``x``."""
        total = torch.softmax(self.members[0](x).float(), dim=1)
        for member in self.members[1:]:
            total = total + torch.softmax(member(x).float(), dim=1)
        return torch.log((total / len(self.members)).clamp_min(PROBABILITY_FLOOR))
