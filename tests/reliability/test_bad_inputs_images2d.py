"""Broken 2D images: in a prediction batch each fails alone with one line naming the file and the cause; in the
training checks and the CamVid importer a label of the wrong size or with a value or colour outside the label
map is refused naming the label file.

The package is a tiny untrained image2d U-Net (the ``voc_unet2d`` preprocessing): what is tested is the batch's
behaviour, not the masks. Images and labels are drawn by the test (``tests.images2d_data``).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.config import load_config
from medseg.data.input_checks import check_image_cases
from medseg.errors import InputError
from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover_inputs
from medseg.inference.model_package import load_package, save_package
from medseg.io.images2d.camvid import import_camvid
from medseg.io.images2d.common import Pair, build_manifest, write_index_png
from medseg.io.manifest import load_manifest
from medseg.models import build_model
from tests.images2d_data import H, W, rgb_for, write_camvid

LABELS = {"background": 0, "a": 1, "b": 2}


def _scene(seed: int = 0) -> np.ndarray:
    lab = np.zeros((H, W), np.int64)
    lab[H // 4 : H // 2, W // 5 : W // 2] = 1
    lab[H // 2 :, W // 2 + seed :] = 2
    return lab


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _flip_in_idat(png: bytes) -> bytes:
    i = png.index(b"IDAT") + 4
    bad = bytearray(png)
    bad[i + 40] ^= 0x08
    return bytes(bad)


BOMB = (
    b"\x89PNG\r\n\x1a\n"
    + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    + _chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    + _chunk(b"IEND", b"")
)

# kind -> (file name, its bytes from a good PNG, cause)
KINDS = {
    "corrupt_png": ("b_flip.png", _flip_in_idat, r"not a readable image \(OSError: (broken|unrecognized) data stream"),
    "truncated_png": ("c_cut.png", lambda g: g[: len(g) // 2], r"not a readable image \(OSError: image file is trunc"),
    "zero_bytes_png": ("d_empty.png", lambda g: b"", r"not a readable image \(UnidentifiedImageError"),
    "not_an_image": ("e_text.png", lambda g: b"a report, not a picture\n" * 20, r"not a readable image"),
    "absurd_size_png": (
        "f_bomb.png",
        lambda g: BOMB,
        r"absurd image size, refused before decoding \(Image size \(10000000000 pixels\) exceeds",
    ),
}


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained image2d package (3 classes, 16x16 windows on images resized to 20x28)."""
    root = tmp_path_factory.mktemp("pkg2d")
    (root / "images").mkdir()
    pairs = []
    for i in range(2):
        Image.fromarray(rgb_for(_scene(i), i)).save(root / "images" / f"t{i}.png")
        write_index_png(root / "labels" / f"t{i}.png", _scene(i))
        pairs.append(Pair(f"t{i}", root / "images" / f"t{i}.png", root / "labels" / f"t{i}.png", "val"))
    manifest = load_manifest(build_manifest("toy2d", LABELS, pairs, root / "toy.json", 0.0, 0, "test").path)
    cfg = load_config(
        "voc_unet2d",
        [
            f"data.manifest={manifest.path}",
            "data.patch_size=[16, 16]",
            "data.resize=[20, 28]",
            "inference.roi_size=[16, 16]",
            "model.params.channels=[4, 8, 16]",
            "model.params.strides=[2, 2]",
        ],
    )
    torch.manual_seed(3)
    net = build_model(cfg.model.name, 2, manifest.num_channels, manifest.num_classes, cfg.model.params)
    return save_package(root / "pkg", net, cfg, manifest)


@pytest.fixture(scope="module")
def batch(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    images = tmp_path_factory.mktemp("bad_images")
    good = _png(rgb_for(_scene(), 0))
    for name in ("a_good.png", "z_good.png"):
        (images / name).write_bytes(good)
    for name, make, _ in KINDS.values():
        (images / name).write_bytes(make(good))
    out = tmp_path_factory.mktemp("out")
    report = run_batch(load_package(package_dir), discover_inputs(images), out, device="cpu", progress=False)
    return images, out, {"done": sorted(report.done), "failed": sorted(report.failed)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_image_fails_alone(kind: str, batch: tuple[Path, Path, dict]) -> None:
    images, out, _ = batch
    name, _, cause = KINDS[kind]
    cid = name.removesuffix(".png")
    record = json.loads((out / f"{cid}.json").read_text())
    error = record["error"]
    assert record["status"] == "failed" and error.startswith(f"{images / name}: ") and re.search(cause, error), error
    assert "\n" not in error and "Traceback" not in error and not re.search(r"object at 0x", error)
    assert not (out / name).exists()


def test_the_image_batch_goes_on(batch: tuple[Path, Path, dict]) -> None:
    _, out, report = batch
    assert report["done"] == ["a_good", "z_good"]
    assert report["failed"] == sorted(n.removesuffix(".png") for n, _, _ in KINDS.values())
    for cid in report["done"]:
        assert np.asarray(Image.open(out / f"{cid}.png")).shape == (H, W)


def _dataset(root: Path) -> tuple[Path, Path]:
    """Two image/label pairs and a manifest over them; returns (manifest, the second label)."""
    pairs = []
    for i in range(2):
        img, lab = root / "images" / f"p{i}.png", root / "labels" / f"p{i}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb_for(_scene(i), i)).save(img)
        write_index_png(lab, _scene(i))
        pairs.append(Pair(f"p{i}", img, lab, "train"))
    return build_manifest("d", LABELS, pairs, root / "d.json", 0.0, 0, "test", check=False).path, pairs[1].label


def _palette_label(array: np.ndarray) -> Image.Image:
    im = Image.fromarray(array.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [200, 200, 200] * 253)
    return im


LABEL_KINDS = {
    "label_wrong_size": (
        lambda p: _palette_label(_scene()[:-4, :-6]).save(p),
        rf"label size {W - 6}x{H - 4} != image size {W}x{H} \(p1\.png\)",
    ),
    "label_unknown_palette_index": (
        lambda p: _palette_label(np.where(_scene() == 2, 7, _scene())).save(p),
        r"label values \[7\] not in the label map \[0, 1, 2, 255\]",
    ),
    "label_in_colour": (
        lambda p: Image.fromarray(rgb_for(_scene(), 0)).save(p),
        r"label image has mode RGB; expected a class-index PNG",
    ),
}


@pytest.mark.parametrize("kind", sorted(LABEL_KINDS))
def test_bad_2d_label_is_refused_naming_it(kind: str, tmp_path: Path) -> None:
    manifest_path, label = _dataset(tmp_path)
    write, cause = LABEL_KINDS[kind]
    write(label)
    m = load_manifest(manifest_path)
    with pytest.raises(InputError) as e:
        check_image_cases(m, m.cases, ignore_index=255)
    assert e.value.path == str(label) and re.search(cause, str(e.value)), str(e.value)
    check_image_cases(m, m.cases[:1], ignore_index=255)  # the other case is fine


def test_camvid_colour_not_in_class_dict_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "camvid"
    write_camvid(src)
    label = src / "train_labels" / "0001TP_000001_L.png"
    colours = np.asarray(Image.open(label)).copy()
    colours[3, 5] = (10, 200, 30)  # a colour class_dict.csv does not list
    Image.fromarray(colours).save(label)
    with pytest.raises(InputError) as e:
        import_camvid(src, tmp_path / "camvid.json")
    assert e.value.path == str(label)
    assert str(e.value).endswith("colour (10, 200, 30) at pixel (x=5, y=3) is not in class_dict.csv")
    assert not (tmp_path / "camvid.json").exists()
