"""One run at a time per output folder: an exclusive ``fcntl.flock`` on a lock file that names its holder's PID.

The kernel releases a ``flock`` when its holder exits, however it exits (``kill -9`` included), so a lock file
left behind never blocks the next run: only a live holder does. The PID in the file is for the message. On a
shared volume the lock holds across machines only where the filesystem's flock does (local disks, NFSv4,
CephFS). Both pipelines (``nightly_predict``, ``train_evaluate_register``) lock their output folder with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockedError(RuntimeError):
    """Another live process holds the lock; ``holder`` is the PID it wrote (``"unknown"`` if none yet)."""

    def __init__(self, path: Path, holder: str, what: str) -> None:
        super().__init__(
            f"{path.parent}: another {what} (pid {holder}) is using this output folder; "
            f"not starting a second one (lock file {path.name})"
        )
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str = "run") -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` while the block runs; ``LockedError`` at once if a
    live process holds it. The file keeps the holder's PID while it is held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise LockedError(path, fh.read().strip() or "unknown", what) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()  # an unheld lock names no holder
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
