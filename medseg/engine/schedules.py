"""Optimizers and learning-rate schedules from config (AdamW, SGD+Nesterov; poly, cosine, linear warmup)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

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


def lr_factor(
    epoch: int, total_epochs: int, schedule: str, warmup_epochs: int = 0, time_fraction: float = 0.0
) -> float:
    """Multiplier of the base LR at ``epoch`` (0-based): linear warmup, then poly(0.9) / cosine / constant.

    ``time_fraction`` (share of a time budget spent, 0..1) moves the schedule on when it is ahead of the
    epoch count: a run cut by ``train.max_minutes`` then ends annealed instead of at a high LR."""
    if warmup_epochs and epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(1, total_epochs - warmup_epochs)
    t = min(1.0, max((epoch - warmup_epochs) / span, time_fraction))
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimizerConfig,
    total_epochs: int,
    time_fraction: Callable[[], float] | None = None,
) -> LambdaLR:
    """Per-epoch scheduler (``step()`` once per epoch); its state dict resumes exactly.

    ``time_fraction`` (used when ``cfg.schedule_span`` is ``time_budget``) returns the share of the time budget
    spent when ``step()`` is called; the caller makes it agree across DDP ranks."""
    use_time = cfg.schedule_span == "time_budget" and time_fraction is not None

    def factor(epoch: int) -> float:
        spent = min(1.0, max(0.0, time_fraction())) if use_time and time_fraction is not None else 0.0
        return lr_factor(epoch, total_epochs, cfg.scheduler, cfg.warmup_epochs, spent)

    return LambdaLR(optimizer, factor)
