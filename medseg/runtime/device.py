"""Device and mixed-precision selection: CUDA when present, clean CPU fallback."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from medseg.errors import ConfigError


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` -> ``cuda[:local_rank]`` if available else ``cpu``; an explicit CUDA device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:  # plain "cuda": each DDP process takes its own card
        return torch.device("cuda", local_rank or 0)
    return dev


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = full precision) and whether a gradient scaler is needed (fp16 only)."""

    dtype: torch.dtype | None
    use_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast context for the forward pass (a no-op in full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA cards that support it, else fp16 with a scaler; full precision on CPU."""
    if device.type != "cuda" or amp == "off":
        if amp in ("fp16", "bf16") and device.type != "cuda":
            return Precision(None, False)  # AMP is a CUDA feature here; CPU runs in fp32
        return Precision(None, False)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision(torch.bfloat16, False) if amp == "bf16" else Precision(torch.float16, True)
