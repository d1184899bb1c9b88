"""End-to-end privacy scan: identifiers planted in a DICOM export reach no log, report, record or MLflow run.

Three real IBSI sarcoma CT series (../shared/data/ibsi_sts_ct), cut to the tumour to keep the run short, are copied
with one patient's identifiers planted in every file's header (PatientName, PatientID, PatientBirthDate,
AccessionNumber, InstitutionName, ReferringPhysicianName, StudyID) and in the export's folder and file names, as
hospital exports name them: two with their RTSTRUCTs, one without and with a slice missing. The real CLI runs the
pipeline once (module fixture): ``data import-dicom`` (hash case ids), ``train`` (one tiny epoch, tracked and
registered on a real MLflow server), ``predict`` on the DICOM folder with ``--dicom-output both`` and
``--mlflow-experiment`` (the broken series fails alone: exit 3), and ``evaluate --mlflow-experiment``. Scanned:

- stdout and stderr of every command;
- every file written (names and bytes; gzip and zip members inflated: NIfTI headers, torch files), except the case
  map (the one file meant to link ids back to the source folders: it must hold them) and the DICOM outputs;
- every MLflow record of the runs (run, experiment and registered model names, params, tags, metric keys, dataset
  inputs, model versions, logged models), every artifact downloaded (inflated the same way), and the server's raw
  store (SQLite database and artifact folder);
- the same sinks for the source's UIDs, which are not planted but identify the exam;
- the DICOM outputs (SEG, RTSTRUCT) attribute by attribute: their patient / study attributes are exactly
  ``REQUIRED_PATIENT_STUDY`` (the standard requires the source's there) and no other element holds a planted value.

A scan that finds nothing proves little unless it could find something: the planted export and the case map are
scanned with the same function and must be found full of them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import time
import uuid
import zipfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from mlflow.tracking import MlflowClient

from medseg.io.dicom_seg import REQUIRED_PATIENT_STUDY
from tests.helpers import SHARED_DATA, run_cli

IBSI = SHARED_DATA / "ibsi_sts_ct"
PLANTED = {  # every header of the export gets these
    "PatientName": "ZZPRIVNAME^ZZPLANTED",
    "PatientID": "ZZPRIVID123",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ZZACC987",
    "InstitutionName": "ZZHOSPITAL",
    "ReferringPhysicianName": "ZZREFDOC^ZZDR",
    "StudyID": "ZZSTUDY55",
}
# What is searched for (lower case): each planted value's parts, the birth date as ISO too, and a fragment that is
# only in a folder name (``zzdoe``): a folder part naming the patient must vanish whole, not be cut around the ID.
TOKENS = tuple(
    "zzprivname zzplanted zzprivid123 19010203 1901-02-03 zzacc987 zzhospital zzrefdoc zzdr zzstudy55 zzdoe".split()
)
# case -> (patient folder, series folder below it or "", slice file name pattern, RTSTRUCT path below the patient).
# The third has no RTSTRUCT (import leaves it out) and a missing slice: prediction fails it, naming its slices.
LAYOUT = {
    "STS_019": ("ZZPRIVID123_ZZDOE", "", "ZZPRIVNAME_slice{:03d}.dcm", "RS/ZZPRIVNAME_RS.dcm"),
    "STS_025": ("ZZPRIVNAME_ZZPLANTED", "ZZACC987_CT", "IM_ZZPRIVID123_{:03d}.dcm", "ZZSTUDY55_19010203_RS.dcm"),
    "STS_008": ("ZZPRIVID123_ZZDOE_2", "ZZACC987_broken", "ZZPRIVNAME_{:03d}.dcm", None),
}
TRAIN = (  # one tiny epoch (overlays and HD95 on: more for the scan to read)
    "data.patch_size=[32,32,16] model.params.channels=[4,8,16,32] data.samples_per_volume=1 data.batch_size=1 "
    "train.epochs=1 train.val_every=1 train.device=cpu train.hd95_every=1 train.overlay_cases=1 data.augment=false "
    "data.spacing=[3.0,3.0,3.27] inference.overlap=0.0"
)
CROP, MARGIN_SLICES = 64, 2  # pixels kept around the tumour in-plane; slices kept beyond its first / last
pytestmark = pytest.mark.skipif(not IBSI.is_dir(), reason="shared IBSI data not available")


def hits(data: bytes, depth: int = 0) -> set[str]:
    """The planted tokens in ``data`` (case-insensitive), also inside gzip streams and zip members, recursively."""
    low = data.lower()
    found = {t for t in TOKENS if t.encode() in low}
    if depth < 3 and data[:2] == b"\x1f\x8b":
        found |= hits(gzip.decompress(data), depth + 1)
    if depth < 3 and data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                found |= hits(name.encode(), depth + 1) | hits(z.read(name), depth + 1)
    return found


def scan_tree(root: Path, skip: Collection[Path] = ()) -> dict[str, set[str]]:
    """``relative path -> tokens`` for every file (and folder) under ``root`` whose name or bytes hold any."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path in skip:
            continue
        found = hits(path.relative_to(root).as_posix().encode())
        if path.is_file():
            found |= hits(path.read_bytes())
        if found:
            out[path.relative_to(root).as_posix()] = found
    return out


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Read the source without pydicom's warnings about its own over-long SH values (they flood a failure's log)."""
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        pydicom.config.settings.reading_validation_mode = mode


def _plant(ds: pydicom.Dataset, dst: Path) -> None:
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)


def _tumour_box(rtstruct: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    points = [np.asarray(c.ContourData, float).reshape(-1, 3) for c in rtstruct.ROIContourSequence[0].ContourSequence]
    return np.concatenate(points).min(axis=0), np.concatenate(points).max(axis=0)


def _cropped(ds: pydicom.Dataset, lo: np.ndarray, hi: np.ndarray) -> pydicom.Dataset | None:
    """An axial CT slice cut to ``CROP`` pixels around the tumour's box (``None``: more than ``MARGIN_SLICES``
    slices from it), pixels and position kept consistent (the orientation is the identity in this data set)."""
    z, step = float(ds.ImagePositionPatient[2]), float(ds.SliceThickness)
    if not lo[2] - MARGIN_SLICES * step <= z <= hi[2] + MARGIN_SLICES * step:
        return None
    origin, (row_mm, col_mm) = np.asarray(ds.ImagePositionPatient, float), (float(v) for v in ds.PixelSpacing)
    centre = (lo + hi) / 2
    c0 = int(np.clip(round((centre[0] - origin[0]) / col_mm) - CROP // 2, 0, ds.Columns - CROP))
    r0 = int(np.clip(round((centre[1] - origin[1]) / row_mm) - CROP // 2, 0, ds.Rows - CROP))
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[r0 : r0 + CROP, c0 : c0 + CROP]).tobytes()
    ds.Rows = ds.Columns = CROP
    ds.ImagePositionPatient = [f"{origin[0] + c0 * col_mm:.6f}", f"{origin[1] + r0 * row_mm:.6f}", f"{z:.6f}"]
    return ds


def planted_export(root: Path) -> Path:
    """The three cases cut to the tumour's neighbourhood (small and fast; still valid series + RTSTRUCT), every
    header and the folder / file names planted; the unlabelled one loses a slice from its middle."""
    for case, (patient, series, slice_name, rtstruct) in LAYOUT.items():
        with quiet_pydicom():
            rs = pydicom.dcmread(IBSI / case / "CT" / "mask" / "RS.dcm")
            lo, hi = _tumour_box(rs)
            files = sorted((IBSI / case / "CT" / "image").glob("*.dcm"))
            slices = [ds for ds in (_cropped(pydicom.dcmread(p), lo, hi) for p in files) if ds is not None]
            for k, ds in enumerate(slices):
                if rtstruct is not None or k != len(slices) // 2:
                    _plant(ds, root / patient / series / slice_name.format(k))
            if rtstruct is not None:
                _plant(rs, root / patient / rtstruct)
    return root


@dataclass
class Pipeline:
    """What one run of the pipeline left: console output per command, folders, MLflow records."""

    root: Path
    export: Path
    consoles: dict[str, str] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    model_name: str = ""
    experiments: tuple[str, ...] = ()
    client: MlflowClient | None = None

    @property
    def case_map(self) -> Path:
        return self.root / "data" / "sts_case_map.json"

    def cli(self, name: str, args: str, exit_code: int = 0) -> None:
        """Run ``medseg ARGS`` (split at spaces: no path here has one), keep its console output and time."""
        t0 = time.perf_counter()
        p = run_cli(*args.split(), check=False)
        self.consoles[name] = p.stdout + p.stderr
        assert p.returncode == exit_code, f"{name} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        print(f"{name}: {time.perf_counter() - t0:.1f} s")


@pytest.fixture(scope="module")
def pipeline(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """Import, train, predict and evaluate once on the planted export, tracked on the real MLflow server."""
    root = tmp_path_factory.mktemp("privacy")
    tag, uri = uuid.uuid4().hex[:8], f"--tracking-uri {mlflow_server}"
    run = Pipeline(
        root,
        planted_export(root / "export"),
        model_name=f"privacy-{tag}",
        experiments=(f"privacy-train-{tag}", f"privacy-predict-{tag}", f"privacy-eval-{tag}"),
        client=MlflowClient(tracking_uri=mlflow_server),
    )
    manifest, model = root / "data" / "sts.json", root / "runs" / "tiny"
    run.cli("import", f"data import-dicom {run.export} --labels rtstruct --output {manifest} --val-fraction 0.5")
    run.cli(
        "train",
        f"train sarcoma_ct_unet3d data.manifest={manifest} train.output_dir={model.parent} train.run_name={model.name} "
        f"{TRAIN} tracking.experiment={run.experiments[0]} "
        f"tracking.registered_model_name={run.model_name} {uri}",
    )
    run.run_ids["train"] = (model / "mlflow_run_id.txt").read_text().strip()
    run.cli(  # exit 3: the broken series failed (alone)
        "predict",
        f"predict --model {model} --input {run.export} --output {root / 'pred'} --device cpu --dicom-output both "
        f"--mlflow-experiment {run.experiments[1]} {uri}",
        exit_code=3,
    )
    run.cli(
        "evaluate",
        f"evaluate --pred {root / 'pred'} --manifest {manifest} --output {root / 'eval'} "
        f"--mlflow-experiment {run.experiments[2]} {uri}",
    )
    return run


def _dicom_outputs(run: Pipeline) -> list[Path]:
    return sorted(p for p in (run.root / "pred").rglob("*.dcm"))


def test_the_scan_finds_what_was_planted(pipeline: Pipeline) -> None:
    """The export and the case map are full of the planted values: the scanner does see them."""
    export = scan_tree(pipeline.export)
    assert set().union(*export.values()) == set(TOKENS) - {"1901-02-03"}
    case_map = hits(pipeline.case_map.read_bytes())
    assert {"zzprivid123", "zzdoe", "zzacc987"} <= case_map  # folder names, as its note says; beside the manifest
    assert "re-identifies" in pipeline.case_map.read_text()
    ds = pydicom.dcmread(next(pipeline.export.rglob("*_RS.dcm")))
    assert ds.Modality == "RTSTRUCT" and str(ds.InstitutionName) == "ZZHOSPITAL" and str(ds.StudyID) == "ZZSTUDY55"


def test_no_planted_value_in_any_console_output(pipeline: Pipeline) -> None:
    assert set(pipeline.consoles) == {"import", "train", "predict", "evaluate"}
    leaks = {name: hits(text.encode()) for name, text in pipeline.consoles.items()}
    assert not any(leaks.values()), leaks


def test_no_planted_value_in_any_file_written(pipeline: Pipeline) -> None:
    """Manifest, NIfTI cache, import report, run folder (checkpoints, package, plots, history), per-case JSON,
    summary CSV, skipped-objects list, evaluation tables and plots: names and bytes."""
    dicom = set(_dicom_outputs(pipeline))
    assert len(dicom) == 4  # SEG + RTSTRUCT per case, checked attribute by attribute below
    written = [pipeline.root / d for d in ("data", "runs", "pred", "eval")]
    leaks = {d.name: scan_tree(d, dicom | {pipeline.case_map}) for d in written}
    assert not any(leaks.values()), leaks
    files = {p.relative_to(pipeline.root).as_posix() for d in written for p in d.rglob("*") if p.is_file()}
    assert {"pred/summary.csv", "data/sts_import_report.json", "eval/metrics_per_case.csv"} <= files, sorted(files)


def test_the_failed_series_is_named_without_its_identifiers(pipeline: Pipeline) -> None:
    """The broken series fails alone, and its error (record, summary, console) still names the folder and the two
    slices around the gap, with the parts that name the patient redacted: the user's own root is kept."""
    records = [json.loads(p.read_text()) for p in (pipeline.root / "pred").glob("series-*.json")]
    assert sorted(r["status"] for r in records) == ["failed", "ok", "ok"]
    error = next(r["error"] for r in records if r["status"] == "failed")
    expected = f"{pipeline.export}/<redacted>/<redacted>: missing slice(s): a gap of 6.54 mm between <redacted> and "
    assert error.startswith(expected), error
    assert error in (pipeline.root / "pred" / "summary.csv").read_text()
    assert error in " ".join(pipeline.consoles["predict"].split())  # the console wraps long lines


