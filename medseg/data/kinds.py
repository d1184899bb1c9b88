"""Data kinds (``data.kind``): what differs between 3D volumes and 2D natural images, behind one interface.

Every stage of the pipeline asks the case's kind instead of branching on ``kind == ...``: the data layer here
(transforms, input checks, which classes are scored, the sliding window's shape, the default mirror axes,
which files are inputs, output suffixes, summary columns), and the stages above register their own per-kind
strategy under the same name (validation scoring: ``engine.validation.SCORERS``; per-case prediction:
``inference.case_runners.CASE_RUNNERS``; evaluation: ``evaluation.kinds.EVALUATORS``; planning:
``planning.kinds.PLANNERS``). ``DATA_KINDS.names()`` is the list ``data.kind`` accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from monai import transforms as mt

from medseg.config import Config, DataConfig, InferenceConfig
from medseg.data.image_transforms import image_preprocessing, image_train_transforms
from medseg.data.input_checks import check_cases, check_image_cases
from medseg.data.volume_transforms import volume_eval_transforms, volume_train_transforms
from medseg.io.images2d.common import IMAGE_SUFFIXES
from medseg.io.manifest import Case, Manifest
from medseg.registry import Registry

DATA_KINDS: Registry = Registry("data kind")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DataKind(ABC):
    """One kind of data: how its cases are read, checked, windowed and written."""

    name: Literal["volume", "image2d"]  # the values DataConfig.kind accepts
    input_dims: int  # spatial axes of one input (3: a volume, 2: an image)
    mask_suffix: str  # file name ending of a predicted mask
    probabilities_suffix: str  # file name ending of saved class probabilities

    @abstractmethod
    def train_transforms(self, cfg: Config, num_classes: int) -> mt.Compose:
        """Preprocessing, patch sampling and the configured augmentations."""

    @abstractmethod
    def eval_transforms(self, cfg: Config, with_label: bool = True) -> mt.Compose:
        """Deterministic preprocessing for validation (with label) and prediction (without)."""

    @abstractmethod
    def check_cases(self, manifest: Manifest, cases: list[Case], data: DataConfig) -> None:
        """Every case readable and consistent; the first problem is an ``InputError`` naming the file."""

    @abstractmethod
    def scored_labels(self, manifest: Manifest, ignore_index: int | None = None) -> dict[str, int]:
        """Class name -> value of the classes metrics are reported for; never void (``ignore_index``, also when
        it is a value of the label map: ``Manifest.class_labels``)."""

    @abstractmethod
    def is_input_file(self, path: Path) -> bool:
        """True for a file name this kind predicts on."""

    def window(self, cfg: Config) -> tuple[int, ...]:
        """Sliding-window size in the input's axes (a 2D net on volumes slides (H, W, 1) windows)."""
        roi = tuple(cfg.roi_size)
        return roi if cfg.model.spatial_dims == self.input_dims else (*roi, 1)

    def mirror_axes(self, inf: InferenceConfig) -> list[int]:
        """Spatial axes mirrored by test-time augmentation (``inference.tta_axes``, else this kind's default)."""
        if not inf.tta_mirror:
            return []
        return list(inf.tta_axes) if inf.tta_axes is not None else list(self.default_mirror_axes)

    default_mirror_axes: Sequence[int] = ()

    # A prediction record's per-class section, and the summary.csv column suffix -> record key of each class.
    record_section: str = "organs"
    amount_columns: Mapping[str, str] = {"ml": "volume_ml", "voxels": "voxels"}

    def summary_columns(self, label_map: Mapping[str, int]) -> list[str]:
        """Per-class columns of a batch's ``summary.csv`` (``<class>_<suffix>``)."""
        return [f"{name}_{col}" for name in self.reported_classes(label_map) for col in self.amount_columns]

    def reported_classes(self, label_map: Mapping[str, int]) -> list[str]:
        """Class names whose amount a prediction record reports (volumes: organs; images: every class)."""
        return [n for n, v in sorted(label_map.items(), key=lambda kv: kv[1]) if v != 0]


@DATA_KINDS.register("volume")
class VolumeKind(DataKind):
    """3D scans (NIfTI, DICOM series): organs are scored, background is not."""

    name, input_dims, mask_suffix, probabilities_suffix = "volume", 3, ".nii.gz", "_probs.nii.gz"
    default_mirror_axes = (0, 1, 2)

    def train_transforms(self, cfg: Config, num_classes: int) -> mt.Compose:
        return volume_train_transforms(cfg, num_classes)

    def eval_transforms(self, cfg: Config, with_label: bool = True) -> mt.Compose:
        return volume_eval_transforms(cfg, with_label)

    def check_cases(self, manifest: Manifest, cases: list[Case], data: DataConfig) -> None:
        check_cases(manifest, cases)

    def scored_labels(self, manifest: Manifest, ignore_index: int | None = None) -> dict[str, int]:
        return {k: v for k, v in manifest.class_labels(ignore_index).items() if v != 0}

    def is_input_file(self, path: Path) -> bool:
        return path.name.lower().endswith(NIFTI_SUFFIXES)


@DATA_KINDS.register("image2d")
class ImageKind(DataKind):
    """2D natural images (PNG/JPG, index-PNG labels): every class is scored (VOC's background is a class)."""

    name, input_dims, mask_suffix, probabilities_suffix = "image2d", 2, ".png", "_probs.npy"
    default_mirror_axes = (1,)  # (H, W): the horizontal mirror; an upside-down photo is another picture
    record_section = "classes"
    amount_columns = {"pixels": "pixels", "fraction": "fraction"}

    def train_transforms(self, cfg: Config, num_classes: int) -> mt.Compose:
        return image_train_transforms(cfg)

    def eval_transforms(self, cfg: Config, with_label: bool = True) -> mt.Compose:
        return mt.Compose(image_preprocessing(cfg.data, with_label))

    def check_cases(self, manifest: Manifest, cases: list[Case], data: DataConfig) -> None:
        check_image_cases(manifest, cases, data.ignore_index)

    def scored_labels(self, manifest: Manifest, ignore_index: int | None = None) -> dict[str, int]:
        return manifest.class_labels(ignore_index)

    def is_input_file(self, path: Path) -> bool:
        return path.name.lower().endswith(IMAGE_SUFFIXES)

    def reported_classes(self, label_map: Mapping[str, int]) -> list[str]:
        return [n for n, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


def data_kind(cfg: Config | str) -> DataKind:
    """The kind of a config (``data.kind``) or of a kind name."""
    name = cfg if isinstance(cfg, str) else cfg.data.kind
    return DATA_KINDS.get(name)()


def manifest_kind(manifest: Manifest) -> DataKind:
    """The kind a manifest's cases are (``Manifest.holds_images``: the one test of an image manifest)."""
    return data_kind("image2d" if manifest.holds_images else "volume")


def train_transforms(cfg: Config, num_classes: int) -> mt.Compose:
    """Training transforms of the config's data kind."""
    return data_kind(cfg).train_transforms(cfg, num_classes)


def eval_transforms(cfg: Config, with_label: bool = True) -> mt.Compose:
    """Evaluation / prediction transforms of the config's data kind."""
    return data_kind(cfg).eval_transforms(cfg, with_label)
