"""``--shard I/N`` and torchrun's RANK/WORLD_SIZE: parsing, and shards that partition a batch."""

from __future__ import annotations

import pytest

from medseg.inference.shard import parse_shard, select_shard, shard_from_env


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "0/0", "1", "1/2/3", "a/b", "1.0/2", ""):
        with pytest.raises(ValueError, match="0..N-1"):
            parse_shard(bad)


@pytest.mark.parametrize(("n_items", "count"), [(0, 3), (1, 3), (10, 1), (11, 3), (12, 4), (5, 7)])
def test_shards_partition_the_items_in_order(n_items: int, count: int) -> None:
    items = [f"case{i}" for i in range(n_items)]
    parts = [select_shard(items, i, count) for i in range(count)]
    assert sorted(sum(parts, [])) == sorted(items)  # disjoint and complete
    assert len(set(sum(parts, []))) == n_items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(p == [x for x in items if x in p] for p in parts)  # each keeps the batch order
    assert select_shard(items, 1, 3) == items[1::3]


def test_shard_from_env() -> None:
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: no sharding
    assert shard_from_env({"RANK": "0"}) is None and shard_from_env({}) is None
    with pytest.raises(ValueError, match="0..N-1"):
        shard_from_env({"RANK": "4", "WORLD_SIZE": "4"})
