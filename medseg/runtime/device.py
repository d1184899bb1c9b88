"""Device and mixed-precision selection: CUDA when present, clean CPU fallback."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from medseg.errors import ConfigError
from medseg.runtime.cpu_bf16 import cpu_has_native_bf16, warn_emulated_bf16, warn_once


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


def resolve_precision(amp: str, device: torch.device, native_bf16: bool | None = None) -> Precision:
    """The training autocast ``train.amp`` asks for on ``device``.

    CUDA: ``auto`` is bf16 on cards that support it, else fp16 with a gradient scaler. CPU: ``bf16`` autocasts the
    forward to bf16 (no scaler: bf16 has fp32's range); on a CPU that computes bf16 natively (``avx512_bf16`` /
    ``amx_bf16``, see ``medseg.runtime.cpu_bf16.cpu_has_native_bf16``; ``native_bf16`` overrides the detection)
    a hippocampus U-Net training step is ~1.2x faster than in fp32; elsewhere it is emulated and slower, so a
    one-time warning says so. ``auto`` stays fp32 on the CPU: bf16 changes the training numerics and is slow where
    emulated, so a run opts in explicitly rather than every CPU run changing under the user. ``fp16`` on the CPU falls back
    to fp32 with a one-time warning (CPU fp16 autocast is emulated; a GPU config must still run on a CPU host).
    """
    if amp == "off":
        return Precision(None, False)
    if device.type == "cuda":
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Precision(torch.bfloat16, False) if amp == "bf16" else Precision(torch.float16, True)
    if device.type != "cpu" or amp == "auto":
        return Precision(None, False)
    if amp == "fp16":
        warn_once("train-cpu-fp16", "train.amp fp16 is a CUDA setting: training on the CPU runs in fp32")
        return Precision(None, False)
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if not native:
        warn_emulated_bf16("train.amp")
    return Precision(torch.bfloat16, False)
