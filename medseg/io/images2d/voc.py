"""PASCAL VOC-style folders: ``JPEGImages/<id>.jpg`` + ``SegmentationClass/<id>.png`` (palette PNGs whose
pixel values are class indices, 255 = void boundary), split lists in ``ImageSets/Segmentation/*.txt``.

The label PNGs are used in place (they already are index maps); nothing is converted or copied.
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError
from medseg.io.images2d.common import IMAGE_SUFFIXES, Pair, build_manifest, inside, label_map, safe_id
from medseg.io.manifest import Manifest, Split

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_SPLIT_FILES: dict[Split, str] = {"train": "train", "val": "val"}  # trainval.txt is their union; test.txt has no labels


def _image_for(images: Path, stem: str) -> Path | None:
    for suf in IMAGE_SUFFIXES:
        for s in (suf, suf.upper()):
            if (images / f"{stem}{s}").is_file():
                return images / f"{stem}{s}"
    return None


def import_voc(
    src: Path, out: Path, val_fraction: float = 0.1, seed: int = 0, classes: list[str] | None = None
) -> Manifest:
    """Manifest for a VOC-style folder; splits from ``ImageSets/Segmentation/{train,val}.txt`` when present.

    Without split lists, every ``SegmentationClass`` PNG is a case and a deterministic ``val_fraction`` of
    them goes to validation. An id listed in a split file without its image or label is an ``InputError``.
    """
    src = Path(src).resolve()
    images, labels_dir = src / "JPEGImages", src / "SegmentationClass"
    for d in (images, labels_dir):
        if not d.is_dir():
            raise InputError(
                d, "folder not found (expected a VOC-style folder with JPEGImages/ and SegmentationClass/)"
            )
    names = list(classes or VOC_CLASSES)
    sets = src / "ImageSets" / "Segmentation"
    listed: list[tuple[str, Split | None]] = []
    for listed_split, stem in _SPLIT_FILES.items():
        f = sets / f"{stem}.txt"
        if f.is_file():
            listed += [(line.strip(), listed_split) for line in f.read_text().splitlines() if line.strip()]
    if not listed:
        listed = [(p.stem, None) for p in sorted(labels_dir.glob("*.png"))]
    pairs = []
    for stem, split in listed:
        label = inside(labels_dir / f"{stem}.png", labels_dir, sets / f"{split}.txt")  # a listed '../x' cannot escape
        if not label.is_file():
            raise InputError(label, f"label of image {stem!r} not found")
        image = _image_for(images, stem)
        if image is None:
            raise InputError(images / f"{stem}.jpg", "image not found (listed, or has a label)")
        pairs.append(Pair(safe_id(stem), image, label, split))
    return build_manifest(
        src.name,
        label_map(names, src),
        pairs,
        out,
        val_fraction,
        seed,
        f"imported from VOC-style folder {src.name} (seed {seed})",
    )
