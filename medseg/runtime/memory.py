"""Peak resident memory (RSS) of this process, per case where the kernel allows it.

Linux keeps the high-water mark ``VmHWM`` in ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it, so each case reports its own peak. Elsewhere (or if the reset is not
allowed) the process-wide peak from ``resource.getrusage`` is reported and marked as such.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

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
# Blocks above this get their own mapping, unmapped on free. 32 MiB keeps one window's activations (a 96x96x64
# window's full-resolution feature maps are ~19 MiB) on the heap, where they are reused without page faults:
# measured on 512x512x600 int16, memory-bounded, 2 CPU cores: 128 KiB 80.9 s / 2.64x the input's bytes,
# 32 MiB 51.8 s / 2.89x in isolated runs; in the benchmark (README) 44.2 s / 2.54x.
MMAP_THRESHOLD = 32 * 2**20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory_to_os(threshold_bytes: int = MMAP_THRESHOLD) -> bool:
    """Make glibc give large freed blocks back to the OS at once (memory-bounded inference); True if applied.

    glibc raises its mmap threshold dynamically (up to 32 MiB on 64-bit) after large blocks are freed, after
    which multi-MiB tensors come from the heap and their pages stay resident when freed: RSS then tracks the
    largest heap ever used, not what is live. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, as
    ``MALLOC_MMAP_THRESHOLD_`` would) serves every block above it with its own mapping, unmapped on free (the
    slab accumulators, the label maps). Smaller blocks stay on the heap: a very low threshold (128 KiB was
    tried) makes every activation of the network a fresh mapping whose pages fault in on each window, ~1.6x
    slower per window. Process-wide; a no-op off glibc.
    """
    libc = _libc()
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))) if libc is not None else False
    except AttributeError:
        return False


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS now (glibc ``malloc_trim(0)``); True if memory was released.

    Called when a phase that reused heap blocks (the network's activations, window after window) is over, so
    their pages do not stay resident through the next phase and raise its peak. A no-op off glibc.
    """
    libc = _libc()
    try:
        return bool(libc.malloc_trim(0)) if libc is not None else False
    except AttributeError:
        return False
