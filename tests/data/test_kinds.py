"""Data kinds: the registry, the sliding window's shape, mirror axes, summary columns and scored classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.config import InferenceConfig, load_config
from medseg.data.kinds import DATA_KINDS, ImageKind, VolumeKind, data_kind, manifest_kind
from medseg.io.manifest import load_manifest

LABELS = {"background": 0, "liver": 2, "kidney": 1}  # not in value order: columns must follow the values


def _manifest(tmp_path: Path, image: str) -> Path:
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"labels": LABELS, "training": [{"image": image, "label": "l/" + image}]}))
    return p


def test_registry_names_and_lookup() -> None:
    assert DATA_KINDS.names() == ["image2d", "volume"]
    assert isinstance(data_kind("volume"), VolumeKind) and isinstance(data_kind("image2d"), ImageKind)
    assert isinstance(data_kind(load_config(None, ["data.kind=image2d", "model.spatial_dims=2",
                                                   "data.patch_size=[32, 32]"])), ImageKind)
    with pytest.raises(KeyError, match="image2d, volume"):
        data_kind("video")


def test_window_shape() -> None:
    vol3d = load_config(None, ["data.patch_size=[32, 24, 16]"])
    vol2d = load_config(None, ["model.spatial_dims=2", "data.patch_size=[64, 48]"])
    img = load_config(None, ["data.kind=image2d", "model.spatial_dims=2", "data.patch_size=[64, 48]"])
    assert data_kind("volume").window(vol3d) == (32, 24, 16)
    assert data_kind("volume").window(vol2d) == (64, 48, 1)  # a 2D net on volumes slides (H, W, 1) windows
    assert data_kind("image2d").window(img) == (64, 48)
    roi = load_config(None, ["model.spatial_dims=2", "data.patch_size=[64, 48]", "inference.roi_size=[80, 72]"])
    assert data_kind("volume").window(roi) == (80, 72, 1)  # inference.roi_size wins over the patch size


def test_mirror_axes_defaults_and_override() -> None:
    vol, img = data_kind("volume"), data_kind("image2d")
    assert vol.mirror_axes(InferenceConfig()) == [] == img.mirror_axes(InferenceConfig())  # TTA off
    on = InferenceConfig(tta_mirror=True)
    assert vol.mirror_axes(on) == [0, 1, 2]
    assert img.mirror_axes(on) == [1]  # the horizontal mirror of an (H, W) image only
    assert vol.mirror_axes(InferenceConfig(tta_mirror=True, tta_axes=[0])) == [0]
    assert img.mirror_axes(InferenceConfig(tta_mirror=True, tta_axes=[0, 1])) == [0, 1]
    assert vol.mirror_axes(InferenceConfig(tta_mirror=True, tta_axes=[])) == []  # empty is not "default"
    assert vol.mirror_axes(InferenceConfig(tta_axes=[0])) == []  # axes without tta_mirror: still off


def test_summary_columns_follow_label_values() -> None:
    assert data_kind("volume").summary_columns(LABELS) == ["kidney_ml", "kidney_voxels", "liver_ml", "liver_voxels"]
    assert data_kind("image2d").summary_columns(LABELS) == [
        "background_pixels", "background_fraction", "kidney_pixels", "kidney_fraction", "liver_pixels",
        "liver_fraction"]
    assert (data_kind("volume").record_section, data_kind("image2d").record_section) == ("organs", "classes")


def test_scored_labels_and_manifest_kind(tmp_path: Path) -> None:
    vol = load_manifest(_manifest(tmp_path, "a.nii.gz"))
    img = load_manifest(_manifest(tmp_path, "a.PNG"))
    assert isinstance(manifest_kind(vol), VolumeKind) and isinstance(manifest_kind(img), ImageKind)
    assert data_kind("volume").scored_labels(vol) == {"liver": 2, "kidney": 1}  # background is not scored
    assert data_kind("image2d").scored_labels(img) == LABELS  # VOC's background is a class


def test_input_files_and_suffixes() -> None:
    vol, img = data_kind("volume"), data_kind("image2d")
    assert vol.is_input_file(Path("a.nii")) and vol.is_input_file(Path("A.NII.GZ")) and not vol.is_input_file(Path("a.png"))
    assert img.is_input_file(Path("a.JPG")) and img.is_input_file(Path("a.jpeg")) and not img.is_input_file(Path("a.nii"))
    assert (vol.mask_suffix, vol.probabilities_suffix, vol.input_dims) == (".nii.gz", "_probs.nii.gz", 3)
    assert (img.mask_suffix, img.probabilities_suffix, img.input_dims) == (".png", "_probs.npy", 2)
