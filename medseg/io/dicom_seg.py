"""DICOM-SEG output and input with highdicom: one binary segment per label, aligned with the source slices.

A label array here is in the source series' voxel order: shape (n_slices, rows, columns) with slices
sorted as in ``SeriesInfo.files`` (the order of ``sitk.GetArrayFromImage(read_series(info))``).

What reaches a derived object from the source slices: the writers (this SEG, ``rtstruct_write``) are given
``reference_headers``, minimal copies of the source headers, not the headers themselves. highdicom copies every
attribute of the source's Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
modules (PatientAge/Weight/Size, OtherPatientIDsSequence, StudyDescription, PhysiciansOfRecord, ... whatever the
source holds) and, as Contributing Equipment, the scanner's Manufacturer, model, serial number, InstitutionName,
InstitutionAddress, InstitutionalDepartmentName, StationName and acquisition date-time. With minimal copies only
the patient and study attributes the IODs require (``REQUIRED_PATIENT_STUDY``) are copied, plus the UIDs and
geometry that reference and place the planes (``_REFERENCE_KEYWORDS``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.dicom_headers import effective_sop_class
from medseg.io.dicom_series import SeriesInfo

DEFAULT_CATEGORY = codes.SCT.Tissue  # SCT 85756007, CID 7150 "Segmentation Property Categories"
DEFAULT_TYPE = codes.SCT.Tissue
# Patient module and General Study module attributes of type 1/2: the only patient/study data a derived object
# (SEG, RTSTRUCT) gets from its source. Type 2 ones absent from the source are written empty ("unknown").
REQUIRED_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# What the writers read to reference and place the source planes (no patient data).
_REFERENCE_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)
_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def write_dicom_seg(
    label_array: np.ndarray,
    source_files: Sequence[Path],
    label_map: dict[str, int],
    out_path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str = "medseg segmentation",
    series_number: int = 100,
    segment_codes: Mapping[str, tuple[Code, Code]] | None = None,
    manufacturer: str = "medseg",
) -> Path:
    """Write ``label_array`` as a BINARY DICOM-SEG referencing ``source_files``, atomically.

    ``label_map`` maps segment names to label values (background 0 is not a segment). Segments are
    numbered 1..K in order of label value; each is AUTOMATIC, made by ``algorithm_name``
    ``algorithm_version``, with category/type ``segment_codes[name]`` (default SCT "Tissue"/"Tissue").
    Labels absent from the array still get a (empty) segment. The SEG's Manufacturer is ``manufacturer``, its
    model name ``algorithm_name``; from the source only ``REQUIRED_PATIENT_STUDY`` patient/study data is copied.
    """
    out_path = Path(out_path)
    labels = check_label_map(label_map)
    sources = reference_headers(source_files)
    check_labels_fit(label_array, sources, label_map)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    segment_of_label = np.zeros(max(labels.values()) + 1, dtype=np.uint16)
    for number, (name, value) in enumerate(sorted(labels.items(), key=lambda kv: kv[1]), start=1):
        category, prop_type = (segment_codes or {}).get(name, (DEFAULT_CATEGORY, DEFAULT_TYPE))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=category,
                segmented_property_type=prop_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
        segment_of_label[value] = number
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segment_of_label[label_array.astype(np.intp)],  # segment numbers, a plane per source
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=bool(label_array.any()),  # an all-empty SEG still needs frames
    )
    with atomic_path(out_path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return out_path


def reference_headers(source_files: Sequence[Path]) -> list[pydicom.Dataset]:
    """Minimal copies of the source slices' headers for a derived object's writer (highdicom, rt-utils).

    Each holds only ``REQUIRED_PATIENT_STUDY`` (type 2 ones empty when the source lacks them: derived series
    such as crops often do) and ``_REFERENCE_KEYWORDS``, so whatever a library copies from it, no other patient,
    study, institution or device data can reach the output. ``InputError`` for an unreadable file or one
    without the UIDs a reference needs.
    """
    out: list[pydicom.Dataset] = []
    for f in source_files:
        path = Path(f)
        try:
            full = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:
            raise InputError(path, f"unreadable DICOM header ({type(e).__name__})") from e
        full.SOPClassUID = effective_sop_class(full)[0]  # blanked by an anonymiser: the file meta's, or Modality's
        missing = [k for k in _TYPE1 if not full.get(k)]
        if missing:
            raise InputError(path, f"missing {', '.join(missing)}; a derived object cannot reference it")
        ds = pydicom.Dataset()
        ds.file_meta = copy.deepcopy(full.file_meta)
        for keyword in (*_REFERENCE_KEYWORDS, *REQUIRED_PATIENT_STUDY):
            if keyword in full:
                ds.add(copy.deepcopy(full[keyword]))
            elif keyword in REQUIRED_PATIENT_STUDY:
                setattr(ds, keyword, "")  # type 2: empty is valid ("unknown")
        out.append(ds)
    return out


def check_labels_fit(label_array: np.ndarray, sources: list[pydicom.Dataset], label_map: Mapping[str, int]) -> None:
    """``ValueError`` unless the array is integer, (slices, rows, cols) of the series, with known values."""
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns)) if sources else None
    if label_array.shape != expected:
        raise ValueError(f"label array shape {label_array.shape} != source series (slices, rows, cols) {expected}")
    if not (np.issubdtype(label_array.dtype, np.integer) or label_array.dtype == bool):
        raise ValueError(f"label array must hold integers, got {label_array.dtype}")
    unknown = sorted(set(np.unique(label_array).tolist()) - {0, *label_map.values()})
    if unknown:
        raise ValueError(f"label values {unknown} are not in the label map {label_map}")


def read_dicom_seg(path: Path, source_info: SeriesInfo, label_map: Mapping[str, int] | None = None) -> np.ndarray:
    """Read a DICOM-SEG into a label array aligned with ``source_info`` (n_slices, rows, columns).

    Voxels get their segment number, or ``label_map[segment label]`` when a label map is given.
    Overlapping segments cannot form a label array and are an ``InputError``.
    """
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as e:
        raise InputError(path, f"not a readable DICOM-SEG ({type(e).__name__})") from e
    referenced = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
    if source_info.uid not in referenced:
        raise InputError(path, f"the SEG does not reference source series {source_info.case_id}")
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise InputError(path, "FRACTIONAL segmentations are not supported; need BINARY or LABELMAP")
    try:
        numbers = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_info.sop_instance_uids,
            combine_segments=True,
            assert_missing_frames_are_empty=True,  # empty frames are omitted from the SEG
        )
    except (ValueError, RuntimeError) as e:
        raise InputError(path, f"cannot align segments with the source slices ({e})") from e
    if label_map is None:
        return numbers.astype(np.uint16)
    lut = np.zeros(max(seg.segment_numbers, default=0) + 1, dtype=np.uint16)
    for number in seg.segment_numbers:
        name = seg.get_segment_description(number).segment_label
        if name not in label_map:
            raise InputError(path, f"segment {number} {name!r} is not in the label map {sorted(label_map)}")
        lut[number] = label_map[name]
    return lut[numbers]


def check_label_map(label_map: Mapping[str, int]) -> dict[str, int]:
    """The label map as ``{name: value}``; ``ValueError`` unless its values are distinct positive integers."""
    if not label_map:
        raise ValueError("label map is empty: need at least one segment")
    values = list(label_map.values())
    if any(not isinstance(v, (int, np.integer)) or v <= 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"label map values must be distinct positive integers (0 is background): {label_map}")
    return {str(k): int(v) for k, v in label_map.items()}
