"""The decoding caches: passive, preallocated storage written in place (the model computes what
goes in). KVCache: self-attention keys/values of one layer; NeighbourCache: what CCA reads while
decoding; DecodeState: all of a batch's caches and positions."""
from __future__ import annotations

import torch
from torch import Tensor

from ..base.checks import MAX_NEIGHBOURS


class KVCache:
    """Self-attention keys/values k, v (batch, heads, max_len, head_dim)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len

    def write(self, k: Tensor, v: Tensor, positions: Tensor | None = None) -> None:
        """positions None (a prefill): k, v (batch, heads, n, head_dim) of positions 0 .. n-1 of
        every row. positions (batch,) (a step): k, v (batch, heads, 1, head_dim), one token per row."""
        if positions is None:
            n = k.shape[2]
            self.k[:, :, :n], self.v[:, :, :n] = k, v
        else:
            rows = torch.arange(len(positions), device=positions.device)
            self.k[rows, :, positions], self.v[rows, :, positions] = k[:, :, 0], v[:, :, 0]


class NeighbourCache:
    """What CCA reads while decoding, for `batch` sequences: chunk_states (batch, m, hidden), the
    first CCA layer's states of each sequence's chunk in progress (the encoder's input when it
    completes); per CCA layer i, kv[i] = keys, values (batch, K, R, heads, head_dim) of the
    neighbours the next positions attend, and their mask (batch, K, R) (all False before a
    sequence's first chunk completes: CCA then adds 0)."""

    def __init__(self, layer_heads: dict[int, tuple[int, int]], batch: int, chunk_size: int, hidden: int,
                 num_neighbours: int, neighbour_len: int, device, dtype):
        """layer_heads: CCA layer index -> (heads, head_dim)."""
        if isinstance(num_neighbours, bool) or not isinstance(num_neighbours, int) or \
                not 1 <= num_neighbours <= MAX_NEIGHBOURS:
            raise ValueError(f"num_neighbours must be an int in [1, {MAX_NEIGHBOURS}], got {num_neighbours!r}")
        self.chunk_size = chunk_size
        self.chunk_states = torch.zeros(batch, chunk_size, hidden, device=device, dtype=dtype)
        self.kv = {}
        for i, (heads, head_dim) in layer_heads.items():
            shape = (batch, num_neighbours, neighbour_len, heads, head_dim)
            self.kv[i] = (torch.zeros(shape, device=device, dtype=dtype),
                          torch.zeros(shape, device=device, dtype=dtype))
        self.mask = torch.zeros((batch, num_neighbours, neighbour_len), dtype=torch.bool, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.chunk_states, self.mask] + [t for kv in self.kv.values() for t in kv]

    def read(self, i: int, rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """CCA layer i's cached keys, values and mask (of `rows`, default all)."""
        if rows is None:  # the tensors themselves (no views to make at every step)
            return self.kv[i][0], self.kv[i][1], self.mask
        return self.kv[i][0][rows], self.kv[i][1][rows], self.mask[rows]

    def store(self, rows: Tensor, kv: dict[int, tuple[Tensor, Tensor]], mask: Tensor) -> None:
        """For `rows` (b,): each CCA layer's keys, values (b, K, R, heads, head_dim) and the mask (b, K, R)."""
        for i, (k, v) in kv.items():
            self.kv[i][0].index_copy_(0, rows, k.to(self.kv[i][0].dtype))
            self.kv[i][1].index_copy_(0, rows, v.to(self.kv[i][1].dtype))
        self.mask.index_copy_(0, rows, mask)

    def record(self, positions: Tensor, h: Tensor, rows: Tensor | None = None) -> None:
        """h (b, hidden): the states of the tokens at positions (b,) of `rows` (default all) into their
        chunk in progress."""
        rows = torch.arange(len(positions), device=positions.device) if rows is None else rows
        self.chunk_states[rows, positions % self.chunk_size] = h.to(self.chunk_states.dtype)


class DecodeState:
    """A batch being decoded, preallocated for `batch` sequences of max_len tokens: pos (batch,)
    each sequence's next position, self_attn[i] layer i's KVCache, neighbour_cache."""

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, depth: int,
                 neighbour_cache: NeighbourCache, device, dtype):
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.self_attn = [KVCache(batch, heads, max_len, head_dim, device, dtype) for _ in range(depth)]
        self.neighbour_cache = neighbour_cache
        self.ticket = 0  # compiled decoding: which new_state() handed this set of caches out last

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def tensors(self) -> list[Tensor]:
        """Every cache tensor (positions, self-attention keys/values, the neighbour cache)."""
        return [self.pos] + [t for kv in self.self_attn for t in (kv.k, kv.v)] + self.neighbour_cache.tensors()

    def put_row(self, row: int, other: "DecodeState") -> None:
        """Row `row` of these caches becomes row 0 of `other` (a one-row state, e.g. just prefilled,
        whose caches may be shorter): its positions past other's length are zeroed. How a request
        joins a batch already decoding (retro serve's scheduler)."""
        for dst, src in zip(self.tensors(), other.tensors()):
            if dst.dim() == 4 and dst.shape[2] != src.shape[2]:  # self-attention keys/values (B, H, T, D)
                n = src.shape[2]
                dst[row, :, :n] = src[0]
                dst[row, :, n:] = 0
            else:
                dst[row] = src[0]

    def reset(self) -> None:
        """Empties the caches in place (their addresses stay): as a new state of the same shapes."""
        for t in self.tensors():
            t.zero_()

    def mark_static(self) -> None:
        """Tells torch.compile these tensors keep their addresses, so CUDA graphs may write them in
        place (unguarded: never a recompile; compiled decoding reuses this state per shape, so the
        graphs are recorded once)."""
        for t in self.tensors():
            torch._dynamo.mark_static_address(t, guard=False)
