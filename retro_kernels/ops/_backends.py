"""Backend resolution: which implementation runs an op for the given tensors.

  "reference"  plain PyTorch, reads like the paper; the ground truth of the tests
  "cpu"        the fused C++ kernels (CPU tensors)
  "triton"     the fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  "cuda"       the CUDA C++ kernels (CUDA tensors; the decode op)
  "auto"       the fastest one available for the tensors' device
"""
from __future__ import annotations

import torch

from .._extension import has_cpu_kernels, has_cuda_kernels, has_triton, triton_interpreting

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def _unusable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else why it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors and the inputs are on {device}"
        return None if has_cpu_kernels() else "retro_kernels._C is not built"
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); the inputs are on {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors and the inputs are on {device}"
        return None if has_cuda_kernels() else "retro_kernels._C was built without CUDA"
    raise AssertionError(backend)


def resolve_backend(op: str, backend, device: torch.device, supported: tuple[str, ...],
                    preference: dict[str, tuple[str, ...]]) -> str:
    """The concrete backend for `op`.

    supported: the backends `op` implements. preference: device type -> backends to try for
    "auto", fastest first ("reference" is always the last resort).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in preference.get(device.type, ()):
            if name in supported and _unusable_reason(name, device) is None:
                return name
        return "reference"
    if backend not in supported:
        raise ValueError(f"backend={backend!r} is not implemented for {op}; expected one of {supported}")
    reason = _unusable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run {op}: {reason}")
    return backend

