"""Loads the compiled extension `retro_kernels._C` (C++ CPU kernels, CUDA kernels when built
with CUDA) and says which kernel families are usable in this process."""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch  # loads libtorch before the extension

try:
    from . import _C  # noqa: F401  (registers torch.ops.retro_kernels.*)
except ImportError as exc:  # a source checkout that was never built, or a broken build
    _C = None
    warnings.warn(
        f"retro_kernels._C could not be imported ({exc}); only the 'reference' and 'triton' "
        "backends are available. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_kernels() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return _C is not None


def cpu_kernel_isa() -> str | None:
    """The instruction set the C++ CPU kernels run with in this process: "avx512", "avx2" or
    "default" (the baseline target: SSE2 on x86-64, NEON on AArch64); None without the extension.
    Chosen once from what the CPU supports; the environment variable RETRO_KERNELS_CPU_ISA
    (read before the first kernel call) can lower it."""
    if _C is None or not hasattr(_C, "cpu_isa"):
        return None
    return _C.cpu_isa()


# asked once: a plain bool that torch.compile reads as a constant (it cannot trace into _C)
_CUDA_KERNELS = _C is not None and bool(_C.cuda_kernels_compiled())


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _CUDA_KERNELS


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_triton() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def has_triton() -> bool:
    """True when triton can be imported (imported once, on the first call)."""
    return _import_triton()
