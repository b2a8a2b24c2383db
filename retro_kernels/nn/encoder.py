"""RetroEncoder: the bidirectional neighbour encoder of RETRO (paper section 2.4, docs/semantics.md, "Encoder").

Each retrieved neighbour (r tokens) is encoded by pre-norm blocks of self-attention within the
neighbour, then (in `cross_attend_layers`) cross-attention to the decoder states H_u of the chunk
that retrieved it, then a feed-forward. The K neighbours of chunk u share H_u: the fused
neighbour_cross_attention op reads it once per chunk, never a K-fold copy.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops.neighbour_attention import neighbour_cross_attention, neighbour_self_attention
from .rotary import apply_rotary, rotary_table


def _rotate(x: Tensor, base: float) -> Tensor:
    """x (..., n, heads, head_dim) at positions 0 .. n-1 -> rotated x."""
    cos, sin = rotary_table(x.shape[-3], x.shape[-1], base, x.device, torch.promote_types(x.dtype, torch.float32))
    return apply_rotary(x, cos[:, None], sin[:, None])


class NeighbourSelfAttention(nn.Module):
    """(B, L, K, R, dim) -> (B, L, K, R, dim): attention within each neighbour; rotary position of
    token i is i."""

    def __init__(self, dim, heads, head_dim, rotary=True, backend="auto", rotary_base=10000.0):
        super().__init__()
        self.heads, self.head_dim, self.rotary, self.backend, self.base = heads, head_dim, rotary, backend, rotary_base
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, neighbour_mask: Tensor | None = None) -> Tensor:
        shape = x.shape[:-1] + (self.heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in self.to_qkv(x).chunk(3, dim=-1))
        if self.rotary:
            q, k = _rotate(q, self.base), _rotate(k, self.base)
        out = neighbour_self_attention(q, k, v, neighbour_mask, backend=self.backend)
        return self.to_out(out.reshape(x.shape[:-1] + (-1,)))


class NeighbourCrossAttention(nn.Module):
    """x (B, L, K, R, dim), chunk states (B, L, C, context_dim) -> (B, L, K, R, dim). Rotary:
    neighbour token i' at i', chunk token j at j, so scores depend on their relative distance."""

    def __init__(self, dim, context_dim, heads, head_dim, rotary=True, backend="auto", rotary_base=10000.0):
        super().__init__()
        self.heads, self.head_dim, self.rotary, self.backend, self.base = heads, head_dim, rotary, backend, rotary_base
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(context_dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(context_dim, heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, chunk_states: Tensor, chunk_mask: Tensor | None = None) -> Tensor:
        q = self.to_q(x).reshape(x.shape[:-1] + (self.heads, self.head_dim))
        kv_shape = chunk_states.shape[:-1] + (self.heads, self.head_dim)
        k, v = self.to_k(chunk_states).reshape(kv_shape), self.to_v(chunk_states).reshape(kv_shape)
        if self.rotary:
            q = _rotate(q, self.base)
            k = _rotate(k, self.base)
        out = neighbour_cross_attention(q, k, v, chunk_mask, backend=self.backend)
        return self.to_out(out.reshape(x.shape[:-1] + (-1,)))


class FeedForward(nn.Sequential):
    """dim -> hidden (default mult * dim) -> GELU -> dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, hidden: int | None = None):
        hidden = hidden or mult * dim
        _checks.check_positive_int("hidden", hidden)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class RetroEncoderLayer(nn.Module):
    def __init__(self, dim, context_dim, heads, head_dim, cross_attend, rotary, backend, ff_mult, dropout):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = NeighbourSelfAttention(dim, heads, head_dim, rotary, backend)
        self.cross_norm = nn.LayerNorm(dim) if cross_attend else None
        self.cross_attn = (NeighbourCrossAttention(dim, context_dim, heads, head_dim, rotary, backend)
                           if cross_attend else None)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, chunk_states, neighbour_mask, chunk_mask):
        x = x + self.dropout(self.self_attn(self.self_norm(x), neighbour_mask))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), chunk_states, chunk_mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class RetroEncoder(nn.Module):
    """RETRO's neighbour encoder.

    forward(neighbours, chunk_states, neighbour_mask=None, chunk_mask=None):
        neighbours   (batch, chunks, k, r, dim)  embedded neighbour tokens [chunk, continuation]
        chunk_states (batch, chunks, m, context_dim)  decoder states H_u of each chunk (unshifted)
        neighbour_mask optional bool (batch, chunks, k, r); chunk_mask optional bool (batch, chunks, m)
        -> encoded neighbours (batch, chunks, k, r, dim), after a final LayerNorm.

    Second derivatives are right on every backend, as for ChunkedCrossAttention: a backward with
    create_graph=True runs the attentions' backward through the reference formulas.
    """

    def __init__(self, dim: int, depth: int = 2, heads: int = 8, head_dim: int = 64, context_dim: int | None = None,
                 cross_attend_layers=(0,), rotary: bool = True, ff_mult: int = 4, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads), ("head_dim", head_dim)):
            _checks.check_positive_int(name, value)
        bad = [i for i in cross_attend_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"cross_attend_layers must index layers 0 .. {depth - 1}, "
                             f"got {tuple(cross_attend_layers)}")
        if rotary and head_dim % 2:
            raise ValueError(f"rotary=True needs an even head_dim, got head_dim={head_dim}")
        self.dim, self.context_dim = dim, context_dim or dim
        self.layers = nn.ModuleList(
            RetroEncoderLayer(dim, self.context_dim, heads, head_dim, i in cross_attend_layers, rotary, backend,
                              ff_mult, dropout) for i in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, neighbours: Tensor, chunk_states: Tensor, neighbour_mask: Tensor | None = None,
                chunk_mask: Tensor | None = None) -> Tensor:
        _checks.check_tensor("neighbours", neighbours, "(batch, chunks, k, r, dim)", 5)
        _checks.check_tensor("chunk_states", chunk_states, "(batch, chunks, m, context_dim)", 4)
        _checks.check_sizes("neighbours", neighbours, {4: (self.dim, "the encoder's dim")})
        _checks.check_sizes("chunk_states", chunk_states, {0: (neighbours.shape[0], "neighbours' batch"),
                                                           1: (neighbours.shape[1], "neighbours' chunks"),
                                                           3: (self.context_dim, "the encoder's context_dim")})
        _checks.check_mask("neighbour_mask", neighbour_mask, neighbours.shape[:4], "(batch, chunks, k, r)",
                           neighbours.device)
        _checks.check_mask("chunk_mask", chunk_mask, chunk_states.shape[:3], "(batch, chunks, m)", neighbours.device)
        x = neighbours
        for layer in self.layers:
            x = layer(x, chunk_states, neighbour_mask, chunk_mask)
        return self.norm(x)
