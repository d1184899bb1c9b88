"""The tracking spool of a run folder, and the training tracker that fills it when the server is away.

``SpoolingTracker`` (a training run's tracker) sends each call through ``MlflowTracker``; a call that fails for
want of the server (``medseg.tracking.is_outage``) is appended to ``<run folder>/tracking_spool.jsonl`` instead
and opens a circuit breaker: for ``MEDSEG_TRACKING_COOLDOWN_S`` seconds (default 30) every call is spooled
without calling the server. The first call after that probes ``/health`` (2 s at most; a stopped server
refuses in milliseconds) and, if it answers, sends the spool in order, then goes on directly. ``end`` tries
once more whatever the breaker says; what is still left is sent by ``medseg runs sync RUN_FOLDER``
(``sync_spool``). A run that starts during an outage creates its MLflow run when the server is back.

The spool holds JSON lines, appended, never rewritten:

- a record per call that could not be sent, ``{"id": <uuid4 hex>, "op": ..., ...}`` with ``op`` one of
  ``start`` (run_name, run_id, ts), ``params``, ``tags``, ``metrics`` (step, ts in ms, metrics), ``artifact``
  (path relative to the run folder, artifact_path: the file is read when sent), ``register`` (artifact_path,
  name) and ``end`` (status, ts);
- a header ``{"id": ..., "op": "open", "uri": ..., "experiment": ..., "run_id": ...}`` from each session that
  spooled: where the records go (the last header wins; ``run_id`` is null while the run is not created);
- an acknowledgement ``{"sent": <id>}`` once the server took a record (with ``run_id`` for a ``start``, with
  ``rejected`` when the server refused it for good).

A record is pending while no acknowledgement names its id. A sender holds the file's exclusive lock, sends the
pending records in order and acknowledges each, so a record is sent once even when the training process and
``medseg runs sync`` both try. Consecutive metrics records go in one ``log_batch`` of at most 1000 metrics
(one request, one transaction on the server); a metrics record whose step the server already has for its
first metric is acknowledged without sending it (a batch whose reply was lost, epochs replayed on resume).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import InputError, MedsegError
from medseg.tracking import MlflowTracker, apply_record, finite, is_outage, server_reachable, write_run_id

log = logging.getLogger("medseg.tracking")
SPOOL_NAME = "tracking_spool.jsonl"
COOLDOWN_ENV = "MEDSEG_TRACKING_COOLDOWN_S"
_MAX_METRICS_PER_REQUEST = 1000  # MLflow's limit per log_batch request: a merged batch up to it is one request


@dataclass
class SpoolState:
    """What a spool file says: where its records go and which of them are still to be sent."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    uri: str | None = None
    experiment: str | None = None
    run_id: str | None = None
    has_start: bool = False  # a ``start`` record exists (sent or not): the run is, or will be, created from it
    n_sent: int = 0


