"""MONAI transforms for 2D natural images (``data.kind: image2d``).

Images are RGB PNG/JPG files read with MONAI's ``PILReader`` and labels are class-index PNGs. Both are
read with ``reverse_indexing=False`` so arrays are ``(C, H, W)`` in numpy's row/column order, the order
Pillow and every image viewer use: ``data.patch_size`` and ``data.resize`` are (height, width), and a
predicted index map can be written back with Pillow without transposing. (``PILReader``'s default
reverses the axes to ITK's (W, H) order; it would still keep image and label aligned, but every size
in the config would then read as (width, height).)

Preprocessing: RGB conversion (greyscale/palette/RGBA photos become 3 channels), optional resize
(labels nearest), intensity scaling (``range``: [lower, upper] -> [0, 1]; ``zscore``: per channel).
Training then pads to ``data.patch_size`` (labels padded with ``data.ignore_index`` when set, so padding
never counts as background) and draws ``data.samples_per_volume`` random crops, then augments.
"""

from __future__ import annotations

import numpy as np
from monai import transforms as mt
from monai.data import PILReader
from PIL import Image

from medseg.config import Config, DataConfig
from medseg.data.augmentations import augmentations
from medseg.data.intensity import intensity_steps
from medseg.data.keys import IMAGE, LABEL


class ToRGB:
    """``PILReader`` converter: any Pillow mode to 3-channel RGB (a class so transforms pickle)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


def image_preprocessing(data: DataConfig, with_label: bool) -> list[mt.Transform]:
    """Deterministic loading and scaling shared by training, validation and prediction."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    out: list[mt.Transform] = [
        # LoadImaged takes a reader instance too (documented); its annotation lists only classes and names.
        mt.LoadImaged(
            keys=IMAGE,
            reader=PILReader(reverse_indexing=False, converter=ToRGB()),  # type: ignore[arg-type]  # instance
            image_only=True,
            ensure_channel_first=True,
        ),
        mt.EnsureTyped(keys=IMAGE, dtype=np.float32),
    ]
    if with_label:
        out.append(
            mt.LoadImaged(
                keys=LABEL,
                reader=PILReader(reverse_indexing=False),  # type: ignore[arg-type]  # instance: see above
                image_only=True,
                ensure_channel_first=True,
            )
        )
    if data.resize is not None:
        out.append(mt.Resized(keys=keys, spatial_size=tuple(data.resize), mode=["bilinear", "nearest"][: len(keys)]))
    return [*out, *intensity_steps(data, with_label)]


def image_train_transforms(cfg: Config) -> mt.Compose:
    """Preprocessing, pad + random crops of ``data.patch_size``, then the configured augmentations."""
    d = cfg.data
    patch = tuple(d.patch_size)
    sampling: list[mt.Transform] = [
        mt.SpatialPadd(keys=IMAGE, spatial_size=patch, value=0),
        mt.SpatialPadd(keys=LABEL, spatial_size=patch, value=d.ignore_index if d.ignore_index is not None else 0),
        mt.RandSpatialCropSamplesd(
            keys=[IMAGE, LABEL], roi_size=patch, num_samples=d.samples_per_volume, random_size=False
        ),
    ]
    return mt.Compose([*image_preprocessing(d, True), *sampling, *augmentations(d, 2)])