def _source_uids(export: Path) -> set[str]:
    """The export's Study / Series / SOP Instance / Frame of Reference UIDs: not planted, but they identify the exam,
    so only the case map and the DICOM outputs (which must reference them) may hold them."""
    uids = set()
    for path in export.rglob("*.dcm"):
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k in ds}
        uids |= {str(ds.FrameOfReferenceUID)} if "FrameOfReferenceUID" in ds else set()
    return uids


def test_no_source_uid_in_any_report_or_log(pipeline: Pipeline) -> None:
    uids = _source_uids(pipeline.export)
    assert len(uids) > 40  # two studies, series, frames and every slice
    skip = set(_dicom_outputs(pipeline)) | {pipeline.case_map}
    assert any(u.encode() in pipeline.case_map.read_bytes() for u in uids)  # the case map holds the series UIDs
    sinks = {f"console {name}": text.encode() for name, text in pipeline.consoles.items()}
    for d in ("data", "runs", "pred", "eval"):
        sinks |= {str(p): p.read_bytes() for p in (pipeline.root / d).rglob("*") if p.is_file() and p not in skip}
    leaks = {where: sorted(u for u in uids if u.encode() in data) for where, data in sinks.items()}
    assert not any(leaks.values()), {k: v[:2] for k, v in leaks.items() if v}


