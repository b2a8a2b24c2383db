"""ChunkedCrossAttention: the drop-in RETRO CCA layer (projections, rotary positions, the fused op)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops.cca import chunked_cross_attention
from ..ops.cca_decode import chunked_cross_attention_decode
from .rotary import apply_rotary, cca_query_positions, rotary_table


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class ChunkedCrossAttention(nn.Module):
    """RETRO chunked cross-attention (docs/semantics.md, "Chunked cross-attention") as a layer.

    forward(x, neighbours, neighbour_mask=None):
        x          (batch, seq_len, dim) decoder states at their natural positions
        neighbours (batch, num_chunks, num_neighbours, neighbour_len, context_dim) encoded neighbours
        neighbour_mask optional bool (batch, num_chunks, num_neighbours, neighbour_len)
        -> (batch, seq_len, dim); positions 0 .. chunk_size-2 get exactly 0.
    With rotary=True, the query at window offset i sits at rotary position chunk_size-1+i and
    neighbour token i' at i' (paper eq. 6).

    qk_norm=True normalises each head's queries and keys to unit length and scales the scores by a
    learned gain per head (initial value qk_gain) instead of head_dim ** -0.5: attention over the
    k * r neighbour tokens can then sharpen from the first steps, which makes the layer learn to
    read its neighbours much sooner (see benchmarks/results/retrieval_learning-*.md).

    smear_keys=True mixes each neighbour token's key with the key of the token before it (a learned
    share per head, Olsson et al. 2022's "smeared keys"), so a query can find "the token after the
    one I am at" in one step: the circuit that copies from a neighbour needs no earlier layer to
    learn a shift first.

    step(x, positions, k, v, neighbour_mask): one token per sequence against cached neighbour
    keys/values (from project_neighbours) -> (batch, 1, dim), for incremental decoding.

    Second derivatives (Hessian-vector products, gradient penalties, gradgradcheck) are right on
    every backend: a backward with create_graph=True runs the attention's backward through the
    reference formulas instead of the fused backward kernel (a plain backward stays fused).
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 64, chunk_size: int = 64,
                 context_dim: int | None = None, rotary: bool = True, backend: str = "auto",
                 rotary_base: float = 10000.0, qk_norm: bool = False, qk_gain: float = 10.0,
                 smear_keys: bool = False):
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
        self.qk_norm = qk_norm
        self.qk_gain = nn.Parameter(torch.full((heads,), float(qk_gain))) if qk_norm else None
        self.smear_keys = smear_keys
        self.smear = nn.Parameter(torch.zeros(heads)) if smear_keys else None  # sigmoid(0) = half

    def _check(self, x, neighbours, neighbour_mask) -> None:
        _checks.check_tensor("x", x, "(batch, seq_len, dim)", 3)
        _checks.check_tensor("neighbours", neighbours,
                             "(batch, num_chunks, num_neighbours, neighbour_len, context_dim)", 5)
        _checks.check_sizes("x", x, {2: (self.dim, "the layer's dim")})
        _checks.check_sizes("neighbours", neighbours, {0: (x.shape[0], "x's batch"),
                                                       4: (self.context_dim, "the layer's context_dim")})
        _checks.check_mask("neighbour_mask", neighbour_mask, neighbours.shape[:4],
                           "(batch, num_chunks, num_neighbours, neighbour_len)", x.device)

    @property
    def softmax_scale(self) -> float | None:
        """The scale the op applies to q.k: 1 with qk_norm (the gain is in the queries), else the default."""
        return 1.0 if self.qk_norm else None

    def project_neighbours(self, neighbours: Tensor) -> tuple[Tensor, Tensor]:
        """neighbours (..., neighbour_len, context_dim) -> rotated keys and values
        (..., neighbour_len, heads, head_dim). Decoding caches these once per chunk."""
        shape = neighbours.shape[:-1] + (self.heads, self.head_dim)
        k = self.to_k(neighbours).view(shape)
        v = self.to_v(neighbours).view(shape)
        if self.smear_keys:  # k_j <- (1 - a) k_j + a k_{j-1}, a = sigmoid(smear) per head
            previous = nn.functional.pad(k, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]  # k_{j-1}, zero before the first
            a = torch.sigmoid(self.smear).to(k.dtype)[:, None]
            k = k + a * (previous - k)
        if self.qk_norm:  # autocast runs the norm in float32: back to the projection's dtype
            k = nn.functional.normalize(k, dim=-1).to(v.dtype)
        if self.rotary:  # neighbour token i' at rotary position i'
            cos, sin = rotary_table(k.shape[-3], self.head_dim, self.rotary_base, k.device, _work_dtype(k))
            k = apply_rotary(k, cos[:, None], sin[:, None])
        return k, v

    def project_queries(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (batch, n, dim) at sequence positions (n,) or (batch, n) -> rotated queries
        (batch, n, heads, head_dim)."""
        q = self.to_q(x).view(x.shape[0], x.shape[1], self.heads, self.head_dim)
        if self.qk_norm:
            q = (nn.functional.normalize(q, dim=-1) * self.qk_gain[:, None]).to(q.dtype)
        if self.rotary:
            rot = cca_query_positions(positions, self.chunk_size)  # in m-1 .. 2m-2
            cos, sin = rotary_table(2 * self.chunk_size - 1, self.head_dim, self.rotary_base, q.device, _work_dtype(q))
            q = apply_rotary(q, cos[rot][..., None, :], sin[rot][..., None, :])
        return q

    def forward(self, x: Tensor, neighbours: Tensor, neighbour_mask: Tensor | None = None) -> Tensor:
        self._check(x, neighbours, neighbour_mask)
        B, N, _ = x.shape
        q = self.project_queries(x, torch.arange(N, device=x.device))
        k, v = self.project_neighbours(neighbours)
        out = chunked_cross_attention(q, k, v, chunk_size=self.chunk_size, neighbour_mask=neighbour_mask,
                                      softmax_scale=self.softmax_scale, backend=self.backend)
        return self.to_out(out.reshape(B, N, self.heads * self.head_dim))

    def step(self, x: Tensor, positions: Tensor, k: Tensor, v: Tensor, neighbour_mask: Tensor | None = None) -> Tensor:
        """One token per sequence, each at its own position: x (batch, 1, dim) at sequence positions
        (batch,); k, v (batch, K, R, heads, head_dim) from project_neighbours for the chunk each
        position attends; neighbour_mask (batch, K, R) -> (batch, 1, dim). A position before its
        sequence's first complete chunk (0 .. chunk_size-2) must come with an all-False mask (output 0).
        Shapes only, no data-dependent branch: torch.compile captures it whole."""
        _checks.check_tensor("x", x, "(batch, 1, dim)", 3)
        if x.shape[1] != 1:
            raise ValueError(f"step: x must hold one token per sequence, got shape {tuple(x.shape)}")
        if positions.shape != x.shape[:1]:
            raise ValueError(f"step: positions must have shape (batch,) = {tuple(x.shape[:1])}, "
                             f"got {tuple(positions.shape)}")
        q = self.project_queries(x, positions[:, None])[:, 0]
        out = chunked_cross_attention_decode(q, k.to(q.dtype), v.to(q.dtype), neighbour_mask,
                                             softmax_scale=self.softmax_scale, backend=self.decode_backend)
        return self.to_out(out.reshape(x.shape[0], 1, -1))

    @property
    def decode_backend(self) -> str:
        """The decode op's backend for this layer's: the same where the decode op has it (reference,
        cpu, cuda), else "auto" (triton: the CUDA decode kernel)."""
        return self.backend if self.backend in ("reference", "cpu", "cuda") else "auto"

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}, "
                f"context_dim={self.context_dim}, rotary={self.rotary}, qk_norm={self.qk_norm}, "
                f"smear_keys={self.smear_keys}, backend={self.backend!r}")
