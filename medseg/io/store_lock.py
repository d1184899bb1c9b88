"""One process at a time through the set-up of a local SQLite MLflow store.

MLflow creates a new SQLite store's tables (and runs its migrations) when the first client opens it; two
processes doing that at once (two trainings started together on a new ``mlflow.db``) make one of them fail with
``table experiments already exists``, and two creating the same experiment make one fail with ``RESOURCE_ALREADY_
EXISTS``. A tracking server serialises its own writes; a SQLite file needs a lock beside it. ``filelock`` (already
installed with torch) holds an OS file lock (``flock`` on POSIX), released when the process dies, so a killed run
never leaves the store locked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"
LOCK_TIMEOUT_S = 300.0  # creating a store takes ~1 s; a wait this long means something else is wrong


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    return Path(uri.removeprefix(SQLITE_PREFIX)) if uri.startswith(SQLITE_PREFIX) else None


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` (exclusive, across processes) while the block runs, where ``uri`` is a SQLite store;
    for other stores the block runs without a lock."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=LOCK_TIMEOUT_S):
        yield
