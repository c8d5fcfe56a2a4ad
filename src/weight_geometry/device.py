"""Where the extraction computes, and at what float32 precision.

:func:`resolve_device` turns the config's ``device`` (``auto``, ``cpu``, ``cuda``) into a torch
device on this machine: on CUDA, one GPU that this process claims for its lifetime among those
it can see (:mod:`gpu_claim`: concurrent jobs on a multi-GPU machine never share one while
another is free), checked to be usable rather than merely present;
:func:`pin_float32_matmul` turns off TF32 and anything else that would round float32 products
more coarsely than float32, which the error bounds of :mod:`ranks` assume.
"""

from __future__ import annotations

import torch

from .gpu_claim import Claim


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is there and usable, else CPU; ``cuda`` without a usable GPU
    is a user error. On CUDA the device is ``cuda:i``, the GPU this process claimed
    (:func:`claimed_gpu`: it may wait for one, and fail with one line, when every visible GPU
    is claimed by other jobs), made the current device. Usable: a one-element tensor can be
    made on it (``is_available()`` is also True for a GPU that a driver mismatch or an
    exclusive-process job makes unusable); an unusable one is released. ``cpu`` claims
    nothing and asks nothing of CUDA."""
    from .errors import UserError
    from .rule_script import progress

    if device == "cpu":
        return torch.device("cpu")
    problem = NO_CUDA
    if torch.cuda.is_available():
        gpu = torch.device("cuda", claimed_gpu().index)
        problem = cuda_problem(gpu)
        if problem is None:
            return gpu
        release_gpu()
    if device == "cuda":
        raise UserError(f"device: 'cuda' was requested but {problem} (allowed here: auto, cpu)")
    if problem != NO_CUDA:   # a GPU is there but fails: say why the CPU runs instead
        progress(f"device: auto: {problem}; using the CPU")
    return torch.device("cpu")


#: :func:`cuda_problem` on a machine (or a torch build) without CUDA.
NO_CUDA = "torch.cuda.is_available() is False"


def cuda_problem(gpu: torch.device | None = None) -> str | None:
    """Why the GPU ``gpu`` (default: the current one) cannot be used (one line), or None when
    it is now torch's current device and a tensor can be made on it."""
    if not torch.cuda.is_available():
        return NO_CUDA
    gpu = gpu or torch.device("cuda")
    try:
        if gpu.index is not None:   # before any work: no context on GPU 0 for nothing
            torch.cuda.set_device(gpu)
        torch.zeros(1, device=gpu)
        torch.cuda.synchronize(gpu)
    except Exception as exc:   # RuntimeError, torch.cuda.DeferredCudaCallError, ...
        return f"the GPU is unusable ({str(exc).strip().splitlines()[0]})"
    return None


#: The GPU this process holds (:func:`claimed_gpu`), or None.
_CLAIM: Claim | None = None


def claimed_gpu() -> Claim:
    """This process's GPU: claimed at the first call among :func:`visible_gpu_ids`
    (:func:`gpu_claim.claim_gpu`, which may wait for one), with a progress line naming it,
    and held until :func:`release_gpu` or the process's end; later calls return the same."""
    global _CLAIM
    from .gpu_claim import claim_gpu
    from .rule_script import progress

    if _CLAIM is None:
        ids, names = visible_gpu_ids()
        _CLAIM = claim_gpu(ids)
        i = _CLAIM.index
        progress(f"claimed GPU cuda:{i} for this job ({len(ids)} visible): {names[i]}, lock"
                 f" {_CLAIM.path}")
    return _CLAIM


def release_gpu() -> None:
    """Give this process's GPU back (no-op when it holds none)."""
    global _CLAIM
    if _CLAIM is not None:
        _CLAIM.release()
        _CLAIM = None


def visible_gpu_ids() -> tuple[list[str], list[str]]:
    """The GPUs torch sees, in its order: their physical identities, to lock on (the UUID
    where torch gives one, else the ``CUDA_VISIBLE_DEVICES`` entry or index), and a line for
    the log on each (``CUDA_VISIBLE_DEVICES`` entry, model, UUID). Reads device properties
    only: no GPU memory, no context."""
    import os

    from .gpu_claim import visible_gpus

    names = visible_gpus(os.environ, torch.cuda.device_count())
    ids, lines = [], []
    for i, name in enumerate(names):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "") or "")
        entry = ("CUDA_VISIBLE_DEVICES entry " if "CUDA_VISIBLE_DEVICES" in os.environ
                 else "CUDA device ")
        ids.append(uuid or name)
        lines.append(f"{entry}{name}, {props.name}" + (f", UUID {uuid}" if uuid else ""))
    return ids, lines


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
