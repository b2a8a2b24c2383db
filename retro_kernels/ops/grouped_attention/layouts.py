"""How each fused op maps its tensors onto grouped attention (triton_kernels.py), as views.

A GroupedLayout says: query row r = g * q_rows + i of `q` (rows >= q_valid absent) attends to
the `keys` keys of group g in `k`/`v`, masked by `mask`; rows [-prefix_rows, 0) of `q` attend to
nothing. Outputs use the same views: `out`/`dq` like `q`, `dk`/`dv` like `k`, `lse` rows like q.
The C++ CPU kernels do the same mapping in csrc/torch/cpu_ops.cpp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupedLayout:
    q_rows: int       # query rows per group
    q_valid: int      # query rows that exist (per batch element)
    groups: int       # groups that have query rows
    keys: int         # keys per group
    prefix_rows: int  # rows before group 0's first row; they attend to nothing


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cca_layout(q: Tensor, k: Tensor, chunk_size: int) -> GroupedLayout:
    """q (B, N, H, D), k (B, L, K, R, H, D): shifted row r = t - (m - 1) is in chunk r // m."""
    n, m = q.shape[1], chunk_size
    used = n // m
    return GroupedLayout(q_rows=m, q_valid=max(n - m + 1, 0), groups=used,
                         keys=k.shape[2] * k.shape[3], prefix_rows=min(m - 1, n))


def self_layout(q: Tensor) -> GroupedLayout:
    """q/k/v (B, L, K, R, H, D): each neighbour is one group of R rows and R keys."""
    b, l, kk, r = q.shape[:4]
    return GroupedLayout(q_rows=r, q_valid=l * kk * r, groups=l * kk, keys=r, prefix_rows=0)


def cross_layout(q: Tensor, k: Tensor) -> GroupedLayout:
    """q (B, L, K, R, H, D), k (B, L, C, H, D): the K*R neighbour rows of chunk u share its C keys."""
    b, l, kk, r = q.shape[:4]
    return GroupedLayout(q_rows=kk * r, q_valid=l * kk * r, groups=l, keys=k.shape[2], prefix_rows=0)


def as_rows(x: Tensor) -> Tensor:
    """(B, ..., H, D) -> (B, rows, H, D), a view of a contiguous tensor (sizes spelled out, so that
    empty tensors reshape too)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-2]), x.shape[-2], x.shape[-1])


def as_groups(x: Tensor, groups: int, keys: int) -> Tensor:
    """(B, ..., H, D) -> (B, groups, keys, H, D), a view of a contiguous tensor."""
    return x.reshape(x.shape[0], groups, keys, x.shape[-2], x.shape[-1])
