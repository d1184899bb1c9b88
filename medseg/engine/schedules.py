"""Optimizers and learning-rate schedules from config (AdamW, SGD+Nesterov; poly, cosine, linear warmup)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from medseg.config import OptimizerConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with (optional) Nesterov momentum."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(epoch: int, total_epochs: int, schedule: str, warmup_epochs: int = 0) -> float:
    """Multiplier of the base LR at ``epoch`` (0-based): linear warmup, then poly(0.9) / cosine / constant."""
    if warmup_epochs and epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(1, total_epochs - warmup_epochs)
    t = min(1.0, (epoch - warmup_epochs) / span)
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_epochs: int) -> LambdaLR:
    """Per-epoch scheduler (``step()`` once per epoch); its state dict resumes exactly."""
    return LambdaLR(optimizer, lambda e: lr_factor(e, total_epochs, cfg.scheduler, cfg.warmup_epochs))
