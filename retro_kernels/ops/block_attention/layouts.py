"""The one description of each attention problem, which every backend runs.

Block-local attention: the query rows fall into consecutive blocks of `q_rows` rows, and the rows
of block g attend, under one softmax, to the keys of key group g only:

    q         (batch, rows, heads, head_dim), rows = prefix_rows + q_valid
    k, v      (batch, key_groups, keys, heads, head_dim), key_groups >= groups
    key_mask  (batch, key_groups, keys) bool, True = real key (optional)
    row prefix_rows + g * q_rows + i  attends to  key group g       (g < groups)
    rows 0 .. prefix_rows - 1         attend to nothing (out 0, lse +inf)

(Not grouped-query attention: every head has its own keys; "block" is a block of rows and the
key group it sees.) A BlockProblem is that description as contiguous views of the caller's
tensors plus the three integers; the C++ op (torch.ops.retro_kernels.block_attention_fwd), the
Triton op (block_attention_fwd_triton) and the CUDA decode op take exactly these arguments, check
them against each other and derive every position from them. How each public op maps onto it is
written here and nowhere else:

    chunked cross-attention   position t = m - 1 + r, shifted row r in chunk r // m: q_rows = m,
                              prefix_rows = m - 1, groups = seq_len // m, keys = K * R per chunk
    neighbour self-attention  each neighbour is a group of its R rows and its R keys
    neighbour cross-attention the K * R rows of chunk u's neighbours share the chunk's C keys
    decoding                  one query row per key group (block_attention_decode)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockProblem:
    q: Tensor                   # (batch, rows, heads, head_dim), contiguous
    k: Tensor                   # (batch, key_groups, keys, heads, head_dim), contiguous
    v: Tensor                   # like k
    key_mask: Optional[Tensor]  # (batch, key_groups, keys) bool, contiguous
    q_rows: int                 # query rows per group
    groups: int                 # key groups that have query rows
    prefix_rows: int            # rows before group 0; they attend to nothing
    out_shape: tuple            # the caller's shape of q (and of the output)

    @property
    def args(self) -> tuple:
        """The op arguments before softmax_scale: q, k, v, key_mask, q_rows, groups, prefix_rows."""
        return self.q, self.k, self.v, self.key_mask, self.q_rows, self.groups, self.prefix_rows


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype, which is lse's."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: Tensor) -> Tensor:
    """(B, ..., H, D) -> (B, rows, H, D), a view of a contiguous tensor (sizes spelled out, so
    that empty tensors reshape too)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-2]), x.shape[-2], x.shape[-1])


def _groups(x: Tensor, groups: int, keys: int) -> Tensor:
    """(B, ..., H, D) -> (B, groups, keys, H, D), a view of a contiguous tensor."""
    return x.reshape(x.shape[0], groups, keys, x.shape[-2], x.shape[-1])


def _mask(mask: Optional[Tensor], groups: int, keys: int) -> Optional[Tensor]:
    return None if mask is None else mask.contiguous().reshape(mask.shape[0], groups, keys)


def cca(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor], chunk_size: int) -> BlockProblem:
    """q (B, N, H, D); k, v (B, L, K, R, H, D) with L >= N // chunk_size; mask (B, L, K, R).
    Position t attends chunk (t + 1) // m - 1: shifted row r = t - (m - 1) is in chunk r // m."""
    n, m = q.shape[1], chunk_size
    b, l, kk, r = k.shape[:4]
    return BlockProblem(q.contiguous(), _groups(k.contiguous(), l, kk * r), _groups(v.contiguous(), l, kk * r),
                        _mask(neighbour_mask, l, kk * r), q_rows=m, groups=n // m,
                        prefix_rows=min(m - 1, n), out_shape=tuple(q.shape))


def neighbour_self(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor]) -> BlockProblem:
    """q, k, v (B, L, K, R, H, D); mask (B, L, K, R): each neighbour is a group of R rows, R keys."""
    b, l, kk, r = q.shape[:4]
    return BlockProblem(_rows(q.contiguous()), _groups(k.contiguous(), l * kk, r), _groups(v.contiguous(), l * kk, r),
                        _mask(neighbour_mask, l * kk, r), q_rows=r, groups=l * kk, prefix_rows=0,
                        out_shape=tuple(q.shape))


def neighbour_cross(q: Tensor, k: Tensor, v: Tensor, chunk_mask: Optional[Tensor]) -> BlockProblem:
    """q (B, L, K, R, H, D); k, v (B, L, C, H, D); mask (B, L, C): the K * R rows of chunk u's
    neighbours are group u and share its C keys (never copied)."""
    b, l, kk, r = q.shape[:4]
    return BlockProblem(_rows(q.contiguous()), k.contiguous(), v.contiguous(),
                        None if chunk_mask is None else chunk_mask.contiguous(),
                        q_rows=kk * r, groups=l, prefix_rows=0, out_shape=tuple(q.shape))


def decode(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor]) -> BlockProblem:
    """q (B, H, D); k, v (B, K, R, H, D); mask (B, K, R): one step of CCA decoding, the token's
    one query row attends the K * R neighbour tokens of its chunk: one key group of one row."""
    b, kk, r = k.shape[:3]
    return BlockProblem(q.contiguous().reshape(b, 1, q.shape[1], q.shape[2]), _groups(k.contiguous(), 1, kk * r),
                        _groups(v.contiguous(), 1, kk * r), _mask(neighbour_mask, 1, kk * r),
                        q_rows=1, groups=1, prefix_rows=0, out_shape=tuple(q.shape))
