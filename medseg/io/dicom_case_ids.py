"""Case ids of DICOM series that name no patient: the series' folder name when it holds exactly that series and
contains no patient identifier fragment, else a hash of the SeriesInstanceUID."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pydicom

_WORD = re.compile(r"[^/\\\s:'\"()\[\],]+")


def uid_hash(uid: str, n: int = 10) -> str:
    """Short, stable, non-identifying name for a UID."""
    return hashlib.sha1(uid.encode()).hexdigest()[:n]


def identifier_tokens(ds: pydicom.Dataset) -> set[str]:
    """Lower-cased patient identifier fragments (>= 3 chars), only to keep them out of case ids and messages."""
    with warnings.catch_warnings():  # pydicom's invalid-value warnings would quote the value
        warnings.simplefilter("ignore")
        values = [str(ds.get(k, "") or "") for k in ("PatientID", "AccessionNumber", "PatientBirthDate")]
        values += re.split(r"[\^\s=,]+", str(ds.get("PatientName", "") or ""))
    return {v.strip().lower() for v in values if len(v.strip()) >= 3}


def redact_identifiers(text: str, tokens: Iterable[str]) -> str:
    """``text`` with every word or path part (split at ``/``, spaces, quotes, brackets, commas and colons) that
    contains one of ``tokens`` (``identifier_tokens``) replaced by ``<redacted>``: the whole part, so a folder
    named ``<PatientID>_<surname>`` loses the surname too."""
    lowered = [t.lower() for t in tokens]
    if not lowered:
        return text
    return _WORD.sub(lambda m: "<redacted>" if any(t in m.group(0).lower() for t in lowered) else m.group(0), text)


def case_ids(files: dict[str, list[Path]], identifiers: dict[str, set[str]]) -> dict[str, str]:
    """Folder name where a folder holds exactly one series (and names no patient), else a UID hash."""
    uids_in_folder: dict[Path, set[str]] = defaultdict(set)
    for uid, paths in files.items():
        for p in paths:
            uids_in_folder[p.parent].add(uid)
    ids: dict[str, str] = {}
    for uid, paths in files.items():
        parents = {p.parent for p in paths}
        name = ""
        if len(parents) == 1 and len(uids_in_folder[next(iter(parents))]) == 1:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", next(iter(parents)).name).strip("._-")
            if any(tok in name.lower() for tok in identifiers[uid]):
                name = ""
        ids[uid] = name or f"series-{uid_hash(uid)}"
    counts: dict[str, int] = defaultdict(int)
    for case_id in ids.values():
        counts[case_id] += 1
    for uid, case_id in ids.items():
        if counts[case_id] > 1:  # two folders with the same name: disambiguate by UID hash
            ids[uid] = f"{case_id}-{uid_hash(uid, 8)}"
    return ids
