"""A PACS over DICOMweb (dicomweb-client): find a study's series (QIDO-RS), retrieve a series into a folder
(WADO-RS), store files back (STOW-RS).

- Every network failure (connection refused, timeout, HTTP error, an answer that is not DICOMweb) is one
  ``PacsError`` line naming the server (scheme, host, port and path only: no credentials, no query string,
  since a query may carry a patient id) and what was being done; never a traceback, never patient data.
- A retrieved series appears in its folder only once complete: instances are written to a staging folder,
  counted against the PACS's own count, then the folder is renamed into place.
- Series are named by a hash of their SeriesInstanceUID (``series-<hash>``, as ``dicom_case_ids``), never by
  a description or a patient attribute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from medseg.errors import InputError, MedsegError
from medseg.io.atomic import atomic_folder
from medseg.io.dicom_case_ids import uid_hash
from medseg.io.dicom_headers import NON_IMAGE_MODALITIES, NON_IMAGE_SOP_PREFIXES

# WADO-RS in the transfer syntax the PACS holds (the client's default, Explicit VR Little Endian, would make
# the server decompress every image; the series reader decodes JPEG / JPEG 2000 / RLE itself)
AS_STORED = (("application/dicom", "*"),)
DEFAULT_TIMEOUT = (5.0, 60.0)  # seconds: (connect, read) of each request


class PacsError(MedsegError):
    """The PACS cannot be reached, refused a request, or answered something unusable."""


def server_label(url: str) -> str:
    """The server URL as errors and records name it: scheme, host, port and path (no credentials, no query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class RemoteSeries:
    """A series on the PACS: its UIDs, Modality, the number of instances the PACS reports and a SOP class."""

    study_uid: str
    uid: str
    modality: str
    n_instances: int | None
    sop_class_uid: str = ""

    @property
    def is_image(self) -> bool:
        """False for SEG, RTSTRUCT, SR, PR, KO, ... (by Modality, or by the SOP class of an instance: a SEG filed
        under the source modality, say), by the same rules as ``dicom_headers.non_image_reason``."""
        return self.modality.upper() not in NON_IMAGE_MODALITIES and not self.sop_class_uid.startswith(
            NON_IMAGE_SOP_PREFIXES
        )

    @property
    def name(self) -> str:
        """``series-<hash of the SeriesInstanceUID>``: its folder name, and so its case id."""
        return f"series-{uid_hash(self.uid)}"


def study_name(study_uid: str) -> str:
    """``study-<hash of the StudyInstanceUID>`` (folder names and log lines; never the UID's owner)."""
    return f"study-{uid_hash(study_uid)}"


def _attributes(item: Mapping) -> pydicom.Dataset:
    with warnings.catch_warnings():  # pydicom's value warnings may quote values (patient names)
        warnings.simplefilter("ignore")
        return pydicom.Dataset.from_json(dict(item))


class DicomWebPacs:
    """A DICOMweb server at ``url`` (e.g. Orthanc: ``http://host:8042/dicom-web``)."""

    def __init__(self, url: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"{server_label(url) or url!r}: not an http(s):// DICOMweb URL")
        self.url = url.rstrip("/")
        self.label = server_label(url)
        self.timeout = timeout
        self._client = DICOMwebClient(self.url, timeout=timeout)
        self._client.set_http_retry_params(retry=False)  # a down server should fail now, not after back-offs
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines quote every UID

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn a failed request into one ``PacsError`` line (the request's own text is dropped: its URL may
        carry query values)."""
        try:
            yield
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            reason = e.response.reason if e.response is not None else ""
            hint = " (is this the DICOMweb root? Orthanc: http://HOST:8042/dicom-web)" if code == 404 else ""
            raise PacsError(f"PACS {self.label}: {what} failed: HTTP {code} {reason}{hint}".rstrip()) from None
        except requests.ConnectTimeout:
            raise PacsError(f"PACS {self.label}: cannot connect within {self.timeout[0]:g} s ({what})") from None
        except requests.Timeout:
            raise PacsError(f"PACS {self.label}: no answer within {self.timeout[1]:g} s ({what})") from None
        except requests.exceptions.ChunkedEncodingError:
            raise PacsError(f"PACS {self.label}: connection lost ({what})") from None
        except requests.ConnectionError as e:
            why = "connection refused" if "refused" in repr(e).lower() else "cannot connect"
            raise PacsError(f"PACS {self.label}: {why} ({what}); is the server running?") from None
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            raise PacsError(f"PACS {self.label}: {what}: unusable answer ({type(e).__name__})") from None

    def find_studies(self, filters: Mapping[str, str]) -> list[str]:
        """StudyInstanceUIDs of the studies matching QIDO-RS ``filters`` (DICOM keyword -> value)."""
        with self._errors("search for studies"):
            found = self._client.search_for_studies(
                search_filters=dict(filters), fields=["StudyInstanceUID"], get_remaining=True
            )
            return sorted({str(_attributes(s).StudyInstanceUID) for s in found})

    def find_series(self, study_uid: str) -> list[RemoteSeries]:
        """The series of a study, each with its Modality, instance count and (unless the Modality already says
        it is no image) the SOP class of one instance."""
        what = f"search for the series of {study_name(study_uid)}"
        with self._errors(what):
            found = self._client.search_for_series(
                study_uid, fields=["Modality", "NumberOfSeriesRelatedInstances"], get_remaining=True
            )
            out = []
            for item in found:
                ds = _attributes(item)
                count = ds.get("NumberOfSeriesRelatedInstances")
                series = RemoteSeries(
                    study_uid,
                    str(ds.SeriesInstanceUID),
                    str(ds.get("Modality", "") or ""),
                    int(count) if count not in (None, "") else None,
                )
                if series.is_image:
                    first = self._client.search_for_instances(study_uid, series.uid, limit=1, fields=["SOPClassUID"])
                    sop = str(_attributes(first[0]).get("SOPClassUID", "")) if first else ""
                    series = RemoteSeries(series.study_uid, series.uid, series.modality, series.n_instances, sop)
                out.append(series)
        return sorted(out, key=lambda s: s.name)

    def retrieve_series(self, series: RemoteSeries, target: Path, staging: Path) -> int:
        """Write the series' instances (WADO-RS) into the new folder ``target``; the number written.

        The files are written in a folder under ``staging`` (same file system) and renamed onto ``target``
        only when all the PACS reported have arrived, so ``target`` is complete or absent; an existing
        ``target`` is replaced.
        """
        with atomic_folder(target, staging_dir=staging, replace=True) as tmp:
            with self._errors(f"retrieve {series.name}"):
                n = 0
                stream = self._client.iter_series(series.study_uid, series.uid, media_types=AS_STORED)
                for n, ds in enumerate(stream, start=1):
                    write_instance(ds, tmp / f"{n:05d}.dcm")
            if series.n_instances is not None and n != series.n_instances:
                raise PacsError(f"PACS {self.label}: retrieve {series.name}: got {n} of {series.n_instances} instances")
        return n

    def store(self, path: Path) -> str:
        """Store one DICOM file on the PACS (STOW-RS, into its own study); its SOPInstanceUID."""
        ds = pydicom.dcmread(path)
        with self._errors(f"store {path.name}"):
            answer = self._client.store_instances([ds], study_instance_uid=str(ds.StudyInstanceUID))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise PacsError(f"PACS {self.label}: store {path.name}: refused (failure reason {reason})")
        return str(ds.SOPInstanceUID)


def write_instance(ds: pydicom.Dataset, path: Path) -> None:
    """Write a retrieved instance as a DICOM file, on disk before it counts (``InputError`` if it cannot be)."""
    try:
        with open(path, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise InputError(path.parent, f"cannot write the retrieved series ({e.strerror or type(e).__name__})") from None
