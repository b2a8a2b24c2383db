"""ChunkedCrossAttention: the drop-in RETRO CCA layer (projections, rotary positions, the fused op)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops.cca import chunked_cross_attention
from .rotary import apply_rotary, cca_query_positions, rotary_angles


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class ChunkedCrossAttention(nn.Module):
    """RETRO chunked cross-attention (SPEC "Chunked cross-attention") as a layer.

    forward(x, neighbours, neighbour_mask=None):
        x          (batch, seq_len, dim) decoder states at their natural positions
        neighbours (batch, num_chunks, num_neighbours, neighbour_len, context_dim) encoded neighbours
        neighbour_mask optional bool (batch, num_chunks, num_neighbours, neighbour_len)
        -> (batch, seq_len, dim); positions 0 .. chunk_size-2 get exactly 0.
    With rotary=True, the query at window offset i sits at rotary position chunk_size-1+i and
    neighbour token i' at i' (paper eq. 6).
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 64, chunk_size: int = 64,
                 context_dim: int | None = None, rotary: bool = True, backend: str = "auto",
                 rotary_base: float = 10000.0):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("head_dim", head_dim), ("chunk_size", chunk_size)):
            _checks.check_positive_int(name, value)
        if rotary and head_dim % 2:
            raise ValueError(f"rotary=True needs an even head_dim, got head_dim={head_dim}")
        self.dim, self.heads, self.head_dim, self.chunk_size = dim, heads, head_dim, chunk_size
        self.context_dim = context_dim or dim
        self.rotary, self.rotary_base, self.backend = rotary, rotary_base, backend
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _check(self, x, neighbours, neighbour_mask) -> None:
        _checks.check_tensor("x", x, "(batch, seq_len, dim)", 3)
        _checks.check_tensor("neighbours", neighbours,
                             "(batch, num_chunks, num_neighbours, neighbour_len, context_dim)", 5)
        _checks.check_sizes("x", x, {2: (self.dim, "the layer's dim")})
        _checks.check_sizes("neighbours", neighbours, {0: (x.shape[0], "x's batch"),
                                                       4: (self.context_dim, "the layer's context_dim")})
        _checks.check_mask("neighbour_mask", neighbour_mask, neighbours.shape[:4],
                           "(batch, num_chunks, num_neighbours, neighbour_len)", x.device)

    def project_neighbours(self, neighbours: Tensor) -> tuple[Tensor, Tensor]:
        """neighbours (..., neighbour_len, context_dim) -> rotated keys and values
        (..., neighbour_len, heads, head_dim). Decoding caches these once per chunk."""
        shape = neighbours.shape[:-1] + (self.heads, self.head_dim)
        k = self.to_k(neighbours).view(shape)
        v = self.to_v(neighbours).view(shape)
        if self.rotary:
            positions = torch.arange(neighbours.shape[-2], device=neighbours.device)
            cos, sin = rotary_angles(positions, self.head_dim, self.rotary_base, _work_dtype(k))
            k = apply_rotary(k, cos[:, None], sin[:, None])
        return k, v

    def project_queries(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (batch, n, dim) at sequence positions (n,) -> rotated queries (batch, n, heads, head_dim)."""
        q = self.to_q(x).view(x.shape[0], x.shape[1], self.heads, self.head_dim)
        if self.rotary:
            rot = cca_query_positions(positions, self.chunk_size)
            cos, sin = rotary_angles(rot, self.head_dim, self.rotary_base, _work_dtype(q))
            q = apply_rotary(q, cos[:, None], sin[:, None])
        return q

    def forward(self, x: Tensor, neighbours: Tensor, neighbour_mask: Tensor | None = None) -> Tensor:
        self._check(x, neighbours, neighbour_mask)
        B, N, _ = x.shape
        q = self.project_queries(x, torch.arange(N, device=x.device))
        k, v = self.project_neighbours(neighbours)
        out = chunked_cross_attention(q, k, v, chunk_size=self.chunk_size, neighbour_mask=neighbour_mask,
                                      backend=self.backend)
        return self.to_out(out.reshape(B, N, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}, "
                f"context_dim={self.context_dim}, rotary={self.rotary}, backend={self.backend!r}")
