"""The warnings of one case: Python warnings and library log records raised while it runs go into its JSON record.

Real DICOM exports make pydicom warn about header values and highdicom log INFO lines ("copy attributes of module
...") for every file; on the console they would bury the batch's own lines. While a case runs, ``CaseNotes``
records them instead (deduplicated, at most ``MAX_NOTES``) for the case's ``warnings``. pydicom's messages can quote
header values (patient names), so only their category is kept; the others have DICOM UIDs replaced by ``<uid>``
(highdicom names the source instance it copies from: a UID identifies the exam, and the record is a report).
"""

from __future__ import annotations

import logging
import re
import warnings
from types import TracebackType

LIBRARY_LOGGERS = ("pydicom", "highdicom", "rt_utils", "SimpleITK", "nibabel")
MAX_NOTES = 50
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")  # a DICOM UID: 5 or more dotted numbers (a version has fewer)


class _Collect(logging.Handler):
    def __init__(self, notes: CaseNotes) -> None:
        super().__init__(logging.INFO)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] == "pydicom":  # may quote header values
            self.notes.add(f"pydicom log {record.levelname}")
        else:
            message = _UID.sub("<uid>", record.getMessage().splitlines()[0])
            self.notes.add(f"{record.name} {record.levelname}: {message[:300]}")


def warning_text(w: warnings.WarningMessage) -> str:
    """One line for a caught warning; pydicom's (which can quote header values) keep only their category."""
    if "pydicom" in (w.filename or "") or "pydicom" in type(w.message).__module__:
        return f"pydicom {w.category.__name__}"
    return f"{w.category.__name__}: {_UID.sub('<uid>', str(w.message).splitlines()[0])[:300]}"


class CaseNotes:
    """Context manager: catches warnings and library log records (INFO and up) of one case, in order, once each."""

    def __init__(self) -> None:
        self._notes: dict[str, None] = {}
        self._handler = _Collect(self)
        self._saved: list[tuple[logging.Logger, bool, int]] = []
        self._warnings = warnings.catch_warnings(record=True)
        self._caught: list[warnings.WarningMessage] = []

    def add(self, note: str) -> None:
        """Add a note (kept once; at most ``MAX_NOTES``)."""
        if len(self._notes) < MAX_NOTES:
            self._notes[note] = None

    def _drain(self) -> None:
        for w in self._caught:
            self.add(warning_text(w))
        self._caught.clear()

    @property
    def notes(self) -> list[str]:
        """The notes so far, in the order they came, each once."""
        self._drain()
        return list(self._notes)

    def __enter__(self) -> CaseNotes:
        caught = self._warnings.__enter__()  # the list the warnings are appended to (record=True)
        self._caught = caught if caught is not None else []
        warnings.simplefilter("always")
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.propagate, logger.level))
            logger.addHandler(self._handler)
            logger.propagate = False  # not on the console: into the record
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for logger, propagate, level in self._saved:
            logger.removeHandler(self._handler)
            logger.propagate, logger.level = propagate, level
        self._saved.clear()
        self._drain()
        self._warnings.__exit__(exc_type, exc, tb)
