"""One training epoch: forward under autocast, loss in fp32, scaled backward, gradient accumulation and
clipping, DDP gradient sync only on the micro-steps that update."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from medseg.runtime import distributed as dist_utils
from medseg.runtime.device import Precision


@dataclass
class StepParts:
    """What a training step touches: the (possibly DDP-wrapped) network, its module, loss and optimisation."""

    net: nn.Module  # what is called (DDP wrapper under torchrun)
    model: nn.Module  # the module whose parameters are clipped
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    accumulation: int = 1
    grad_clip: float | None = None
    distributed: bool = False


def train_epoch(parts: StepParts, loader: Iterable[dict[str, Any]], n_batches: int) -> dict[str, float]:
    """Train over ``loader`` once; returns train_loss (mean over samples and ranks), lr, time and data share."""
    parts.net.train()
    total, n, t_data, t0 = 0.0, 0, 0.0, time.perf_counter()
    tick = time.perf_counter()
    parts.optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        t_data += time.perf_counter() - tick
        image = plain_tensor(batch["image"]).to(parts.device, non_blocking=True)
        label = plain_tensor(batch["label"]).to(parts.device, non_blocking=True)
        update = (step + 1) % parts.accumulation == 0 or step + 1 == n_batches
        loss = _backward(parts, image, label, sync=update)
        if update:
            _update(parts)
        total += float(loss.detach()) * image.shape[0]
        n += image.shape[0]
        tick = time.perf_counter()
    sums = dist_utils.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64))
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": float(sums[0]) / max(float(sums[1]), 1.0),
        "lr": parts.optimizer.param_groups[0]["lr"],
        "time_epoch_s": elapsed,
        "time_data_fraction": t_data / max(elapsed, 1e-9),
    }


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """The batch without MONAI's metadata: a ``MetaTensor`` runs every network and loss op through its
    ``__torch_function__`` (metadata copied per op), which training does not need."""
    as_tensor = getattr(t, "as_tensor", None)  # MetaTensor.as_tensor(): the same storage as a plain Tensor
    return as_tensor() if callable(as_tensor) else t


def _backward(parts: StepParts, image: torch.Tensor, label: torch.Tensor, sync: bool) -> torch.Tensor:
    # DDP all-reduces gradients on every backward; skip that on accumulation-only micro-steps.
    no_sync = getattr(parts.net, "no_sync", None)
    ctx = no_sync() if parts.distributed and not sync and no_sync is not None else contextlib.nullcontext()
    with ctx:
        with parts.precision.autocast(parts.device):
            out = parts.net(image)
        # The loss runs in fp32 outside autocast; deep-supervision nets may return a list of heads.
        out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = parts.loss_fn(out, label)
        parts.scaler.scale(loss / parts.accumulation).backward()
    return loss


def _update(parts: StepParts) -> None:
    if parts.grad_clip:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
