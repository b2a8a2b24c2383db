"""chunked_cross_attention_decode: one incremental-decoding step of chunked cross-attention."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .._backends import backend_resolver, resolve_backend, within_limits
from ..block_attention import block_attention_decode, layouts
from .naive import chunked_cross_attention_decode_reference

OP = "chunked_cross_attention_decode"
SUPPORTED_BACKENDS = ("reference", "cpu", "cuda")
_PREFERENCE = {"cuda": ("cuda",), "cpu": ("cpu",)}
_KV = "(batch, num_neighbours, neighbour_len, heads, head_dim)"
# The CUDA kernel's limits (csrc/cuda/block_attention_decode.h; the grid's y dimension holds batch * heads).
_CUDA_MAX_HEAD_DIM = 256
_CUDA_MAX_ROWS = 65535


def _cuda_unsupported(q: Tensor) -> str | None:
    """Why the CUDA decode kernel cannot take queries q (batch, heads, head_dim); None if it can."""
    B, H, D = q.shape
    if q.dtype == torch.float64 or not 1 <= D <= _CUDA_MAX_HEAD_DIM or B * H > _CUDA_MAX_ROWS:
        return (f"backend='cuda' supports float16, bfloat16 and float32 with 1 <= head_dim <= "
                f"{_CUDA_MAX_HEAD_DIM} and batch * heads <= {_CUDA_MAX_ROWS}; got dtype {q.dtype}, "
                f"head_dim {D}, batch {B} and heads {H}")
    return None


@backend_resolver(OP)
def _backend(backend: str, q: Tensor) -> str:
    """The backend chunked_cross_attention_decode runs for queries q (also resolved_backend's
    answer): "auto" falls back to the reference outside the CUDA kernel's limits (warning once),
    an explicit backend="cuda" raises there."""
    name = resolve_backend(OP, backend, q.device, SUPPORTED_BACKENDS, _PREFERENCE)
    return within_limits(OP, name, "cuda", backend, q, _cuda_unsupported)


def _validate(q, k, v, neighbour_mask) -> None:
    _checks.check_tensor("q", q, "(batch, heads, head_dim)", 3)
    _checks.check_tensor("k", k, _KV, 5)
    _checks.check_tensor("v", v, _KV, 5)
    for name, x in (("k", k), ("v", v)):
        _checks.check_like(name, x, "q", q)
    B, H, D = q.shape
    expected = {0: (B, "q's batch"), 3: (H, "q's heads"), 4: (D, "q's head_dim")}
    _checks.check_sizes("k", k, expected)
    _checks.check_sizes("v", v, {**expected, 1: (k.shape[1], "k's num_neighbours"),
                                 2: (k.shape[2], "k's neighbour_len")})
    _checks.check_mask("neighbour_mask", neighbour_mask, k.shape[:3],
                       "(batch, num_neighbours, neighbour_len)", q.device)


def chunked_cross_attention_decode(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Tensor | None = None,
                                   softmax_scale: float | None = None, backend: str = "auto") -> Tensor:
    """Chunked cross-attention for the one new token of each sequence: its query attends to the
    neighbour tokens of the chunk its position t attends to in training, chunk (t + 1) // m - 1,
    so decoding token by token reproduces chunked_cross_attention at every position.

    Args:
        q: (batch, heads, head_dim), the query of the token just fed in.
        k, v: (batch, num_neighbours, neighbour_len, heads, head_dim), the cached CCA keys and
            values of the neighbours of each sequence's current chunk.
        neighbour_mask: optional bool (batch, num_neighbours, neighbour_len), True = real token.
        softmax_scale: defaults to head_dim ** -0.5.
        backend: "auto", "reference", "cpu" (C++) or "cuda" (CUDA C++, split over the keys).
    Returns:
        (batch, heads, head_dim); 0 for a sequence whose neighbour tokens are all masked.
        Differentiable in q, k and v to any order on every backend: the fused decode kernels have
        no backward of their own, their gradients come from the reference formulas.
    """
    _validate(q, k, v, neighbour_mask)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    name = _backend(backend, q)
    if name == "reference":
        return chunked_cross_attention_decode_reference(q, k, v, neighbour_mask, scale)
    return block_attention_decode(layouts.decode(q, k, v, neighbour_mask), scale)
