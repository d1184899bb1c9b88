"""Phantom: deterministic, multi-organ, with flipped and oblique storage geometries."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.phantom import LABELS, make_case, write_phantom
from medseg.io.manifest import load_manifest


def _arrays(manifest_path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    m = load_manifest(manifest_path)
    out = []
    for c in m.cases:
        img, lab = nib.load(m.image_paths(c)[0]), nib.load(m.label_path(c))
        out.append((np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj), img.affine))
    return out


def test_phantom_is_deterministic(tmp_path: Path) -> None:
    a = write_phantom(tmp_path / "a", cases=4, seed=5, shape=(32, 32, 16))
    b = write_phantom(tmp_path / "b", cases=4, seed=5, shape=(32, 32, 16))
    for (ia, la, aa), (ib, lb, ab) in zip(_arrays(a.path), _arrays(b.path), strict=True):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb) and np.array_equal(aa, ab)
    assert [c.split for c in a.cases] == [c.split for c in b.cases]
    c = write_phantom(tmp_path / "c", cases=4, seed=6, shape=(32, 32, 16))
    assert not np.array_equal(_arrays(a.path)[0][0], _arrays(c.path)[0][0])


def test_phantom_organs_sizes_and_geometries(tiny_phantom: Path) -> None:
    cases = _arrays(tiny_phantom)
    orientations = set()
    for image, label, affine in cases:
        counts = np.bincount(label.ravel(), minlength=4)
        assert all(counts[v] > 0 for v in LABELS.values())  # every organ present
        assert counts[1] > counts[3] and counts[1] > counts[2]  # liver is the largest
        assert image.dtype == np.int16 and label.dtype == np.uint8
        orientations.add(nib.aff2axcodes(affine))
        # organs are brighter than surrounding soft tissue (CT-like contrast)
        assert image[label == 3].mean() > image[label == 1].mean() > image[label == 0].mean()
    assert {("R", "A", "S"), ("L", "A", "S"), ("L", "P", "S")} <= orientations
    obliques = [a for _, _, a in cases if np.count_nonzero(np.abs(a[:3, :3]) > 1e-6) > 3]
    assert obliques, "at least one oblique case"
    zooms = nib.affines.voxel_sizes(cases[0][2])
    assert zooms[2] != zooms[0]  # anisotropic spacing


def test_anatomy_is_fixed_in_world_space() -> None:
    # Liver centroid in world mm is the same whatever the storage geometry (up to the per-case jitter).
    centroids = []
    for i in range(4):
        _, label, affine = make_case(i, seed=0, shape=(48, 48, 24), spacing=(3.0, 3.0, 4.0))
        ijk = np.argwhere(label == 1).mean(0)
        centroids.append(affine[:3, :3] @ ijk + affine[:3, 3])
    spread = np.ptp(np.array(centroids), axis=0)
    assert (spread < 15).all(), centroids  # jitter is at most ~8 mm; a wrong flip would move it ~44 mm
