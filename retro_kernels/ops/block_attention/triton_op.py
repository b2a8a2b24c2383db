"""The Triton ops of block-local attention (pattern of pytorch/extension-cpp): each op's
definition, its fake (meta) implementation and its autograd, together. They take the description of
layouts.py, exactly as the C++ ops (native_ops.py) do:

    block_attention_fwd_triton(q, k, v, key_mask, q_rows, groups, prefix_rows, softmax_scale)
        -> (out, lse)
    block_attention_bwd_triton(grad_out, q, k, v, key_mask, out, lse, q_rows, groups, prefix_rows,
                               softmax_scale) -> (dq, dk, dv)

Both check every argument against the others (arg_checks.py, the messages of the C++ ops) before
a kernel runs; the launchers (triton_launch.py) add the kernels' own limits. Importing this module
does not import triton: the launchers are imported at the first call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import arg_checks
from .autograd import block_attention_autograd, refuse_differentiation
from .layouts import lse_dtype

_DTYPES = arg_checks.TRITON_DTYPES


@torch.library.custom_op("retro_kernels::block_attention_fwd_triton", mutates_args=())
def block_attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], q_rows: int,
                               groups: int, prefix_rows: int, softmax_scale: float) -> tuple[Tensor, Tensor]:
    arg_checks.check_block("block_attention_fwd_triton", q, k, v, key_mask, q_rows, groups, prefix_rows,
                           softmax_scale, _DTYPES)
    if groups == 0 or prefix_rows == q.shape[1]:  # no group has rows: nothing attends
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("inf"), dtype=lse_dtype(q.dtype),
                         device=q.device)
        return torch.zeros_like(q), lse
    from . import triton_launch

    return triton_launch.forward(q, k, v, key_mask, q_rows, groups, prefix_rows, softmax_scale)


@block_attention_fwd_triton.register_fake
def _block_attention_fwd_triton_fake(q, k, v, key_mask, q_rows, groups, prefix_rows, softmax_scale):
    arg_checks.check_block("block_attention_fwd_triton", q, k, v, key_mask, q_rows, groups, prefix_rows,
                           softmax_scale, _DTYPES)
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("retro_kernels::block_attention_bwd_triton", mutates_args=())
def block_attention_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                               out: Tensor, lse: Tensor, q_rows: int, groups: int, prefix_rows: int,
                               softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    arg_checks.check_block("block_attention_bwd_triton", q, k, v, key_mask, q_rows, groups, prefix_rows,
                           softmax_scale, _DTYPES, grad_out, out, lse)
    if groups == 0 or prefix_rows == q.shape[1]:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    from . import triton_launch

    return triton_launch.backward(grad_out, q, k, v, key_mask, out, lse, q_rows, groups, prefix_rows,
                                  softmax_scale)


@block_attention_bwd_triton.register_fake
def _block_attention_bwd_triton_fake(grad_out, q, k, v, key_mask, out, lse, q_rows, groups, prefix_rows,
                                     softmax_scale):
    arg_checks.check_block("block_attention_bwd_triton", q, k, v, key_mask, q_rows, groups, prefix_rows,
                           softmax_scale, _DTYPES, grad_out, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_backward, _setup_context = block_attention_autograd(block_attention_bwd_triton)
block_attention_fwd_triton.register_autograd(_backward, setup_context=_setup_context)
_backward, _setup_context = refuse_differentiation("retro_kernels::block_attention_bwd_triton")
block_attention_bwd_triton.register_autograd(_backward, setup_context=_setup_context)
