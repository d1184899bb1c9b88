"""Manifests: MSD import on the real hippocampus data, path safety, label formats, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.errors import InputError
from medseg.io.manifest import assign_splits, duplicates, import_msd, load_manifest
from tests.conftest import run_cli


def test_import_msd_real_hippocampus(hippocampus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifests" / "hippo.json"
    m = import_msd(hippocampus_dir, out, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert m.labels == {"background": 0, "anterior": 1, "posterior": 2}
    assert len(m.cases) == 220
    counts = {s: len(m.split(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 154, "val": 44, "test": 22}
    reloaded = load_manifest(out)
    assert [c.id for c in reloaded.cases] == [c.id for c in m.cases]
    first = reloaded.cases[0]
    assert reloaded.image_paths(first)[0].is_file() and reloaded.label_path(first).is_file()
    assert not Path(first.image[0]).is_absolute()  # stored relative to the manifest root
    # dataset.json compatibility: numTraining and MSD-style entries
    raw = json.loads(out.read_text())
    assert raw["numTraining"] == 220 and {"image", "label"} <= set(raw["training"][0])
    # same seed -> same split; fingerprint stable
    again = import_msd(hippocampus_dir, tmp_path / "again.json", val_fraction=0.2, test_fraction=0.1, seed=3)
    assert [c.split for c in again.cases] == [c.split for c in m.cases]
    assert again.fingerprint() == reloaded.fingerprint()


def test_import_msd_cli(hippocampus_dir: Path, tmp_path: Path) -> None:
    p = run_cli("data", "import-msd", str(hippocampus_dir), "--out", str(tmp_path / "h.json"), "--val-fraction", "0.1")
    assert "220 cases" in p.stdout
    assert load_manifest(tmp_path / "h.json").split("val")


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "imgs/../../outside.nii.gz", "/etc/passwd"])
def test_paths_cannot_escape_root(tmp_path: Path, bad: str) -> None:
    p = _write(tmp_path, {"labels": {"background": 0, "a": 1}, "training": [{"image": bad, "label": "l.nii.gz"}]})
    with pytest.raises(InputError, match="escapes the dataset root|is absolute"):
        load_manifest(p)


def test_class_names_with_spaces_dots_and_dashes_load(tmp_path: Path) -> None:
    labels = {"background": 0, "traffic light": 1, "left-kidney": 2, "T1.lesion": 3}
    assert load_manifest(_write(tmp_path, {"labels": labels})).labels == labels


def test_msd_v1_labels_and_modality(tmp_path: Path) -> None:
    p = _write(tmp_path, {"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "MR"},
                          "training": [{"image": "./imagesTr/x_001.nii.gz", "label": "./labelsTr/x_001.nii.gz"}],
                          "test": ["./imagesTs/x_009.nii.gz"]})
    m = load_manifest(p)
    assert m.labels == {"background": 0, "tumour": 1}
    assert m.channel_names == {"0": "MR"}
    assert [(c.id, c.split) for c in m.cases] == [("x_001", "train"), ("x_009", "test")]


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"labels": {"a": 1}}, "background with value 0"),
        ({"labels": {"background": 0, "a": 1, "b": 1}}, "duplicate values"),
        ({"labels": {"background": 0}, "training": [{"image": "a.nii.gz"}, {"image": "b/a.nii.gz"}]}, "duplicate case ids"),
        ({"labels": {"background": 0}, "training": [{"label": "a.nii.gz"}]}, "needs an 'image'"),
        ({"labels": {"background": 0}, "training": [{"image": "a.nii.gz", "split": "holdout"}]}, "split 'holdout'"),
        ({"labels": {"background": 0, "Mean": 1}}, "'Mean' is reserved"),
        ({"labels": {"background": 0, "liver+tumour": 1}}, "'liver\\+tumour' cannot name a metric"),
    ],
)
def test_manifest_structure_errors(tmp_path: Path, doc: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        load_manifest(_write(tmp_path, doc))


def test_missing_manifest_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(tmp_path / "x.json")


def test_assign_splits_deterministic_and_complete() -> None:
    ids = [f"c{i}" for i in range(20)]
    a = assign_splits(ids, 0.25, 0.1, seed=1)
    assert a == assign_splits(list(reversed(ids)), 0.25, 0.1, seed=1)
    assert sorted(a.values()).count("val") == 5 and sorted(a.values()).count("test") == 2
    assert a != assign_splits(ids, 0.25, 0.1, seed=2)


def test_duplicates_lists_each_repeated_value_once_sorted() -> None:
    assert duplicates([]) == [] and duplicates(["a", "b", "c"]) == []
    assert duplicates(iter(["b", "a", "b", "c", "a", "b"])) == ["a", "b"]  # any iterable, one pass
    assert duplicates(["A", "a"]) == []  # ids are case-sensitive
    ids = [f"c{i:05d}" for i in range(20_000)]
    assert duplicates([*ids, "c00007", "c19999"]) == ["c00007", "c19999"]


def test_duplicate_ids_error_names_them(tmp_path: Path) -> None:
    cases = [{"id": cid, "image": f"i/{n}.png", "label": f"l/{n}.png"} for n, cid in enumerate("abacdc")]
    with pytest.raises(InputError, match="duplicate case ids: a, c$"):
        load_manifest(_write(tmp_path, {"labels": {"background": 0}, "training": cases}))


CAMVID_SEGNET = {"Sky": 0, "Road": 1, "Car": 2, "void": 3}  # the SegNet layout: void a value of the label map


def test_class_labels_leave_void_out_of_classes(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, {"labels": CAMVID_SEGNET}))
    assert m.class_labels(3) == {"Sky": 0, "Road": 1, "Car": 2} and m.num_classes_without(3) == 3
    assert m.num_classes == 4  # the label map's own count is unchanged
    for void in (None, 255):  # void not in the label map (VOC's 255): every entry is a class
        assert m.class_labels(void) == CAMVID_SEGNET and m.num_classes_without(void) == 4


@pytest.mark.parametrize(("labels", "void", "fragment"), [
    ({"background": 0, "void": 1, "car": 2}, 1, r"label 'void' = 1 .* class values \[2\] are above it"),
    ({"background": 0}, 0, "no other class is left"),
])
def test_void_below_a_class_is_refused(tmp_path: Path, labels: dict, void: int, fragment: str) -> None:
    m = load_manifest(_write(tmp_path, {"labels": labels}))
    with pytest.raises(InputError, match=fragment) as err:
        m.class_labels(void)
    assert str(tmp_path / "m.json") in str(err.value)
    with pytest.raises(InputError, match=fragment):
        m.num_classes_without(void)
