"""Planning per data kind (``medseg.planning.kinds``): one planner per data kind, the options each kind refuses
before any work, the volume planner's need for a saved manifest and its one-line description."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.data.kinds import DATA_KINDS
from medseg.errors import MedsegError
from medseg.io.manifest import Case, Manifest
from medseg.planning.kinds import PLANNERS, ImagePlanner, PlanOptions, VolumePlanner, planner_for


def test_one_planner_per_data_kind() -> None:
    assert PLANNERS.names() == DATA_KINDS.names() == ["image2d", "volume"]
    for name in DATA_KINDS.names():
        assert planner_for(name).name == name
    assert isinstance(planner_for("volume"), VolumePlanner) and isinstance(planner_for("image2d"), ImagePlanner)
    with pytest.raises(KeyError, match="unknown planner 'points'; valid names: image2d, volume"):
        planner_for("points")


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_volume_planning_refuses_ignore_index(ignore_index: int) -> None:
    with pytest.raises(MedsegError, match="^--ignore-index applies to 2D image manifests only$"):
        VolumePlanner().check(PlanOptions(ignore_index=ignore_index))


def test_each_planner_takes_its_own_options() -> None:
    VolumePlanner().check(PlanOptions(splits=("train", "val"), max_cases=3, max_patch=64**3))
    ImagePlanner().check(PlanOptions(splits=("train",), max_cases=3, max_patch=128 * 128, ignore_index=11))


def test_volume_planning_needs_a_manifest_saved_to_a_file(tmp_path: Path) -> None:
    m = Manifest("m", {"background": 0, "organ": 1}, [Case("a", ("img/a.nii.gz",), "lab/a.nii.gz", "train")])
    with pytest.raises(MedsegError, match="needs a manifest saved to a file"):
        VolumePlanner().plan(m, tmp_path / "plans.json", PlanOptions())
    assert not (tmp_path / "plans.json").exists()


def test_volume_plan_description() -> None:
    doc = {"fingerprint": {"n_cases": 6},
           "plans": {"median_shape_at_target": [48, 48, 24], "median_spacing": [3.0, 3.0, 4.0],
                     "network_downsamplings": 3}}
    assert VolumePlanner().describe(doc, Path("ds.plans.json")) == (
        "wrote ds.plans.json: 6 cases, median shape [48, 48, 24], median spacing [3.0, 3.0, 4.0], 3 downsamplings")