def _patient_study_keywords() -> set[str]:
    """Top-level keywords of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
    Study modules: the standard's own tables, as highdicom ships them (the modules it copies into derived objects)."""
    from highdicom._standard_utils import get_module_attribute_map  # the tables of PS3.3; not re-typed here

    modules = get_module_attribute_map()
    names = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
    return {a["keyword"] for m in names for a in modules[m] if not a["path"]}


def _planted_elements(ds: pydicom.Dataset, nested: bool = False) -> list[str]:
    """Keywords of the elements holding a planted value, other than the required top-level ones."""
    found = []
    for elem in ds:
        if elem.VR == "SQ":
            found += [f"{elem.keyword}>{k}" for item in elem.value for k in _planted_elements(item, nested=True)]
        elif (nested or elem.keyword not in REQUIRED_PATIENT_STUDY) and hits(str(elem.value).encode()):
            found.append(elem.keyword or str(elem.tag))
    return found


def test_dicom_outputs_carry_only_the_required_patient_and_study_attributes(pipeline: Pipeline) -> None:
    required, patient_study = set(REQUIRED_PATIENT_STUDY), _patient_study_keywords()
    assert {"PatientName", "StudyID", "PatientAge", "StudyDescription"} <= patient_study and required <= patient_study
    copied = {k: v for k, v in PLANTED.items() if k in required}  # the standard's: same patient, same study
    assert set(PLANTED) - set(copied) == {"InstitutionName"}
    for path in _dicom_outputs(pipeline):
        ds = pydicom.dcmread(path)
        assert ds.Modality in ("SEG", "RTSTRUCT")
        assert {e.keyword for e in ds} & patient_study == required, path.name
        assert {k: str(ds[k].value) for k in copied} == copied, path.name
        assert _planted_elements(ds) == [], path.name
        allowed = hits(" ".join(copied.values()).encode())
        assert hits(path.read_bytes()) <= allowed and "zzhospital" not in allowed, path.name


