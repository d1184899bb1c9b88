"""Which precision the network runs in at prediction time (``inference.precision``), from the device's capabilities.

``auto`` picks bf16 autocast on a CPU that computes bf16 natively, AMP on CUDA (bf16 where the card supports it,
else fp16) and fp32 everywhere else. "Natively" is read from the CPU's feature flags (``avx512_bf16``,
``amx_bf16``; ``bf16`` / ``sve_bf16`` on Arm), never from its brand: a CPU without them emulates bf16 and is slower
in it than in fp32. torch's own view of the CPU (``torch.cpu.get_capabilities``, cpuinfo-based) is asked first,
``/proc/cpuinfo`` where that torch lacks it; ``torch.backends.cpu.get_cpu_capability`` only names the vector ISA
ATen dispatches to (``AVX512``, ``AVX2``), which does not say whether bf16 is there, so it is not used. That
detection lives in ``medseg.runtime.cpu_bf16`` (training asks it too, ``medseg.runtime.device.resolve_precision``).

Explicit ``bf16`` on a CPU without native bf16 runs (slowly) after a one-time warning; ``fp16`` on the CPU is a
``ConfigError``: CPU autocast to fp16 is emulated and far slower than fp32. The windows' self-check against fp32
is ``medseg.inference.sliding.CheckedAutocast``; the volume predictor and the 2D image predictor both resolve the
setting with ``network_precision`` and self-check it that way (2D images: on the first image's first windows).

A network that runs in one precision only (``fixed_precision``: an exported ONNX / TorchScript network,
``medseg.inference.onnx_network``) runs in fp32 whatever is asked; an explicit bf16 / fp16 then gives a note for
a ``PrecisionWarning`` instead of an error.
"""

from __future__ import annotations

import torch

from medseg.errors import ConfigError
from medseg.runtime.cpu_bf16 import PrecisionWarning as PrecisionWarning  # re-exported: the predictors warn with it
from medseg.runtime.cpu_bf16 import cpu_has_native_bf16, warn_emulated_bf16
from medseg.runtime.device import Precision

SETTINGS = ("auto", "fp32", "bf16", "fp16")
FULL = Precision(None, False)


def cuda_precision(setting: str, device: torch.device) -> Precision:
    """CUDA: ``auto`` is bf16 where the card supports it, else fp16 (autocast, no gradient scaler at inference)."""
    if setting == "fp32":
        return FULL
    bf16_ok = torch.cuda.is_bf16_supported()
    if setting == "auto":
        setting = "bf16" if bf16_ok else "fp16"
    if setting == "bf16" and not bf16_ok:
        raise ConfigError(f"inference.precision: bf16 is not supported by {device} (use fp16, fp32 or auto)")
    return Precision(torch.bfloat16 if setting == "bf16" else torch.float16, False)


def resolve_inference_precision(setting: str, device: torch.device, native_bf16: bool | None = None) -> Precision:
    """The autocast ``inference.precision`` asks for on ``device`` (``Precision(None, ...)``: fp32).

    ``native_bf16`` overrides the CPU detection (``cpu_has_native_bf16``). ``ConfigError`` for fp16 on the CPU.
    """
    if setting not in SETTINGS:
        raise ConfigError(f"inference.precision: {setting!r} is none of auto, fp32, bf16, fp16")
    if device.type == "cuda":
        return cuda_precision(setting, device)
    if device.type != "cpu":  # other accelerators: fp32 unless asked; autocast on them is torch's to support
        explicit = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting)
        return Precision(explicit, False)
    if setting == "fp16":
        raise ConfigError(
            "inference.precision: fp16 runs only on CUDA devices (CPU autocast to fp16 is emulated and slower than "
            "fp32); on the CPU use bf16, fp32 or auto"
        )
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if setting == "bf16" and not native:
        warn_emulated_bf16("inference.precision")
    if setting == "bf16" or (setting == "auto" and native):
        return Precision(torch.bfloat16, False)
    return FULL


def network_precision(setting: str, device: torch.device, network: object) -> tuple[Precision, str | None]:
    """``resolve_inference_precision`` for ``network``, and a note for a ``PrecisionWarning`` (else None).

    A network with a ``fixed_precision`` attribute (exported networks: ``"fp32"``) runs in full precision: ``auto``
    and ``fp32`` silently, ``bf16`` / ``fp16`` with the note saying the request was not honoured (never an error:
    the prediction is the exported network's own).
    """
    fixed = getattr(network, "fixed_precision", None)
    if fixed is None:
        return resolve_inference_precision(setting, device), None
    if setting not in SETTINGS:
        raise ConfigError(f"inference.precision: {setting!r} is none of auto, fp32, bf16, fp16")
    if setting in ("bf16", "fp16"):
        backend = getattr(network, "backend", "exported")
        return (
            FULL,
            f"inference.precision {setting}: the exported network ({backend}) runs in {fixed} only; predicting in {fixed}",
        )
    return FULL, None
