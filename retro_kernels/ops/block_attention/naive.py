"""Block-local attention in plain PyTorch, as layouts.py describes it: the reference the compiled
ops are tested against when called directly (tests/test_op_boundaries.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def block_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], q_rows: int,
                              groups: int, prefix_rows: int, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """q (B, T, H, D); k, v (B, G, keys, H, D); key_mask (B, G, keys). Row prefix_rows + g * q_rows + i
    attends to the real keys of group g; other rows, and rows whose group has no real key, give 0
    (lse +inf). Returns out like q and lse (B, H, T) in float32 (float64 for float64 inputs)."""
    B, T, H, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q)
    lse = torch.full((B, H, T), float("inf"), dtype=acc, device=q.device)
    for g in range(groups):
        lo = prefix_rows + g * q_rows
        if lo >= T:
            break
        hi = min(T, lo + q_rows)
        scores = torch.einsum("bihd,bjhd->bhij", q[:, lo:hi].to(acc), k[:, g].to(acc)) * softmax_scale
        real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=q.device) if key_mask is None \
            else key_mask[:, g]
        scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
        attended = real.any(-1)[:, None, None, None]                      # the group has a real key
        scores = scores.masked_fill(~attended, 0.0)
        weights = torch.softmax(scores, dim=-1) * attended
        out[:, lo:hi] = torch.einsum("bhij,bjhd->bihd", weights, v[:, g].to(acc)).to(q.dtype)
        lse[:, :, lo:hi] = torch.where(attended[..., 0], torch.logsumexp(scores, dim=-1), float("inf"))
    return out, lse
