"""Planning per data kind (``medseg data plan``): ``PLANNERS`` maps a kind name (``data.kinds.DATA_KINDS``) to
its planner, so the caller looks the manifest's kind up instead of branching on it::

    planner = PLANNERS.get(manifest_kind(manifest).name)()
    planner.check(options)
    doc = planner.plan(manifest, target, options)  # written to target
    print(planner.describe(doc, target))

* ``volume``: spacing, shape and intensity fingerprint (``planning.volumes.plan_dataset``);
* ``image2d``: sizes, RGB statistics, void share, median-frequency class weights
  (``planning.images.plan_images`` and ``describe``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.atomic import write_json_atomic
from medseg.io.images2d.common import VOID
from medseg.io.manifest import Manifest
from medseg.planning import images, volumes
from medseg.registry import Registry


@dataclass(frozen=True)
class PlanOptions:
    """What ``medseg data plan`` can ask for; None means "this kind's default" (and "not given" to ``check``)."""

    splits: tuple[str, ...] = ("train",)
    max_cases: int | None = None
    max_patch: int | None = None  # voxels (volumes, default 96*96*64) or pixels (2D images, default 256*256)
    ignore_index: int | None = None  # 2D images: void label value (default 255)


class Planner(ABC):
    """The planning of one data kind."""

    name: str

    def check(self, options: PlanOptions) -> None:
        """``MedsegError`` if ``options`` asks for something this kind cannot do (checked before any work)."""

    @abstractmethod
    def plan(self, manifest: Manifest, target: Path, options: PlanOptions) -> dict[str, Any]:
        """Fingerprint and plans of the manifest's cases, written atomically to ``target``; the document."""

    @abstractmethod
    def describe(self, doc: dict[str, Any], target: Path) -> str:
        """One line for the CLI: what was planned."""


PLANNERS: Registry = Registry("planner")


@PLANNERS.register("volume")
class VolumePlanner(Planner):
    """3D scans: ``planning.volumes.plan_dataset``."""

    name = "volume"

    def check(self, options: PlanOptions) -> None:
        if options.ignore_index is not None:
            raise MedsegError("--ignore-index applies to 2D image manifests only")

    def plan(self, manifest: Manifest, target: Path, options: PlanOptions) -> dict[str, Any]:
        if manifest.path is None:
            raise MedsegError("planning a volume manifest needs a manifest saved to a file")
        return volumes.plan_dataset(
            manifest.path,
            target,
            options.splits,
            options.max_cases,
            options.max_patch or volumes.DEFAULT_MAX_PATCH_VOXELS,
        )

    def describe(self, doc: dict[str, Any], target: Path) -> str:
        p = doc["plans"]
        return (
            f"wrote {target}: {doc['fingerprint']['n_cases']} cases, median shape {p['median_shape_at_target']}, "
            f"median spacing {p['median_spacing']}, {p['network_downsamplings']} downsamplings"
        )


@PLANNERS.register("image2d")
class ImagePlanner(Planner):
    """2D natural images: ``planning.images.plan_images``."""

    name = "image2d"

    def plan(self, manifest: Manifest, target: Path, options: PlanOptions) -> dict[str, Any]:
        doc = images.plan_images(
            manifest,
            options.splits,
            options.max_cases,
            options.max_patch or images.DEFAULT_MAX_PATCH_PIXELS,
            VOID if options.ignore_index is None else options.ignore_index,
        )
        write_json_atomic(target, doc)
        return doc

    def describe(self, doc: dict[str, Any], target: Path) -> str:
        return images.describe(doc, target)


def planner_for(kind: str) -> Planner:
    """The planner of a data kind name (``KeyError`` listing the valid names)."""
    return PLANNERS.get(kind)()
