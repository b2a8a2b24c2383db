"""Block-local attention in plain PyTorch, as layouts.py describes it: the reference the compiled
ops are tested against when called directly (tests/kernels/test_op_boundaries.py), and the backward
formulas that give the fused ops their second derivatives (autograd.py): made of differentiable
PyTorch operations, the gradients they return can be differentiated again."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layouts import lse_dtype


def _group_rows(x: Tensor, q_rows: int, groups: int, prefix_rows: int) -> Tensor:
    """x (B, T, H, D) -> the rows of each group (B, groups, q_rows, H, D), zero-padded past T."""
    rows = x[:, prefix_rows:prefix_rows + groups * q_rows]
    rows = F.pad(rows, (0, 0, 0, 0, 0, groups * q_rows - rows.shape[1]))
    return rows.reshape(x.shape[0], groups, q_rows, *x.shape[2:])


def _ungroup_rows(y: Tensor, rows: int, prefix_rows: int, fill: float = 0.0) -> Tensor:
    """y (B, groups, q_rows, ...) -> (B, rows, ...): group g's row i at prefix_rows + g * q_rows + i,
    `fill` before them and after the last group."""
    flat = y.flatten(1, 2)[:, :rows - prefix_rows]
    before = y.new_full((y.shape[0], prefix_rows, *y.shape[3:]), fill)
    after = y.new_full((y.shape[0], rows - prefix_rows - flat.shape[1], *y.shape[3:]), fill)
    return torch.cat([before, flat, after], dim=1)


def _used(rows: int, q_rows: int, groups: int, prefix_rows: int) -> tuple[int, int]:
    """(q_rows, groups) cut to the rows that exist: the groups that have a row, and q_rows at most
    rows - prefix_rows (a legal q_rows may be far larger, with one group)."""
    rest = rows - prefix_rows
    return min(q_rows, rest), min(groups, -(-rest // q_rows))


def _attention(q: Tensor, k: Tensor, key_mask: Optional[Tensor], q_rows: int, groups: int, prefix_rows: int,
               softmax_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The grouped rows qg (B, G, q_rows, H, D) and keys kg (B, G, keys, H, D) in the accumulation
    dtype, the masked scores and the softmax weights (B, G, H, q_rows, keys), 0 for a group without
    a real key (whose scores are 0, not -inf: no NaN, and nothing flows through them). q_rows and
    groups as _used cuts them (G = kg.shape[1])."""
    acc = lse_dtype(q.dtype)
    q_rows, groups = _used(q.shape[1], q_rows, groups, prefix_rows)
    qg, kg = _group_rows(q.to(acc), q_rows, groups, prefix_rows), k[:, :groups].to(acc)
    scores = torch.einsum("bgihd,bgjhd->bghij", qg, kg) * softmax_scale
    real = torch.ones(kg.shape[:3], dtype=torch.bool, device=q.device) if key_mask is None \
        else key_mask[:, :groups]
    scores = scores.masked_fill(~real[:, :, None, None, :], float("-inf"))
    attended = real.any(-1)[:, :, None, None, None]                      # the group has a real key
    scores = scores.masked_fill(~attended, 0.0)
    return qg, kg, scores, torch.softmax(scores, dim=-1) * attended


def block_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], q_rows: int,
                              groups: int, prefix_rows: int, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """q (B, T, H, D); k, v (B, G, keys, H, D); key_mask (B, G, keys). Row prefix_rows + g * q_rows + i
    attends to the real keys of group g; other rows, and rows whose group has no real key, give 0
    (lse +inf). Returns out like q and lse (B, H, T) in float32 (float64 for float64 inputs)."""
    T = q.shape[1]
    _, _, scores, weights = _attention(q, k, key_mask, q_rows, groups, prefix_rows, softmax_scale)
    out = torch.einsum("bghij,bgjhd->bgihd", weights, v[:, :weights.shape[1]].to(weights.dtype))
    attended = weights.sum(-1) > 0                                       # (B, G, H, q_rows)
    lse = torch.where(attended, torch.logsumexp(scores, dim=-1), float("inf"))
    return (_ungroup_rows(out, T, prefix_rows).to(q.dtype),
            _ungroup_rows(lse.transpose(2, 3), T, prefix_rows, float("inf")).transpose(1, 2))


def block_attention_backward_reference(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                                       q_rows: int, groups: int, prefix_rows: int,
                                       softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (dq, dk, dv), like q, k and v, of <out, grad_out> for out of
    block_attention_reference (the arguments are its own, grad_out like q), by the formulas of the
    fused backward kernels: with P the softmax weights and dP = grad_out V^T,
    dV = P^T grad_out, dS = P * (dP - rowsum(P * dP)), dQ = scale dS K, dK = scale dS^T Q.
    Differentiable in grad_out, q, k and v: the second derivatives of every fused op."""
    qg, kg, _, weights = _attention(q, k, key_mask, q_rows, groups, prefix_rows, softmax_scale)
    dout = _group_rows(grad_out.to(weights.dtype), qg.shape[2], qg.shape[1], prefix_rows)
    dv = torch.einsum("bghij,bgihd->bgjhd", weights, dout)
    dweights = torch.einsum("bgihd,bgjhd->bghij", dout, v[:, :kg.shape[1]].to(weights.dtype))
    dscores = weights * (dweights - (weights * dweights).sum(-1, keepdim=True)) * softmax_scale
    dq = torch.einsum("bghij,bgjhd->bgihd", dscores, kg)
    dk = torch.einsum("bghij,bgihd->bgjhd", dscores, qg)
    unused = (0, 0) * 3 + (0, k.shape[1] - kg.shape[1])                 # key groups without rows get 0
    return (_ungroup_rows(dq, q.shape[1], prefix_rows).to(q.dtype), F.pad(dk, unused).to(k.dtype),
            F.pad(dv, unused).to(v.dtype))
