"""chunked_cross_attention: RETRO's chunked cross-attention as a fused, differentiable op."""
from __future__ import annotations

from torch import Tensor

from .. import _checks
from .._backends import backend_resolver, resolve_backend
from ..block_attention import block_attention, layouts
from ..block_attention.triton_limits import triton_or_reference
from .naive import chunked_cross_attention_reference

OP = "chunked_cross_attention"
SUPPORTED_BACKENDS = ("reference", "cpu", "triton")
_PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu",)}

_Q = "(batch, seq_len, heads, head_dim)"
_KV = "(batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim)"
_MASK = "(batch, num_chunks, num_neighbours, neighbour_len)"


def _validate(q, k, v, chunk_size, neighbour_mask) -> None:
    _checks.check_tensor("q", q, _Q, 4)
    _checks.check_tensor("k", k, _KV, 6)
    _checks.check_tensor("v", v, _KV, 6)
    _checks.check_positive_int("chunk_size", chunk_size)
    for name, x in (("k", k), ("v", v)):
        _checks.check_like(name, x, "q", q)
    B, N, H, D = q.shape
    expected = {0: (B, "q's batch"), 4: (H, "q's heads"), 5: (D, "q's head_dim")}
    _checks.check_sizes("k", k, expected)
    _checks.check_sizes("v", v, {**expected, 1: (k.shape[1], "k's num_chunks"),
                                 2: (k.shape[2], "k's num_neighbours"), 3: (k.shape[3], "k's neighbour_len")})
    if k.shape[1] < N // chunk_size:
        raise ValueError(
            f"k has {k.shape[1]} chunks (shape {tuple(k.shape)}), expected at least "
            f"seq_len // chunk_size = {N} // {chunk_size} = {N // chunk_size}")
    _checks.check_mask("neighbour_mask", neighbour_mask, k.shape[:4], _MASK, q.device)


@backend_resolver(OP)
def _backend(backend: str, q: Tensor) -> str:
    """The backend chunked_cross_attention runs for queries q (also resolved_backend's answer)."""
    name = resolve_backend(OP, backend, q.device, SUPPORTED_BACKENDS, _PREFERENCE)
    return triton_or_reference(name, backend, q, op=OP)


def chunked_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int,
                            neighbour_mask: Tensor | None = None, softmax_scale: float | None = None,
                            backend: str = "auto") -> Tensor:
    """RETRO chunked cross-attention (Borgeaud et al. 2021, section 2.4).

    Position t attends to all neighbour tokens of chunk u(t) = (t + 1) // chunk_size - 1 under one
    softmax; positions 0 .. chunk_size-2, and chunks whose neighbour tokens are all masked, give 0.

    Args:
        q: (batch, seq_len, heads, head_dim) decoder queries at their natural positions.
        k, v: (batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim), the encoded
            neighbours of each chunk; num_chunks >= seq_len // chunk_size (extra chunks unused).
        chunk_size: m, tokens per chunk.
        neighbour_mask: optional bool (batch, num_chunks, num_neighbours, neighbour_len),
            True = real token.
        softmax_scale: defaults to head_dim ** -0.5.
        backend: "auto", "reference", "cpu" or "triton".
    Returns:
        (batch, seq_len, heads, head_dim), differentiable in q, k and v, twice and more: a
        backward with create_graph=True runs the reference's backward formulas instead of the fused
        backward kernel, so Hessian-vector products and gradient penalties are right.
    """
    _validate(q, k, v, chunk_size, neighbour_mask)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    name = _backend(backend, q)
    if name == "reference":
        return chunked_cross_attention_reference(q, k, v, chunk_size, neighbour_mask, scale)
    return block_attention(layouts.cca(q, k, v, neighbour_mask, chunk_size), scale, name)
