"""Exported networks (``medseg export``) as torch modules, so ``medseg predict --model EXPORT_DIR`` runs them in the
same predictor as a package's torch network: preprocessing, sliding window, mirroring, blending, post-processing,
outputs and records stay the predictor's; only the network call goes to ONNX Runtime (or TorchScript).

An export folder holds ``medseg.json`` (what a serving stack reads), the network file it names and the package's
``config.yaml`` and ``metadata.json``; ``model_package.load_package`` recognises it and its ``ModelPackage.build``
returns ``exported_network``'s adapter instead of the torch network. The adapter takes the window batch medseg
slides (``(N, C_in, *roi)``; any ``N``: the export's batch axis is dynamic) and returns the logits as a float32 torch
tensor on the windows' device.

- ONNX: an ``onnxruntime.InferenceSession`` on ``CUDAExecutionProvider`` when torch sees a CUDA device and the
  installed onnxruntime has that provider, else ``CPUExecutionProvider``. Windows cross as numpy arrays (on CUDA
  that is a host round trip per window batch; ORT's I/O binding could keep them on the card, not done: unmeasured).
- TorchScript: ``torch.jit.load``, which is not ``weights_only`` (a TorchScript file holds code, run by torch's
  interpreter), so only a local folder the user named is loaded, never one downloaded from a registry.

Both run in fp32 only (``fixed_precision``): ``runtime.precision.network_precision`` turns an ``inference.precision``
of bf16 / fp16 into fp32 with a warning for such a network instead of failing.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medseg.errors import InputError, MedsegError

MEDSEG_JSON = "medseg.json"
EXPORT_FORMAT = "medseg-export/1"
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportedNetworkError(MedsegError):
    """An exported network cannot run here (its runtime is not installed, or the windows do not fit it)."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_onnxruntime() -> None:
    """``ExportedNetworkError`` (one line) unless onnxruntime can be imported."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ExportedNetworkError(
            "predicting with an ONNX export needs onnxruntime (pip install 'medseg[export]', or onnxruntime-gpu)"
        )


def check_export_folder(folder: Path, record: dict[str, Any]) -> Path:
    """The network file of the export folder ``folder`` (its ``medseg.json`` is ``record``); ``InputError`` naming
    the file when it is missing or not the one exported (``file_sha256`` in medseg.json)."""
    fmt = record.get("model_format")
    if fmt not in FILES or record.get("format") != EXPORT_FORMAT:
        raise InputError(folder / MEDSEG_JSON, f"not a medseg export ({EXPORT_FORMAT}, onnx or torchscript)")
    target = folder / str(record.get("file") or FILES[fmt])
    if not target.is_file():
        raise InputError(target, f"the {fmt} export's network file is missing (medseg.json names it)")
    sha = record.get("file_sha256")
    if sha is not None and file_sha256(target) != sha:
        raise InputError(target, "checksum mismatch with medseg.json: the file was changed after the export")
    if fmt == "onnx":
        require_onnxruntime()
    return target


def onnx_providers(device: torch.device, available: list[str]) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers for ``device``: CUDA (then CPU) on a CUDA device where onnxruntime has it, else CPU."""
    if device.type == "cuda" and torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ExportedNetwork(nn.Module):
    """An exported network as a module of window batches; fp32 only."""

    backend = "exported"
    fixed_precision = "fp32"

    def __init__(self, path: Path, window: tuple[int, ...]) -> None:
        super().__init__()
        self.path, self.window = path, window

    def check_window(self, x: torch.Tensor) -> None:
        """``ExportedNetworkError`` unless ``x`` is a batch of the export's fixed window ``(C_in, *roi)``."""
        if tuple(x.shape[1:]) != self.window:
            raise ExportedNetworkError(
                f"{self.path}: the export takes windows {list(self.window)} (channels, roi), got {list(x.shape[1:])}: "
                "inference.roi_size cannot change for an exported network"
            )

    def describe(self) -> dict[str, Any]:
        """What ran, for the case record."""
        return {"backend": self.backend, "file": self.path.name}


class OnnxNetwork(ExportedNetwork):
    """``model.onnx`` run by ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, path: Path, window: tuple[int, ...], device: torch.device) -> None:
        super().__init__(path, window)
        require_onnxruntime()
        import onnxruntime

        providers = onnx_providers(device, onnxruntime.get_available_providers())
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        self.providers = list(self.session.get_providers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_window(x)
        windows = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: windows})
        return torch.from_numpy(logits).to(x.device)

    def describe(self) -> dict[str, Any]:
        """Backend, file and the providers the session runs on."""
        return {**super().describe(), "providers": self.providers}


class TorchScriptNetwork(ExportedNetwork):
    """``model.torchscript.pt`` loaded with ``torch.jit.load`` (not weights_only: only a folder the user named)."""

    backend = "torchscript"

    def __init__(self, path: Path, window: tuple[int, ...], device: torch.device) -> None:
        super().__init__(path, window)
        self.net = torch.jit.load(str(path), map_location=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_window(x)
        return self.net(x.float())


def exported_network(
    folder: Path, record: dict[str, Any], roi_size: tuple[int, ...], device: torch.device | str
) -> ExportedNetwork:
    """The network of the export folder ``folder`` (``record``: its medseg.json) on ``device``, in eval mode.

    ``roi_size`` (the config's, after ``--set`` overrides) must be the window the export was made for.
    """
    target = check_export_folder(folder, record)
    window = tuple(int(n) for n in record["input"]["shape"][1:])
    if tuple(int(n) for n in roi_size) != window[1:]:
        raise ExportedNetworkError(
            f"{folder / MEDSEG_JSON}: inference.roi_size {list(roi_size)} is not the export's window "
            f"{list(window[1:])}: an exported network takes only the window it was exported for"
        )
    dev = torch.device(device)
    net: ExportedNetwork = (
        OnnxNetwork(target, window, dev)
        if record["model_format"] == "onnx"
        else TorchScriptNetwork(target, window, dev)
    )
    return net.eval()


def network_record(model: nn.Module, asked: str, dtype: torch.dtype | None, agreement: float | None) -> dict[str, Any]:
    """The case record's ``network``: backend (torch, onnxruntime, torchscript), the precision asked
    (``inference.precision``) and the one the network ran in (``dtype``: the batch's autocast, None for fp32), and
    the reduced-precision self-check's argmax agreement with fp32 when it ran."""
    described = model.describe() if isinstance(model, ExportedNetwork) else {"backend": "torch"}
    used = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    out = {**described, "precision_asked": asked, "precision": used}
    if agreement is not None:
        out["self_check_agreement"] = round(agreement, 6)
    return out
