"""``medseg pacs predict`` against a real Orthanc (DICOMweb plugin) started on free local ports.

The real MR study (Study3 of ../shared/data/dicom_mr_series: T1post and its HippoCrop series, one
StudyInstanceUID) is uploaded through Orthanc's REST API; the CLI runs in a subprocess with a real model
package folder (tiny untrained U-Net). Checked: the DICOM-SEG of each series arrives in the study and
references that series' instances; a ``--resume`` run (found by ``--query``) sends nothing twice and skips
the SEG series now in the study; a stopped server is one error line, exit 1 and no output written.
Orthanc comes from Debian (``make setup-system``); without it these tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from medseg.io.dicomweb import DicomWebPacs, PacsError, RemoteSeries, study_name
from tests.helpers import MEDSEG, SHARED_DATA, free_port, phantom_package, run_cli

ORTHANC_BIN = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
STUDY3 = SHARED_DATA / "dicom_mr_series" / "Study3"
SERIES = ("11-T1post-18670", "11_HCropVolume")  # one study, two series (62 instances)



class Orthanc:
    """An Orthanc server of its own (config, storage and log in ``root``), local access only, no authentication."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port, self.listener_port = root, free_port(), free_port()
        config = {
            "Name": "medseg-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"medseg": ["MEDSEG", "127.0.0.1", self.listener_port]},  # `medseg pacs listen`
            "SaveJobs": False,
            "ConcurrentJobs": 1,
        }
        (root / "config.json").write_text(json.dumps(config, indent=2))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen(
            [ORTHANC_BIN or "Orthanc", str(root / "config.json")],
            cwd=root,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.base}/dicom-web"
        self._wait()

    def _wait(self) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.base}/system", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system: {(self.root / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def upload(self, folder: Path) -> int:
        """POST every file of ``folder`` to /instances; the number stored."""
        files = sorted(folder.glob("*.dcm"))
        for f in files:
            requests.post(f"{self.base}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        return len(files)

    def post(self, path: str, body: object) -> requests.Response:
        """POST JSON to the REST API (no raise: callers look at the answer)."""
        return requests.post(f"{self.base}{path}", json=body, timeout=60)

    def series_of_modality(self, modality: str) -> list[dict]:
        """Orthanc's expanded series records of that Modality."""
        query = {"Level": "Series", "Query": {"Modality": modality}, "Expand": True}
        r = requests.post(f"{self.base}/tools/find", json=query, timeout=30)
        r.raise_for_status()
        return r.json()

    def instance_file(self, orthanc_id: str) -> pydicom.Dataset:
        r = requests.get(f"{self.base}/instances/{orthanc_id}/file", timeout=30)
        r.raise_for_status()
        return pydicom.dcmread(pydicom.filebase.DicomBytesIO(r.content))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc holding the Study3 MR study (two series)."""
    if ORTHANC_BIN is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"Orthanc or its DICOMweb plugin {DICOMWEB_PLUGIN} is not installed (as root: make setup-system)")
    if not STUDY3.is_dir():
        pytest.skip(f"real data not found at {STUDY3}")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        assert sum(server.upload(STUDY3 / s) for s in SERIES) == 62
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def study() -> dict:
    """The study's UIDs from the files themselves: study UID, series UID -> its SOPInstanceUIDs, a PatientID."""
    series: dict[str, set[str]] = {}
    for name in SERIES:
        for f in (STUDY3 / name).glob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
            uid, patient = str(ds.StudyInstanceUID), str(ds.PatientID)
    return {"uid": uid, "series": series, "patient_id": patient}


@pytest.fixture(scope="module")
def model_dir(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model package folder (tiny untrained 3D U-Net, native spacing: no resampling of the MR)."""
    root = tmp_path_factory.mktemp("model")
    phantom_package(root, tiny_phantom, ["data.spacing=null"])
    return root / "pkg"


@pytest.fixture(scope="module")
def first_run(orthanc: Orthanc, study: dict, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``medseg pacs predict --study UID --send-back`` once; its output folder and the completed process."""
    out = tmp_path_factory.mktemp("pacs_run") / "out"
    p = run_cli(
        "pacs",
        "predict",
        "--server",
        orthanc.dicomweb,
        "--study",
        study["uid"],
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--send-back",
        "--set",  # few large windows (divisible by 8 for the U-Net): this is about the PACS, not the segmentation
        "inference.overlap=0",
        "--set",
        "inference.roi_size=[160, 144, 24]",
        timeout=120,
    )
    return {"out": out, "proc": p}


def seg_instances(orthanc: Orthanc) -> list[pydicom.Dataset]:
    """Every SEG instance on the server, read back from Orthanc."""
    return [orthanc.instance_file(i) for s in orthanc.series_of_modality("SEG") for i in s["Instances"]]


def test_send_back_stores_a_seg_per_series_referencing_it(orthanc: Orthanc, study: dict, first_run: dict) -> None:
    out, p = first_run["out"], first_run["proc"]
    assert "retrieved 62 instances" in p.stdout and "2 predicted, 0 already done, 0 failed" in p.stdout
    assert "sent 2 DICOM objects" in p.stdout
    segs = seg_instances(orthanc)
    assert len(segs) == 2
    referenced = {}
    for seg in segs:
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.StudyInstanceUID == study["uid"]
        (ref,) = seg.ReferencedSeriesSequence
        referenced[str(ref.SeriesInstanceUID)] = {
            str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence
        }
    assert referenced == study["series"]  # each SEG names its own series and exactly that series' instances
    sent = json.loads((out / "pacs_sent.json").read_text())["servers"][orthanc.dicomweb]
    assert sorted(sent) == sorted(p.name for p in out.glob("series-*.seg.dcm")) and len(sent) == 2
    assert {v["sop_instance_uid"] for v in sent.values()} == {str(s.SOPInstanceUID) for s in segs}
    records = [json.loads(f.read_text()) for f in out.glob("series-*.json")]
    assert len(records) == 2 and all(r["status"] == "ok" and r["kind"] == "dicom" for r in records)
    assert (out / "summary.csv").is_file() and not list((out / "pacs_input").glob(".*"))


def test_resume_by_query_sends_nothing_twice_and_names_no_patient(
    orthanc: Orthanc, study: dict, model_dir: Path, first_run: dict
) -> None:
    out = first_run["out"]
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("series-*")}
    p = run_cli(
        "pacs",
        "predict",
        "--server",
        orthanc.dicomweb,
        "--query",
        f"PatientID={study['patient_id']}",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--send-back",
        "--resume",
        timeout=120,
    )
    # the study now also holds the two SEG series: skipped, not segmented
    assert "retrieved 0 instances" in p.stdout and "0 predicted, 2 already done, 0 failed" in p.stdout
    assert "sent 0 DICOM objects" in p.stdout and "(2 already sent)" in p.stdout
    assert len(seg_instances(orthanc)) == 2
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("series-*")} == before
    texts = {
        "stdout": p.stdout,
        "stderr": p.stderr,
        "pacs_sent.json": (out / "pacs_sent.json").read_text(),
        "file names": " ".join(str(f.relative_to(out)) for f in out.rglob("*")),
    }
    leaks = [where for where, text in texts.items() if study["patient_id"] in text]
    assert not leaks, f"the PatientID appears in: {leaks}"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")}


