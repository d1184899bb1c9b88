"""Dataset fingerprint and plans: rules checked by hand, the phantom (CT), and real hippocampus MR files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import load_config
from medseg.errors import InputError
from medseg.io.manifest import Case, Manifest, import_msd, load_manifest
from medseg.planning.volumes import (
    _to_orientation,
    fingerprint_dataset,
    normalization,
    num_downsamplings,
    patch_size,
    plan_dataset,
    plans_path_for,
    target_spacing,
)
from tests.conftest import run_cli


# ---- rules, on hand-made numbers ------------------------------------------------------------------
def test_patch_rounds_up_to_divisor_and_respects_budget() -> None:
    assert patch_size([35, 50, 36], 8, 10**9) == [40, 56, 40]  # nnU-Net's hippocampus patch
    assert patch_size([33, 8, 1], 4, 10**9) == [36, 8, 4]  # never below one divisor per axis
    capped = patch_size([200, 100, 60], 8, 96 * 96 * 64)
    assert np.prod(capped) <= 96 * 96 * 64 and all(s % 8 == 0 for s in capped)
    assert capped[0] < 200  # the longest axis gave way first
    assert capped[2] == 64  # the short axis kept its rounded-up size


def test_downsamplings_stop_at_min_feature_size() -> None:
    assert num_downsamplings([35, 50, 36]) == 3  # 35 / 2^3 = 4.4 >= 4, 35 / 2^4 < 4
    assert num_downsamplings([512, 512, 512]) == 5  # capped
    assert num_downsamplings([6, 6, 6]) == 1  # at least one halving


def test_target_spacing_median_and_anisotropy() -> None:
    iso = {"spacing": {"median": [1.0, 1.0, 1.2], "percentile_10": [0.9, 0.9, 1.0]}}
    assert target_spacing(iso) == [1.0, 1.0, 1.2]
    aniso = {"spacing": {"median": [0.7, 0.7, 5.0], "percentile_10": [0.6, 0.6, 2.5]}}
    assert target_spacing(aniso) == [0.7, 0.7, 2.5]  # the coarse axis takes the 10th percentile


def test_normalization_by_modality() -> None:
    fi = {"percentile_00_5": -80.0, "percentile_99_5": 240.0}
    assert normalization({"modality": "CT", "foreground_intensity": fi, "nonzero_fraction_median": 1.0}) == \
        {"mode": "ct_window", "lower": -80.0, "upper": 240.0}
    assert normalization({"modality": "MRI", "foreground_intensity": fi, "nonzero_fraction_median": 0.99}) == \
        {"mode": "zscore", "nonzero": False}
    assert normalization({"modality": "T1", "foreground_intensity": fi, "nonzero_fraction_median": 0.4}) == \
        {"mode": "zscore", "nonzero": True}  # skull-stripped: normalise inside the brain only


def test_shape_and_spacing_follow_reorientation() -> None:
    # voxel axis 0 runs along world y (A), axis 1 along world x (R), axis 2 along z (S)
    affine = np.array([[0, 2.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    shape, spacing = _to_orientation((10, 20, 30), (1.0, 2.0, 3.0), affine, "RAS")
    assert shape == [20, 10, 30] and spacing == [2.0, 1.0, 3.0]
    flipped = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS storage: a flip is not a permutation
    assert _to_orientation((5, 6, 7), (1.0, 1.0, 2.0), flipped, "RAS") == ([5, 6, 7], [1.0, 1.0, 2.0])


# ---- the phantom (CT, four storage geometries) ------------------------------------------------------
def test_plan_phantom(tiny_phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "plans.json"
    doc = plan_dataset(tiny_phantom, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp file left
    m = load_manifest(tiny_phantom)
    train = m.split("train")
    fp = doc["fingerprint"]
    assert fp["n_cases"] == len(train) and [c["id"] for c in fp["cases"]] == [c.id for c in train]
    # shapes from the headers, reoriented to RAS (the phantom's axes are only flipped or slightly oblique)
    shapes = [nib.load(m.image_paths(c)[0]).shape for c in train]
    assert fp["shape"]["median"] == np.median(np.array(shapes), 0).tolist()
    p = doc["plans"]
    assert p["target_spacing"] is None  # every case already has the median spacing: nothing to resample
    assert all(s % p["patch_divisor"] == 0 for s in p["patch_size"])
    assert all(ps >= s for ps, s in zip(p["patch_size"], p["median_shape_at_target"], strict=True))
    # CT -> window between foreground percentiles; phantom organs are 60..180 HU (+ noise), air is -1000
    inten = p["intensity"]
    assert inten["mode"] == "ct_window" and -150 < inten["lower"] < 100 < inten["upper"] < 400
    # class frequencies add up and every organ is present
    fr = p["class_fractions"]
    assert abs(sum(fr.values()) - 1.0) < 1e-4 and fr["background"] > fr["liver"] > fr["kidney"] > 0
    # the suggested overrides are valid for a preset
    cfg = load_config("phantom_unet3d", doc["overrides"])
    assert list(cfg.data.patch_size) == p["patch_size"] and cfg.data.intensity.mode == "ct_window"


def test_plan_resamples_when_spacings_differ(phantom_copy: Path) -> None:
    m = load_manifest(phantom_copy)
    first = m.split("train")[0]
    path = m.image_paths(first)[0]
    img = nib.load(path)
    lab_path = m.label_path(first)
    lab = nib.load(lab_path)
    stretch = np.diag([2.0, 2.0, 2.0, 1.0])  # this case now has twice the spacing of the others
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine @ stretch), path)
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), lab.affine @ stretch), lab_path)
    doc = plan_dataset(phantom_copy, phantom_copy.parent / "plans.json")
    spacings = [c["spacing"] for c in doc["fingerprint"]["cases"]]
    assert doc["plans"]["target_spacing"] == np.median(np.array(spacings), 0).tolist()


# ---- the real hippocampus MR data (a subset, to stay fast) --------------------------------------------
@pytest.fixture(scope="module")
def hippo_manifest(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hippo") / "hippocampus.json"
    import_msd(hippocampus_dir, out, val_fraction=0.1, test_fraction=0.2, seed=0)
    return out


def test_plan_real_hippocampus_subset(hippo_manifest: Path, tmp_path: Path) -> None:
    doc = plan_dataset(hippo_manifest, tmp_path / "p.json", max_cases=16)
    m = load_manifest(hippo_manifest)
    cases = m.split("train")[:16]
    fp, p = doc["fingerprint"], doc["plans"]
    assert fp["modality"] == "MRI" and fp["n_cases"] == 16
    assert {c["id"] for c in fp["cases"]} <= {c.id for c in m.split("train")}  # never the held-out test split
    shapes = np.array([nib.load(m.image_paths(c)[0]).shape for c in cases])
    assert fp["shape"]["median"] == np.median(shapes, 0).tolist()
    assert p["target_spacing"] is None and fp["spacing"]["median"] == [1.0, 1.0, 1.0]
    # mixed storage (float32 and uint8) and raw scales far apart -> per-volume z-score over the whole crop
    assert sum(fp["dtypes"].values()) == 16
    assert p["intensity"] == {"mode": "zscore", "nonzero": False}
    assert p["network_downsamplings"] == 3 and all(s % 8 == 0 for s in p["patch_size"])
    assert all(ps >= s for ps, s in zip(p["patch_size"], p["median_shape_at_target"], strict=True))
    assert p["patch_covers_median_fraction"] == 1.0
    # class statistics against the label files themselves
    counts = np.zeros(3, dtype=np.int64)
    for c in cases:
        counts += np.bincount(np.rint(np.asanyarray(nib.load(m.label_path(c)).dataobj)).astype(int).ravel(), minlength=3)
    for name, v in m.labels.items():
        assert fp["classes"][name]["voxels"] == counts[v]
        assert fp["classes"][name]["cases_present"] == 16


def test_plan_cli_writes_beside_manifest_and_prints_overrides(hippo_manifest: Path) -> None:
    target = plans_path_for(hippo_manifest)
    p = run_cli("data", "plan", str(hippo_manifest), "--max-cases", "6")
    assert target.is_file() and str(target) in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("suggested overrides:"))
    suggested = line.split(":", 1)[1].split()
    assert "data.spacing=null" in suggested and "data.intensity.mode=zscore" in suggested
    assert json.loads(target.read_text())["overrides"] == suggested


def test_plan_cli_bad_input_is_one_line_error(phantom_copy: Path, tmp_path: Path) -> None:
    m = load_manifest(phantom_copy)
    missing = m.label_path(m.split("train")[0])
    missing.unlink()
    p = run_cli("data", "plan", str(phantom_copy), "--out", str(tmp_path / "p.json"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("medseg: error:") and missing.name in p.stderr and "not found" in p.stderr
    assert not (tmp_path / "p.json").exists()


def test_plan_needs_labelled_training_cases(tmp_path: Path) -> None:
    m = Manifest(name="empty", labels={"background": 0, "x": 1}, cases=[Case("a", ("a.nii.gz",), None, "test")])
    m.save(tmp_path / "m.json")
    with pytest.raises(InputError, match="no labelled cases"):
        fingerprint_dataset(load_manifest(tmp_path / "m.json"))
