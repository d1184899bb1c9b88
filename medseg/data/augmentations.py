"""Augmentations by registry name, so presets list them (``data.augmentations``); each builder gets
(keys, spatial_dims) and returns MONAI dictionary transforms. Used by every data kind."""

from __future__ import annotations

from collections.abc import Sequence

from monai import transforms as mt

from medseg.config import DataConfig
from medseg.data.keys import IMAGE, LABEL
from medseg.registry import Registry

AUGMENTATIONS: Registry = Registry("augmentation")


@AUGMENTATIONS.register("intensity")
def _intensity_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    return [
        mt.RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
        mt.RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
    ]


@AUGMENTATIONS.register("noise")
def _noise_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    return [mt.RandGaussianNoised(keys=IMAGE, std=0.05, prob=0.2)]


@AUGMENTATIONS.register("spatial")
def _spatial_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    # Small rotations (+-15 deg) and scaling (+-15 %), as in nnU-Net's default spatial augmentation;
    # labels use nearest interpolation so no new label values appear. Patch size is kept.
    rot = (0.26,) * (1 if spatial_dims == 2 else 3)
    return [
        mt.RandAffined(
            keys=list(keys),
            prob=0.3,
            rotate_range=rot,
            scale_range=(0.15,) * spatial_dims,
            mode=("bilinear", "nearest"),
            padding_mode="border",
        )
    ]


@AUGMENTATIONS.register("flip_lr")
def _flip_lr_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    # Left-right mirror only (axis 0 is L-R after Orientationd to RAS): anatomy is bilaterally similar,
    # whereas anterior-posterior or superior-inferior flips would change what the labels mean.
    return [mt.RandFlipd(keys=list(keys), prob=0.5, spatial_axis=0)]


@AUGMENTATIONS.register("flip_all")
def _flip_all_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    # Every spatial axis mirrored independently (p = 0.5 each), as nnU-Net's default training does; pairs with
    # ``inference.tta_axes: [0, 1, 2]``. Image and label move together, so a label keeps its value; whether an
    # anatomically impossible view (head below feet) helps is the dataset's question: measure it.
    return [mt.RandFlipd(keys=list(keys), prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]


@AUGMENTATIONS.register("flip_horizontal")
def _flip_horizontal_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    # 2D natural images, arrays (C, H, W): mirror the width axis (the last). Not for volumes, where
    # flip_lr mirrors the patient's left-right axis.
    return [mt.RandFlipd(keys=list(keys), prob=0.5, spatial_axis=spatial_dims - 1)]


def augmentations(data: DataConfig, spatial_dims: int) -> list[mt.Transform]:
    """The configured augmentations (``data.augmentations`` when ``data.augment``), in order."""
    if not data.augment:
        return []
    return [t for name in data.augmentations for t in AUGMENTATIONS.get(name)([IMAGE, LABEL], spatial_dims)]
