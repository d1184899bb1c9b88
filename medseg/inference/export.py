"""Export a model package's network for a serving stack: ONNX or TorchScript, plus ``medseg.json``.

    medseg export MODEL --format onnx --output DIR          ->  DIR/model.onnx            + DIR/medseg.json
    medseg export MODEL --format torchscript --output DIR   ->  DIR/model.torchscript.pt  + DIR/medseg.json

Beside them the package's ``config.yaml`` and ``metadata.json`` (model card), so ``medseg predict --model DIR``
runs the exported network in medseg's own predictor (``onnx_network``); medseg.json stays self-contained for a
serving stack and names those two files (``config``, ``model_card``) and the network file's ``file_sha256``.

The exported network is the package's trained network in fp32 on one batch of windows: ``(N, C_in, *roi)`` in,
the full-resolution logits ``(N, classes, *roi)`` out (a deep-supervision net's first head), ``N`` free. A 2D net
takes ``(N, C_in, H, W)``; on volumes medseg runs it slice by slice (``slice_wise`` in medseg.json). The sliding
window, mirroring, preprocessing and post-processing are the serving stack's to do: ``medseg.json`` says how
medseg does them (orientation, spacing, intensity settings, foreground crop, label map, window size, overlap and
blending, mirrored axes, channels, post-processing), so predictions can match ``medseg predict``.

ONNX: ``torch.onnx.export`` with its default (dynamo) exporter, which needs ``onnx`` and ``onnxscript`` (the
``export`` extra), and the opset that exporter writes by default (recorded in medseg.json). A network the dynamo
exporter cannot take goes through the older TorchScript-based exporter instead (also recorded). TorchScript:
``torch.jit.trace`` on a window batch: any eval-mode module traces, while ``script`` needs every layer scriptable.

Before medseg.json (the completion marker, written last) each export is checked: the written file (ONNX Runtime,
when installed, or ``torch.jit.load``) and the torch network run the same random windows at batch sizes 1 and 3
(the example batch had 2), and their largest logit difference and argmax agreement go into ``check``; an export
that disagrees beyond ``CHECK_TOLERANCE`` is an ``ExportError``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medseg.data.kinds import data_kind
from medseg.errors import MedsegError
from medseg.inference.model_package import CONFIG, METADATA, ModelPackage
from medseg.inference.onnx_network import EXPORT_FORMAT, FILES, INPUT_NAME, MEDSEG_JSON, OUTPUT_NAME, file_sha256
from medseg.io.atomic import atomic_path, write_json_atomic, write_text_atomic

FORMATS = ("onnx", "torchscript")
CHECK_BATCHES = (1, 3)  # batch sizes the check runs (the export traced 2): the batch axis must be free
CHECK_TOLERANCE = 1e-3  # largest |logit difference| an export may show on the check windows (measured: ~1e-5)
ONNX_SINGLE_FILE_LIMIT = 2**31  # protobuf's 2 GiB: larger weights would need ONNX external data files


class ExportError(MedsegError):
    """The network cannot be exported, or the exported file does not reproduce it."""


class Logits(nn.Module):
    """The network as exported: one tensor, the full-resolution head of deep-supervision nets."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def window_shape(package: ModelPackage) -> tuple[int, ...]:
    """``(C_in, *roi)`` of one window as the exported network takes it (2D nets: ``(C_in, H, W)``)."""
    return (int(package.metadata["in_channels"]), *(int(n) for n in package.config.roi_size))


def check_windows(package: ModelPackage, batch: int, seed: int = 0) -> torch.Tensor:
    """Random windows in [0, 1) (normalised intensities' range) of the network's input shape."""
    return torch.rand((batch, *window_shape(package)), generator=torch.Generator().manual_seed(seed))


