"""``medseg data``: datasets (phantom, MSD and 2D-image import, input checks, planning)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from medseg.cli_common import OldOut, renamed
from medseg.errors import MedsegError

data_app = typer.Typer(no_args_is_help=True, help="Datasets: phantom, MSD and 2D image import, validation.")


# ---- data ---------------------------------------------------------------------------------------
@data_app.command("phantom")
def data_phantom(
    output: Annotated[Path, typer.Argument(help="output folder")],
    cases: Annotated[int, typer.Option(min=2, help="number of cases")] = 12,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same phantom)")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of validation cases")] = 0.25,
) -> None:
    """Write the deterministic synthetic multi-organ CT phantom (NIfTI + dataset.json manifest) to OUTPUT."""
    from medseg.data.phantom import write_phantom

    m = write_phantom(output, cases=cases, seed=seed, val_fraction=val_fraction)
    typer.echo(f"wrote {len(m.cases)} cases and manifest {m.path}")


@data_app.command("import-msd")
def data_import_msd(
    msd_dir: Path,
    output: Annotated[
        Optional[Path], typer.Option(help="manifest path (default data_manifests/<msd_dir name>.json)")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="share of validation cases")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="share of test cases")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed of the split")] = 0,
    out_old: OldOut = None,
) -> None:
    """Make a manifest from an MSD / nnU-Net dataset.json folder (data stays where it is)."""
    from medseg.io.manifest import import_msd

    output = renamed(output, out_old, "--out", "--output")
    target = output or Path("data_manifests") / f"{msd_dir.resolve().name.lower()}.json"
    m = import_msd(msd_dir, target, val_fraction, test_fraction, seed)
    counts = {s: len(m.split(s)) for s in ("train", "val", "test")}
    typer.echo(f"wrote {m.path}: {len(m.cases)} cases {counts}, labels {m.labels}")


@data_app.command("import-dicom")
def data_import_dicom(
    dicom_dir: Annotated[Path, typer.Argument(help="folder of DICOM image series and their RTSTRUCT / SEG objects")],
    labels: Annotated[str, typer.Option("--labels", help="label objects to read: rtstruct or seg")],
    output: Annotated[
        Optional[Path],
        typer.Option(help="manifest path (required); NIfTI cache, case map and import report go beside it"),
    ] = None,
    roi_map: Annotated[
        Optional[Path],
        typer.Option(help="YAML: label name -> ROI / segment name globs, and priority (default: one label per name)"),
    ] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of validation cases")] = 0.2,
    test_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of test cases")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed of the split")] = 0,
    case_ids: Annotated[
        str, typer.Option(help="hash (of the SeriesInstanceUID) or folder (top-level folder under DICOM_DIR)")
    ] = "hash",
    out_old: OldOut = None,
) -> None:
    """Make a manifest from DICOM series labelled by RTSTRUCT or DICOM-SEG (NIfTI cached beside it). Exit 3 if
    some cases failed."""
    from medseg.io.dicom_import import CASE_ID_MODES, LABEL_KINDS, CaseResult, ImportOptions, import_dicom

    output = renamed(output, out_old, "--out", "--output")
    if output is None:
        raise typer.BadParameter("give the manifest path", param_hint="--output")
    if labels not in LABEL_KINDS:
        raise typer.BadParameter(f"{labels!r}: choose {' or '.join(LABEL_KINDS)}", param_hint="--labels")
    if case_ids not in CASE_ID_MODES:
        raise typer.BadParameter(f"{case_ids!r}: choose {' or '.join(CASE_ID_MODES)}", param_hint="--case-ids")
    options = ImportOptions(labels, roi_map, val_fraction, test_fraction, seed, case_ids)

    def show(case: CaseResult) -> None:
        typer.echo(case.line(), err=case.status == "failed")

    result = import_dicom(dicom_dir, output, options, on_case=show)
    for line in result.unreadable:
        typer.echo(f"FAILED folder (not scanned) {line}", err=True)
    for line in result.unlinked:
        typer.echo(f"unlinked label object {line}")
    if result.without_labels:
        typer.echo(f"{len(result.without_labels)} image series without labels (listed in the report)")
    m = result.manifest
    counts = {s: len(m.split(s)) for s in ("train", "val", "test")}
    typer.echo(
        f"wrote {m.path}: {len(m.cases)} cases {counts}, labels {m.labels}; {len(result.failed)} failed, "
        f"{len(result.unreadable)} folder(s) unreadable; report {result.report_path}"
    )
    if not result.ok:
        raise typer.Exit(3)


@data_app.command("import-images")
def data_import_images(
    src: Annotated[Path, typer.Argument(help="dataset folder (COCO: also an instances_*.json file)")],
    format: Annotated[str, typer.Option("--format", help="voc, camvid, labelme or coco")],
    output: Annotated[
        Optional[Path], typer.Option(help="manifest path (default data_manifests/<src name>.json)")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="share of validation cases where the source has no split")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="random seed of the split")] = 0,
    classes: Annotated[
        Optional[Path], typer.Option(help="text file, one class name per line, in index order ('#' lines are comments)")
    ] = None,
    images: Annotated[Optional[Path], typer.Option(help="camvid/coco: images folder (relative to SRC)")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="camvid: labels folder (relative to SRC)")] = None,
    void: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            max=255,
            help="camvid: label value of void pixels in the source (SegNet's CamVid: 11); stored as 255, left out of the classes",
        ),
    ] = None,
    out_old: OldOut = None,
) -> None:
    """Make a manifest from a 2D image dataset (VOC, CamVid-like, LabelMe, COCO); converted labels go beside it."""
    from medseg.io.images2d import IMPORTERS

    try:
        importer = IMPORTERS.get(format)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0]), param_hint="--format") from None
    output = renamed(output, out_old, "--out", "--output")
    options = {
        "classes": _read_class_names(classes) if classes else None,
        "images": images,
        "labels": labels,
        "void": void,
    }
    accepted = inspect.signature(importer).parameters
    for key, value in options.items():
        if value is not None and key not in accepted:
            raise typer.BadParameter(f"--{key} does not apply to --format {format}", param_hint=f"--{key}")
    target = output or Path("data_manifests") / f"{src.resolve().name.lower()}.json"
    m = importer(
        src, target, val_fraction=val_fraction, seed=seed, **{k: v for k, v in options.items() if v is not None}
    )
    counts = {s: len(m.split(s)) for s in ("train", "val", "test")}
    typer.echo(f"wrote {m.path}: {len(m.cases)} images {counts}, {len(m.labels)} classes")


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise MedsegError(f"{path}: class list not found")
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]  # '#' lines say where the list came from


@data_app.command("validate")
def data_validate(manifest: Path) -> None:
    """Check every case of a manifest (files, shapes, affines, label values, NaN)."""
    from medseg.config import DataConfig
    from medseg.data.kinds import manifest_kind
    from medseg.io.manifest import load_manifest

    m = load_manifest(manifest)
    kind = manifest_kind(m)  # 2D images: void 255 allowed, unlabelled images skipped
    cases = [c for c in m.cases if c.label] if kind.name == "image2d" else m.cases
    kind.check_cases(m, cases, DataConfig(kind=kind.name, ignore_index=255 if kind.name == "image2d" else None))
    typer.echo(f"{manifest}: {len(m.cases)} cases ok (fingerprint {m.fingerprint()})")


@data_app.command("plan")
def data_plan(
    manifest: Path,
    output: Annotated[
        Optional[Path], typer.Option(help="plans JSON (default MANIFEST_STEM.plans.json beside it)")
    ] = None,
    split: Annotated[Optional[list[str]], typer.Option(help="split(s) to plan from (repeatable)")] = None,
    max_cases: Annotated[Optional[int], typer.Option(min=1, help="only the first N cases (quick look)")] = None,
    max_patch_voxels: Annotated[
        Optional[int],
        typer.Option(min=64, help="patch voxel budget (default 96*96*64; 2D images: pixels, default 256*256)"),
    ] = None,
    ignore_index: Annotated[
        Optional[int], typer.Option(min=0, max=255, help="2D images only: label value of void pixels (default 255)")
    ] = None,
    out_old: OldOut = None,
) -> None:
    """Fingerprint the training cases (spacing, shape, intensities, classes) and print suggested overrides.
    For 2D images: sizes, RGB statistics, void share, class frequencies and median-frequency class weights."""
    from medseg.data.kinds import manifest_kind
    from medseg.io.manifest import load_manifest
    from medseg.planning.kinds import PlanOptions, planner_for
    from medseg.planning.volumes import plans_path_for

    output = renamed(output, out_old, "--out", "--output")
    target = output or plans_path_for(manifest)
    m = load_manifest(manifest)
    planner = planner_for(manifest_kind(m).name)
    options = PlanOptions(tuple(split or ["train"]), max_cases, max_patch_voxels, ignore_index)
    planner.check(options)
    doc = planner.plan(m, target, options)
    typer.echo(planner.describe(doc, target))
    typer.echo("suggested overrides: " + " ".join(doc["overrides"]))


# ---- train / predict / evaluate -----------------------------------------------------------------
