"""``medseg pacs``: segment studies of a PACS (DICOMweb) and send the DICOM-SEG back.

``medseg pacs predict`` finds the study's series (QIDO-RS), keeps the image series (not SEG, RTSTRUCT, SR,
PR, KO, ...), retrieves each into ``OUTPUT/pacs_input/study-<hash>/series-<hash>/`` (WADO-RS; a series folder
appears only once complete), segments them with the same batch runner as ``medseg predict`` (resume,
per-case JSON, ``summary.csv``, exit code 3 for failed cases), and with ``--send-back`` stores each case's
``<id>.seg.dcm`` (and ``<id>.rtstruct.dcm``) on the server (STOW-RS). What was sent is recorded in
``OUTPUT/pacs_sent.json`` (per server: file, sha256, SOPInstanceUID), so a rerun never sends a file twice.
All searches run before anything is written: a server that is down is one error line and no output.
``medseg pacs listen`` is a DICOM C-STORE SCP (pynetdicom): it keeps each received image series in
``OUTPUT/pacs_input/.received/`` and segments it the same way once no instance of it arrived for ``--idle`` s.
The retrieved or received series are patient data: treat the output folder as such.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from medseg.cli_common import MODEL_HELP
from medseg.errors import InputError, MedsegError
from medseg.io.atomic import write_atomic, write_json_atomic

if TYPE_CHECKING:  # imported when a command runs: `medseg --help` should not load pydicom and requests
    from medseg.io.dicomweb import DicomWebPacs, RemoteSeries

log = logging.getLogger("medseg.pacs")

pacs_app = typer.Typer(
    no_args_is_help=True,
    help="A PACS: segment its studies (DICOMweb) and send the DICOM-SEG back; or receive series (C-STORE).",
)

INPUT_DIR, STAGING_DIR = "pacs_input", ".incoming"
SENT_RECORD = "pacs_sent.json"


class DicomOutput(str, Enum):
    """DICOM objects a DICOM series' case writes (``inference.dicom_output``)."""

    seg = "seg"
    rtstruct = "rtstruct"
    both = "both"
    none = "none"


def inference_overrides(set_: Sequence[str] | None, dicom_output: DicomOutput | None) -> list[str]:
    """``--set`` overrides, plus ``inference.dicom_output=...`` when ``--dicom-output`` is given."""
    return [*(set_ or []), *([f"inference.dicom_output={dicom_output.value}"] if dicom_output else [])]


