"""Manifest loading at 20,000 cases: the linear duplicate-id check against the quadratic one it replaced.

Writes a 2D-image manifest of ``--cases`` cases (``imagesTr/<id>.png`` + ``labelsTr/<id>.png``) to a temporary
folder. No image files are written: ``load_manifest`` checks that every path stays inside the dataset root
(``Path.resolve``, which needs no file) but opens and stats nothing; files are read by ``data validate`` and
training. Then, in the same process and on the same manifest, it times ``load_manifest`` as it is
(``medseg.io.manifest.duplicates``: one ``Counter`` pass) and with the old check put back in its place
(``sorted({i for i in ids if ids.count(i) > 1})``, reimplemented here as the reference), plus both checks
alone on the same ids; prints the best of ``--repeat`` runs of each and the ratios. Both checks must agree,
on these unique ids and on a list with duplicates.

    .venv/bin/python benchmarks/manifest_load.py [--cases 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import medseg.io.manifest as manifest_module  # noqa: E402
from medseg.io.manifest import duplicates, load_manifest  # noqa: E402


def quadratic_duplicates(values: Iterable[str]) -> list[str]:
    """The check before ``duplicates``: one ``list.count`` (a full scan) per id, O(n^2)."""
    ids = list(values)
    return sorted({i for i in ids if ids.count(i) > 1})


def write_manifest(folder: Path, n: int) -> Path:
    """A VOC-style manifest of ``n`` labelled 2D images (paths only, no files), 10 % of them in val."""
    training = [{"id": f"2007_{i:06d}", "image": f"imagesTr/2007_{i:06d}.png", "label": f"labelsTr/2007_{i:06d}.png",
                 "split": "val" if i % 10 == 0 else "train"} for i in range(n)]
    doc = {"name": "bench2d", "labels": {"background": 0, "person": 1, "car": 2}, "channel_names": {"0": "RGB"},
           "file_ending": ".png", "numTraining": n, "training": training, "medseg": {"version": 1, "root": "."}}
    path = folder / "bench2d.json"
    path.write_text(json.dumps(doc))
    return path


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Fastest wall time of ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_manifest(Path(tmp), args.cases)
        new_s, m = best_of(args.repeat, lambda: load_manifest(path))
        assert len(m.cases) == args.cases and m.holds_images
        try:
            manifest_module.duplicates = quadratic_duplicates  # load_manifest looks the name up at call time
            old_s, m_old = best_of(args.repeat, lambda: load_manifest(path))
        finally:
            manifest_module.duplicates = duplicates
        assert [c.id for c in m_old.cases] == [c.id for c in m.cases]

    ids = [c.id for c in m.cases]
    check_new, found_new = best_of(args.repeat, lambda: duplicates(ids))
    check_old, found_old = best_of(args.repeat, lambda: quadratic_duplicates(ids))
    assert found_new == found_old == []
    with_dups = ids[:2000] + ids[:300:3] + ids[5:7]
    assert duplicates(with_dups) == quadratic_duplicates(with_dups) == sorted(set(ids[:300:3]) | set(ids[5:7]))

    print(f"load_manifest, {args.cases} 2D-image cases (best of {args.repeat}):")
    print(f"  new (Counter)        {new_s * 1000:10.1f} ms")
    print(f"  old (ids.count)      {old_s * 1000:10.1f} ms")
    print(f"  ratio old / new      {old_s / new_s:10.1f} x")
    print("duplicate-id check alone, same ids:")
    print(f"  new (Counter)        {check_new * 1000:10.2f} ms")
    print(f"  old (ids.count)      {check_old * 1000:10.2f} ms")
    print(f"  ratio old / new      {check_old / check_new:10.0f} x")


if __name__ == "__main__":
    main()
