"""MONAI dictionary-transform pipelines built from config (data, not code).

The deterministic preprocessing (load, channel-first, orientation, spacing, intensity, foreground crop)
is shared by training, validation and inference, and every step is invertible with MONAI's
``Invertd``: that is how predictions return to the input scan's voxel grid.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from monai import transforms as mt

from medseg.config import Config, DataConfig
from medseg.registry import Registry

IMAGE, LABEL = "image", "label"

# LoadImage probes MONAI's optional GPU DICOM decoder (nvImageCodec) even for NIfTI input and warns twice
# when it is absent; DICOM decoding here goes through pydicom's own plugins, so the notice is only noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

# Augmentations by name, so presets can list them; each builder gets (keys, spatial_dims).
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
    return [mt.RandAffined(keys=list(keys), prob=0.3, rotate_range=rot, scale_range=(0.15,) * spatial_dims,
                           mode=("bilinear", "nearest"), padding_mode="border")]


@AUGMENTATIONS.register("flip_lr")
def _flip_lr_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    # Left-right mirror only (axis 0 is L-R after Orientationd to RAS): anatomy is bilaterally similar,
    # whereas anterior-posterior or superior-inferior flips would change what the labels mean.
    return [mt.RandFlipd(keys=list(keys), prob=0.5, spatial_axis=0)]


@AUGMENTATIONS.register("flip_horizontal")
def _flip_horizontal_aug(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    # 2D natural images, arrays (C, H, W): mirror the width axis (the last). Not for volumes, where
    # flip_lr mirrors the patient's left-right axis.
    return [mt.RandFlipd(keys=list(keys), prob=0.5, spatial_axis=spatial_dims - 1)]


class ForegroundAbove:
    """Foreground selector for ``CropForegroundd``: voxels above ``threshold`` (or above the minimum).

    A class, not a lambda, so transforms pickle into DataLoader workers and persistent caches.
    """

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x > (x.min() if self.threshold is None else self.threshold)


def preprocessing(data: DataConfig, with_label: bool) -> list[mt.Transform]:
    """Deterministic, invertible preprocessing shared by train, validation and inference."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    interp = ["bilinear", "nearest"] if with_label else ["bilinear"]
    out: list[mt.Transform] = [
        mt.LoadImaged(keys=keys, reader="NibabelReader", image_only=True, ensure_channel_first=True),
        mt.EnsureTyped(keys=IMAGE, dtype=np.float32),
        mt.Orientationd(keys=keys, axcodes=data.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if data.spacing is not None:
        out.append(mt.Spacingd(keys=keys, pixdim=data.spacing, mode=interp))
    if data.crop_foreground:
        out.append(mt.CropForegroundd(keys=keys, source_key=IMAGE, select_fn=ForegroundAbove(data.foreground_threshold), margin=2, allow_smaller=True))
    if data.intensity.mode in ("ct_window", "range"):
        out.append(mt.ScaleIntensityRanged(keys=IMAGE, a_min=data.intensity.lower, a_max=data.intensity.upper, b_min=0.0, b_max=1.0, clip=True))
    else:
        out.append(mt.NormalizeIntensityd(keys=IMAGE, nonzero=data.intensity.nonzero, channel_wise=True))
    if with_label:
        out.append(mt.EnsureTyped(keys=LABEL, dtype=np.int64))
    return out


def _sampling(cfg: Config, num_classes: int) -> list[mt.Transform]:
    d = cfg.data
    patch = tuple(d.patch_size) if cfg.model.spatial_dims == 3 else (*d.patch_size, 1)
    keys = [IMAGE, LABEL]
    out: list[mt.Transform] = [mt.SpatialPadd(keys=keys, spatial_size=patch)]
    # Candidate patch centres are computed once per case (deterministic, so CacheDataset caches them) instead
    # of on every draw: the random crops below then only index into them. Costs 8 bytes per candidate voxel
    # in the cache. Centres come from the label alone (no image threshold: z-scored images are negative
    # over half their voxels, which an image_key threshold of 0 would silently exclude).
    if d.class_ratios is not None:
        if len(d.class_ratios) != num_classes:
            raise ValueError(f"data.class_ratios has {len(d.class_ratios)} values for {num_classes} classes")
        index_keys = [f"{LABEL}_cls_indices"]
        out.append(mt.ClassesToIndicesd(keys=LABEL, num_classes=num_classes, indices_postfix="_cls_indices"))
        out.append(mt.RandCropByLabelClassesd(keys=keys, label_key=LABEL, spatial_size=patch, ratios=list(d.class_ratios),
                                              num_classes=num_classes, num_samples=d.samples_per_volume,
                                              indices_key=index_keys[0], allow_smaller=False, warn=False))
    else:
        index_keys = [f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"]
        out.append(mt.FgBgToIndicesd(keys=LABEL))
        out.append(mt.RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=patch, pos=d.pos_fraction,
                                             neg=1.0 - d.pos_fraction, num_samples=d.samples_per_volume,
                                             fg_indices_key=index_keys[0], bg_indices_key=index_keys[1], allow_smaller=False))
    out.append(mt.DeleteItemsd(keys=index_keys))  # index arrays differ in length per case: never collate them
    if cfg.model.spatial_dims == 2:  # slice-wise 2D training on volumes: drop the singleton z axis
        out.append(mt.SqueezeDimd(keys=keys, dim=-1))
    return out


def train_transforms(cfg: Config, num_classes: int) -> mt.Compose:
    """Preprocessing + patch sampling + light augmentation."""
    if cfg.data.kind == "image2d":
        from medseg.data.natural_images import image_train_transforms

        return image_train_transforms(cfg)
    aug: list[mt.Transform] = []
    if cfg.data.augment:
        for name in cfg.data.augmentations:
            aug += AUGMENTATIONS.get(name)([IMAGE, LABEL], cfg.model.spatial_dims)
    return mt.Compose([*preprocessing(cfg.data, True), *_sampling(cfg, num_classes), *aug])


def eval_transforms(cfg: Config, with_label: bool = True) -> mt.Compose:
    """Deterministic preprocessing for validation (with label) and inference (without)."""
    if cfg.data.kind == "image2d":
        from medseg.data.natural_images import image_preprocessing

        return mt.Compose(image_preprocessing(cfg.data, with_label))
    return mt.Compose(preprocessing(cfg.data, with_label))
