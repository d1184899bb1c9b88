"""Dataset manifests: one JSON file describing a dataset, compatible with MSD / nnU-Net ``dataset.json``.

Format (a superset of ``dataset.json``; extra keys are ignored by MSD/nnU-Net readers)::

    {
      "name": "phantom", "description": "...",
      "channel_names": {"0": "CT"},                  # nnU-Net v2 style (MSD "modality" is read too)
      "labels": {"background": 0, "liver": 1},       # name -> int (MSD v1 {"0": "background"} is read too)
      "file_ending": ".nii.gz", "numTraining": 2,
      "training": [{"id": "case0", "image": "imagesTr/case0.nii.gz",
                    "label": "labelsTr/case0.nii.gz", "split": "train"}, ...],
      "test": ["imagesTs/case9.nii.gz"],
      "medseg": {"version": 1, "root": "."}
    }

Paths are relative to ``root``, itself relative to the manifest file. No case path may be absolute or
escape ``root`` (``../../etc/passwd`` is rejected): a manifest from elsewhere cannot make medseg read or
overwrite files outside the dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import InputError
from medseg.io.atomic import write_json_atomic

Split = Literal["train", "val", "test"]
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # 2D natural images (``data.kind: image2d``)
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", *IMAGE_SUFFIXES)


def case_id_from_path(path: str) -> str:
    """``imagesTr/hippocampus_001.nii.gz`` -> ``hippocampus_001`` (nnU-Net ``_0000`` channel suffix dropped)."""
    name = Path(path).name
    for suf in _SUFFIXES:
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    return re.sub(r"_\d{4}$", "", name)


@dataclass(frozen=True)
class Case:
    """One case: id, image path(s) (one per channel), optional label path, split. Paths are manifest-relative."""

    id: str
    image: tuple[str, ...]
    label: str | None
    split: Split


@dataclass
class Manifest:
    """A dataset: label map, channels and cases, anchored at ``root_dir``."""

    name: str
    labels: dict[str, int]
    cases: list[Case]
    root: str = "."
    channel_names: dict[str, str] = field(default_factory=lambda: {"0": "image"})
    description: str = ""
    path: Path | None = None  # where it was loaded from / saved to

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def root_dir(self) -> Path:
        """Absolute dataset root."""
        base = self.path.parent if self.path is not None else Path.cwd()
        return (base / self.root).resolve()

    def resolve(self, rel: str, root: Path | None = None) -> Path:
        """Absolute path of a manifest-relative path; escaping the root is an ``InputError``.

        ``root``: this manifest's ``root_dir`` when the caller already has it (resolving it is a few
        syscalls per call: checking 20,000 cases passes it once instead of once per path).
        """
        src = self.path or Path("manifest")
        if os.path.isabs(rel):
            raise InputError(src, f"case path {rel!r} is absolute; paths must be relative to the dataset root")
        root = root or self.root_dir
        p = (root / rel).resolve()
        if not p.is_relative_to(root):
            raise InputError(src, f"case path {rel!r} escapes the dataset root {root}")
        return p

    def image_paths(self, case: Case) -> list[Path]:
        """Absolute image path(s) of a case."""
        return [self.resolve(p) for p in case.image]

    def label_path(self, case: Case) -> Path | None:
        """Absolute label path of a case, or None."""
        return self.resolve(case.label) if case.label else None

    # ---- queries ---------------------------------------------------------------------------------
    def split(self, *names: Split) -> list[Case]:
        """Cases in the given split(s), in manifest order."""
        return [c for c in self.cases if c.split in names]

    def case(self, case_id: str) -> Case:
        """Look a case up by id."""
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(case_id)

    @property
    def holds_images(self) -> bool:
        """Whether the cases are 2D images (PNG/JPG) rather than volumes (decided by the first case's file)."""
        return bool(self.cases) and self.cases[0].image[0].lower().endswith(IMAGE_SUFFIXES)

    @property
    def num_classes(self) -> int:
        """Number of output classes (max label value + 1)."""
        return max(self.labels.values()) + 1

    def class_labels(self, ignore_index: int | None = None) -> dict[str, int]:
        """Label map without void: the classes a network predicts (and, per data kind, scores).

        ``ignore_index`` (``data.ignore_index``) may itself be a value of the label map (the SegNet CamVid
        layout labels void as 11 with classes 0..10): that entry is then neither a network output, nor a
        scored class, nor written in a model package. Void must be above every real class value, so the
        outputs stay ``0 .. N-1``; otherwise (and if nothing but void is left) ``InputError`` naming the
        manifest and the values. Training (outputs, loss, validation) and scoring all call this.
        """
        classes = {k: v for k, v in self.labels.items() if v != ignore_index}
        if len(classes) == len(self.labels):
            return dict(self.labels)
        void = [k for k, v in self.labels.items() if v == ignore_index]
        above = sorted(v for v in classes.values() if ignore_index is not None and v > ignore_index)
        if not classes or above:
            raise InputError(
                self.path or "manifest",
                f"label {void[0]!r} = {ignore_index} is the void value (data.ignore_index) but "
                + (f"class values {above} are above it" if above else "no other class is left")
                + f"; void must be above every class value (label map {self.labels}): renumber the "
                f"classes 0..{len(classes) - 1} and give void a larger value",
            )
        return classes

    def num_classes_without(self, ignore_index: int | None = None) -> int:
        """Network outputs when ``ignore_index`` is void: max class value + 1 over ``class_labels``."""
        return max(self.class_labels(ignore_index).values()) + 1

    @property
    def num_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)

    @property
    def foreground(self) -> dict[str, int]:
        """Label map without background (value 0)."""
        return {k: v for k, v in self.labels.items() if v != 0}

    def fingerprint(self) -> str:
        """sha256 over labels, channels, cases (ids, splits, paths) and every file's size.

        Independent of where the manifest file sits and of its free-text description, so the same data
        described from two places has one fingerprint.
        """
        doc = self.to_json()
        content = {k: doc[k] for k in ("labels", "channel_names", "training", "test")}
        h = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
        for c in self.cases:
            for rel in (*c.image, *([c.label] if c.label else [])):
                p = self.resolve(rel)
                size = p.stat().st_size if p.exists() else -1
                h.update(f"{rel}:{size}\n".encode())
        return h.hexdigest()[:16]

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The ``dataset.json``-compatible dict."""
        labelled = [c for c in self.cases if c.label]
        unlabelled = [c for c in self.cases if not c.label]
        return {
            "name": self.name,
            "description": self.description,
            "channel_names": self.channel_names,
            "labels": dict(sorted(self.labels.items(), key=lambda kv: kv[1])),
            "file_ending": _file_ending(self.cases),
            "numTraining": len(labelled),
            "numTest": len(unlabelled),
            "training": [
                {
                    "id": c.id,
                    "image": c.image[0] if len(c.image) == 1 else list(c.image),
                    "label": c.label,
                    "split": c.split,
                }
                for c in labelled
            ],
            "test": [
                {"id": c.id, "image": c.image[0] if len(c.image) == 1 else list(c.image), "split": "test"}
                for c in unlabelled
            ],
            "medseg": {"version": 1, "root": self.root},
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically; ``path`` becomes this manifest's anchor (``root`` is kept as given)."""
        self.path = Path(path).resolve()
        write_json_atomic(self.path, self.to_json())
        return self.path


