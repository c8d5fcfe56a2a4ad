"""Where the extraction computes, and at what float32 precision.

:func:`resolve_device` turns the config's ``device`` (``auto``, ``cpu``, ``cuda``) into a torch
device on this machine, checking that a GPU is usable rather than merely present;
:func:`pin_float32_matmul` turns off TF32 and anything else that would round float32 products
more coarsely than float32, which the error bounds of :mod:`ranks` assume.
"""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is there and usable, else CPU; ``cuda`` without a usable GPU
    is a user error. Usable: a one-element tensor can be made on it (``is_available()`` is
    also True for a GPU that a driver mismatch or an exclusive-process job makes unusable)."""
    from .errors import UserError
    from .rule_script import progress

    if device == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda")
    if device == "cuda":
        raise UserError(f"device: 'cuda' was requested but {problem} (allowed here: auto, cpu)")
    if problem != NO_CUDA:   # a GPU is there but fails: say why the CPU runs instead
        progress(f"device: auto: {problem}; using the CPU")
    return torch.device("cpu")


#: :func:`cuda_problem` on a machine (or a torch build) without CUDA.
NO_CUDA = "torch.cuda.is_available() is False"


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (one line), or None when a tensor can be made on it."""
    if not torch.cuda.is_available():
        return NO_CUDA
    try:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    except Exception as exc:   # RuntimeError, torch.cuda.DeferredCudaCallError, ...
        return f"the GPU is unusable ({str(exc).strip().splitlines()[0]})"
    return None


#: Set to 1 in the environment (NVIDIA's PyTorch containers do), it makes every float32 cuBLAS
#: GEMM use TF32 whatever torch's flags; torch reads it at the process's first such GEMM.
TF32_OVERRIDE_ENV = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"


def pin_float32_matmul(device: torch.device) -> None:
    """Full float32 precision for every float32 matrix product: TF32 (a 10-bit mantissa,
    ``2^-11`` relative) off for cuBLAS and ``torch.set_float32_matmul_precision("highest")``
    (torch's defaults, which a site hook or a library may have changed). Process-wide, and not
    undone: a notebook that wants TF32 back sets it again. The float32 Grams' error bounds
    (:mod:`ranks`) and the stored vectors' few-ulp error assume float32 rounding.

    On CUDA, :data:`TF32_OVERRIDE_ENV` ``=1`` would force TF32 past both flags: it is removed
    from this process's environment, with a progress line. That takes effect only if no
    float32 GEMM ran on the GPU before (true of the extraction job, which calls this first).
    """
    import os

    from .rule_script import progress

    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda" and os.environ.get(TF32_OVERRIDE_ENV) == "1":
        del os.environ[TF32_OVERRIDE_ENV]
        progress(f"unset {TF32_OVERRIDE_ENV}=1 in this job: it would force TF32 (a 10-bit"
                 " mantissa) on float32 GEMMs, beyond the effective ranks' float32 error bound")
