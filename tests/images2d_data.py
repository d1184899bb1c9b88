"""Tiny synthetic 2D datasets drawn with Pillow/numpy (VOC, CamVid, LabelMe, COCO) for the image tests.

Every image encodes its classes in colour (class k is painted with red = 12 * k), so a test can check
that a loaded image and label stay pixel-aligned, and every label map is returned as the exact array.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.io.images2d.common import voc_palette

H, W = 40, 56  # deliberately not square: an (H, W) / (W, H) mix-up changes shapes


def rgb_for(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """An RGB image whose red channel is 20 * class (void 255 -> 250), with a little green texture."""
    rng = np.random.default_rng(seed)
    img = np.zeros((*labels.shape, 3), np.uint8)
    img[..., 0] = np.where(labels == 255, 250, labels * 12).astype(np.uint8)
    img[..., 1] = rng.integers(0, 30, labels.shape, dtype=np.uint8)
    return img


def voc_label(i: int) -> np.ndarray:
    """Background, a box of class 1 + i % 3 (person 15 for every third), a 1-pixel void (255) border."""
    lab = np.zeros((H, W), np.int64)
    cls = 15 if i % 3 == 2 else 1 + i % 3
    y0, x0 = 5 + i, 8 + 2 * i
    lab[y0 - 1:y0 + 21, x0 - 1:x0 + 25] = 255
    lab[y0:y0 + 20, x0:x0 + 24] = cls
    return lab


def write_voc(root: Path, n: int = 6, val: tuple[int, ...] = (4, 5)) -> dict[str, np.ndarray]:
    """A VOC-style folder with palette PNG labels and ImageSets split files; returns id -> label array."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        cid = f"2007_{i:06d}"
        lab = voc_label(i)
        Image.fromarray(rgb_for(lab, i)).save(root / "JPEGImages" / f"{cid}.png")  # lossless for alignment checks
        p = Image.fromarray(lab.astype(np.uint8), mode="P")
        p.putpalette(voc_palette())
        p.save(root / "SegmentationClass" / f"{cid}.png")
        out[cid] = lab
    ids = sorted(out)
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{c}\n" for j, c in enumerate(ids) if j not in val))
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{c}\n" for j, c in enumerate(ids) if j in val))
    return out


CAMVID_CLASSES = [("Sky", (128, 128, 128)), ("Road", (128, 64, 128)), ("Car", (64, 0, 128)), ("Void", (0, 0, 0))]


def write_camvid(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """Kaggle-CamVid layout: train/, train_labels/<stem>_L.png (RGB colours), class_dict.csv; id -> index map."""
    (root / "train").mkdir(parents=True)
    (root / "train_labels").mkdir()
    with (root / "class_dict.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "r", "g", "b"])
        for name, (r, g, b) in CAMVID_CLASSES:
            w.writerow([name, r, g, b])
    out = {}
    for i in range(n):
        idx = np.zeros((H, W), np.int64)  # sky
        idx[H // 2:] = 1  # road
        idx[H // 2 - 6:H // 2 + 4, 10 + 3 * i:30 + 3 * i] = 2  # car
        idx[:, :2] = 255  # void strip
        colours = np.zeros((H, W, 3), np.uint8)
        for k, (_, rgb) in enumerate(CAMVID_CLASSES):
            colours[idx == (255 if k == 3 else k)] = rgb
        stem = f"0001TP_{i:06d}"
        Image.fromarray(rgb_for(idx, i)).save(root / "train" / f"{stem}.png")
        Image.fromarray(colours).save(root / "train_labels" / f"{stem}_L.png")
        out[stem] = idx
    return out


def write_labelme(root: Path) -> dict[str, np.ndarray]:
    """Two LabelMe JSONs (polygon, rectangle, __ignore__ on top, circle); id -> expected index map
    (classes sorted: background 0, car 1, person 2; circles are checked separately)."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    # a: integer-vertex square polygon 'person' (PIL fills the boundary: columns 4..20, rows 6..18),
    # a 'car' rectangle overlapping it, then an __ignore__ rectangle drawn last on top of both.
    lab = np.zeros((H, W), np.int64)
    lab[6:19, 4:21] = 2
    lab[15:31, 18:41] = 1
    lab[28:34, 38:45] = 255
    expected["a"] = lab
    Image.fromarray(rgb_for(lab)).save(root / "a.png")
    shapes = [
        {"label": "person", "shape_type": "polygon", "points": [[4, 6], [20, 6], [20, 18], [4, 18]]},
        {"label": "car", "shape_type": "rectangle", "points": [[40, 30], [18, 15]]},  # corners in any order
        {"label": "__ignore__", "shape_type": "rectangle", "points": [[38, 28], [44, 33]]},
    ]
    (root / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.png", "imageHeight": H, "imageWidth": W}))
    # b (in a sub-folder, image one level up): a 'car' circle of radius 8 around (30, 20).
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(rgb_for(np.zeros((H, W), np.int64), 1)).save(root / "b.png")
    shapes = [{"label": "car", "shape_type": "circle", "points": [[30, 20], [38, 20]]}]
    (root / "sub" / "b.json").write_text(json.dumps({"shapes": shapes, "imagePath": "../b.png", "imageHeight": H, "imageWidth": W}))
    return expected


def write_coco(root: Path) -> tuple[dict[str, np.ndarray], Path]:
    """COCO layout annotations/instances_train2017.json + train2017/: polygon, compressed and uncompressed
    RLE, a crowd region and nested boxes (the smaller one must win); returns (stem -> index map, json)."""
    from pycocotools import mask as mask_utils

    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    cats = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}]  # out of order on purpose: person -> 1, car -> 2
    images, anns = [], []
    # image 1: big car box polygon [x 2..50) x [y 2..30) annotated FIRST with a small person box inside it LAST,
    # and a person given as compressed RLE elsewhere.
    e1 = np.zeros((H, W), np.int64)
    e1[2:30, 2:50] = 2
    e1[10:20, 20:30] = 1
    rle_mask = np.zeros((H, W), np.uint8)
    rle_mask[33:38, 5:15] = 1
    e1[rle_mask == 1] = 1
    images.append({"id": 1, "file_name": "000000000001.png", "height": H, "width": W})
    anns.append({"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[20, 10, 30, 10, 30, 20, 20, 20]]})
    anns.append({"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0,
                 "segmentation": [[2, 2, 50, 2, 50, 30, 2, 30]]})
    comp = mask_utils.encode(np.asfortranarray(rle_mask))
    anns.append({"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "segmentation": {"size": [H, W], "counts": comp["counts"].decode()}})
    # image 2: an uncompressed RLE car (column-major runs) and a crowd region that is void.
    e2 = np.zeros((H, W), np.int64)
    car = np.zeros((H, W), np.uint8)
    car[10:25, 30:40] = 1
    e2[car == 1] = 2
    flat = car.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    images.append({"id": 2, "file_name": "000000000002.png", "height": H, "width": W})
    anns.append({"id": 20, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": {"size": [H, W], "counts": runs}})
    anns.append({"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1,
                 "segmentation": [[0, 30, 8, 30, 8, 40, 0, 40]]})
    e2[30:40, 0:8] = 255
    # image 3: no annotations at all -> all background.
    images.append({"id": 3, "file_name": "000000000003.png", "height": H, "width": W})
    e3 = np.zeros((H, W), np.int64)
    for info, e in zip(images, (e1, e2, e3), strict=True):
        Image.fromarray(rgb_for(e, info["id"])).save(root / "train2017" / info["file_name"])
    path = root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"000000000001": e1, "000000000002": e2, "000000000003": e3}, path