def require_onnx() -> None:
    """``ExportError`` naming the missing packages unless ONNX export can run here."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"--format onnx needs {' and '.join(missing)} (the export extra: pip install 'medseg[export]')"
        )


@contextlib.contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Only errors from ``logger_name`` and no deprecation notices of torch's internals while the block runs (the
    dynamo exporter logs a warning per operator library it skips, e.g. torchvision's when it is not installed)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def write_onnx(net: nn.Module, example: torch.Tensor, target: Path) -> dict[str, Any]:
    """Write ``net`` as ONNX with a dynamic batch axis (atomically); the exporter and opset used."""
    import onnx

    require_onnx()
    if sum(p.numel() * p.element_size() for p in net.parameters()) >= ONNX_SINGLE_FILE_LIMIT:
        raise ExportError("the network's weights exceed 2 GiB, ONNX's single-file limit: export torchscript instead")
    with atomic_path(target, ".onnx") as tmp:
        exporter = "dynamo"
        try:
            with contextlib.redirect_stdout(io.StringIO()), quiet("torch.onnx"):  # its progress lines, notes
                torch.onnx.export(
                    net,
                    (example,),
                    str(tmp),
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    dynamo=True,
                    external_data=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                )
        except Exception as e:  # torch.export covers most networks, not all: the TorchScript-based exporter next
            exporter = f"torchscript (dynamo failed: {e.__class__.__name__})"
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                dynamic_axes=axes,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
            )
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"exporter": exporter, "opset": int(opset), "onnx": onnx.__version__, "torch": torch.__version__}


def write_torchscript(net: nn.Module, example: torch.Tensor, target: Path) -> dict[str, Any]:
    """Write ``net`` traced to TorchScript (atomically); how it was made."""
    with torch.no_grad(), warnings.catch_warnings():
        # Shape checks inside layers (InstanceNorm's) become trace constants; the export check below runs other
        # batch sizes, which is what those warnings ask to verify.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, (example,))
    with atomic_path(target, ".pt") as tmp:
        torch.jit.save(traced, str(tmp))
    return {"method": "torch.jit.trace", "torch": torch.__version__}


def onnx_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray] | None:
    """The ONNX file as a function of a window batch (ONNX Runtime, CPU), or None where it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run(None, {INPUT_NAME: x.numpy()})[0])


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The TorchScript file, loaded back, as a function of a window batch."""
    loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    return run


def check_export(net: nn.Module, run: Callable[[torch.Tensor], np.ndarray] | None, package: ModelPackage) -> dict:
    """Largest |logit difference| and argmax agreement of the exported file vs the network on the check windows;
    ``ExportError`` beyond ``CHECK_TOLERANCE`` or a wrong output shape."""
    if run is None:
        return {"skipped": "onnxruntime is not installed"}
    worst, agree, n = 0.0, 0, 0
    for i, batch in enumerate(CHECK_BATCHES):
        x = check_windows(package, batch, seed=i)
        with torch.no_grad():
            ref = net(x).numpy()
        got = run(x)
        if got.shape != ref.shape:
            raise ExportError(f"the exported network gives shape {got.shape} for a batch of {batch}, not {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        n += int(ref[:, 0].size)
    if not worst <= CHECK_TOLERANCE:
        raise ExportError(f"the exported network differs from the package's by up to {worst:.3g} in the logits")
    return {"batches": list(CHECK_BATCHES), "max_abs_logit_diff": worst, "argmax_agreement": agree / n}


def serving_metadata(package: ModelPackage) -> dict[str, Any]:
    """What a serving stack needs besides the network: preprocessing, windows, labels, channels, post-processing."""
    cfg, meta, inf = package.config, package.metadata, package.config.inference
    kind = data_kind(cfg)
    it = cfg.data.intensity
    return {
        "labels": package.labels,
        "num_classes": package.num_classes,
        "in_channels": int(meta["in_channels"]),
        "channel_names": meta.get("channel_names"),
        "data_kind": cfg.data.kind,
        "spatial_dims": cfg.model.spatial_dims,
        "slice_wise": cfg.model.spatial_dims == 2 and kind.input_dims == 3,
        "preprocessing": {
            "orientation": cfg.data.orientation,
            "spacing_mm": list(cfg.data.spacing) if cfg.data.spacing else None,  # None: the scan's own spacing
            "resize": list(cfg.data.resize) if cfg.data.resize else None,
            "intensity": {
                **it.model_dump(mode="json"),
                "formula": "clip to [lower, upper], then (x - lower) / (upper - lower)"
                if it.mode in ("ct_window", "range")
                else "per channel (x - mean) / std over the foreground box"
                + (", non-zero voxels" if it.nonzero else ""),
            },
            "crop_foreground": cfg.data.crop_foreground,
            "foreground_threshold": cfg.data.foreground_threshold,
        },
        "window": {
            "roi_size": list(cfg.roi_size),
            "input_window": list(kind.window(cfg)),  # in the input's axes: a 2D net on volumes slides (H, W, 1)
            "overlap": inf.overlap,
            "blend_mode": inf.blend_mode,
            "sw_batch_size": inf.sw_batch_size,
            "mirror_axes": kind.mirror_axes(inf),
        },
        "postprocessing": {
            "argmax": "over the class axis (1) of the blended logits",
            **{k: getattr(inf, k) for k in ("keep_largest_component", "min_component_voxels", "min_component_ml")},
            "fill_holes": inf.fill_holes,
        },
        "model": {k: meta.get(k) for k in ("dataset", "run_id", "versions")} | {"architecture": cfg.model.name},
    }


def export_package(package: ModelPackage, fmt: str, out_dir: str | Path) -> dict[str, Any]:
    """Export ``package``'s network as ``fmt`` (onnx, torchscript) into ``out_dir`` with ``medseg.json``; returns
    what medseg.json holds. The network file is written and checked first, medseg.json last."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if package.export is not None:  # its network is ONNX Runtime's / TorchScript's, not a torch module to trace
        raise ExportError(f"{package.path} is an export already: export the model package it was made from")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = Logits(package.build("cpu")).eval()
    example = check_windows(package, 2, seed=7)
    target = out / FILES[fmt]
    if fmt == "onnx":
        made = write_onnx(net, example, target)
        run = onnx_runner(target)
    else:
        made = write_torchscript(net, example, target)
        run = torchscript_runner(target)
    shape = ["batch", *window_shape(package)]
    # The package's config and model card, for ``medseg predict --model DIR`` (the in-memory config: what was
    # loaded, overrides included; the card's weights_sha256 is model.pt's, which the export does not need).
    write_text_atomic(out / CONFIG, package.config.to_yaml())
    write_json_atomic(out / METADATA, package.metadata)
    record = {
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "file": target.name,
        "file_sha256": file_sha256(target),
        "config": CONFIG,
        "model_card": METADATA,
        "export": made,
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", package.num_classes, *shape[2:]], "dtype": "float32"},
        "check": check_export(net, run, package),
        **serving_metadata(package),
    }
    write_json_atomic(out / MEDSEG_JSON, record)
    return record
