"""What the Triton kernels support (importable without triton): the public functions fall back to
the reference outside these limits with backend="auto", and triton_launch.py refuses them."""
from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256           # BLOCK_D = next power of two >= head_dim, tested up to 256
MAX_GRID_Y = 65535           # CUDA's limit on gridDim.y, which holds batch * heads
MAX_INT32 = 2 ** 31 - 1      # the kernels form in-batch offsets (row * stride) in int32
MAX_SHARED_MEMORY = 227 * 1024  # bytes of shared memory a block may use on sm_90 (H100, H200)


def triton_unsupported(q: Tensor) -> str | None:
    """Why the Triton kernels cannot run a problem with queries q (B, ..., H, D); None if they can."""
    if q.dtype not in DTYPES:
        return f"supports float16, bfloat16 and float32; q has dtype {q.dtype}"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"supports head_dim 1 .. {MAX_HEAD_DIM}; q has head_dim {q.shape[-1]}"
    if q.shape[0] * q.shape[-2] > MAX_GRID_Y:
        return (f"supports batch * heads <= {MAX_GRID_Y} (CUDA's gridDim.y); q has batch {q.shape[0]} "
                f"and heads {q.shape[-2]}")
    return None


def triton_or_reference(name: str, backend: str, q: Tensor, op: str = "block_attention") -> str:
    """`name` (the resolved backend), or "reference" where auto chose Triton for a problem it does not
    support (announced once per op and reason by a BackendFallbackWarning on CUDA tensors); an
    explicit backend="triton" for such a problem raises (TypeError for the dtype). op: the public
    op's name, for the warning."""
    if name != "triton":
        return name
    from .._backends import within_limits  # here: this module stays importable on its own

    return within_limits(op, name, "triton", backend, q, _why_not, _error_for)


def _why_not(q: Tensor) -> str | None:
    reason = triton_unsupported(q)
    return None if reason is None else f"backend='triton' {reason}"


def _error_for(q: Tensor) -> type[Exception]:
    return TypeError if q.dtype not in DTYPES else ValueError
