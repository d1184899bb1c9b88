"""Whether this CPU computes bf16 natively, and the one-time precision warnings.

Read from the CPU's feature flags (``avx512_bf16``, ``amx_bf16``; ``bf16`` / ``sve_bf16`` on Arm), never from its
brand: a CPU without them emulates bf16 and is slower in it than in fp32. Used by both precision choices, training
(``medseg.runtime.device.resolve_precision``) and prediction (``medseg.runtime.precision``); kept apart from both so
neither imports the other.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16, SVE)
CPUINFO = Path("/proc/cpuinfo")

_warned: set[str] = set()  # one-time warnings already given in this process


class PrecisionWarning(UserWarning):
    """Reduced precision that is slow here, or that the self-check turned back to fp32."""


def cpuinfo_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU feature flags of the first processor in a ``/proc/cpuinfo``-style file (x86 ``flags``, Arm
    ``Features``); None where the file is unreadable or lists none (not Linux)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def torch_cpu_capabilities() -> Mapping[str, Any] | None:
    """``torch.cpu.get_capabilities()`` (what torch's kernels see), or None on a torch without it (< 2.9)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    return get() if callable(get) else None


def cpu_has_native_bf16(
    capabilities: Mapping[str, Any] | None = None, flags: frozenset[str] | None = None, probe: bool = True
) -> bool:
    """True when the CPU computes bf16 in hardware (one of ``BF16_FLAGS``).

    ``capabilities`` (torch's map) is consulted first, then ``flags`` (``/proc/cpuinfo``); with ``probe`` the ones
    not given are read from this machine. A CPU that neither source describes counts as without bf16.
    """
    caps = capabilities if capabilities is not None or not probe else torch_cpu_capabilities()
    if caps is not None and any(name in caps for name in BF16_FLAGS):
        return any(bool(caps.get(name, False)) for name in BF16_FLAGS)
    found = flags if flags is not None or not probe else cpuinfo_flags()
    return bool(found and found.intersection(BF16_FLAGS))


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """A ``PrecisionWarning`` the first time ``key`` comes up in this process, nothing after (``stacklevel`` as
    ``warnings.warn``'s, counted from this function's caller's caller by default)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, PrecisionWarning, stacklevel=stacklevel)


def warn_emulated_bf16(setting: str) -> None:
    """The one-time warning that ``setting`` (``train.amp``, ``inference.precision``) asks for bf16 on a CPU that
    only emulates it."""
    warn_once(
        f"{setting}: emulated bf16",
        f"{setting} bf16: this CPU has no native bf16 (no avx512_bf16 / amx_bf16): bf16 is emulated and slower than "
        "fp32 here",
        stacklevel=4,  # the caller of the function that resolved the setting, as a direct warn_once call reports
    )
