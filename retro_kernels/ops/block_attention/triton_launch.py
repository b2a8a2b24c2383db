"""Launchers for the block-attention Triton kernels (triton_kernels.py).

They take the description of layouts.py: q-like tensors (B, T, H, D) with T = prefix_rows + q_valid,
k-like tensors (B, G, keys, H, D) with G >= groups, all contiguous, and q_rows, groups, prefix_rows.
Both launchers check every tensor against that description and the kernels' limits (dtype, head_dim, the grid, int32 offsets) before launching, and
take optional preallocated outputs (which the kernels must write in full). On a GPU the kernels autotune over a small space
(RETRO_TRITON_AUTOTUNE=0 keeps one default configuration, for quick test runs); under
TRITON_INTERPRET=1 (CPU tests) a single small configuration runs, with row blocks of 16 so that
the multi-block paths are exercised too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..._extension import triton_interpreting
from . import triton_limits
from .layouts import lse_dtype
from .triton_kernels import block_attention_bwd_kernel, block_attention_fwd_kernel

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

_fwd = triton.autotune(configs=_FWD_CONFIGS, key=_KEY)(block_attention_fwd_kernel)
_bwd = triton.autotune(configs=_BWD_CONFIGS, key=_KEY)(block_attention_bwd_kernel)


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


@dataclass(frozen=True)
class _Layout:
    """The kernels' integers, derived from the description (and the tensors' sizes)."""
    q_rows: int
    q_valid: int
    groups: int
    keys: int
    prefix_rows: int


def _layout(q: Tensor, k: Tensor, q_rows: int, groups: int, prefix_rows: int) -> _Layout:
    q_valid = q.shape[1] - prefix_rows
    # A group never has more rows than exist: a larger q_rows changes nothing (only group 0 can
    # then have rows) but would overflow g * q_rows and the grid.
    return _Layout(min(q_rows, max(q_valid, 1)), q_valid, groups, k.shape[2], prefix_rows)


def _grid(layout: _Layout, block_m: int, batch_heads: int):
    row_blocks = triton.cdiv(layout.q_rows, block_m)
    group_programs = layout.groups * row_blocks
    prefix = triton.cdiv(layout.prefix_rows, block_m)
    return row_blocks, group_programs, (group_programs + prefix, batch_heads)


def _fail(error, what: str, name: str, got, expected) -> None:
    raise error(f"triton block attention {what}: {name} {got}, expected {expected}")


def _check_tensor(what: str, name: str, t, shape, dtype, device) -> None:
    """t is a contiguous `dtype` tensor of exactly `shape` on `device`."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, what, name, f"is a {type(t).__name__}", "a tensor")
    if t.device != device:
        _fail(ValueError, what, name, f"is on {t.device}", f"{device} (q's device)")
    if t.dtype != dtype:
        _fail(TypeError, what, name, f"has dtype {t.dtype}", dtype)
    if tuple(t.shape) != tuple(shape):
        _fail(ValueError, what, name, f"has shape {tuple(t.shape)}", tuple(shape))
    if not t.is_contiguous():
        _fail(ValueError, what, name, f"has strides {t.stride()}", "contiguous strides")


