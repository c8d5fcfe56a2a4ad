"""device: the config's device resolved on this machine, and full-precision float32 products."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import NEEDS_NO_CUDA

from weight_geometry import device
from weight_geometry.errors import UserError


def test_resolve_device_without_a_usable_gpu(monkeypatch, capsys):
    """``cpu`` asks nothing of CUDA; ``cuda`` without a usable GPU is one line naming why;
    ``auto`` falls back to the CPU, saying why only when a GPU is there but unusable."""
    monkeypatch.setattr(device, "cuda_problem", lambda: device.NO_CUDA)
    assert device.resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(device, "cuda_problem", lambda: "the GPU is unusable (busy)")
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().out == ""
    assert device.resolve_device("auto") == torch.device("cpu")
    assert "device: auto: the GPU is unusable (busy); using the CPU" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^device: 'cuda' was requested but the GPU is unusable"
                                        r" \(busy\) \(allowed here: auto, cpu\)$"):
        device.resolve_device("cuda")
    monkeypatch.setattr(device, "cuda_problem", lambda: None)
    assert device.resolve_device("auto") == device.resolve_device("cuda") == torch.device(
        "cuda")


@NEEDS_NO_CUDA
def test_cuda_problem_without_a_gpu():
    assert device.cuda_problem() == "torch.cuda.is_available() is False"


def test_pin_float32_matmul(monkeypatch, capsys):
    """Full float32 products whatever was set before; on CUDA the TF32 override (=1, the one
    value torch honours) is removed from the environment, with a line saying so."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:   # torch's flags are set and restored by hand (cuBLASModule defeats monkeypatch)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        device.pin_float32_matmul(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        monkeypatch.setenv(device.TF32_OVERRIDE_ENV, "1")
        device.pin_float32_matmul(torch.device("cpu"))        # no cuBLAS on the CPU
        assert os.environ[device.TF32_OVERRIDE_ENV] == "1" and capsys.readouterr().out == ""
        device.pin_float32_matmul(torch.device("cuda"))
        assert device.TF32_OVERRIDE_ENV not in os.environ
        assert "unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in this job" in capsys.readouterr().out
        monkeypatch.setenv(device.TF32_OVERRIDE_ENV, "true")   # torch ignores it: so do we
        device.pin_float32_matmul(torch.device("cuda"))
        assert os.environ[device.TF32_OVERRIDE_ENV] == "true"
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cuda.matmul.allow_tf32 = previous[1]
