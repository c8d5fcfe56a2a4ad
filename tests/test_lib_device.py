"""device: the config's device resolved on this machine, and full-precision float32 products."""

from __future__ import annotations

import os
import types

import pytest
import torch
from conftest import NEEDS_NO_CUDA

from weight_geometry import device, gpu_claim
from weight_geometry.errors import UserError


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    """torch sees two GPUs (CUDA_VISIBLE_DEVICES=5,2; UUIDs a and b), claimed in ``tmp_path``;
    this process's claim is released afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "visible_gpu_ids", lambda: (
        ["uuid-a", "uuid-b"], ["entry 5, GPU A", "entry 2, GPU B"]))
    monkeypatch.setattr(gpu_claim, "claims_dir", lambda: tmp_path)
    monkeypatch.setattr(device, "_CLAIM", None)
    yield tmp_path
    device.release_gpu()


def test_resolve_device_without_a_gpu(monkeypatch, capsys, tmp_path):
    """No CUDA: ``auto`` is the CPU, silently, ``cuda`` one line; nothing is claimed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_claim, "claims_dir", lambda: tmp_path / "claims")
    assert device.resolve_device("auto") == device.resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match=r"^device: 'cuda' was requested but"
                                        r" torch.cuda.is_available\(\) is False"):
        device.resolve_device("cuda")
    assert not (tmp_path / "claims").exists()


def test_resolve_device_with_an_unusable_gpu(two_gpus, monkeypatch, capsys):
    """``cpu`` asks nothing of CUDA; ``cuda`` with an unusable GPU is one line naming why;
    ``auto`` falls back to the CPU, saying why; either way the claimed GPU is given back."""
    tried = []
    monkeypatch.setattr(device, "cuda_problem",
                        lambda gpu=None: tried.append(gpu) or "the GPU is unusable (busy)")
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().out == "" and tried == []
    assert device.resolve_device("auto") == torch.device("cpu")
    out = capsys.readouterr().out
    assert "claimed GPU cuda:0 for this job (2 visible): entry 5, GPU A, lock" in out
    assert out.endswith("device: auto: the GPU is unusable (busy); using the CPU\n")
    with pytest.raises(UserError, match=r"^device: 'cuda' was requested but the GPU is unusable"
                                        r" \(busy\) \(allowed here: auto, cpu\)$"):
        device.resolve_device("cuda")
    assert tried == [torch.device("cuda", 0)] * 2 and device._CLAIM is None
    free = gpu_claim.claim_gpu(["uuid-a"], two_gpus, wait_s=0)   # released: free at once
    free.release()


def test_resolve_device_claims_one_gpu_for_the_process(two_gpus, monkeypatch, capsys):
    """A usable GPU: the device is ``cuda:i`` of the GPU claimed, the first free one (here the
    second: another holder has the first), with a line naming it; later calls keep it."""
    monkeypatch.setattr(device, "cuda_problem", lambda gpu=None: None)
    other = gpu_claim.claim_gpu(["uuid-a"], two_gpus, wait_s=0)   # another job's claim
    try:
        assert device.resolve_device("auto") == torch.device("cuda", 1)
        assert device.resolve_device("cuda") == torch.device("cuda", 1)
    finally:
        other.release()
    [line] = capsys.readouterr().out.splitlines()
    assert line.endswith(f"claimed GPU cuda:1 for this job (2 visible): entry 2, GPU B, lock"
                         f" {two_gpus / 'gpu-uuid-b.lock'}")
    assert device._CLAIM.ident == "uuid-b"


@pytest.mark.parametrize(("uuid", "ids"), [("abc", ["abc", "abc"]), ("", ["5", "2"])])
def test_visible_gpu_ids_lock_on_the_uuid(monkeypatch, uuid, ids):
    """The identity locked is the GPU's UUID where torch gives one (the same GPU whichever
    index names it), else its CUDA_VISIBLE_DEVICES entry."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=f"GPU {i}", uuid=uuid))
    got, lines = device.visible_gpu_ids()
    assert got == ids
    assert lines == [f"CUDA_VISIBLE_DEVICES entry {e}, GPU {i}" + (f", UUID {uuid}" * bool(uuid))
                     for i, e in enumerate(["5", "2"])]


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
