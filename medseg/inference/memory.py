"""Peak resident memory (RSS) of this process, per case where the kernel allows it.

Linux keeps the high-water mark ``VmHWM`` in ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it, so each case reports its own peak. Elsewhere (or if the reset is not
allowed) the process-wide peak from ``resource.getrusage`` is reported and marked as such.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_peak_bytes() -> int:
    """Peak RSS of the process since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager measuring the peak RSS inside the block: ``with PeakMemory() as pm: ...; pm.peak_mb``."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.scope = "process"

    def __enter__(self) -> PeakMemory:
        try:
            _CLEAR.write_text("5")
            self.scope = "case" if _vm_hwm_bytes() is not None else "process"
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _vm_hwm_bytes() if self.scope == "case" else None
        self.peak_bytes = hwm if hwm is not None else process_peak_bytes()

    @property
    def peak_mb(self) -> float:
        """Peak RSS in MiB."""
        return round(self.peak_bytes / 2**20, 1)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc give large freed blocks back to the OS at once (memory-bounded inference); True if applied.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed, after which
    multi-MiB tensors come from the heap and their pages stay resident when freed: RSS then tracks the
    largest heap ever used, not what is live (measured ~+85 MiB on a 512x512x300 scan). Fixing the threshold
    (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_`` would) serves every block above it with
    its own mapping, unmapped on free. Process-wide; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
