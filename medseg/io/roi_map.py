"""ROI / segment names -> label values: a small YAML map of globs and synonyms, and overlap priority.

Map file::

    labels:                       # label name -> globs / synonyms, case-insensitive; values 1..K in this order
      tumour: ["GTV*", "gtv_mass*"]
      oedema: ["edema*", "oedema*"]
    priority: [tumour, oedema]    # where ROIs overlap, the earlier label wins (default: the order of `labels`)

A label's own name matches too. An ROI that several labels match goes to the earliest of them in ``priority``
(and is noted). Without a map each distinct ROI name becomes its own label (sorted, matched exactly).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.errors import InputError
from medseg.io.manifest import CLASS_NAME, RESERVED_CLASS_NAMES

_NOT_IN_CLASS_NAME = re.compile(r"[^A-Za-z0-9_\-. ]+")


@dataclass(frozen=True)
class RoiMap:
    """Label names (values 1..K in this order), the ROI name patterns of each, and the overlap priority."""

    labels: tuple[str, ...]
    patterns: tuple[tuple[str, ...], ...]  # per label; lower-cased fnmatch globs (or exact names when ``exact``)
    priority: tuple[str, ...]
    exact: bool = False

    @property
    def values(self) -> dict[str, int]:
        """Label name -> value (1..K), background excluded."""
        return {name: i for i, name in enumerate(self.labels, start=1)}

    def matches(self, roi_name: str) -> list[str]:
        """The labels whose patterns match ``roi_name``, in priority order."""
        key = roi_name if self.exact else roi_name.strip().lower()
        hits = [
            label
            for label, pats in zip(self.labels, self.patterns)
            if any(key == p if self.exact else fnmatch.fnmatchcase(key, p) for p in pats)
        ]
        return sorted(hits, key=self.priority.index)

    def label_of(self, roi_name: str) -> str | None:
        """The label an ROI / segment name maps to (the first match in priority order), or None."""
        hits = self.matches(roi_name)
        return hits[0] if hits else None

    def to_json(self) -> dict[str, Any]:
        """A plain description (for reports and cache keys)."""
        return {
            "labels": {name: list(p) for name, p in zip(self.labels, self.patterns)},
            "priority": list(self.priority),
            "exact": self.exact,
        }


def load_roi_map(path: str | Path) -> RoiMap:
    """Read and check a ROI map YAML file; ``InputError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ROI map not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid YAML ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("labels"), dict) or not raw["labels"]:
        raise InputError(path, "needs 'labels': a mapping of label name -> list of ROI name globs")
    unknown = sorted(set(raw) - {"labels", "priority"})
    if unknown:
        raise InputError(path, f"unknown key(s) {unknown}; the map has 'labels' and 'priority'")
    labels, patterns = [], []
    for name, pats in raw["labels"].items():
        name = str(name)
        _check_label_name(path, name)
        pats = [pats] if isinstance(pats, str) else ([] if pats is None else pats)
        if not isinstance(pats, list) or not all(isinstance(p, str) and p.strip() for p in pats):
            raise InputError(path, f"label {name!r}: give a list of ROI name globs / synonyms (strings)")
        labels.append(name)
        patterns.append(tuple(dict.fromkeys([name.lower(), *(p.strip().lower() for p in pats)])))
    return RoiMap(tuple(labels), tuple(patterns), _priority(path, raw.get("priority"), labels))


def identity_roi_map(roi_names: Iterable[str]) -> RoiMap:
    """Each distinct ROI name its own label, sorted; names that cannot name a class are made safe."""
    labels: list[str] = []
    patterns: list[tuple[str, ...]] = []
    for roi in sorted(set(roi_names)):
        name = _NOT_IN_CLASS_NAME.sub("_", roi).strip() or "roi"
        if name.lower() in RESERVED_CLASS_NAMES | {"background"}:
            name += "_roi"
        base, n = name, 2
        while name in labels:
            name, n = f"{base}_{n}", n + 1
        labels.append(name)
        patterns.append((roi,))
    return RoiMap(tuple(labels), tuple(patterns), tuple(labels), exact=True)


def _check_label_name(path: Path, name: str) -> None:
    if name.strip().lower() in RESERVED_CLASS_NAMES | {"background"}:
        raise InputError(path, f"label name {name!r} is reserved (background is 0; 'mean' names the class average)")
    if not CLASS_NAME.fullmatch(name):
        raise InputError(path, f"label name {name!r}: use letters, digits, space, '_', '-', '.' (it names metrics)")


def _priority(path: Path, raw: Any, labels: list[str]) -> tuple[str, ...]:
    if raw is None:
        return tuple(labels)
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise InputError(path, "'priority' must be a list of label names")
    unknown = [p for p in raw if p not in labels]
    if unknown or len(set(raw)) != len(raw):
        raise InputError(path, f"'priority' names {unknown or 'a label twice'}; labels are {labels}")
    return (*raw, *(name for name in labels if name not in raw))  # unlisted labels follow, in `labels` order


@dataclass
class LabelVolume:
    """A label map built ROI by ROI. Where ROIs of different labels overlap, the label earlier in the map's
    priority wins; ``contested`` counts the voxels that two or more labels claimed."""

    roi_map: RoiMap
    shape: tuple[int, ...]
    _rank: np.ndarray = field(init=False, repr=False)  # 0 background, else 1 + priority position of the label
    _contested: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rank = np.zeros(self.shape, dtype=np.uint16)
        self._contested = np.zeros(self.shape, dtype=bool)

    def add(self, label: str, mask: np.ndarray) -> None:
        """Paint ``mask`` (bool, ``shape``) as ``label`` wherever no label of higher priority is."""
        rank = self.roi_map.priority.index(label) + 1
        taken = self._rank != 0
        self._contested |= mask & taken & (self._rank != rank)
        self._rank[mask & (~taken | (self._rank > rank))] = rank

    @property
    def contested(self) -> int:
        """Voxels claimed by ROIs of two or more different labels."""
        return int(self._contested.sum())

    def labels(self) -> np.ndarray:
        """The label map: values 1..K of ``roi_map.values`` (uint8, or uint16 beyond 255 labels), 0 background."""
        values = self.roi_map.values
        lut = np.array([0, *(values[name] for name in self.roi_map.priority)], dtype=np.uint16)
        out = lut[self._rank]
        return out.astype(np.uint8) if len(values) < 256 else out

    def voxels(self) -> dict[str, int]:
        """Voxels per label (after priority), in label order."""
        counts = np.bincount(self._rank.ravel(), minlength=len(self.roi_map.priority) + 1)
        return {name: int(counts[self.roi_map.priority.index(name) + 1]) for name in self.roi_map.labels}