def _mlflow_records(run: Pipeline) -> dict[str, str]:
    """``where -> text`` of every MLflow record of the pipeline's runs, model and logged models."""
    client = run.client
    assert client is not None
    experiments = [client.get_experiment_by_name(n) for n in run.experiments]
    ids = [e.experiment_id for e in experiments if e is not None]
    assert len(ids) == 3
    out = {f"experiment {e.name}": repr(dict(e)) for e in experiments if e is not None}
    runs = client.search_runs(ids)
    assert (
        sorted(r.info.run_name for r in runs if r.info.run_name in ("predict", "evaluation"))
        == ["evaluation", "predict"]
        and run.run_ids["train"] in {r.info.run_id for r in runs}
        and len(runs) == 3
    )
    for r in runs:
        rid = r.info.run_id
        out[f"run {rid} name"] = str(r.info.run_name)
        out[f"run {rid} params"] = repr(r.data.params)
        out[f"run {rid} tags"] = repr(r.data.tags)
        out[f"run {rid} metric keys"] = repr(sorted(r.data.metrics))
        datasets = [(d.dataset.to_dictionary(), [(t.key, t.value) for t in d.tags]) for d in r.inputs.dataset_inputs]
        out[f"run {rid} dataset inputs"] = repr(datasets)
        run.run_ids.setdefault(str(r.info.run_name), rid)
    model = client.get_registered_model(run.model_name)
    out["registered model"] = repr((model.name, model.description, model.tags, model.aliases))
    versions = client.search_model_versions(f"name='{run.model_name}'")
    assert len(versions) == 1
    out["model versions"] = repr([dict(v) for v in versions])
    out["logged models"] = repr([m.to_dictionary() for m in client.search_logged_models(ids)])
    return out


