"""Launchers for the grouped-attention Triton kernels (triton_kernels.py).

q-like tensors are (B, T, H, D) with T = prefix_rows + rows; k-like tensors are
(B, G, keys, H, D); all contiguous. On a GPU the kernels autotune over a small space
(RETRO_TRITON_AUTOTUNE=0 keeps one default configuration, for quick test runs); under
TRITON_INTERPRET=1 (CPU tests) a single small configuration runs, with row blocks of 16 so that
the multi-block paths are exercised too.
"""
from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from ..._extension import triton_interpreting
from .layouts import GroupedLayout, lse_dtype
from .triton_kernels import grouped_attention_bwd_kernel, grouped_attention_fwd_kernel

_INTERPRET = triton_interpreting()
_KEY = ["q_rows", "n_keys", "head_dim"]

if _INTERPRET:
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=1)]
    _BWD_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=1)]
elif os.environ.get("RETRO_TRITON_AUTOTUNE", "1") == "0":
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)]
    _BWD_CONFIGS = [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
else:
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n in (64, 128) for w in (4, 8) for s in (2, 3)
    ] + [triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=4)]  # no spills at head_dim 64 (sm_90)
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n in (32, 64) for w in (4, 8) for s in (1, 2)
    ]

_fwd = triton.autotune(configs=_FWD_CONFIGS, key=_KEY)(grouped_attention_fwd_kernel)
_bwd = triton.autotune(configs=_BWD_CONFIGS, key=_KEY)(grouped_attention_bwd_kernel)


def _block_m(q_rows: int, head_dim: int, backward: bool) -> int:
    if _INTERPRET:
        cap = 16
    else:
        cap = 64 if backward and head_dim > 64 else 128
    return max(16, min(triton.next_power_of_2(max(q_rows, 1)), cap))


def _precision(dtype: torch.dtype) -> str:
    # float32 stays float32 (IEEE) so the kernel matches a float32 PyTorch reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: Tensor | None, fallback: Tensor):
    if mask is None:
        return fallback, (0, 0, 0), False
    m = mask.view(torch.uint8)
    return m, (m.stride(0), m.stride(1), m.stride(2)), True


def _grid(layout: GroupedLayout, block_m: int, batch_heads: int):
    row_blocks = triton.cdiv(layout.q_rows, block_m)
    grouped = layout.groups * row_blocks
    prefix = triton.cdiv(layout.prefix_rows, block_m)
    return row_blocks, grouped, (grouped + prefix, batch_heads)


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, layout: GroupedLayout,
            scale: float) -> tuple[Tensor, Tensor]:
    """-> out (B, T, H, D) like q, lse (B, H, T)."""
    B, T, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, T), dtype=lse_dtype(q.dtype), device=q.device)
    if B * H == 0 or T == 0:
        return out, lse
    p = layout.prefix_rows
    block_m = _block_m(layout.q_rows, D, backward=False)
    row_blocks, grouped, grid = _grid(layout, block_m, B * H)
    mask_t, (smb, smg, smr), has_mask = _mask_args(mask, q)
    qv, ov, lv = q[:, p:], out[:, p:], lse[:, :, p:]
    _fwd[grid](
        qv, k, v, mask_t, ov, lv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        smb, smg, smr,
        lse.stride(0), lse.stride(1),
        H, layout.q_rows, layout.q_valid, layout.keys, D, p, row_blocks, grouped, scale,
        HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION=_precision(q.dtype),
    )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
             out: Tensor, lse: Tensor, layout: GroupedLayout, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq like q, dk and dv like k (groups without query rows get 0)."""
    B, T, H, D = q.shape
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if layout.groups < k.shape[1]:
        dk[:, layout.groups:].zero_()
        dv[:, layout.groups:].zero_()
    if B * H == 0 or T == 0:
        return dq, dk, dv
    p = layout.prefix_rows
    block_m = _block_m(layout.q_rows, D, backward=True)
    row_blocks, grouped, grid = _grid(layout, block_m, B * H)
    if row_blocks == 1:
        dk_buf, dv_buf = dk, dv
        part_stride = 0
    else:  # one float32 partial per row block, summed below (deterministic)
        shape = (row_blocks, B, layout.groups) + tuple(k.shape[2:])
        dk_buf = torch.empty(shape, dtype=torch.float32, device=k.device)
        dv_buf = torch.empty_like(dk_buf)
        part_stride = dk_buf.stride(0)
    mask_t, (smb, smg, smr), has_mask = _mask_args(mask, q)
    _bwd[grid](
        q[:, p:], k, v, mask_t, out[:, p:], grad_out[:, p:], lse[:, :, p:], dq[:, p:], dk_buf, dv_buf,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        part_stride, dk_buf.stride(-5), dk_buf.stride(-4), dk_buf.stride(-3), dk_buf.stride(-2),
        smb, smg, smr,
        lse.stride(0), lse.stride(1),
        H, layout.q_rows, layout.q_valid, layout.keys, D, p, row_blocks, grouped, scale,
        HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION=_precision(q.dtype),
    )
    if row_blocks > 1:
        dk[:, : layout.groups] = dk_buf.sum(0).to(dk.dtype)
        dv[:, : layout.groups] = dv_buf.sum(0).to(dv.dtype)
    return dq, dk, dv
