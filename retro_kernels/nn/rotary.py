"""Rotary position embeddings (Su et al. 2021), half-split layout: the first and second halves of
head_dim form the rotated pairs."""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, head_dim: int, base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """positions (...) integer -> cos, sin of shape (..., head_dim) in dtype (computed in float64).
    The reference of the tables: the layers read rotary_table instead."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# (head_dim, base, device, dtype) -> (cos, sin) of positions 0 .. capacity-1; capacity a power of two
_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def rotary_table(length: int, head_dim: int, base: float = 10000.0, device=None,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin (length, head_dim) of positions 0 .. length-1, equal to rotary_angles(arange(length)).
    Computed once (in float64) per head_dim, base, device and dtype for the longest length asked so
    far, rounded up to a power of two, and sliced (gpt-fast keeps one such table per model). Under
    torch.compile the table is traced instead, so the compiler fuses it into its use."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return rotary_angles(torch.arange(length, device=device), head_dim, base, dtype)
    key = (head_dim, float(base), device, dtype)
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        capacity = max(64, 1 << max(length - 1, 0).bit_length())
        table = _TABLES[key] = rotary_angles(torch.arange(capacity, device=device), head_dim, base, dtype)
    return table[0][:length], table[1][:length]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., heads, head_dim); cos, sin broadcastable to (..., 1, head_dim) -> rotated x in x's
    dtype (computed in float32, or float64 for float64 x)."""
    work = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    xw = x.to(work)
    x1, x2 = xw[..., :half], xw[..., half:]
    c, s = cos[..., :half].to(work), sin[..., :half].to(work)  # both halves of the tables are equal
    # (x1, x2) -> (x1 c - x2 s, x2 c + x1 s): the pairs rotated, without building rotate_half(x)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def cca_query_positions(positions: Tensor, chunk_size: int) -> Tensor:
    """Rotary positions of CCA queries at sequence positions t (docs/semantics.md, paper eq. 6): the i-th query
    of chunk u's attending window (t = u*m + m-1 + i) sits at m-1+i, i.e. (t + 1) % m + m - 1.
    Neighbour token i' sits at i', so the relative distance is d(i, i') = i - i' + m - 1."""
    return (positions + 1) % chunk_size + chunk_size - 1
