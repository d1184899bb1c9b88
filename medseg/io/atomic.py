"""Atomic file writes: write to a temp file in the target folder, fsync, then ``os.replace``.

A killed process leaves either the old file or the new one, never half of it. Temp files start with a dot
and carry ``.tmp`` before any format suffix; readers of output folders skip dot-files (``is_output_file``).
A SIGKILL between ``mkstemp`` and ``os.replace`` leaves such a temp file behind (the ``finally`` never runs);
the next run of the writer removes it (``remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success it is renamed onto ``target``.

    ``suffix`` lets writers that infer the format from the extension (nibabel: ``.nii.gz``) see it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(target: str | Path, staging_dir: str | Path | None = None, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty folder to fill; on success it is renamed onto ``target`` in one step, so ``target``
    exists whole or not at all. On an error, the folder and what was written into it are removed.

    The folder is made in ``staging_dir`` (default: beside ``target``; it must be on the same file system). An
    existing ``target`` is an error (``os.replace`` of a folder fails onto a non-empty one) unless ``replace``:
    then the old folder is moved aside into the staging area first and removed once the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    where = Path(staging_dir) if staging_dir is not None else target.parent
    where.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=where))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700: the renamed folder would be private to this user
    old = staging.with_suffix(".old")
    try:
        yield staging
        if replace and target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        for leftover in (staging, old):  # gone after the renames; what a failure left otherwise
            shutil.rmtree(leftover, ignore_errors=True)


def write_atomic(target: str | Path, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` then atomically move the result to ``target``."""
    with atomic_path(target, suffix) as tmp:
        writer(tmp)
    return Path(target)


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return write_atomic(target, lambda p: p.write_text(text))


def write_json_atomic(target: str | Path, obj: Any) -> Path:
    """Atomically write JSON (indented, keys in insertion order)."""
    return write_text_atomic(target, json.dumps(obj, indent=2, default=str) + "\n")


def is_output_file(path: Path) -> bool:
    """False for hidden files, which include in-flight atomic temp files."""
    return not path.name.startswith(".")


def remove_stale_temps(folder: str | Path, names: list[str] | None = None) -> int:
    """Delete the temp files ``atomic_path`` left in ``folder`` for targets ``names`` (None: any target); the count.

    Only for a folder this process owns while it runs: another writer's temp file in flight would be removed too.
    """
    folder = Path(folder)
    patterns = [f".{glob.escape(n)}.*.tmp*" for n in names] if names is not None else [".*.tmp*"]
    n = 0
    for pattern in patterns:
        for tmp in folder.glob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                n += 1
    return n
