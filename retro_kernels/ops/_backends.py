"""Backend resolution: which implementation runs an op for the given tensors.

  "reference"  plain PyTorch, reads like the paper; the ground truth of the tests
  "cpu"        the fused C++ kernels (CPU tensors)
  "triton"     the fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  "cuda"       the CUDA C++ kernels (CUDA tensors; the decode op)
  "auto"       the fastest one available for the tensors' device

No silent fallback on the GPU: where "auto" on CUDA tensors would pick a fused kernel that is
missing (extension built without CUDA, triton not installed) or cannot take the problem (outside
the kernel's limits), the slower backend that runs instead is announced once per op and reason
with a BackendFallbackWarning. CPU tensors stay quiet (a missing extension is warned about once,
at import, by retro_kernels._extension).

resolved_backend(op, backend, q) answers which backend an op runs for given queries: it is the
op's own resolution (each op registers it with @backend_resolver), not a copy of it.
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch
from torch import Tensor

from .._extension import has_cpu_kernels, has_cuda_kernels, has_triton, triton_interpreting

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# device types on which "auto" falling back to a slower backend warns
WARN_ON_FALLBACK = frozenset({"cuda"})

_warned: set[tuple[str, str, str]] = set()  # (op, backend it would have picked, reason)
_resolvers: dict[str, Callable[[str, Tensor], str]] = {}


class BackendFallbackWarning(RuntimeWarning):
    """backend="auto" runs a slower backend on CUDA tensors than the fused kernel it would pick,
    because that kernel is missing or cannot take the problem. Issued once per op and reason;
    pass the fused backend explicitly (e.g. backend="triton") to get an error instead."""


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


def _caller_stacklevel() -> int:
    """The stacklevel of warnings.warn (called by _warn_once) that names the first frame outside
    retro_kernels: the user's call of the op."""
    frame, level = sys._getframe(2), 2  # _warn_once's caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith("retro_kernels"):
        frame, level = frame.f_back, level + 1
    return level


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing: no graph break
def _warn_once(op: str, wanted: str, ran: str, reason: str, device_type: str) -> bool:
    """Issues the BackendFallbackWarning for (op, wanted, reason) unless it was issued before in
    this process; True when it did."""
    key = (op, wanted, reason)
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(f"{op}: backend='auto' runs the slower {ran!r} backend instead of {wanted!r} on {device_type} "
                  f"tensors: {reason}. (Warned once per op and reason; backend={wanted!r} raises instead.)",
                  BackendFallbackWarning, stacklevel=_caller_stacklevel())
    return True


def fall_back(op: str, wanted: str, reason: str, device: torch.device, to: str = "reference") -> str:
    """`to`, the backend that runs where "auto" would pick `wanted` and cannot (`reason`); warns
    once per (op, wanted, reason) on the devices of WARN_ON_FALLBACK (CUDA), stays quiet on CPU."""
    if device.type in WARN_ON_FALLBACK:
        _warn_once(op, wanted, to, reason, device.type)
    return to


def within_limits(op: str, name: str, fused: str, backend: str, q: Tensor,
                  why: Callable[[Tensor], str | None],
                  error: Callable[[Tensor], type[Exception]] = lambda q: ValueError) -> str:
    """`name` (the resolved backend), unless it is the fused backend `fused` and its kernel cannot take
    queries q: why(q) says why (None when it can). Then an explicit backend=fused raises
    error(q)(reason), and "auto" falls back to the reference through fall_back (warns on CUDA)."""
    if name != fused:
        return name
    reason = why(q)
    if reason is None:
        return name
    if backend == fused:
        raise error(q)(reason)
    return fall_back(op, fused, reason, q.device)


def _resolve_auto(op: str, device: torch.device, supported: tuple[str, ...],
                  preference: dict[str, tuple[str, ...]]) -> str:
    """The first backend of preference[device.type] (that `op` supports) able to run on `device`,
    else "reference"; a fallback from the first choice goes through fall_back (warns on CUDA)."""
    skipped = None  # (the first choice, why it cannot run)
    for name in preference.get(device.type, ()):
        if name not in supported:
            continue
        reason = _unusable_reason(name, device)
        if reason is None:
            return name if skipped is None else fall_back(op, *skipped, device, to=name)
        skipped = skipped or (name, reason)
    return "reference" if skipped is None else fall_back(op, *skipped, device)


def resolve_backend(op: str, backend, device: torch.device, supported: tuple[str, ...],
                    preference: dict[str, tuple[str, ...]]) -> str:
    """The concrete backend for `op` (before the kernels' limits on the problem's shape and dtype,
    which each op applies after this).

    supported: the backends `op` implements. preference: device type -> backends to try for
    "auto", fastest first ("reference" is always the last resort).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _resolve_auto(op, device, supported, preference)
    if backend not in supported:
        raise ValueError(f"backend={backend!r} is not implemented for {op}; expected one of {supported}")
    reason = _unusable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run {op}: {reason}")
    return backend


def backend_resolver(op: str) -> Callable:
    """Decorator: registers fn(backend, q) -> str as `op`'s resolution, the one function the op
    itself calls to choose its backend, so that resolved_backend(op, ...) gives the same answer."""
    def register(fn: Callable[[str, Tensor], str]) -> Callable[[str, Tensor], str]:
        if op in _resolvers:
            raise ValueError(f"op {op!r} already has a backend resolver: {_resolvers[op]!r}")
        _resolvers[op] = fn
        return fn
    return register


def resolved_backend(op: str, backend: str, q: Tensor) -> str:
    """The backend that `op` (a public op's name, e.g. "chunked_cross_attention") runs when called
    with backend=`backend` and queries like `q` (their device, dtype and shape decide; values are
    not read, so an expanded or empty tensor of the right shape will do): "reference", "cpu",
    "triton" or "cuda".

    It is the op's own resolution: it raises where the op would (an explicit backend that cannot
    run) and issues the op's BackendFallbackWarning where "auto" falls back on CUDA tensors.
    """
    if op not in _resolvers:
        raise ValueError(f"op must be one of {tuple(sorted(_resolvers))}, got {op!r}")
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor (the op's queries), got {type(q).__name__}")
    return _resolvers[op](backend, q)