class TrackingSpool:
    """The spool file of one run folder (created by the first ``append``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / SPOOL_NAME

    def exists(self) -> bool:
        """Whether anything was ever spooled in this folder."""
        return self.path.is_file()

    def append(self, record: dict[str, Any]) -> str:
        """Append ``record`` under its ``id`` (a new unique one if it has none); returns the id."""
        record_id = str(record.get("id") or new_id())
        self._append_line({**record, "id": record_id})
        return record_id

    def ack(self, record_id: str, run_id: str | None = None, rejected: str | None = None) -> None:
        """Mark record ``record_id`` as sent (``run_id``: the run a ``start`` created; ``rejected``: why not)."""
        line: dict[str, Any] = {"sent": record_id}
        if run_id:
            line["run_id"] = run_id
        if rejected:
            line["rejected"] = rejected
        self._append_line(line)

    def _append_line(self, obj: dict[str, Any]) -> None:
        # Hand-written: no kept library appends JSON lines. One os.write of the whole line to a file opened with
        # O_APPEND, then fsync: readers and other appenders see whole lines, and a crash leaves at most a cut
        # last line, which ``read`` ignores. (atomic_path replaces a whole file; a spool must only grow.)
        data = (json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n").encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> SpoolState:
        """The spool's state (an empty state when there is no spool file)."""
        state = SpoolState()
        if not self.exists():
            return state
        records: list[dict[str, Any]] = []
        sent: set[str] = set()
        lines = self.path.read_text().split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # a last line cut by a crash: the record was never taken as spooled
                    continue
                raise InputError(self.path, f"line {n} is not a JSON spool record") from None
            if "sent" in obj:
                sent.add(obj["sent"])
                state.run_id = obj.get("run_id") or state.run_id
            elif obj.get("op") == "open":
                state.uri, state.experiment = obj.get("uri"), obj.get("experiment")
                state.run_id = obj.get("run_id") or state.run_id
            elif "id" in obj and "op" in obj:
                records.append(obj)
            else:
                raise InputError(self.path, f"line {n} is neither a record nor an acknowledgement")
        state.pending = [r for r in records if r["id"] not in sent]
        state.n_sent = len(records) - len(state.pending)
        state.has_start = any(r["op"] == "start" for r in records)
        return state

    @contextlib.contextmanager
    def locked(self, wait: bool) -> Iterator[bool]:
        """Hold the spool's exclusive lock (``flock``) while sending; yields False if another process holds it
        and ``wait`` is False."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    """A record id (uuid4, hex)."""
    return uuid.uuid4().hex


class SpoolingTracker:
    """A training run's tracker: ``inner``'s calls, spooled in ``folder`` while the server is away (module doc)."""

    def __init__(self, inner: MlflowTracker, folder: str | Path) -> None:
        self.inner, self.spool = inner, TrackingSpool(folder)
        try:
            self.cooldown_s = float(os.environ.get(COOLDOWN_ENV, "30"))
        except ValueError:
            raise MedsegError(f"{COOLDOWN_ENV}={os.environ[COOLDOWN_ENV]!r}: not a number of seconds") from None
        self.retry_at = 0.0  # the circuit breaker: no call to the server before this time.monotonic()
        state = self.spool.read()  # a resumed run may find records an earlier session could not send
        self.pending, self.has_start, self.spooled_run = len(state.pending), state.has_start, state.run_id
        self.run_id: str | None = None
        self.announced = False

    def start(self, run_name: str | None = None, run_id: str | None = None) -> str | None:
        """Start (or resume) the run; during an outage the run is created when the server is back."""
        if run_id is None and self.has_start:  # this folder's spool began the run already: never a second one
            run_id = self.spooled_run
            if run_id is None:  # its creation is still pending: it goes first when the spool is sent
                self._flush()
                self.run_id = self.inner.run_id
                return self.run_id
        return self._do({"op": "start", "run_name": run_name, "run_id": run_id, "ts": _now_ms()})

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (as strings)."""
        self._do({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (as strings)."""
        self._do({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dataset(self, dataset: dict[str, Any], context: str = "training") -> None:
        """Log a dataset input (``MlflowTracker.log_dataset``; spooled like the rest while the server is away)."""
        self._do({"op": "dataset", "dataset": dataset, "context": context})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log one step's finite metrics, timestamped now (also when sent later)."""
        self._do({"op": "metrics", "step": int(step), "ts": _now_ms(), "metrics": finite(metrics)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder (a spooled one is read when it is sent)."""
        path, root = Path(path).resolve(), self.spool.folder.resolve()
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        self._do({"op": "artifact", "path": name, "artifact_path": artifact_path})

    def logged_steps(self, key: str) -> set[int]:
        """Steps of ``key`` on the server; empty when it cannot be asked (records replayed then are checked
        against the server when they are sent)."""
        if (self.pending or time.monotonic() < self.retry_at) and not self._flush():
            return set()
        try:
            return self.inner.logged_steps(key)
        except Exception as e:
            if not is_outage(e):
                raise
            self._trip()
            return set()

    def register_model(self, artifact_path: str, name: str) -> str | None:
        """Register the model package (the version; None while spooled)."""
        version = self._do({"op": "register", "artifact_path": artifact_path, "name": name})
        return str(version) if version else None

    def end(self, status: str = "FINISHED") -> None:
        """Close the run; first a last try to send the spool, whatever the circuit breaker says."""
        if self.pending:
            self._flush(force=True)
        self._do({"op": "end", "status": status, "ts": _now_ms()})
        if self.pending:
            log.warning(
                "%d tracking records wait in %s: send them with `medseg runs sync %s`",
                self.pending,
                self.spool.path,
                self.spool.folder,
            )

    def _do(self, record: dict[str, Any]) -> Any:
        """Send ``record`` now if the server may be called and nothing waits before it; else spool it (with
        the same id: a call whose reply was lost is recognised when its record is sent)."""
        record = {"id": new_id(), **record}
        if (self.pending or time.monotonic() < self.retry_at) and not self._flush():
            return self._spool(record)
        try:
            result = apply_record(self.inner, record, self.spool.folder)
        except Exception as e:
            if not is_outage(e):
                raise
            self._trip()
            return self._spool(record)
        self.run_id = self.inner.run_id
        return result

    def _flush(self, force: bool = False) -> bool:
        """Send the spool if the breaker allows and the server answers; True when nothing is left."""
        if not force and time.monotonic() < self.retry_at:
            return False
        if not server_reachable(self.inner.uri):
            self._trip()
            return False
        try:
            sent = send_pending(self.inner, self.spool, wait=False, reject="skip")
        except Exception as e:
            if not is_outage(e):
                raise
            self._trip()
            self.pending = len(self.spool.read().pending)
            return False
        if sent is None:  # another process (`medseg runs sync`) is sending them now
            return False
        self.pending, self.run_id = 0, self.inner.run_id
        if self.run_id:
            write_run_id(self.spool.folder, self.run_id)
        log.info("tracking server %s is back: sent %d spooled records", self.inner.uri, sent)
        return True

    def _spool(self, record: dict[str, Any]) -> Any:
        if not self.announced:  # one header and one console line per session
            self.announced = True
            header = {"op": "open", "uri": self.inner.uri, "experiment": self.inner.experiment}
            self.spool.append({**header, "run_id": self.inner.run_id})
            log.warning(
                "tracking server %s unreachable: training goes on; tracking records go to %s "
                "(sent when the server is back, or by `medseg runs sync %s`)",
                self.inner.uri,
                self.spool.path,
                self.spool.folder,
            )
        self.spool.append(record)
        self.pending += 1
        if record["op"] == "start":
            self.has_start = True
            return record["run_id"]
        return None

    def _trip(self) -> None:
        self.retry_at = time.monotonic() + self.cooldown_s


def _units(pending: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Pending records in sending units: runs of metrics records (one request each), other records alone."""
    units: list[list[dict[str, Any]]] = []
    size = 0
    for rec in pending:
        n = len(rec["metrics"]) if rec["op"] == "metrics" else 0
        if (
            rec["op"] == "metrics"
            and units
            and units[-1][0]["op"] == "metrics"
            and size + n <= _MAX_METRICS_PER_REQUEST
        ):
            units[-1].append(rec)
            size += n
        else:
            units.append([rec])
            size = n
    return units


def send_pending(
    tracker: MlflowTracker, spool: TrackingSpool, wait: bool, reject: Literal["skip", "raise"]
) -> int | None:
    """Send the spool's pending records in order, acknowledging each; the number delivered, or None when
    another process holds the spool (``wait=False``). An outage error propagates (the rest stays pending); a
    record the server refuses is skipped with a warning (``reject="skip"``) or stops the sending."""
    with spool.locked(wait) as held:
        if not held:
            return None
        state = spool.read()
        tracker.run_id = tracker.run_id or state.run_id
        seen: dict[str, set[int]] = {}  # metric key -> steps the server has
        sent = 0
        for unit in _units(state.pending):
            try:
                if unit[0]["op"] == "metrics":
                    _send_metrics(tracker, unit, seen)
                    result = None
                else:
                    result = apply_record(tracker, unit[0], spool.folder)
            except Exception as e:
                if is_outage(e) or reject == "raise":
                    raise
                log.warning("the tracking server refused spooled %s record %s: %s", unit[0]["op"], unit[0]["id"], e)
                spool.ack(unit[0]["id"], rejected=str(e)[:300])
                continue
            for rec in unit:
                spool.ack(rec["id"], run_id=result if rec["op"] == "start" else None)
            sent += len(unit)
        return sent


def _send_metrics(tracker: MlflowTracker, unit: list[dict[str, Any]], seen: dict[str, set[int]]) -> None:
    """One ``log_batch`` of the records whose step the server lacks (by each record's first metric)."""
    entries = []
    for rec in unit:
        if not rec["metrics"]:
            continue
        key = next(iter(rec["metrics"]))
        if key not in seen:
            seen[key] = tracker.logged_steps(key)
        if rec["step"] not in seen[key]:
            entries.append((rec["metrics"], rec["step"], rec["ts"]))
            seen[key].add(rec["step"])
    if entries:
        tracker.log_metric_steps(entries)


def sync_spool(folder: str | Path, uri: str | None = None) -> tuple[int, int]:
    """Send a run folder's pending records to ``uri`` (default: where the run logs); ``(sent, still pending)``."""
    spool = TrackingSpool(folder)
    state = spool.read()
    if not state.pending:
        return 0, 0
    target = uri or state.uri
    if not target:
        raise InputError(spool.path, "no tracking URI recorded in the spool: pass --tracking-uri")
    tracker = MlflowTracker(target, state.experiment or "Default")
    left = f"{len(state.pending)} records stay in {spool.path}"
    if not server_reachable(target):
        raise MedsegError(f"{target}: tracking server unreachable; {left}")
    try:
        sent = send_pending(tracker, spool, wait=True, reject="raise")
    except Exception as e:
        if not is_outage(e):
            raise MedsegError(f"{spool.path}: the tracking server refused a record ({str(e)[:200]})") from None
        raise MedsegError(
            f"{target}: the tracking server failed during the sync ({type(e).__name__}); {left}"
        ) from None
    if tracker.run_id:
        write_run_id(folder, tracker.run_id)
    return sent or 0, len(spool.read().pending)
