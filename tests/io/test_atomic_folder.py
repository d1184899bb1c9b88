"""``atomic_folder``: a folder appears whole (with normal permissions) or not at all; in replace mode the old one
stays until the new one is whole."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medseg.io.atomic import atomic_folder


def test_folder_appears_whole_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out" / "pkg"
    old = os.umask(0o022)
    try:
        with atomic_folder(target) as staging:
            assert staging.parent == target.parent and staging.name.startswith(".")
            (staging / "a.txt").write_text("a")
            (staging / "sub").mkdir()
            (staging / "sub" / "b.txt").write_text("b")
            assert not target.exists()  # nothing visible before the block ends
    finally:
        os.umask(old)
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in target.parent.iterdir()) == ["pkg"]  # no staging folder left


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pkg"
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target) as staging:
        (staging / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_target_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OSError), atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_replace_swaps_in_the_new_folder_and_removes_the_old(tmp_path: Path) -> None:
    target, staging_dir = tmp_path / "series" / "s1", tmp_path / ".staging"
    target.mkdir(parents=True)
    (target / "old.dcm").write_text("old")
    with atomic_folder(target, staging_dir=staging_dir, replace=True) as staging:
        assert staging.parent == staging_dir
        (staging / "new.dcm").write_text("new")
        assert [p.name for p in target.iterdir()] == ["old.dcm"]  # the old copy stays until the new one is whole
    assert [p.name for p in target.iterdir()] == ["new.dcm"]
    assert list(staging_dir.iterdir()) == []  # neither the staging folder nor the old copy is left


def test_failed_replace_keeps_the_old_folder(tmp_path: Path) -> None:
    target, staging_dir = tmp_path / "s1", tmp_path / ".staging"
    target.mkdir()
    (target / "old.dcm").write_text("old")
    with pytest.raises(RuntimeError, match="half"), atomic_folder(target, staging_dir, replace=True) as staging:
        (staging / "1.dcm").write_text("x")
        raise RuntimeError("half a series")
    assert [p.name for p in target.iterdir()] == ["old.dcm"]
    assert list(staging_dir.iterdir()) == []