def test_no_planted_value_in_mlflow(pipeline: Pipeline, mlflow_server: str, tmp_path: Path) -> None:
    """Params, tags, metric keys, dataset inputs, run / experiment / model names, and every artifact downloaded
    (names and bytes, gzip / zip inflated): no planted value, no source UID, no case map."""
    import mlflow

    records = _mlflow_records(pipeline)
    leaks = {where: hits(text.encode()) for where, text in records.items()}
    assert not any(leaks.values()), {k: v for k, v in leaks.items() if v}
    assert "sts" in records[f"run {pipeline.run_ids['train']} dataset inputs"]  # the scan read the real records
    uids = _source_uids(pipeline.export)
    assert not [w for w, text in records.items() if any(u in text for u in uids)]
    for name, rid in pipeline.run_ids.items():
        dst = tmp_path / name
        mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="", dst_path=str(dst), tracking_uri=mlflow_server)
        files = [p for p in dst.rglob("*") if p.is_file()]
        assert bool(files) == (name != "predict"), name  # a batch run logs no artifacts (per-case files stay out)
        assert not scan_tree(dst), name
        assert not [p.name for p in files if any(u.encode() in p.read_bytes() for u in uids)], name
        assert not [p for p in files if p.name.endswith("_case_map.json")], name
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"train/model/model.pt", "train/data/manifest.json", "evaluation/evaluation/metrics_per_case.csv"} <= names


def test_no_planted_value_in_the_tracking_servers_store(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The server's own store, raw: its SQLite database (every param, tag, input, trace and model record of the
    session's runs, whatever API they are read through) and its artifact folder."""
    stores = sorted({p.parent.resolve() for p in tmp_path_factory.getbasetemp().glob("mlflow_server*/mlflow.db")})
    assert len(stores) == 1, stores  # the session fixture's (tests/conftest.py)
    assert pipeline.model_name.encode() in (stores[0] / "mlflow.db").read_bytes()  # this pipeline's records are in it
    assert not scan_tree(stores[0])
