"""2D image transforms: image and label stay pixel-aligned through loading (PILReader axis order),
resizing, padding, random crops and flips; void padding; case checks before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.config import load_config
from medseg.data.input_checks import check_image_cases
from medseg.data.kinds import eval_transforms, train_transforms
from medseg.errors import InputError
from medseg.io.images2d import import_voc
from tests.images2d_data import H, W, write_voc


@pytest.fixture
def voc(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    drawn = write_voc(tmp_path / "VOC", n=4, val=(3,))
    m = import_voc(tmp_path / "VOC", tmp_path / "voc.json")
    return m.path, drawn


def _cfg(manifest: Path, *extra: str):
    return load_config("voc_unet2d", [f"data.manifest={manifest}", "data.patch_size=[48, 48]", *extra])


def _red_class(image: np.ndarray) -> np.ndarray:
    """Class encoded in the red channel by rgb_for (scaled to [0, 1]): 12 * class, void 250."""
    red = np.rint(image[0] * 255).astype(np.int64)
    return np.where(red == 250, 255, red // 12)


def test_eval_transforms_keep_numpy_axis_order(voc) -> None:
    manifest, drawn = voc
    cid = sorted(drawn)[0]
    item = {"image": str(manifest.parent / "VOC" / "JPEGImages" / f"{cid}.png"),
            "label": str(manifest.parent / "VOC" / "SegmentationClass" / f"{cid}.png")}
    out = eval_transforms(_cfg(manifest), with_label=True)(item)
    assert tuple(out["image"].shape) == (3, H, W) and tuple(out["label"].shape) == (1, H, W)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert np.array_equal(out["label"][0].numpy(), drawn[cid])  # same as Pillow/numpy (H, W), not transposed
    assert np.array_equal(_red_class(out["image"].numpy()), drawn[cid])


def test_resize_uses_nearest_labels(voc) -> None:
    manifest, drawn = voc
    cid = sorted(drawn)[1]
    item = {"image": str(manifest.parent / "VOC" / "JPEGImages" / f"{cid}.png"),
            "label": str(manifest.parent / "VOC" / "SegmentationClass" / f"{cid}.png")}
    out = eval_transforms(_cfg(manifest, "data.resize=[80, 112]"), with_label=True)(item)
    assert tuple(out["label"].shape) == (1, 80, 112)
    assert np.array_equal(out["label"][0].numpy(), np.kron(drawn[cid], np.ones((2, 2), np.int64)))


def test_train_crops_flips_and_void_padding_stay_aligned(voc) -> None:
    manifest, drawn = voc
    cfg = _cfg(manifest, "data.patch_size=[64, 64]", "data.samples_per_volume=3",
               "data.augmentations=[flip_horizontal]")  # 64 > H: padded; flips must move both keys
    tf = train_transforms(cfg, 21)
    tf.set_random_state(seed=1)
    cid = sorted(drawn)[2]
    item = {"image": str(manifest.parent / "VOC" / "JPEGImages" / f"{cid}.png"),
            "label": str(manifest.parent / "VOC" / "SegmentationClass" / f"{cid}.png")}
    for _ in range(4):
        samples = tf(dict(item))
        assert len(samples) == 3
        for s in samples:
            image, label = s["image"].numpy(), s["label"][0].numpy()
            assert image.shape == (3, 64, 64) and label.shape == (64, 64)
            # SpatialPad centres the 40x56 image in 64x64 (crop = whole): pad rows 12 + 12, columns 4 + 4.
            padded = np.ones((64, 64), bool)
            padded[12:52, 4:60] = False
            assert (label[padded] == 255).all() and (image[:, padded] == 0).all()  # void, never background
            body = ~padded
            assert np.array_equal(_red_class(image)[body], label[body])
            assert set(np.unique(label[body])) == set(np.unique(drawn[cid]))


def test_check_image_cases(voc, tmp_path: Path) -> None:
    manifest, _ = voc
    from medseg.io.manifest import load_manifest

    m = load_manifest(manifest)
    check_image_cases(m, m.cases, ignore_index=255)
    with pytest.raises(InputError, match=r"2007_000000\.png: label values \[255\] not in the label map"):
        check_image_cases(m, m.cases, ignore_index=None)  # void pixels but no ignore_index configured
    Image.new("RGB", (W, H)).save(tmp_path / "VOC" / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(InputError, match=r"2007_000001\.png: label image has mode RGB"):
        check_image_cases(m, m.cases, ignore_index=255)
