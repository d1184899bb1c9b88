"""DICOM-SEG round trip on a real oblique MR series: labels, references and plane positions survive."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.dicom_series import SeriesInfo, discover_series, scan_dicom_folder

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dicom_mr_series"
T1POST = DATA / "Study3" / "11-T1post-18670"
HIPPO = DATA / "Study3" / "11_HCropVolume"
LABELS = {"box": 1, "sphere": 2}
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared DICOM data not available")


@pytest.fixture(scope="module")
def t1post() -> SeriesInfo:
    (info,) = discover_series(T1POST)
    return info


@pytest.fixture(scope="module")
def labels(t1post: SeriesInfo) -> np.ndarray:
    """A box (label 1) and a 20 mm-radius sphere in physical units (label 2) on the 22 x 320 x 280 grid."""
    out = np.zeros((t1post.n_slices, 320, 280), dtype=np.uint8)
    out[4:9, 100:160, 60:120] = LABELS["box"]
    z, y, x = np.ogrid[: t1post.n_slices, :320, :280]
    out[((z - 14) * 6.5) ** 2 + ((y - 200) * 0.6875) ** 2 + ((x - 170) * 0.6875) ** 2 < 20**2] = LABELS["sphere"]
    return out


def _write(labels: np.ndarray, info: SeriesInfo, out: Path, label_map: dict[str, int] = LABELS) -> Path:
    return write_dicom_seg(labels, list(info.files), label_map, out, algorithm_name="medseg-test",
                           algorithm_version="0.1.0")


def test_round_trip_overlays_the_source(t1post: SeriesInfo, labels: np.ndarray, tmp_path: Path) -> None:
    path = _write(labels, t1post, tmp_path / "out" / "seg.dcm")
    assert [p.name for p in path.parent.iterdir()] == ["seg.dcm"]  # no temp file left behind
    assert np.array_equal(read_dicom_seg(path, t1post), labels)
    assert np.array_equal(read_dicom_seg(path, t1post, LABELS), labels)

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "medseg segmentation"
    descriptions = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.segment_label for d in descriptions] == ["box", "sphere"]
    assert {d.algorithm_type for d in descriptions} == {hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC}
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [t1post.uid]

    # Each stored frame: its source slice, its plane position (= that slice's IPP), its pixels.
    source = {s.sop_instance_uid: (k, s.position) for k, s in enumerate(t1post.slices)}
    pixels = seg.pixel_array.reshape(-1, 320, 280)
    assert len(pixels) == seg.NumberOfFrames == np.count_nonzero(
        [[(labels[k] == v).any() for k in range(t1post.n_slices)] for v in LABELS.values()])
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k, position = source[uid]
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   position, atol=1e-4)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert np.array_equal(frame.astype(bool), labels[k] == number)


def test_label_values_need_not_be_consecutive(t1post: SeriesInfo, labels: np.ndarray, tmp_path: Path) -> None:
    label_map = {"lesion": 3, "edema": 7}
    remapped = np.select([labels == 1, labels == 2], [3, 7], 0).astype(np.uint8)
    path = _write(remapped, t1post, tmp_path / "seg.dcm", label_map)
    assert np.array_equal(read_dicom_seg(path, t1post, label_map), remapped)
    assert set(np.unique(read_dicom_seg(path, t1post)).tolist()) == {0, 1, 2}  # segment numbers


def test_empty_labels_give_a_valid_seg(t1post: SeriesInfo, tmp_path: Path) -> None:
    empty = np.zeros((t1post.n_slices, 320, 280), dtype=np.uint8)
    path = _write(empty, t1post, tmp_path / "empty.dcm")
    assert not read_dicom_seg(path, t1post).any()
    partly = empty.copy()
    partly[3, 10:20, 10:20] = 1  # "sphere" has no voxels at all
    path = _write(partly, t1post, tmp_path / "partly.dcm")
    assert np.array_equal(read_dicom_seg(path, t1post), partly)
    assert hd.seg.segread(path).number_of_segments == 2


def test_seg_is_not_mistaken_for_an_image_series(t1post: SeriesInfo, labels: np.ndarray, tmp_path: Path) -> None:
    path = _write(labels, t1post, tmp_path / "seg.dcm")
    scan = scan_dicom_folder(tmp_path)
    assert scan.series == [] and [(o.path, o.what, o.modality) for o in scan.others] == [
        (path, "Segmentation Storage", "SEG")
    ]


def test_bad_inputs(t1post: SeriesInfo, labels: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        _write(labels[:-1], t1post, tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="not in the label map"):
        _write(labels, t1post, tmp_path / "b.dcm", {"box": 1})
    with pytest.raises(ValueError, match="distinct positive"):
        _write(labels, t1post, tmp_path / "c.dcm", {"box": 1, "sphere": 1})
    assert not list(tmp_path.iterdir())

    path = _write(labels, t1post, tmp_path / "seg.dcm")
    (other,) = discover_series(HIPPO)
    with pytest.raises(InputError, match="does not reference source series 11_HCropVolume"):
        read_dicom_seg(path, other)
    with pytest.raises(InputError, match="not in the label map"):
        read_dicom_seg(path, t1post, {"box": 1})
    with pytest.raises(InputError, match="not a readable DICOM-SEG"):
        read_dicom_seg(t1post.files[0], t1post)  # an MR slice, not a SEG