def _file_ending(cases: list[Case]) -> str:
    """The image suffix of the first case (``.png`` for 2D image sets), ``.nii.gz`` by default."""
    name = cases[0].image[0].lower() if cases else ""
    return next((suf for suf in _SUFFIXES if name.endswith(suf)), ".nii.gz")


# Class names become metric names (dice_<class>, iou_<class>) in MLflow, CSVs and plots: MLflow accepts only
# these characters in metric names, and "mean" would collide with the class averages. Checked at load time so a
# bad name fails before training, not at the first validation epoch.
CLASS_NAME = re.compile(r"[A-Za-z0-9_\-. ]+")
RESERVED_CLASS_NAMES = frozenset({"mean"})


def _parse_labels(raw: Any, src: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(src, "'labels' must be a non-empty mapping")
    items = list(raw.items())
    try:
        if all(str(k).lstrip("-").isdigit() and isinstance(v, str) for k, v in items):  # MSD v1: {"0": "background"}
            labels = {str(v): int(k) for k, v in items}
        else:  # nnU-Net v2: {"background": 0}
            labels = {str(k): int(v) for k, v in items}
    except (TypeError, ValueError):
        raise InputError(src, "'labels' values must be integers (name -> int) or names (int -> name)") from None
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise InputError(src, f"'labels' has duplicate values: {labels}")
    if 0 not in values:
        raise InputError(src, "'labels' must contain background with value 0")
    if min(values) < 0:
        raise InputError(src, "'labels' values must be >= 0")
    for name in labels:
        if name.strip().lower() in RESERVED_CLASS_NAMES:
            raise InputError(
                src,
                f"class name {name!r} is reserved: per-class metrics (dice_<class>, iou_<class>) "
                f"would collide with the averages dice_mean / iou_mean; rename the class",
            )
        if not CLASS_NAME.fullmatch(name):
            raise InputError(
                src,
                f"class name {name!r} cannot name a metric: use letters, digits, space, '_', '-', '.' "
                f"(per-class metrics are logged to MLflow as dice_<class>)",
            )
    return labels


def _parse_case(entry: Any, default_split: Split, src: Path, index: int) -> Case:
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise InputError(src, f"case #{index}: needs an 'image' entry")
    image = entry["image"]
    images = tuple(image) if isinstance(image, list) else (image,)
    images = tuple(str(p).removeprefix("./") for p in images)
    label = entry.get("label")
    label = str(label).removeprefix("./") if label else None
    cid = str(entry.get("id") or case_id_from_path(images[0]))
    if not _ID_RE.match(cid):
        raise InputError(
            src, f"case #{index}: id {cid!r} must be letters, digits, '.', '_' or '-' (used in file names)"
        )
    split = entry.get("split", default_split)
    if split not in ("train", "val", "test"):
        raise InputError(src, f"case {cid}: split {split!r} must be train, val or test")
    return Case(id=cid, image=images, label=label, split=split)


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest (or a plain MSD/nnU-Net ``dataset.json``) and validate its structure and paths."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(path, "top level must be a JSON object")
    labels = _parse_labels(raw.get("labels"), path)
    channels = raw.get("channel_names") or raw.get("modality") or {"0": "image"}
    cases = [_parse_case(e, "train", path, i) for i, e in enumerate(raw.get("training", []))]
    cases += [_parse_case(e, "test", path, len(cases) + i) for i, e in enumerate(raw.get("test", []))]
    dup = duplicates(c.id for c in cases)
    if dup:
        raise InputError(path, f"duplicate case ids: {', '.join(dup[:5])}")
    meta = raw.get("medseg") or {}
    m = Manifest(
        name=str(raw.get("name", path.stem)),
        description=str(raw.get("description", "")),
        labels=labels,
        channel_names={str(k): str(v) for k, v in channels.items()},
        cases=cases,
        root=str(meta.get("root", ".")),
        path=path.resolve(),
    )
    root = m.root_dir
    for c in cases:  # reject escaping paths up front, before any file is opened (no file is opened or stat-ed)
        for rel in (*c.image, *((c.label,) if c.label else ())):
            m.resolve(rel, root)
    return m


def assign_splits(ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Deterministic random split of case ids (sorted first, then shuffled with ``seed``)."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 and len(order) > 1 else 0
    out: dict[str, Split] = {}
    for i, cid in enumerate(order):
        out[cid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def import_msd(
    msd_dir: str | Path, out: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> Manifest:
    """Build a medseg manifest from an MSD / nnU-Net ``dataset.json`` folder.

    Cases get ids from their file names and deterministic train/val/test splits; every referenced file
    must exist. The manifest's ``root`` points from ``out`` to ``msd_dir`` so the data stays in place.
    """
    msd_dir = Path(msd_dir).resolve()
    src = msd_dir / "dataset.json"
    if not src.is_file():
        raise InputError(msd_dir, "no dataset.json in this folder (expected an MSD / nnU-Net dataset)")
    tmp = load_manifest(src)  # anchored at msd_dir, root "."
    missing = [
        p for c in tmp.cases for p in (*tmp.image_paths(c), tmp.label_path(c)) if p is not None and not p.is_file()
    ]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(missing[0], f"listed in {src} but not found{more}")
    labelled = [c.id for c in tmp.cases if c.label]
    splits = assign_splits(labelled, val_fraction, test_fraction, seed)
    cases = [Case(c.id, c.image, c.label, splits[c.id] if c.label else "test") for c in tmp.cases]
    out = Path(out).resolve()
    root = os.path.relpath(msd_dir, out.parent)
    m = Manifest(
        name=tmp.name,
        labels=tmp.labels,
        cases=cases,
        root=root,
        channel_names=tmp.channel_names,
        description=tmp.description or f"imported from {msd_dir.name}/dataset.json (seed {seed})",
    )
    m.save(out)
    return m


def duplicates(values: Iterable[str]) -> list[str]:
    """The values that occur more than once, sorted (one pass: linear in the number of values)."""
    counts = Counter(values)
    return sorted(v for v, n in counts.items() if n > 1)