def _check_launch(what: str, q: Tensor, k: Tensor, v: Tensor, mask, q_rows: int, groups: int,
                  prefix_rows: int, scale: float, **extra) -> _Layout:
    """Every tensor against q and the description, and the kernels' limits; returns the kernels'
    integers. extra: name -> (tensor or None, "q" (like q), "k" (like k) or "lse")."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        _fail(ValueError, what, "q", f"is {getattr(q, 'shape', type(q).__name__)}", "a (batch, rows, heads, head_dim) tensor")
    B, T, H, D = q.shape
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        _fail(ValueError, what, "q", f"is on {q.device}", "a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1)")
    if q.dtype not in triton_limits.DTYPES:
        _fail(TypeError, what, "q", f"has dtype {q.dtype}", "one of torch.float32, torch.bfloat16, torch.float16")
    _check_tensor(what, "q", q, q.shape, q.dtype, q.device)
    if not 1 <= D <= triton_limits.MAX_HEAD_DIM:
        _fail(ValueError, what, "head_dim", f"is {D}", f"1 .. {triton_limits.MAX_HEAD_DIM}")
    if q_rows < 1:
        _fail(ValueError, what, "q_rows", f"is {q_rows}", ">= 1")
    if not 0 <= prefix_rows <= T:
        _fail(ValueError, what, "prefix_rows", f"is {prefix_rows}", f"0 .. q's {T} rows")
    if groups < 0 or groups * q_rows < T - prefix_rows:
        _fail(ValueError, what, "groups", f"is {groups}",
              f"enough groups of q_rows = {q_rows} rows for q's {T} rows after prefix_rows = {prefix_rows}")
    if not isinstance(k, torch.Tensor) or k.dim() != 5:
        _fail(ValueError, what, "k", f"is {getattr(k, 'shape', type(k).__name__)}", "a (batch, key_groups, keys, heads, head_dim) tensor")
    if k.shape[1] < groups:
        _fail(ValueError, what, "k", f"has {k.shape[1]} key groups", f"at least groups = {groups}")
    layout = _layout(q, k, q_rows, groups, prefix_rows)
    k_shape = (B, k.shape[1], layout.keys, H, D)
    _check_tensor(what, "k", k, k_shape, q.dtype, q.device)
    _check_tensor(what, "v", v, k_shape, q.dtype, q.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
            _fail(ValueError, what, "mask", f"is {getattr(mask, 'shape', type(mask).__name__)}", "a (batch, groups, keys) tensor")
        _check_tensor(what, "mask", mask, k_shape[:3], torch.bool, q.device)
    for name, (t, like) in extra.items():
        if t is None:
            continue
        shape = {"q": q.shape, "k": k.shape, "lse": (B, H, T)}[like]
        _check_tensor(what, name, t, shape, lse_dtype(q.dtype) if like == "lse" else q.dtype, q.device)
    if not math.isfinite(scale):
        _fail(ValueError, what, "softmax_scale", f"is {scale}", "a finite number")
    # The grid is (row blocks, batch * heads): the second dimension is limited to 65535.
    if B * H > triton_limits.MAX_GRID_Y:
        _fail(ValueError, what, "batch * heads", f"is {B} * {H} = {B * H}",
              f"<= {triton_limits.MAX_GRID_Y} (the grid's second dimension)")
    # In-batch offsets (row * row stride, group * group stride) are int32 products in the kernels.
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] and t.stride(0) > triton_limits.MAX_INT32:
            _fail(ValueError, what, name, f"has {t.stride(0)} elements per batch element",
                  f"<= {triton_limits.MAX_INT32} (the kernels' int32 offsets)")
    return layout


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_rows: int, groups: int, prefix_rows: int,
            scale: float, out: Tensor | None = None, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """-> out (B, T, H, D) like q, lse (B, H, T). out and lse, when given, are written in full."""
    layout = _check_launch("forward", q, k, v, mask, q_rows, groups, prefix_rows, scale, out=(out, "q"),
                           lse=(lse, "lse"))
    B, T, H, D = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, H, T), dtype=lse_dtype(q.dtype), device=q.device) if lse is None else lse
    if B * H == 0 or T == 0:
        return out, lse
    p = layout.prefix_rows
    block_m = _block_m(layout.q_rows, D, backward=False)
    row_blocks, group_programs, grid = _grid(layout, block_m, B * H)
    mask_t, (smb, smg, smr), has_mask = _mask_args(mask, q)
    qv, ov, lv = q[:, p:], out[:, p:], lse[:, :, p:]
    _fwd[grid](
        qv, k, v, mask_t, ov, lv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        smb, smg, smr,
        lse.stride(0), lse.stride(1),
        H, layout.q_rows, layout.q_valid, layout.keys, D, p, row_blocks, group_programs, scale,
        HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION=_precision(q.dtype),
    )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
             out: Tensor, lse: Tensor, q_rows: int, groups: int, prefix_rows: int, scale: float,
             dq: Tensor | None = None, dk: Tensor | None = None,
             dv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq like q, dk and dv like k (groups without query rows get 0). dq, dk and dv, when given,
    are written in full."""
    layout = _check_launch("backward", q, k, v, mask, q_rows, groups, prefix_rows, scale,
                           grad_out=(grad_out, "q"), out=(out, "q"), lse=(lse, "lse"), dq=(dq, "q"),
                           dk=(dk, "k"), dv=(dv, "k"))
    for name, t in (("grad_out", grad_out), ("out", out), ("lse", lse)):
        if t is None:
            _fail(ValueError, "backward", name, "is None", "a tensor")
    B, T, H, D = q.shape
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if layout.groups < k.shape[1]:
        dk[:, layout.groups:].zero_()
        dv[:, layout.groups:].zero_()
    if B * H == 0 or T == 0:
        return dq, dk, dv
    p = layout.prefix_rows
    block_m = _block_m(layout.q_rows, D, backward=True)
    row_blocks, group_programs, grid = _grid(layout, block_m, B * H)
    if row_blocks == 1:
        dk_buf, dv_buf = dk, dv
        part_stride = 0
    else:  # one float32 partial per row block, summed below (deterministic)
        shape = (row_blocks, B, layout.groups) + tuple(k.shape[2:])
        if math.prod(shape) > triton_limits.MAX_INT32:  # block * block stride is an int32 product
            _fail(ValueError, "backward", "the dk/dv partials", f"have {math.prod(shape)} elements",
                  f"<= {triton_limits.MAX_INT32} (the kernel's int32 offsets; use a smaller chunk or batch)")
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
        H, layout.q_rows, layout.q_valid, layout.keys, D, p, row_blocks, group_programs, scale,
        HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION=_precision(q.dtype),
    )
    if row_blocks > 1:
        dk[:, : layout.groups] = dk_buf.sum(0).to(dk.dtype)
        dv[:, : layout.groups] = dv_buf.sum(0).to(dv.dtype)
    return dq, dk, dv
