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

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class BlockProblem(NamedTuple):
    q: Tensor                   # (batch, rows, heads, head_dim), contiguous
    k: Tensor                   # (batch, key_groups, keys, heads, head_dim), contiguous
    v: Tensor                   # like k
    key_mask: Optional[Tensor]  # (batch, key_groups, keys) bool, contiguous
    q_rows: int                 # query rows per group
    groups: int                 # key groups that have query rows
    prefix_rows: int            # rows before group 0; they attend to nothing
    out_shape: Optional[torch.Size] = None  # the caller's shape of q (and of the output) if not q's

    @property
    def args(self) -> tuple:
        """The op arguments before softmax_scale: q, k, v, key_mask, q_rows, groups, prefix_rows."""
        return self[:7]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype, which is lse's."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The views below are of contiguous tensors (flatten of a contiguous tensor is a view), and cost
# one dispatcher call each: these functions run on every call of the public ops.


def cca(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor], chunk_size: int) -> BlockProblem:
    """q (B, N, H, D); k, v (B, L, K, R, H, D) with L >= N // chunk_size; mask (B, L, K, R).
    Position t attends chunk (t + 1) // m - 1: shifted row r = t - (m - 1) is in chunk r // m; the
    K neighbours of a chunk are one key group of K * R keys."""
    n, m = q.shape[1], chunk_size
    return BlockProblem(q.contiguous(), k.contiguous().flatten(2, 3), v.contiguous().flatten(2, 3),
                        None if neighbour_mask is None else neighbour_mask.contiguous().flatten(2, 3),
                        m, n // m, min(m - 1, n))


def neighbour_self(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor]) -> BlockProblem:
    """q, k, v (B, L, K, R, H, D); mask (B, L, K, R): each neighbour is a group of R rows, R keys."""
    _, l, kk, r = q.shape[:4]
    return BlockProblem(q.contiguous().flatten(1, 3), k.contiguous().flatten(1, 2), v.contiguous().flatten(1, 2),
                        None if neighbour_mask is None else neighbour_mask.contiguous().flatten(1, 2),
                        r, l * kk, 0, q.shape)


def neighbour_cross(q: Tensor, k: Tensor, v: Tensor, chunk_mask: Optional[Tensor]) -> BlockProblem:
    """q (B, L, K, R, H, D); k, v (B, L, C, H, D); mask (B, L, C): the K * R rows of chunk u's
    neighbours are group u and share its C keys (never copied)."""
    _, l, kk, r = q.shape[:4]
    return BlockProblem(q.contiguous().flatten(1, 3), k.contiguous(), v.contiguous(),
                        None if chunk_mask is None else chunk_mask.contiguous(), kk * r, l, 0, q.shape)


def decode(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor]) -> BlockProblem:
    """q (B, H, D); k, v (B, K, R, H, D); mask (B, K, R): one step of CCA decoding, the token's
    one query row attends the K * R neighbour tokens of its chunk: one key group of one row."""
    return BlockProblem(q.contiguous().unsqueeze(1), k.contiguous().flatten(1, 2).unsqueeze(1),
                        v.contiguous().flatten(1, 2).unsqueeze(1),
                        None if neighbour_mask is None else neighbour_mask.contiguous().flatten(1, 2).unsqueeze(1),
                        1, 1, 0, q.shape)