def parse_query(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` QIDO-RS filters; keys are DICOM keywords (``PatientID``, ``AccessionNumber``, ``StudyDate``)."""
    from pydicom.datadict import tag_for_keyword

    filters: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():  # the text itself is not echoed: it may be a patient id
            raise typer.BadParameter("expected KEY=VALUE (a DICOM keyword, '=', a value)", param_hint="--query")
        if tag_for_keyword(key) is None:
            raise typer.BadParameter(
                f"{key!r} is not a DICOM keyword (e.g. PatientID, StudyDate)", param_hint="--query"
            )
        filters[key] = value.strip()
    return filters


def check_model_reference(model: str) -> None:
    """Refuse a local model folder that does not exist before any traffic with the PACS (``models:/`` and
    ``runs:/`` references are resolved when the model is loaded)."""
    if ":/" not in model and not Path(model).exists():
        raise InputError(
            model, "model not found (a package folder, run folder, models:/NAME/VERSION or runs:/ID/model)"
        )


def select_series(pacs: DicomWebPacs, study: str | None, filters: dict[str, str]) -> dict[str, list[RemoteSeries]]:
    """The image series of each study to segment (study UID -> series); all searches, nothing written."""
    from medseg.io.dicomweb import PacsError, study_name

    studies = [study] if study else pacs.find_studies(filters)
    if not studies:
        raise PacsError(f"PACS {pacs.label}: no study matches --query ({', '.join(sorted(filters))})")
    plan: dict[str, list[RemoteSeries]] = {}
    for uid in studies:
        found = pacs.find_series(uid)
        if not found and study:
            raise PacsError(f"PACS {pacs.label}: {study_name(uid)} (--study) has no series on this server")
        images = [s for s in found if s.is_image]
        log.info("%s: %d series, %d to segment", study_name(uid), len(found), len(images))
        if images:
            plan[uid] = images
    if not plan:
        raise PacsError(f"PACS {pacs.label}: no image series to segment (only SEG, RTSTRUCT, SR, ... found)")
    return plan


def is_retrieved(folder: Path, series: RemoteSeries) -> bool:
    """A series folder from an earlier run holding as many instances as the PACS reports."""
    return folder.is_dir() and series.n_instances == sum(1 for _ in folder.glob("*.dcm"))


def retrieve_plan(pacs: DicomWebPacs, plan: dict[str, list[RemoteSeries]], output: Path, resume: bool) -> int:
    """Retrieve every series of ``plan`` into ``output/pacs_input`` (``resume``: keep complete folders); the
    number of instances retrieved. Series folders of a study that are no longer selected are removed."""
    from medseg.io.dicomweb import study_name

    root = output / INPUT_DIR
    staging = root / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run left half-written
    n = 0
    for study_uid, series in plan.items():
        study_dir = root / study_name(study_uid)
        for s in series:
            if resume and is_retrieved(study_dir / s.name, s):
                continue
            n += pacs.retrieve_series(s, study_dir / s.name, staging)
            (output / f"{s.name}.json").unlink(missing_ok=True)  # a new copy of its input: the case is not done
        wanted = {s.name for s in series}
        for old in study_dir.glob("series-*") if study_dir.is_dir() else ():
            if old.name not in wanted:
                shutil.rmtree(old)
    shutil.rmtree(staging, ignore_errors=True)
    return n


def send_results(pacs: DicomWebPacs, output: Path, case_ids: Sequence[str]) -> tuple[int, int]:
    """Store the DICOM objects of these finished cases (``*.seg.dcm``, ``*.rtstruct.dcm``) on the PACS, unless
    this server already has the same file; ``(sent, already sent)``. Each store is recorded at once."""
    from medseg.inference.inputs import sha256_file

    record = output / SENT_RECORD
    try:
        doc: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
    except json.JSONDecodeError:
        raise InputError(record, "not readable JSON: what was sent is unknown; move it away to send again") from None
    sent_here: dict[str, Any] = doc.setdefault("servers", {}).setdefault(pacs.label, {})
    sent = already = 0
    for name in dicom_outputs(output, case_ids):
        sha = sha256_file(output / name)
        if sent_here.get(name, {}).get("sha256") == sha:
            already += 1
            continue
        uid = pacs.store(output / name)
        sent_here[name] = {"sha256": sha, "sop_instance_uid": uid, "sent_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(record, doc)
        sent += 1
    return sent, already


def dicom_outputs(output: Path, case_ids: Sequence[str]) -> list[str]:
    """File names of the DICOM objects to send that the finished cases' JSON records list (and that exist)."""
    from medseg.inference.records import DICOM_OUTPUT_SUFFIXES  # the DICOM-SEG and RTSTRUCT a case may leave

    names = []
    for cid in case_ids:
        try:
            outputs = json.loads((output / f"{cid}.json").read_text()).get("outputs") or []
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        names += [n for n in outputs if str(n).endswith(DICOM_OUTPUT_SUFFIXES["both"]) and (output / n).is_file()]
    return names


@pacs_app.command("predict")
def pacs_predict(
    server: Annotated[str, typer.Option(help="DICOMweb root URL, e.g. http://pacs:8042/dicom-web (Orthanc)")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    output: Annotated[Path, typer.Option(help="output folder (also holds the retrieved series, in pacs_input/)")],
    study: Annotated[Optional[str], typer.Option(help="StudyInstanceUID of the study to segment")] = None,
    query: Annotated[
        Optional[list[str]],
        typer.Option(help="KEY=VALUE study search instead of --study (DICOM keywords; repeat to combine)"),
    ] = None,
    send_back: Annotated[
        bool, typer.Option("--send-back", help="store the DICOM-SEG (RTSTRUCT) on the server")
    ] = False,
    resume: Annotated[bool, typer.Option(help="skip series already retrieved and cases already done")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dicom_output: Annotated[
        Optional[DicomOutput], typer.Option(help="DICOM objects to write (inference.dicom_output)")
    ] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="inference.KEY=VALUE override")] = None,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds to wait for each answer of the server")] = 60.0,
) -> None:
    """Segment a study of a PACS (DICOMweb) like `medseg predict`; --send-back stores the DICOM-SEG on it. Exit 3 if some series failed."""
    import pydicom.uid

    from medseg.io.dicomweb import DicomWebPacs, study_name

    if (study is None) == (not query):
        raise typer.BadParameter("give --study UID or --query KEY=VALUE (one of the two)", param_hint="--study")
    if study is not None and not pydicom.uid.UID(study).is_valid:
        raise typer.BadParameter("not a DICOM UID (digits and dots, at most 64 characters)", param_hint="--study")
    filters = parse_query(query or [])
    check_model_reference(model)
    pacs = DicomWebPacs(server, timeout=(min(timeout, 10.0), timeout))
    plan = select_series(pacs, study, filters)
    n = retrieve_plan(pacs, plan, output, resume)
    from medseg.inference.records import BatchReport  # the inference stack: only once the PACS has answered
    from medseg.workflows import describe_prediction, run_prediction

    overrides = inference_overrides(set_, dicom_output)
    report = BatchReport()
    for study_uid in plan:
        part = run_prediction(
            model,
            output / INPUT_DIR / study_name(study_uid),
            output,
            device=device,
            resume=resume,
            overrides=overrides,
            progress=sys.stderr.isatty(),
        )
        report.done += part.done
        report.skipped += part.skipped
        report.failed.update(part.failed)
    typer.echo(f"retrieved {n} instances from {pacs.label}; {describe_prediction(report, output)}")
    if send_back:
        sent, already = send_results(pacs, output, [*report.done, *report.skipped])
        typer.echo(f"sent {sent} DICOM objects to {pacs.label} ({already} already sent)")
    for cid, err in report.failed.items():
        typer.echo(f"  failed {cid}: {err}", err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


# ---- listen: a C-STORE SCP -------------------------------------------------------------------------------
LISTEN_STAGING = ".received"  # not STAGING_DIR: `pacs predict` into the same folder clears that one


class SeriesInbox:
    """Instances received by C-STORE, kept per series in ``OUTPUT/pacs_input/.received/series-<hash>/`` until no
    instance of the series arrived for ``idle`` seconds; then the series moves to
    ``OUTPUT/pacs_input/study-<hash>/series-<hash>/`` (merged with what came earlier) to be segmented.

    A store and a move hold the same lock, so an instance arriving while its series moves is never lost; what a
    killed listener had received is segmented once quiet, like new arrivals (the senders were told it is stored).
    """

    def __init__(self, output: Path, idle: float) -> None:
        import threading

        self.root, self.idle = output / INPUT_DIR, idle
        self.staging = self.root / LISTEN_STAGING
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}  # series folder name -> monotonic time of its last instance
        self.study: dict[str, str] = {}  # series folder name -> study folder name
        for folder in sorted(self.staging.glob("series-*")) if self.staging.is_dir() else ():
            first = next(iter(sorted(folder.glob("*.dcm"))), None)
            if first is not None:
                self._note(folder.name, str(pydicom_header(first).StudyInstanceUID))
        # series moved but never segmented (stopped in between): no record of their case yet
        self.pending = [
            f for f in sorted(self.root.glob("study-*/series-*")) if not (output / f"{f.name}.json").exists()
        ]

    def _note(self, series: str, study_uid: str) -> None:
        from medseg.io.dicomweb import study_name

        self.last[series] = time.monotonic()
        self.study[series] = study_name(study_uid)

    def handle_store(self, event: Any) -> int:
        """pynetdicom's ``EVT_C_STORE`` handler: keep an image instance (others are accepted, not kept); a status."""
        from medseg.io.dicom_case_ids import uid_hash
        from medseg.io.dicomweb import RemoteSeries

        try:
            ds = event.dataset
            series = RemoteSeries(
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.get("Modality", "")),
                None,
                str(ds.SOPClassUID),
            )
            if not series.is_image:
                return 0x0000
            with self.lock:
                target = self.staging / series.name / f"{uid_hash(str(ds.SOPInstanceUID), 20)}.dcm"
                write_atomic(target, lambda p: p.write_bytes(event.encoded_dataset()))
                self._note(series.name, series.study_uid)
        except (AttributeError, OSError, ValueError) as e:  # no UIDs, unreadable, disk full: refused, not lost
            log.error("C-STORE refused (%s)", type(e).__name__)
            return 0xA700  # out of resources: the sender keeps the instance and may retry
        return 0x0000

    def take_quiet(self) -> list[Path]:
        """Move every series that has been quiet for ``idle`` seconds into its study folder; those folders (first,
        once, those an earlier listener moved but did not segment)."""
        moved, self.pending = self.pending, []
        with self.lock:
            now = time.monotonic()
            for name in [n for n, t in self.last.items() if now - t >= self.idle]:
                target = self.root / self.study.pop(name) / name
                target.mkdir(parents=True, exist_ok=True)
                for f in sorted((self.staging / name).glob("*.dcm")):  # merged: the same instance replaces itself
                    f.replace(target / f.name)
                shutil.rmtree(self.staging / name, ignore_errors=True)
                del self.last[name]
                moved.append(target)
        return moved


def pydicom_header(path: Path) -> Any:
    """A DICOM file's header (no pixels)."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def start_scp(inbox: SeriesInbox, host: str, port: int, ae_title: str) -> Any:
    """A pynetdicom C-STORE (and C-ECHO) SCP answering to ``ae_title`` on ``host:port``; the running server."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # the module sets its names at import

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines describe every association
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    for cx in AllStoragePresentationContexts:  # compressed transfer syntaxes too: the reader decodes them
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    try:
        return ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, inbox.handle_store)])
    except OSError as e:
        raise MedsegError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@pacs_app.command("listen")
def pacs_listen(
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    output: Annotated[Path, typer.Option(help="output folder (also holds the received series, in pacs_input/)")],
    ae_title: Annotated[str, typer.Option(help="AE title this listener answers to")] = "MEDSEG",
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: all)")] = "0.0.0.0",
    idle: Annotated[
        float, typer.Option(min=0.1, help="segment a series once no instance came for this many seconds")
    ] = 10.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dicom_output: Annotated[
        Optional[DicomOutput], typer.Option(help="DICOM objects to write (inference.dicom_output)")
    ] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="inference.KEY=VALUE override")] = None,
) -> None:
    """DICOM C-STORE listener: segment each received series (as `medseg predict`) once none of it came for --idle s. Stop: Ctrl-C, or SIGTERM (after the series being segmented)."""
    import signal
    import threading

    from medseg.inference.model_package import load_package

    if not 1 <= len(ae_title.strip()) <= 16:
        raise typer.BadParameter("1 to 16 characters", param_hint="--ae-title")
    load_package(model)  # a bad model is an error now, not at the first series (and the imports are done)
    inbox = SeriesInbox(output, idle)
    server = start_scp(inbox, host, port, ae_title.strip())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    typer.echo(
        f"listening on {host}:{port} as {ae_title.strip()}; a series is segmented {idle:g} s after its last instance"
    )
    try:
        while not stopping.is_set():
            for folder in inbox.take_quiet():
                segment_received(model, folder, output, device, inference_overrides(set_, dicom_output))
                if stopping.is_set():  # the series moved but not segmented yet are taken up at the next start
                    break
            stopping.wait(min(0.5, idle / 2))
    finally:
        server.shutdown()
    typer.echo("stopped")


def segment_received(model: str, folder: Path, output: Path, device: str, overrides: list[str]) -> None:
    """Segment one received series folder into ``output``; a failure is reported and the listener goes on."""
    from medseg.workflows import describe_prediction, run_prediction

    try:
        report = run_prediction(model, folder, output, device=device, overrides=overrides)
    except MedsegError as e:  # a bad model or setting: say so on every series, keep what was received
        typer.echo(f"medseg: error: {folder.name}: {e}", err=True)
        return
    typer.echo(f"{folder.name}: {describe_prediction(report, output)}")
    for cid, err in report.failed.items():
        typer.echo(f"  failed {cid}: {err}", err=True)