def test_stopped_server_is_one_line_and_writes_nothing(
    study: dict, model_dir: Path, first_run: dict, tmp_path: Path
) -> None:
    down = Orthanc(tmp_path / "down")
    down.stop()
    fresh = tmp_path / "fresh"
    kept = tmp_path / "kept"
    shutil.copytree(first_run["out"], kept)
    kept_before = snapshot(kept)
    for out, extra in ((fresh, []), (kept, ["--resume"])):
        t0 = time.perf_counter()
        p = run_cli(
            "pacs",
            "predict",
            "--server",
            down.dicomweb,
            "--study",
            study["uid"],
            "--model",
            str(model_dir),
            "--output",
            str(out),
            "--send-back",
            *extra,
            check=False,
            timeout=60,
        )
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert lines[0].startswith(f"medseg: error: PACS {down.dicomweb}: connection refused"), lines[0]
        assert time.perf_counter() - t0 < 45  # no retries with back-off
    assert not fresh.exists()
    assert snapshot(kept) == kept_before


def test_client_errors_name_the_server_and_leave_no_folder(orthanc: Orthanc, study: dict, tmp_path: Path) -> None:
    with pytest.raises(PacsError, match=rf"^PACS {orthanc.base}/not-dicomweb: search for studies failed: HTTP 404"):
        DicomWebPacs(f"{orthanc.base}/not-dicomweb").find_studies({})
    pacs = DicomWebPacs(orthanc.dicomweb)
    missing = RemoteSeries(study["uid"], "1.2.3.4.5.6.7", "MR", 3)
    with pytest.raises(PacsError, match=rf"^PACS {orthanc.dicomweb}: retrieve {missing.name}"):
        pacs.retrieve_series(missing, tmp_path / "series", tmp_path / "staging")
    assert not (tmp_path / "series").exists() and list((tmp_path / "staging").iterdir()) == []
    found = {s.uid: s for s in pacs.find_series(study["uid"])}
    assert all(found[u].is_image and found[u].n_instances == len(i) for u, i in study["series"].items())
    with pytest.raises(PacsError, match="not an http"):
        DicomWebPacs("ftp://pacs/dicom-web")


