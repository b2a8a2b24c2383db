"""Autograd of the block-attention ops, registered beside each op (native_ops.py for the C++/CUDA
ops, triton_op.py for the Triton ones).

Second derivatives: the fused backward kernels compute first derivatives only. A backward asked
for a graph of its gradients (create_graph=True: a Hessian-vector product, a gradient penalty,
gradgradcheck) runs instead the differentiable reference formulas of naive.py, so the gradients of
gradients are right; a plain backward runs the fused kernel. The backward ops themselves, called
directly, refuse to be differentiated (refuse_differentiation) instead of passing for constants.
"""
from __future__ import annotations

from typing import Callable

import torch

from .naive import block_attention_backward_reference


def block_attention_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """(backward, setup_context) for torch.library.register_autograd of a forward op (q, k, v,
    key_mask, q_rows, groups, prefix_rows, softmax_scale) -> (out, lse), given its backward op
    (grad_out, q, k, v, key_mask, out, lse, q_rows, groups, prefix_rows, softmax_scale) -> (dq, dk, dv).
    lse is not differentiable."""

    def setup_context(ctx, inputs, output):
        q, k, v, key_mask, q_rows, groups, prefix_rows, softmax_scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.params = (q_rows, groups, prefix_rows, softmax_scale)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            dq, dk, dv = block_attention_backward_reference(grad_out, q, k, v, key_mask, *ctx.params)
        else:
            dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, key_mask, out, lse, *ctx.params)
        return dq, dk, dv, None, None, None, None, None

    return backward, setup_context


def block_attention_decode_autograd() -> tuple[Callable, Callable]:
    """(backward, setup_context) for the decode op (q, k, v, key_mask, softmax_scale) -> out, one
    query row per key group: it has no fused backward kernel, so its gradients, of every order,
    are those of the reference formulas."""

    def setup_context(ctx, inputs, output):
        q, k, v, key_mask, softmax_scale = inputs
        ctx.save_for_backward(q, k, v, key_mask)
        ctx.softmax_scale = softmax_scale

    def backward(ctx, grad_out):
        q, k, v, key_mask = ctx.saved_tensors
        dq, dk, dv = block_attention_backward_reference(grad_out, q, k, v, key_mask, 1, q.shape[1], 0,
                                                        ctx.softmax_scale)
        return dq, dk, dv, None, None

    return backward, setup_context


def refuse_differentiation(op: str) -> tuple[Callable, Callable]:
    """(backward, setup_context) for a backward op `op`: differentiating its output raises a
    RuntimeError naming it and the ways out."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op} computes first derivatives only and cannot be differentiated; differentiate the "
            f"forward op instead (its backward with create_graph=True runs differentiable reference "
            f"formulas), or use backend='reference'")

    return backward, setup_context
