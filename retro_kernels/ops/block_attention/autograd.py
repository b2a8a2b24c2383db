"""Autograd of a block-attention forward op (q, k, v, key_mask, q_rows, groups, prefix_rows,
softmax_scale) -> (out, lse), given its backward op (grad_out, q, k, v, key_mask, out, lse, q_rows,
groups, prefix_rows, softmax_scale) -> (dq, dk, dv). The C++ ops (native_ops.py) and the Triton ops
(triton_op.py) each register theirs beside the op with this."""
from __future__ import annotations

from typing import Callable


def block_attention_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """(backward, setup_context) for torch.library.register_autograd; lse is not differentiable."""

    def setup_context(ctx, inputs, output):
        q, k, v, key_mask, q_rows, groups, prefix_rows, softmax_scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.params = (q_rows, groups, prefix_rows, softmax_scale)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, key_mask, out, lse, *ctx.params)
        return dq, dk, dv, None, None, None, None, None

    return backward, setup_context
