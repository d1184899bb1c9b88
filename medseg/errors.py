"""User-facing errors: one line naming the file (or key) and the cause."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class InputError(MedsegError):
    """A data file is missing, unreadable or inconsistent."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MedsegError):
    """A configuration key or value is invalid."""
