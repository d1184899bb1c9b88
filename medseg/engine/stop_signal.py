"""Graceful stop on SIGTERM: what schedulers (SLURM, Kubernetes) send before SIGKILL at the end of a grace period.

``StopSignal`` is installed by ``Trainer.fit`` for the duration of the run (main thread only; the previous handler
is restored afterwards). The first SIGTERM only sets a flag: the trainer finishes the training steps of the
current epoch, writes ``last.pt``, ends the run and raises ``TrainingStopped``. A second SIGTERM raises
``TrainingStopped`` at once; the previous ``last.pt`` stays valid, since it is written atomically. SIGINT keeps
Python's default: it interrupts at once.

``TrainingStopped`` is a ``KeyboardInterrupt``: a caller that does not know it (a pipeline step that catches
``Exception``) stops too, instead of going on to evaluate or register a model whose training did not finish, and
code that cleans up after an interrupt does so. ``medseg train`` turns it into exit code 143.

Under DDP every rank checks the flag at the same points (``agreed``: a sum over ranks), so all ranks stop after
the same epoch even when only one of them got the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

from medseg.runtime import distributed as dist_utils

log = logging.getLogger("medseg.train")
EXIT_CODE = 128 + int(signal.SIGTERM)  # 143, what a shell reports for a process ended by SIGTERM


class TrainingStopped(KeyboardInterrupt):
    """SIGTERM ended the training (after saving the epoch, or at once on a second one); ``exit_code``: 143."""

    exit_code = EXIT_CODE


class StopSignal:
    """Context manager: the first SIGTERM requests a stop at the next check, the second one stops at once.

    Outside the main thread (signal handlers can only be set there) it installs nothing and never requests a
    stop. Forked children (DataLoader workers) inherit the handler and ignore the signal, so they keep feeding
    the epoch the main process is finishing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._pid = os.getpid()
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopSignal:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        if self.requested:
            raise TrainingStopped(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = True
        # logging from a signal handler can deadlock on the handler's lock; a raw write to stderr cannot
        os.write(2, b"medseg: SIGTERM received: finishing the training steps of this epoch, then stopping\n")

    def agreed(self) -> bool:
        """True when any rank was asked to stop (one all-reduce under DDP: every rank must call it, in step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        stop = float(dist_utils.all_reduce_sum(flag)[0]) > 0
        self.requested = self.requested or stop
        return stop


def stopped_message(run_dir: object, saved_epoch: int, epochs: int) -> str:
    """The one log line of a run stopped by SIGTERM: what is saved (0-based ``saved_epoch``, -1: none) and how
    to go on."""
    resume = f"`medseg train --resume {run_dir}`"
    if saved_epoch < 0:
        return (
            f"stopped on SIGTERM before any epoch was saved; start again, or resume with {resume} once last.pt exists"
        )
    return (
        f"stopped on SIGTERM: epoch {saved_epoch + 1}/{epochs} is saved in {run_dir}/checkpoints/last.pt; "
        f"{resume} continues with epoch {saved_epoch + 2}"
    )
