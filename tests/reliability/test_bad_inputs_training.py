"""Bad training/validation cases: the input checks (``medseg data validate``, the trainer's ``check_cases``) name the
file and the cause in one line before any training starts; an empty label is a warning, not an error.

Each test damages one case of a writable copy of the tiny phantom (``phantom_copy``) and checks that the whole
dataset is refused with that file's error, while the other cases pass the same check on their own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.input_checks import check_case, check_cases
from medseg.errors import InputError
from medseg.inference.inputs import discover_inputs
from medseg.io.manifest import Case, Manifest, load_manifest


def _rewrite(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, nib.load(str(path)).affine if affine is None else affine), str(path))


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).copy()


def _label_shape(m: Manifest, c: Case) -> Path:
    lab = m.label_path(c)
    _rewrite(lab, _voxels(lab)[:, :, :-1])
    return lab


def _label_affine(m: Manifest, c: Case) -> Path:
    lab = m.label_path(c)
    affine = nib.load(str(lab)).affine.copy()
    affine[1, 3] += 0.5  # a sixth of a voxel: far beyond header round-off
    _rewrite(lab, _voxels(lab), affine)
    return lab


def _label_value(m: Manifest, c: Case) -> Path:
    lab = m.label_path(c)
    a = _voxels(lab)
    a[10, 10, 10] = 7
    _rewrite(lab, a)
    return lab


def _float_label(m: Manifest, c: Case) -> Path:
    lab = m.label_path(c)
    a = _voxels(lab).astype(np.float32)
    a[a == 1] = 0.5  # an interpolated or probability map, not classes
    _rewrite(lab, a)
    return lab


def _truncated_label(m: Manifest, c: Case) -> Path:
    lab = m.label_path(c)
    lab.write_bytes(lab.read_bytes()[:-200])
    return lab


def _constant_image(m: Manifest, c: Case) -> Path:
    img = m.image_paths(c)[0]
    _rewrite(img, np.full(_voxels(img).shape, -1000, np.int16))
    return img


def _image_2d(m: Manifest, c: Case) -> Path:
    img = m.image_paths(c)[0]
    _rewrite(img, _voxels(img)[:, :, 0])
    return img


def _image_4d(m: Manifest, c: Case) -> Path:
    img = m.image_paths(c)[0]
    a = _voxels(img)
    _rewrite(img, np.stack([a, a], -1))
    return img


def _nan_image(m: Manifest, c: Case) -> Path:
    img = m.image_paths(c)[0]
    a = _voxels(img).astype(np.float32)
    a[1, 2, 3] = np.inf
    _rewrite(img, a)
    return img


# kind -> (damage one case, returning the file; the cause its error must give)
KINDS: dict[str, tuple[Callable[[Manifest, Case], Path], str]] = {
    "label_shape_mismatch": (_label_shape, r"label shape \(48, 48, 23\) != image shape \(48, 48, 24\)"),
    "label_affine_mismatch": (_label_affine, r"label affine differs from image affine .* by up to 0\.5 \(tolerance"),
    "label_value_outside_map": (_label_value, r"label values \[7\] not in the manifest's label map \[0, 1, 2, 3\]"),
    "float_label": (_float_label, r"label contains non-integer or NaN values"),
    "truncated_label": (_truncated_label, r"corrupt gzip data \(EOFError"),
    "constant_image": (_constant_image, r"image is constant \(every voxel -1000\): no contrast to learn from"),
    "image_2d": (_image_2d, r"expected a 3D volume \(or 4D: channels last\), got shape \(48, 48\)"),
    "image_4d_extra_channel": (_image_4d, r"the manifest lists 1 channel\(s\), this case has 2"),
    "inf_in_image": (_nan_image, r"image contains 1 NaN/inf voxels"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_training_case_is_refused_naming_the_file(kind: str, phantom_copy: Path) -> None:
    m = load_manifest(phantom_copy)
    damage, cause = KINDS[kind]
    bad_case = m.cases[2]
    path = damage(m, bad_case)
    with pytest.raises(InputError) as e:
        check_cases(m, m.cases)
    message = str(e.value)
    assert e.value.path == str(path) and message.startswith(f"{path}: ")
    assert re.search(cause, message), message
    assert "\n" not in message and not re.search(r"object at 0x", message)
    for other in m.cases:  # that case only: the others pass the same checks
        if other is not bad_case:
            check_case(m, other)


def test_label_affine_within_tolerance_passes(phantom_copy: Path) -> None:
    m = load_manifest(phantom_copy)
    lab = m.label_path(m.cases[0])
    affine = nib.load(str(lab)).affine.copy()
    affine[:3, 3] += 2e-4  # writer round-off (float32 headers)
    _rewrite(lab, _voxels(lab), affine)
    assert check_case(m, m.cases[0]).label_values == (0, 1, 2, 3)


def test_integer_valued_float_label_passes(phantom_copy: Path) -> None:
    """Many tools store labels as float32; whole numbers in the label map are classes."""
    m = load_manifest(phantom_copy)
    lab = m.label_path(m.cases[0])
    _rewrite(lab, _voxels(lab).astype(np.float32))
    assert check_case(m, m.cases[0]).label_values == (0, 1, 2, 3)


def test_empty_label_warns_and_does_not_fail(phantom_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = load_manifest(phantom_copy)
    lab = m.label_path(m.cases[1])
    _rewrite(lab, np.zeros_like(_voxels(lab)))
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        infos = check_cases(m, m.cases)
    assert infos[1].label_values == (0,) and len(infos) == len(m.cases)
    warned = [r.getMessage() for r in caplog.records if r.name == "medseg.data"]
    assert warned == [f"{lab}: label is empty (background only); kept as a case without any organ"]


def _manifest_with(path: Path, image: str) -> Path:
    doc = json.loads(path.read_text())
    doc["training"][0]["image"] = image
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_path_escaping_its_root_is_refused(how: str, phantom_copy: Path, tmp_path: Path) -> None:
    """Checked when the manifest is read: training, validation and prediction all refuse it before opening a file."""
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes((phantom_copy.parent / "imagesTr" / "phantom_000.nii.gz").read_bytes())
    if how == "symlink":  # a link inside the dataset folder that points out of it
        (phantom_copy.parent / "imagesTr" / "link.nii.gz").symlink_to(outside)
    rel = {"dotdot": "../outside.nii.gz", "absolute": str(outside), "symlink": "imagesTr/link.nii.gz"}[how]
    manifest = _manifest_with(phantom_copy, rel)
    for read in (load_manifest, discover_inputs):
        with pytest.raises(InputError) as e:
            read(manifest)
        assert e.value.path == str(manifest.resolve())
        assert re.search(r"case path .* (escapes the dataset root|is absolute)", str(e.value)), str(e.value)
