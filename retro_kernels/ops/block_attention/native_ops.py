"""Registers the C++/CUDA ops of retro_kernels._C with torch (pattern of pytorch/extension-cpp): fake (meta)
implementations, so torch.compile traces through them, and autograd (autograd.py), so they train: the
forward op's backward is the backward op (the reference formulas where create_graph=True asks for second
derivatives), the backward op refuses to be differentiated, the decode op's backward is the reference
formulas (it has no backward kernel). Their schemas are in
csrc/torch/registration.cpp, their CPU kernels in csrc/torch/cpu_ops.cpp, the CUDA decode kernel
in csrc/torch_cuda/; the arguments are the description of layouts.py.

    torch.ops.retro_kernels.block_attention_fwd(q, k, v, key_mask, q_rows, groups, prefix_rows,
                                                softmax_scale) -> (out, lse)
    torch.ops.retro_kernels.block_attention_bwd(grad_out, q, k, v, key_mask, out, lse, q_rows,
                                                groups, prefix_rows, softmax_scale) -> (dq, dk, dv)
    torch.ops.retro_kernels.block_attention_decode(q, k, v, key_mask, softmax_scale) -> out

The fakes run the checks of the real ops (arg_checks.py; csrc/torch/arg_checks.h), so torch.compile
reports a bad call while tracing. Imported by block_attention/__init__.py when retro_kernels._C is
built; csrc/torch/registration.cpp names this module as the home of the fakes.
"""
from __future__ import annotations

import torch

from ..._extension import has_cpu_kernels
from . import arg_checks
from .autograd import block_attention_autograd, block_attention_decode_autograd, refuse_differentiation
from .layouts import lse_dtype


def _register_autograd(op: str, autograd: tuple) -> None:
    """Registers (backward, setup_context) as the autograd of torch.ops.retro_kernels.<op>."""
    backward, setup_context = autograd
    torch.library.register_autograd(f"retro_kernels::{op}", backward, setup_context=setup_context)


if has_cpu_kernels():

    @torch.library.register_fake("retro_kernels::block_attention_fwd")
    def _block_attention_fwd_fake(q, k, v, key_mask, q_rows, groups, prefix_rows, softmax_scale):
        arg_checks.check_block("block_attention_fwd", q, k, v, key_mask, q_rows, groups, prefix_rows,
                               softmax_scale)
        return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))

    @torch.library.register_fake("retro_kernels::block_attention_bwd")
    def _block_attention_bwd_fake(grad_out, q, k, v, key_mask, out, lse, q_rows, groups, prefix_rows,
                                  softmax_scale):
        arg_checks.check_block("block_attention_bwd", q, k, v, key_mask, q_rows, groups, prefix_rows,
                               softmax_scale, grad_out=grad_out, out=out, lse=lse)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    _register_autograd("block_attention_fwd", block_attention_autograd(torch.ops.retro_kernels.block_attention_bwd))
    _register_autograd("block_attention_bwd", refuse_differentiation("retro_kernels::block_attention_bwd"))

    @torch.library.register_fake("retro_kernels::block_attention_decode")
    def _block_attention_decode_fake(q, k, v, key_mask, softmax_scale):
        dtypes = arg_checks.CUDA_DECODE_DTYPES if q.device.type == "cuda" else arg_checks.ALL_DTYPES
        arg_checks.check_decode("block_attention_decode", q, k, v, key_mask, softmax_scale, dtypes)
        return q.new_empty(q.shape)

    _register_autograd("block_attention_decode", block_attention_decode_autograd())
