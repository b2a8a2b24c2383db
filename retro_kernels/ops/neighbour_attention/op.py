"""neighbour_self_attention and neighbour_cross_attention: the neighbour encoder's attentions as
fused, differentiable ops (the kernels are those of chunked cross-attention, block_attention/).
Second derivatives are right: a backward with create_graph=True runs the reference's backward
formulas (block_attention/autograd.py)."""
from __future__ import annotations

from torch import Tensor

from .. import _checks
from .._backends import backend_resolver, resolve_backend
from ..block_attention import block_attention, layouts
from ..block_attention.triton_limits import triton_or_reference
from .naive import neighbour_cross_attention_reference, neighbour_self_attention_reference

SUPPORTED_BACKENDS = ("reference", "cpu", "triton")
_PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu",)}
_NEIGHBOURS = "(batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim)"
_CHUNK = "(batch, num_chunks, chunk_len, heads, head_dim)"


def _backend(op: str, backend, q: Tensor) -> str:
    """The backend `op` (either neighbour attention) runs for queries q."""
    name = resolve_backend(op, backend, q.device, SUPPORTED_BACKENDS, _PREFERENCE)
    return triton_or_reference(name, backend, q, op=op)


@backend_resolver("neighbour_self_attention")
def _self_backend(backend: str, q: Tensor) -> str:
    """The backend neighbour_self_attention runs for queries q (also resolved_backend's answer)."""
    return _backend("neighbour_self_attention", backend, q)


@backend_resolver("neighbour_cross_attention")
def _cross_backend(backend: str, q: Tensor) -> str:
    """The backend neighbour_cross_attention runs for queries q (also resolved_backend's answer)."""
    return _backend("neighbour_cross_attention", backend, q)


def neighbour_self_attention(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Tensor | None = None,
                             softmax_scale: float | None = None, backend: str = "auto") -> Tensor:
    """Bidirectional self-attention within each retrieved neighbour.

    Args:
        q, k, v: (batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim).
        neighbour_mask: optional bool (batch, num_chunks, num_neighbours, neighbour_len),
            True = real token. Padding keys are excluded; padding queries still get finite values;
            a neighbour without a real token gives 0.
        softmax_scale: defaults to head_dim ** -0.5.
        backend: "auto", "reference", "cpu" or "triton".
    Returns:
        (batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, x, _NEIGHBOURS, 6)
        _checks.check_like(name, x, "q", q)
    for name, x in (("k", k), ("v", v)):
        _checks.check_sizes(name, x, {i: (q.shape[i], f"q's dimension {i}") for i in range(6)})
    _checks.check_mask("neighbour_mask", neighbour_mask, q.shape[:4],
                       "(batch, num_chunks, num_neighbours, neighbour_len)", q.device)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    name = _self_backend(backend, q)
    if name == "reference":
        return neighbour_self_attention_reference(q, k, v, neighbour_mask, scale)
    return block_attention(layouts.neighbour_self(q, k, v, neighbour_mask), scale, name)


def neighbour_cross_attention(q: Tensor, k: Tensor, v: Tensor, chunk_mask: Tensor | None = None,
                              softmax_scale: float | None = None, backend: str = "auto") -> Tensor:
    """Cross-attention from the neighbour tokens to the decoder states of the chunk that
    retrieved them; the K neighbours of a chunk share its keys/values, which are never copied.

    Args:
        q: (batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim), from neighbour tokens.
        k, v: (batch, num_chunks, chunk_len, heads, head_dim), from the chunk's decoder states.
        chunk_mask: optional bool (batch, num_chunks, chunk_len) for a partial last chunk.
        softmax_scale: defaults to head_dim ** -0.5.
        backend: "auto", "reference", "cpu" or "triton".
    Returns:
        (batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim).
    """
    _checks.check_tensor("q", q, _NEIGHBOURS, 6)
    for name, x in (("k", k), ("v", v)):
        _checks.check_tensor(name, x, _CHUNK, 5)
        _checks.check_like(name, x, "q", q)
    B, L, _, _, H, D = q.shape
    expected = {0: (B, "q's batch"), 1: (L, "q's num_chunks"), 3: (H, "q's heads"), 4: (D, "q's head_dim")}
    _checks.check_sizes("k", k, expected)
    _checks.check_sizes("v", v, {**expected, 2: (k.shape[2], "k's chunk_len")})
    _checks.check_mask("chunk_mask", chunk_mask, k.shape[:3], "(batch, num_chunks, chunk_len)", q.device)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    name = _cross_backend(backend, q)
    if name == "reference":
        return neighbour_cross_attention_reference(q, k, v, chunk_mask, scale)
    return block_attention(layouts.neighbour_cross(q, k, v, chunk_mask), scale, name)
