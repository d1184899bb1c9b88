"""Device and precision selection (``medseg.runtime.device``): CPU fallbacks of the GPU paths."""

from __future__ import annotations

import warnings

import pytest
import torch

from medseg.errors import ConfigError
from medseg.runtime.device import resolve_device, resolve_precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_settings_fall_back_to_cpu_cleanly() -> None:
    cpu = resolve_device("auto", local_rank=1)
    assert cpu.type == "cpu"
    for amp in ("auto", "fp16", "off"):
        p = resolve_precision(amp, cpu, native_bf16=True)
        assert p.dtype is None and not p.use_scaler
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # what the trainer builds on CPU: a pass-through
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler.scale((w * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.tensor([-1.0, -1.0]))


def test_precision_on_cuda_device_object() -> None:
    cuda = torch.device("cuda", 0)  # no card needed: the choice is made from the device type
    assert resolve_precision("fp16", cuda).use_scaler and resolve_precision("fp16", cuda).dtype == torch.float16
    assert resolve_precision("bf16", cuda).dtype == torch.bfloat16 and not resolve_precision("bf16", cuda).use_scaler
    assert resolve_precision("off", cuda).dtype is None


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_on_the_cpu_is_honoured(native: bool) -> None:
    """``train.amp: bf16`` autocasts on the CPU (no scaler); without native bf16 a one-time warning says it is slow."""
    from medseg.runtime import cpu_bf16

    cpu_bf16._warned.clear()  # the warnings are one-time per process
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = resolve_precision("bf16", cpu, native_bf16=native)
    assert p.dtype == torch.bfloat16 and not p.use_scaler
    slow = [w for w in caught if "emulated" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    net = torch.nn.Conv3d(1, 2, 3)
    with p.autocast(cpu):
        out = net(torch.randn(1, 1, 6, 6, 6))
    assert out.dtype == torch.bfloat16


def test_fp16_training_on_the_cpu_falls_back_to_fp32_with_a_warning() -> None:
    from medseg.runtime import cpu_bf16

    cpu_bf16._warned.clear()
    with pytest.warns(UserWarning, match="fp16 is a CUDA setting"):
        p = resolve_precision("fp16", torch.device("cpu"))
    assert p.dtype is None and not p.use_scaler
