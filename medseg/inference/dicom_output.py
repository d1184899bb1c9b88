"""The DICOM objects of a DICOM series case: DICOM-SEG and/or RTSTRUCT beside the NIfTI mask.

``inference.dicom_output`` chooses them (seg, rtstruct, both, none) and ``inference.dicom`` fills their headers
(series description, manufacturer, algorithm name/version) and per-label codes. Both reference the source series'
own SOP instances, in ``SeriesInfo`` slice order; see ``medseg.io.dicom_seg`` for what they copy from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.sr.coding import Code

from medseg.config import DicomOutputConfig, InferenceConfig, parse_code
from medseg.errors import ConfigError
from medseg.inference.dicom_input import seg_label_array
from medseg.inference.records import SEG_SUFFIX, dicom_output_names
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.dicom_series import SeriesInfo
from medseg.io.rtstruct_write import write_rtstruct


def dicom_codes(options: DicomOutputConfig, label_map: Mapping[str, int]) -> dict[str, tuple[Code, Code]]:
    """``inference.dicom.codes`` as (category, type) ``Code`` pairs; ``ConfigError`` for a name not in the label map.

    Cheap: a batch can call it before the first case so a misspelt label fails at once, not after a prediction.
    """
    unknown = sorted(set(options.codes) - {str(k) for k in label_map})
    if unknown:
        raise ConfigError(f"inference.dicom.codes: {unknown} are not labels of the model ({sorted(label_map)})")
    return {name: (_code(c.category), _code(c.type)) for name, c in options.codes.items() if int(label_map[name]) != 0}


def write_dicom_outputs(
    labels_xyz: np.ndarray,
    info: SeriesInfo,
    label_map: Mapping[str, int],
    out_dir: Path,
    case_id: str,
    options: InferenceConfig,
    model_name: str,
    model_version: str,
) -> list[Path]:
    """Write ``<case_id>.seg.dcm`` and/or ``<case_id>.rtstruct.dcm`` in ``out_dir`` as ``options.dicom_output`` says.

    ``labels_xyz`` is the mask in the series' NIfTI voxel order (x, y, z), as the predictor returns it; every
    non-zero label of ``label_map`` becomes a segment / ROI of that name (absent labels: empty segment, ROI without
    contours). Algorithm name and version are ``options.dicom``'s or else the model's. Each file is written
    atomically; returns the paths written, in ``dicom_output_names`` order (none for ``dicom_output: none``).
    """
    names = dicom_output_names(case_id, options.dicom_output)
    if not names:
        return []
    dicom = options.dicom
    segments = {str(name): int(v) for name, v in label_map.items() if int(v) != 0}  # background is not a segment
    codes = dicom_codes(dicom, label_map)
    array = seg_label_array(labels_xyz)
    algorithm, version = (dicom.algorithm_name or model_name)[:64], (dicom.algorithm_version or model_version)[:64]
    written = []
    for name in names:
        path, seg = Path(out_dir) / name, name.endswith(SEG_SUFFIX)
        write = partial(write_dicom_seg, segment_codes=codes) if seg else partial(write_rtstruct, roi_codes=codes)
        write(
            array,
            info.files,
            segments,
            path,
            algorithm_name=algorithm,
            algorithm_version=version,
            series_description=dicom.series_description,
            manufacturer=dicom.manufacturer,
        )
        written.append(path)
    return written


def _code(text: str) -> Code:
    scheme, value, meaning = parse_code(text)
    return Code(value, scheme, meaning)