def test_listener_segments_a_series_orthanc_pushes(
    orthanc: Orthanc, study: dict, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "listen"
    cmd = [
        *MEDSEG,
        "pacs",
        "listen",
        "--port",
        str(orthanc.listener_port),
        "--host",
        "127.0.0.1",
        "--ae-title",
        "MEDSEG",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--idle",
        "1",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hippo = next(u for u, i in study["series"].items() if len(i) == 40)
    name = RemoteSeries(study["uid"], hippo, "MR", None).name
    try:
        deadline = time.time() + 120  # a guard, not a budget: a loaded machine imports torch slowly
        while not orthanc.post("/modalities/medseg/echo", {}).ok:  # Orthanc's C-ECHO: the listener is up
            assert time.time() < deadline and proc.poll() is None, "the listener did not answer C-ECHO"
            time.sleep(0.3)
        r = requests.post(f"{orthanc.base}/tools/lookup", data=hippo, timeout=30)
        (found,) = r.json()
        stored = orthanc.post("/modalities/medseg/store", {"Resources": [found["ID"]], "Synchronous": True})
        assert stored.ok, stored.text
        deadline = time.time() + 120
        while not (out / f"{name}.json").is_file():
            assert time.time() < deadline and proc.poll() is None, "no prediction for the pushed series"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in stdout, stderr
    assert f"{name}: 1 predicted, 0 already done, 0 failed" in stdout
    assert json.loads((out / f"{name}.json").read_text())["status"] == "ok"
    (ref,) = pydicom.dcmread(out / f"{name}.seg.dcm").ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == hippo
    assert {str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence} == study["series"][hippo]
    assert len(list((out / "pacs_input").glob(f"study-*/{name}/*.dcm"))) == 40
    assert not list((out / "pacs_input" / ".received").glob("*"))


def test_listener_takes_up_what_a_stopped_listener_left(tmp_path: Path) -> None:
    from medseg.cli_pacs import SeriesInbox

    out = tmp_path / "out"
    moved = out / "pacs_input" / "study-x" / "series-moved"  # moved in, never segmented (no record)
    moved.mkdir(parents=True)
    done = out / "pacs_input" / "study-x" / "series-done"
    done.mkdir()
    (out / "series-done.json").write_text("{}")
    received = out / "pacs_input" / ".received" / "series-received"  # received, not yet quiet
    received.mkdir(parents=True)
    src = STUDY3 / SERIES[1] / "1.dcm"
    shutil.copy(src, received / "a.dcm")
    inbox = SeriesInbox(out, idle=0.2)
    assert inbox.take_quiet() == [moved]  # at once; the received series only once quiet
    time.sleep(0.3)
    (series,) = inbox.take_quiet()
    study_uid = str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)
    assert series == out / "pacs_input" / study_name(study_uid) / "series-received"
    assert [p.name for p in series.iterdir()] == ["a.dcm"] and not received.exists()
    assert inbox.take_quiet() == []
