"""Per-case work of a batch, one runner per data kind (chosen by name from ``CASE_RUNNERS``).

A runner holds the loaded predictor of its kind and turns one ``InputCase`` into its output files and the
record fields: volumes write ``<id>.nii.gz`` (DICOM series also ``<id>.seg.dcm``) and organ volumes; 2D images
write ``<id>.png`` and class pixel counts. The batch runner (``batch``) does the rest, the same for every kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from medseg.inference.dicom_input import load_series_image
from medseg.inference.dicom_output import write_dicom_outputs
from medseg.inference.images2d import ImagePredictor, predict_image_case
from medseg.inference.inputs import InputCase, case_sha256
from medseg.inference.label_maps import organ_volumes, save_probabilities_like
from medseg.inference.model_package import ModelPackage
from medseg.inference.predictor import Prediction, Predictor
from medseg.inference.records import dicom_output_names, outputs_of, probabilities_name
from medseg.io.dicom_series import SeriesInfo
from medseg.io.nifti import save_label_like
from medseg.registry import Registry

CASE_RUNNERS: Registry = Registry("case runner")


class CaseRunner(ABC):
    """Segments the cases of one data kind with one loaded model."""

    def __init__(self, package: ModelPackage, predictor: Any) -> None:
        self.package, self.predictor = package, predictor

    @classmethod
    @abstractmethod
    def load(cls, package: ModelPackage, device: str, local_rank: int | None) -> Any:
        """Build this kind's predictor for ``package`` (the network loaded once per batch)."""

    @abstractmethod
    def run(
        self, case: InputCase, out: Path, model: dict[str, Any], probabilities: bool, checksum: Future | None
    ) -> dict[str, Any]:
        """Read, predict and write one case's outputs; returns the record fields (``checksum``: read ahead).

        The checksum is taken after the prediction, so an unreadable input fails with the loader's own message.
        """


def _sha256(case: InputCase, checksum: Future | None) -> str:
    return checksum.result() if checksum is not None else case_sha256(case)


@CASE_RUNNERS.register("volume")
class VolumeCases(CaseRunner):
    """NIfTI files and DICOM series: mask (and DICOM-SEG / RTSTRUCT), optional probabilities, organ volumes."""

    @classmethod
    def load(cls, package: ModelPackage, device: str, local_rank: int | None) -> Predictor:
        return Predictor(package, device, local_rank=local_rank)

    def run(
        self, case: InputCase, out: Path, model: dict[str, Any], probabilities: bool, checksum: Future | None
    ) -> dict[str, Any]:
        labels = self.package.labels
        series = case.series
        source = load_series_image(series) if series is not None else list(case.images)
        name = str(series.folder) if series is not None else None
        pred = self.predictor.predict(source, name=name, with_probabilities=probabilities)
        _save_probabilities(pred, out / probabilities_name(case))
        save_label_like(pred.labels, pred.reference, out / outputs_of(case)[0])
        fields: dict[str, Any] = {"outputs": outputs_of(case, probabilities), "warnings": []}
        if series is not None:
            written, notes = self._dicom_outputs(pred, case, series, out, model)
            fields["outputs"] += written
            fields["warnings"] = [*series.warnings, *notes]
            fields.update(n_slices=series.n_slices, modality=series.modality)
        return {
            "seconds": round(pred.seconds, 3),
            "shape": list(pred.labels.shape),
            "organs": organ_volumes(pred.labels, pred.reference, labels),
            "windows": pred.windows,
            "network": pred.network,
            "input_sha256": _sha256(case, checksum),
            **fields,
        }

    def _dicom_outputs(
        self, pred: Prediction, case: InputCase, series: SeriesInfo, out: Path, model: dict[str, Any]
    ) -> tuple[list[str], list[str]]:
        """(names written, warnings): the DICOM objects beside the mask. They cannot fail the case: its NIfTI
        mask is complete, so a DICOM output that cannot be written leaves the case ok, with a warning saying why
        and no partial DICOM file on disk."""
        options = self.package.config.inference
        names = dicom_output_names(case.id, options.dicom_output)
        if not names:
            return [], []
        if series.uid_missing:
            return [], ["no DICOM output: the source slices carry no SeriesInstanceUID for it to reference"]
        try:
            written = write_dicom_outputs(
                pred.labels, series, self.package.labels, out, case.id, options, model["name"], model["version"]
            )
        except Exception as e:  # any library failure: the mask stands, the record says why
            for n in names:  # a SEG written before the RTSTRUCT failed: the record lists neither, so neither stays
                (out / n).unlink(missing_ok=True)
            cause = str(e).splitlines()[0][:200] if str(e) else ""
            return [], [f"no DICOM output ({type(e).__name__}: {cause}); the NIfTI mask is complete"]
        return [Path(p).name for p in written], []


@CASE_RUNNERS.register("image2d")
class ImageCases(CaseRunner):
    """PNG/JPG images: index-PNG mask, optional ``.npy`` probabilities, class pixel counts."""

    @classmethod
    def load(cls, package: ModelPackage, device: str, local_rank: int | None) -> ImagePredictor:
        return ImagePredictor(package, device, local_rank=local_rank)

    def run(
        self, case: InputCase, out: Path, model: dict[str, Any], probabilities: bool, checksum: Future | None
    ) -> dict[str, Any]:
        probs = out / probabilities_name(case) if probabilities else None
        fields = predict_image_case(
            self.predictor, case.images[0], out / outputs_of(case)[0], probs, self.package.labels
        )
        return {**fields, "input_sha256": _sha256(case, checksum)}


def _save_probabilities(pred: Prediction, path: Path) -> None:
    if pred.probabilities is not None:
        save_probabilities_like(pred.probabilities, pred.reference, path)
        pred.probabilities = None  # free it before the next case
