"""Split a batch across processes: ``--shard I/N`` (0-based), or torchrun's RANK/WORLD_SIZE."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4); raises ``ValueError`` with the expected form unless 0 <= I < N."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ValueError(f"{text!r}: expected I/N with integers, e.g. 0/4 (shards are numbered 0..N-1)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{text!r}: need N >= 1 and 0 <= I < N (shards are numbered 0..N-1)")
    return i, n


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when launched by torchrun with more than one process, else None."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    text = f"{env['RANK']}/{env['WORLD_SIZE']}"
    i, n = parse_shard(text)
    return (i, n) if n > 1 else None


def select_shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Every ``count``-th item starting at ``index``: shards are disjoint, cover all items, and sizes differ by <= 1."""
    return list(items[index::count])
