"""torch.library registration of the fused grouped-attention ops (pattern of pytorch/extension-cpp).

For each of chunked cross-attention (cca), neighbour self-attention and neighbour
cross-attention there are two op pairs, forward returning (out, lse) and backward returning
(dq, dk, dv):
  torch.ops.retro_kernels.<name>_fwd / _bwd          C++ (schema in csrc/torch/registration.cpp)
  torch.ops.retro_kernels.<name>_fwd_triton / _bwd_triton    Triton, defined here
This module gives all of them fake (meta) implementations, so torch.compile traces through them,
and autograd, so they train; and the C++ decode op (torch.ops.retro_kernels.cca_decode, for
inference) its fake. csrc/torch/registration.cpp names this module as the home of the fakes.

Every op takes contiguous tensors and checks all of its arguments against each other before any
kernel runs (arg_checks.py here, csrc/torch/arg_checks.h for the C++ ops); the fakes run the same
checks, so torch.compile reports a bad call while tracing. The public functions
(chunked_cross_attention, ...) make their tensors contiguous before calling an op.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..._extension import has_cpu_kernels
from . import arg_checks
from .layouts import GroupedLayout, as_groups, as_rows, cca_layout, cross_layout, lse_dtype, self_layout

# ---- output shapes (shared by the fake implementations of both backends) -----------------------


def _forward_outputs(q: Tensor, lse_rows: int) -> tuple[Tensor, Tensor]:
    lse = q.new_empty((q.shape[0], q.shape[-2], lse_rows), dtype=lse_dtype(q.dtype))
    return q.new_empty(q.shape), lse


def _backward_outputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _neighbour_rows(q: Tensor) -> int:
    return q.shape[1] * q.shape[2] * q.shape[3]


def _fakes(suffix: str, dtypes) -> dict[str, Callable]:
    """The fake implementations of the ops <name>_fwd<suffix> / _bwd<suffix>: the argument checks of
    the real ops, then outputs of the right shapes."""

    def cca_fwd(q, k, v, neighbour_mask, chunk_size, softmax_scale):
        arg_checks.check_cca(f"cca_fwd{suffix}", q, k, v, neighbour_mask, chunk_size, softmax_scale, dtypes)
        return _forward_outputs(q, q.shape[1])

    def cca_bwd(grad_out, q, k, v, neighbour_mask, out, lse, chunk_size, softmax_scale):
        arg_checks.check_cca(f"cca_bwd{suffix}", q, k, v, neighbour_mask, chunk_size, softmax_scale, dtypes,
                             grad_out, out, lse)
        return _backward_outputs(q, k, v)

    def make(name, check):
        def fwd(q, k, v, mask, softmax_scale):
            check(f"{name}_fwd{suffix}", q, k, v, mask, softmax_scale, dtypes)
            return _forward_outputs(q, _neighbour_rows(q))

        def bwd(grad_out, q, k, v, mask, out, lse, softmax_scale):
            check(f"{name}_bwd{suffix}", q, k, v, mask, softmax_scale, dtypes, grad_out, out, lse)
            return _backward_outputs(q, k, v)

        return fwd, bwd

    self_fwd, self_bwd = make("neighbour_self_attn", arg_checks.check_self)
    cross_fwd, cross_bwd = make("neighbour_cross_attn", arg_checks.check_cross)
    return {"cca_fwd": cca_fwd, "cca_bwd": cca_bwd,
            "neighbour_self_attn_fwd": self_fwd, "neighbour_self_attn_bwd": self_bwd,
            "neighbour_cross_attn_fwd": cross_fwd, "neighbour_cross_attn_bwd": cross_bwd}


_CPP_FAKES = _fakes("", arg_checks.ALL_DTYPES)
_TRITON_FAKES = _fakes("_triton", arg_checks.TRITON_DTYPES)


# ---- autograd --------------------------------------------------------------------------------


def _register_autograd(fwd_name: str, bwd: Callable) -> None:
    """Autograd for a forward op (q, k, v, mask, *params) -> (out, lse) whose backward op takes
    (grad_out, q, k, v, mask, out, lse, *params) -> (dq, dk, dv)."""

    def setup_context(ctx, inputs, output):
        q, k, v, mask, *params = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.params = params
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(grad_out.contiguous(), q, k, v, mask, out, lse, *ctx.params)
        return (dq, dk, dv, None) + (None,) * len(ctx.params)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---- the C++ ops -------------------------------------------------------------------------------

if has_cpu_kernels():
    for _name, _fake in _CPP_FAKES.items():
        torch.library.register_fake(f"retro_kernels::{_name}")(_fake)
    for _name in ("cca", "neighbour_self_attn", "neighbour_cross_attn"):
        _register_autograd(f"retro_kernels::{_name}_fwd", getattr(torch.ops.retro_kernels, f"{_name}_bwd"))

    @torch.library.register_fake("retro_kernels::cca_decode")
    def _fake_decode(q, k, v, neighbour_mask, softmax_scale):
        arg_checks.check_cca_decode("cca_decode", q, k, v, neighbour_mask, softmax_scale,
                                    arg_checks.CUDA_DECODE_DTYPES if q.device.type == "cuda" else arg_checks.ALL_DTYPES)
        return q.new_empty(q.shape)


# ---- the Triton ops ----------------------------------------------------------------------------
# Each maps its tensors onto (q rows, k groups, mask groups, layout) and calls triton_launch.


def _cca_problem(q, k, v, mask, chunk_size):
    b, l, kk, r = k.shape[:4]
    mask_g = None if mask is None else mask.reshape(b, l, kk * r)
    return q, as_groups(k, l, kk * r), as_groups(v, l, kk * r), mask_g, cca_layout(q, k, chunk_size)


def _self_problem(q, k, v, mask):
    b, l, kk, r = q.shape[:4]
    mask_g = None if mask is None else mask.reshape(b, l * kk, r)
    return as_rows(q), as_groups(k, l * kk, r), as_groups(v, l * kk, r), mask_g, self_layout(q)


def _cross_problem(q, k, v, mask):
    return as_rows(q), k, v, mask, cross_layout(q, k)


def _triton_forward(q, problem, scale):
    from . import triton_launch

    q_rows, k_g, v_g, mask_g, layout = problem
    if layout.groups == 0:  # nothing attends (a sequence shorter than one chunk)
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[-2], q_rows.shape[1]), float("inf"),
                         dtype=lse_dtype(q.dtype), device=q.device)
        return out, lse
    out, lse = triton_launch.forward(q_rows, k_g, v_g, mask_g, layout, scale)
    return out.view(q.shape), lse


def _triton_backward(grad_out, q, k, v, out, lse, problem, scale):
    from . import triton_launch

    q_rows, k_g, v_g, mask_g, layout = problem
    if layout.groups == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = triton_launch.backward(
        grad_out.reshape(q_rows.shape), q_rows, k_g, v_g, mask_g, out.reshape(q_rows.shape), lse,
        layout, scale)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def contiguous(*xs):
    """The tensors made contiguous (None stays None), as every op here takes them."""
    return tuple(None if x is None else x.contiguous() for x in xs)


_T = arg_checks.TRITON_DTYPES


@torch.library.custom_op("retro_kernels::cca_fwd_triton", mutates_args=())
def cca_fwd_triton(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor], chunk_size: int,
                   softmax_scale: float) -> tuple[Tensor, Tensor]:
    arg_checks.check_cca("cca_fwd_triton", q, k, v, neighbour_mask, chunk_size, softmax_scale, _T)
    return _triton_forward(q, _cca_problem(q, k, v, neighbour_mask, chunk_size), softmax_scale)


@torch.library.custom_op("retro_kernels::cca_bwd_triton", mutates_args=())
def cca_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor],
                   out: Tensor, lse: Tensor, chunk_size: int,
                   softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    arg_checks.check_cca("cca_bwd_triton", q, k, v, neighbour_mask, chunk_size, softmax_scale, _T,
                         grad_out, out, lse)
    return _triton_backward(grad_out, q, k, v, out, lse, _cca_problem(q, k, v, neighbour_mask, chunk_size),
                            softmax_scale)


@torch.library.custom_op("retro_kernels::neighbour_self_attn_fwd_triton", mutates_args=())
def neighbour_self_attn_fwd_triton(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Optional[Tensor],
                                   softmax_scale: float) -> tuple[Tensor, Tensor]:
    arg_checks.check_self("neighbour_self_attn_fwd_triton", q, k, v, neighbour_mask, softmax_scale, _T)
    return _triton_forward(q, _self_problem(q, k, v, neighbour_mask), softmax_scale)


@torch.library.custom_op("retro_kernels::neighbour_self_attn_bwd_triton", mutates_args=())
def neighbour_self_attn_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                   neighbour_mask: Optional[Tensor], out: Tensor, lse: Tensor,
                                   softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    arg_checks.check_self("neighbour_self_attn_bwd_triton", q, k, v, neighbour_mask, softmax_scale, _T,
                          grad_out, out, lse)
    return _triton_backward(grad_out, q, k, v, out, lse, _self_problem(q, k, v, neighbour_mask), softmax_scale)


@torch.library.custom_op("retro_kernels::neighbour_cross_attn_fwd_triton", mutates_args=())
def neighbour_cross_attn_fwd_triton(q: Tensor, k: Tensor, v: Tensor, chunk_mask: Optional[Tensor],
                                    softmax_scale: float) -> tuple[Tensor, Tensor]:
    arg_checks.check_cross("neighbour_cross_attn_fwd_triton", q, k, v, chunk_mask, softmax_scale, _T)
    return _triton_forward(q, _cross_problem(q, k, v, chunk_mask), softmax_scale)


@torch.library.custom_op("retro_kernels::neighbour_cross_attn_bwd_triton", mutates_args=())
def neighbour_cross_attn_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    chunk_mask: Optional[Tensor], out: Tensor, lse: Tensor,
                                    softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    arg_checks.check_cross("neighbour_cross_attn_bwd_triton", q, k, v, chunk_mask, softmax_scale, _T,
                           grad_out, out, lse)
    return _triton_backward(grad_out, q, k, v, out, lse, _cross_problem(q, k, v, chunk_mask), softmax_scale)


for _op, _name in ((cca_fwd_triton, "cca_fwd"), (cca_bwd_triton, "cca_bwd"),
                  (neighbour_self_attn_fwd_triton, "neighbour_self_attn_fwd"),
                  (neighbour_self_attn_bwd_triton, "neighbour_self_attn_bwd"),
                  (neighbour_cross_attn_fwd_triton, "neighbour_cross_attn_fwd"),
                  (neighbour_cross_attn_bwd_triton, "neighbour_cross_attn_bwd")):
    _op.register_fake(_TRITON_FAKES[_name])

_register_autograd("retro_kernels::cca_fwd_triton", cca_bwd_triton)
_register_autograd("retro_kernels::neighbour_self_attn_fwd_triton", neighbour_self_attn_bwd_triton)
_register_autograd("retro_kernels::neighbour_cross_attn_fwd_triton", neighbour_cross_attn_bwd_triton)

# Which op pair runs a backend, by op name.
FORWARD_OPS = {
    "cca": {"cpu": "cca_fwd", "triton": "cca_fwd_triton"},
    "neighbour_self_attn": {"cpu": "neighbour_self_attn_fwd", "triton": "neighbour_self_attn_fwd_triton"},
    "neighbour_cross_attn": {"cpu": "neighbour_cross_attn_fwd", "triton": "neighbour_cross_attn_fwd_triton"},
}


def forward_op(name: str, backend: str):
    """The torch op that runs `name` on `backend` ("cpu" or "triton")."""
    return getattr(torch.ops.retro_kernels, FORWARD_OPS[name][backend])


__all__ = ["GroupedLayout", "contiguous", "forward_op"]
