"""Inference precision and the CUDA out-of-memory fallback, on the CPU.

- ``runtime.precision``: CPU bf16 detection from capabilities (flags, not the brand) and ``inference.precision``
  resolution (auto / fp32 / bf16 with its one-time warning on a CPU without bf16 / fp16 refused on the CPU);
- ``sliding.CheckedAutocast``: the self-check of the first windows against fp32 and the fall back to fp32 for the
  rest of the batch, its warning in the case JSON (a real batch run);
- ``sliding.OomFallback``: a real network that raises ``torch.cuda.OutOfMemoryError`` (as a full GPU would) makes
  the windows run fewer per call, the case completes with the same labels, and the step is in the case JSON.

The "precision-sensitive" network below is a 1x1 convolution whose class-1 weight (1.001) differs from class 0's
(1.0) by less than bf16's resolution (2^-8): in fp32 every voxel with intensity > 0 is class 1, under bf16 autocast
the two logits tie and argmax takes class 0, so its bf16 labels disagree with fp32 wherever the body is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.config import InferenceConfig, load_config
from medseg.errors import ConfigError
from medseg.inference.batch import run_batch
from medseg.inference.inputs import discover_inputs
from medseg.inference.options import apply_inference_overrides
from medseg.inference.predictor import Predictor
from medseg.inference.sliding import (
    CheckedAutocast,
    GpuMemoryWarning,
    OomFallback,
    WindowRunner,
    network_fn,
    window_logits,
)
from medseg.runtime.cpu_bf16 import cpu_has_native_bf16, cpuinfo_flags
from medseg.runtime.device import Precision
from medseg.runtime.precision import PrecisionWarning, resolve_inference_precision
from tests.helpers import REPO, copy_phantom_scans, expected_mask, oracle_model, phantom_package

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
BF16 = Precision(torch.bfloat16, False)


def precision_sensitive_net() -> torch.nn.Module:
    """4 classes; fp32: class 1 where x > 0; bf16: classes 0 and 1 tie, argmax 0 (module docstring)."""
    conv = torch.nn.Conv3d(1, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.001, 0.5, 0.5]).view(4, 1, 1, 1, 1))
        conv.bias.zero_()
    return conv.eval()


class OutOfMemoryNet(torch.nn.Module):
    """A real network that raises ``torch.cuda.OutOfMemoryError`` on its first ``fail_first`` calls and on every call
    with more than ``max_batch`` windows, as a GPU whose memory fits only that many would."""

    def __init__(self, net: torch.nn.Module, fail_first: int = 0, max_batch: int | None = None) -> None:
        super().__init__()
        self.net, self.fail_first, self.max_batch = net, fail_first, max_batch
        self.calls, self.batches = 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.fail_first or (self.max_batch is not None and x.shape[0] > self.max_batch):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0] * 64} MiB (test)")
        self.batches.append(int(x.shape[0]))
        return self.net(x)


# ---- capability detection and resolution ------------------------------------------------------------------------
CPUINFO_X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t: spectre\n"


def test_cpuinfo_flags_are_read_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "x86").write_text(CPUINFO_X86.format(extra="avx512_bf16 amx_tile"))
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n")
    (tmp_path / "old").write_text(CPUINFO_X86.format(extra="avx512_vnni"))
    assert {"avx512_bf16", "avx2"} <= cpuinfo_flags(tmp_path / "x86")
    assert cpu_has_native_bf16(capabilities={}, flags=cpuinfo_flags(tmp_path / "x86"))
    assert cpu_has_native_bf16(capabilities={}, flags=cpuinfo_flags(tmp_path / "arm"))
    assert not cpu_has_native_bf16(capabilities={}, flags=cpuinfo_flags(tmp_path / "old"))  # AVX-512, no BF16
    assert cpuinfo_flags(tmp_path / "missing") is None
    assert not cpu_has_native_bf16(capabilities={}, flags=None, probe=False)  # nothing known: no bf16


def test_torch_capabilities_decide_when_they_name_bf16() -> None:
    assert cpu_has_native_bf16({"avx512_bf16": False, "amx_bf16": True}, flags=frozenset())
    assert not cpu_has_native_bf16({"avx512_bf16": False, "amx_bf16": False}, flags=frozenset({"avx512_bf16"}))
    assert cpu_has_native_bf16({"avx2": True}, flags=frozenset({"amx_bf16"}))  # a map without bf16 keys: the flags


def test_this_machines_detection_agrees_with_proc_cpuinfo() -> None:
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})


def test_precision_settings_resolve_per_device() -> None:
    assert resolve_inference_precision("auto", CPU, native_bf16=True).dtype == torch.bfloat16
    assert resolve_inference_precision("auto", CPU, native_bf16=False).dtype is None
    assert resolve_inference_precision("fp32", CPU, native_bf16=True).dtype is None
    assert resolve_inference_precision("bf16", CPU, native_bf16=True).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 runs only on CUDA"):
        resolve_inference_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="none of auto"):
        resolve_inference_precision("fp8", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # bf16 without native bf16: tested below
        assert not any(resolve_inference_precision(s, CPU, native_bf16=False).use_scaler for s in ("auto", "bf16"))


def test_bf16_on_a_cpu_without_it_runs_with_a_one_time_warning() -> None:
    # A fresh process: the warning is once per process, and this one has not given it yet.
    code = (
        "import warnings, torch\n"
        "from medseg.runtime.precision import resolve_inference_precision\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    dtypes = [resolve_inference_precision('bf16', torch.device('cpu'), native_bf16=False).dtype for _ in range(3)]\n"
        "print(dtypes.count(torch.bfloat16), len(w), w[0].category.__name__, str(w[0].message))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    runs, count, category, message = p.stdout.split(" ", 3)
    assert (runs, count, category) == ("3", "1", "PrecisionWarning") and "no native bf16" in message


def test_config_keys_and_their_validation() -> None:
    inf = InferenceConfig()
    assert (inf.precision, inf.precision_min_agreement) == ("auto", 0.99)
    cfg = load_config("phantom_unet3d", ["inference.precision=bf16", "inference.precision_min_agreement=0.95"])
    assert (cfg.inference.precision, cfg.inference.precision_min_agreement) == ("bf16", 0.95)
    for bad in ("inference.precision=fp8", "inference.precision_min_agreement=1.5"):
        with pytest.raises(ConfigError, match="inference.precision"):
            load_config("phantom_unet3d", [bad])
    assert InferenceConfig.model_fields["precision"].description  # documented like the other keys


def test_fp16_on_the_cpu_is_refused_when_the_predictor_is_built(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", "inference.precision=fp16"])
    with pytest.raises(ConfigError, match="fp16"):
        Predictor(pkg, device="cpu", model=oracle_model())


# ---- the self-check -----------------------------------------------------------------------------------------------
def test_self_check_falls_back_to_fp32_when_labels_disagree() -> None:
    net = precision_sensitive_net()
    x = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.01  # all > 0: fp32 says class 1
    guard = CheckedAutocast(BF16, min_agreement=0.99)
    with torch.inference_mode():
        with pytest.warns(PrecisionWarning, match=r"agreement 0\.0000 .* the rest of the batch runs in fp32"):
            first = guard(net, x)
        assert guard.agreement == 0.0 and guard.dtype is None and guard.checked_windows == 2
        assert torch.equal(first, net(x))  # a failed check: the checked windows keep their fp32 answer
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per batch, not per call
            later = guard(net, x)
    assert later.dtype == torch.float32 and torch.equal(later.argmax(1), torch.ones_like(later.argmax(1)))


def test_self_check_keeps_reduced_precision_when_labels_agree() -> None:
    net = oracle_model().eval()
    x = torch.rand(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    guard = CheckedAutocast(BF16, min_agreement=0.9)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        guard(net, x)
        later = guard(net, x)
    assert guard.dtype == torch.bfloat16 and 0.9 <= guard.agreement <= 1.0
    assert later.dtype == torch.bfloat16  # autocast ran the convolution in bf16
    assert CheckedAutocast(Precision(None, False), 0.99)(net, x).dtype == torch.float32  # fp32: plain calls


def _two_case_batch(tiny_phantom: Path, tmp_path: Path, overrides: list[str], net: torch.nn.Module, name: str):
    pkg, _ = phantom_package(tmp_path / name, tiny_phantom, ["data.spacing=null", *overrides])
    scans = tmp_path / name / "scans"
    if not scans.exists():
        copy_phantom_scans(tiny_phantom, scans, 2)
    predictor = Predictor(pkg, device="cpu", model=net)
    out = tmp_path / name / "out"
    report = run_batch(pkg, discover_inputs(scans), out, device="cpu", progress=False, predictor=predictor)
    records = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    masks = {cid: np.asanyarray(nib.load(out / f"{cid}.nii.gz").dataobj) for cid in records}
    return report, records, masks, predictor


def test_failed_self_check_is_in_the_case_json_and_the_batch_goes_on_in_fp32(
    tiny_phantom: Path, tmp_path: Path
) -> None:
    _, _, want, _ = _two_case_batch(tiny_phantom, tmp_path, ["inference.precision=fp32"], precision_sensitive_net(), "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # the one-time "no native bf16" of this CPU
        report, records, got, predictor = _two_case_batch(
            tiny_phantom, tmp_path, ["inference.precision=bf16"], precision_sensitive_net(), "bf16"
        )
    first, second = sorted(records)
    assert not report.failed and predictor.autocast.dtype is None and predictor.autocast.agreement < 0.99
    notes = [w for w in records[first]["warnings"] if w.startswith("PrecisionWarning")]
    assert len(notes) == 1 and "the rest of the batch runs in fp32" in notes[0], records[first]["warnings"]
    assert not any(w.startswith("PrecisionWarning") for w in records[second]["warnings"])  # checked once a batch
    for cid in records:  # after the fall back both cases are exactly what fp32 gives
        assert np.array_equal(got[cid], want[cid]) and (got[cid] == 1).mean() > 0.1


def test_passing_self_check_keeps_bf16_for_the_batch(tiny_phantom: Path, tmp_path: Path) -> None:
    # Threshold 0: the check passes whatever it finds, so the network really runs in bf16, where this net's
    # classes 0 and 1 tie (module docstring): no voxel is class 1, which fp32 gives to the whole body.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        report, records, got, predictor = _two_case_batch(
            tiny_phantom,
            tmp_path,
            ["inference.precision=bf16", "inference.precision_min_agreement=0.0"],
            precision_sensitive_net(),
            "pass",
        )
    assert not report.failed and predictor.autocast.dtype == torch.bfloat16
    assert predictor.autocast.agreement is not None and predictor.autocast.agreement < 0.5
    assert all(not (m == 1).any() for m in got.values())  # the checked windows too keep their bf16 answer


# ---- the out-of-memory fallback -----------------------------------------------------------------------------------
def test_fallback_steps_windows_then_stitching_then_gives_up() -> None:
    memory = OomFallback()
    assert memory.plan(4, CUDA, 1000) == (4, CUDA)
    assert memory.give_up(True, 4, CUDA, 1000) == "2 window(s) per network call"
    assert memory.give_up(True, 2, CUDA, 1000) == "1 window(s) per network call"
    assert memory.plan(4, CUDA, 1000) == (1, CUDA)
    assert memory.give_up(True, 1, CUDA, 1000) == "the stitching on the CPU"  # one window still too many
    assert memory.plan(4, CUDA, 1000) == (1, CPU) and memory.plan(4, CUDA, 999) == (1, CUDA)  # only as large
    assert memory.give_up(True, 1, CPU, 1000) is None  # nothing left: the error stands
    stitching = OomFallback()
    assert stitching.give_up(False, 4, CUDA, 500) == "the stitching on the CPU"  # not the network: no window step
    assert stitching.plan(4, CUDA, 501) == (4, CPU)
    assert OomFallback().give_up(False, 4, CPU, 500) is None


def test_window_logits_retries_with_fewer_windows_and_gets_the_same_logits() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    x = torch.randn(1, 1, 30, 26, 14, generator=torch.Generator().manual_seed(0))
    inf, roi = InferenceConfig(sw_batch_size=4), (16, 12, 8)
    net = OutOfMemoryNet(conv, fail_first=1, max_batch=2)
    runner, memory = WindowRunner(network_fn(net, 3), 3), OomFallback()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = window_logits(x, roi, inf, runner, CPU, Precision(None, False), memory)
        want = sliding_window_inference(x, roi, 4, conv, overlap=inf.overlap, mode=inf.blend_mode)
    steps = [str(w.message) for w in caught if w.category is GpuMemoryWarning]
    assert len(steps) == 1 and "in the network" in steps[0] and "2 window(s) per network call" in steps[0], steps
    assert torch.allclose(got, want, atol=1e-5)
    assert max(net.batches) == 2 and runner.windows_run == sum(net.batches)  # counts of the failed try dropped
    assert runner.net_batch is None and memory.windows_per_call == 2  # the runner as it was; the step is kept


def test_an_error_that_no_step_helps_propagates() -> None:
    conv = torch.nn.Conv3d(1, 2, 1).eval()
    runner = WindowRunner(network_fn(OutOfMemoryNet(conv, max_batch=0), 3), 2)
    with torch.no_grad(), pytest.warns(GpuMemoryWarning), pytest.raises(torch.cuda.OutOfMemoryError):
        window_logits(torch.rand(1, 1, 20, 20, 10), (8, 8, 8), InferenceConfig(), runner, CPU, Precision(None, False),
                      OomFallback())


def test_out_of_memory_in_a_case_is_recorded_and_the_case_completes(tiny_phantom: Path, tmp_path: Path) -> None:
    net = OutOfMemoryNet(oracle_model(), fail_first=1, max_batch=2)
    report, records, masks, predictor = _two_case_batch(
        tiny_phantom, tmp_path, ["inference.sw_batch_size=4", "inference.precision=fp32"], net, "oom"
    )
    first, second = sorted(records)
    assert not report.failed and all(r["status"] == "ok" for r in records.values())
    steps = [w for w in records[first]["warnings"] if w.startswith("GpuMemoryWarning")]
    assert steps and "CUDA out of memory in the network" in steps[0] and "window(s) per network call" in steps[0]
    kept = [w for w in records[second]["warnings"] if w.startswith("GpuMemoryWarning")]
    assert len(kept) == 1 and "fallback of an earlier case" in kept[0], records[second]["warnings"]
    scans = tmp_path / "oom" / "scans"
    for cid, mask in masks.items():  # the oracle's answer is known voxel by voxel: the labels did not change
        assert np.array_equal(mask, expected_mask(np.asanyarray(nib.load(scans / f"{cid}.nii.gz").dataobj)))
    assert max(net.batches) <= 2 and predictor.memory.windows_per_call <= 2  # half the windows of the failed call


def test_out_of_memory_that_persists_fails_only_that_case(tiny_phantom: Path, tmp_path: Path) -> None:
    pkg, _ = phantom_package(tmp_path, tiny_phantom, ["data.spacing=null", "inference.precision=fp32"])
    pkg = apply_inference_overrides(pkg, ["inference.sw_batch_size=2"])
    scans = copy_phantom_scans(tiny_phantom, tmp_path / "scans", 1)
    predictor = Predictor(pkg, device="cpu", model=OutOfMemoryNet(oracle_model(), max_batch=0))
    report = run_batch(pkg, discover_inputs(scans), tmp_path / "out", device="cpu", progress=False, predictor=predictor)
    (cid, error), = report.failed.items()
    record = json.loads((tmp_path / "out" / f"{cid}.json").read_text())
    assert record["status"] == "failed" and error.startswith("OutOfMemoryError: CUDA out of memory")
    assert any("retrying with 1 window(s) per network call" in w for w in record["warnings"])
