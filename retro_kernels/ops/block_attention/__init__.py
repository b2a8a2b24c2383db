"""Block-local attention: the fused kernel family behind every attention op of retro_kernels.

Row block g of the queries attends, under one softmax, to key group g only (chunked
cross-attention: a chunk's attending window and its neighbours; the encoder: a neighbour's rows
and their keys, or a neighbour and its chunk). Not grouped-query attention: every head has its own
keys. layouts.py describes each problem once; that description is what every op takes:

    layouts.py       BlockProblem and the mapping of each public op onto it
    naive.py         the reference of the block op itself, and its differentiable backward formulas
    autograd.py      the ops' autograd: fused first derivatives, reference formulas for second ones
    arg_checks.py    the ops' argument checks in Python (the C++ ops: csrc/torch/arg_checks.h)
    native_ops.py    registers the C++/CUDA ops: their fakes and autograd (kernels in csrc/)
    triton_op.py     the Triton ops with their fakes and autograd
    triton_kernels.py, triton_launch.py, triton_limits.py  the Triton kernels and launchers
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import native_ops  # noqa: F401  (registers the C++/CUDA ops' fakes and autograd)
from .layouts import BlockProblem
from .triton_op import block_attention_fwd_triton


def block_attention(problem: BlockProblem, softmax_scale: float, backend: str) -> Tensor:
    """The output of `problem` (in the caller's shape of q) from the fused forward op of `backend`
    ("cpu": the C++ op, "triton": the Triton op); differentiable in q, k and v, to any order
    (autograd.py: a backward with create_graph=True runs the reference formulas)."""
    if backend == "cpu":
        out, _ = torch.ops.retro_kernels.block_attention_fwd(*problem.args, softmax_scale)
    elif backend == "triton":
        out, _ = block_attention_fwd_triton(*problem.args, softmax_scale)
    else:
        raise ValueError(f"block_attention: backend is {backend!r}, expected 'cpu' or 'triton'")
    return out if problem.out_shape is None else out.view(problem.out_shape)


def block_attention_decode(problem: BlockProblem, softmax_scale: float) -> Tensor:
    """The output of a one-row-per-group problem (layouts.decode) from the compiled decode op (C++
    on CPU tensors, CUDA C++ on CUDA tensors), in the caller's shape of q; for inference."""
    if problem.q_rows != 1 or problem.prefix_rows != 0 or problem.groups != problem.k.shape[1]:
        raise ValueError(f"block_attention_decode: needs q_rows 1, prefix_rows 0 and every key group "
                         f"attended; got q_rows {problem.q_rows}, prefix_rows {problem.prefix_rows}, "
                         f"groups {problem.groups} of {problem.k.shape[1]}")
    out = torch.ops.retro_kernels.block_attention_decode(problem.q, problem.k, problem.v, problem.key_mask,
                                                         softmax_scale)
    return out if problem.out_shape is None else out.view(problem.out_shape)


__all__ = ["BlockProblem", "block_attention", "block_attention_decode"]
