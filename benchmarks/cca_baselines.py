"""What a user could write instead of our CCA op, on the GPU: the strongest PyTorch baselines.

Each baseline has a layer-level form (from unshifted q (B, N, H, D) and k/v (B, L, K, R, H, D) to
the unshifted output (B, N, H, D), every copy included) and a bare form (only the attention, on
inputs already laid out the way it wants them). All of them compute the same function as
retro_kernels.chunked_cross_attention, fully masked chunks giving 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from retro_kernels.ops.cca.naive import chunked_cross_attention_reference


@dataclass
class Problem:
    q: Tensor      # (B, N, H, D)
    k: Tensor      # (B, L, K, R, H, D)
    v: Tensor
    mask: Tensor   # (B, L, K, R) bool
    chunk_size: int

    @property
    def dims(self):
        B, N, H, D = self.q.shape
        L, K, R = self.k.shape[1:4]
        return B, N, H, D, L, K, R, self.chunk_size


# ---- layer level: every reshape and copy between the natural layouts counts --------------------


def eager_layer(p: Problem) -> Tensor:
    """The popular open implementation's way: pad/shift, per-chunk reshape, einsum, softmax."""
    return chunked_cross_attention_reference(p.q, p.k, p.v, p.chunk_size, p.mask)


def _sdpa_inputs(p: Problem):
    """Shifted, padded windows (B*U, H, m, D) and keys (B*U, H, K*R, D), mask (B*U, 1, 1, K*R)."""
    B, N, H, D, L, K, R, m = p.dims
    U = N // m
    win = F.pad(p.q[:, m - 1:], (0, 0, 0, 0, 0, U * m - (N - m + 1))).reshape(B * U, m, H, D).transpose(1, 2)
    k = p.k[:, :U].reshape(B * U, K * R, H, D).transpose(1, 2)
    v = p.v[:, :U].reshape(B * U, K * R, H, D).transpose(1, 2)
    mask = p.mask[:, :U].reshape(B * U, 1, 1, K * R)
    return win, k, v, mask


def _sdpa_output(p: Problem, out: Tensor, mask: Tensor) -> Tensor:
    """(B*U, H, m, D) -> (B, N, H, D): zero fully masked chunks (SDPA gives NaN), shift back."""
    B, N, H, D, L, K, R, m = p.dims
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    out = out.transpose(1, 2).reshape(B, -1, H, D)[:, : N - m + 1]
    return torch.cat([out.new_zeros(B, m - 1, H, D), out], dim=1)


def sdpa_layer(p: Problem, backend=None) -> Tensor:
    win, k, v, mask = _sdpa_inputs(p)
    if backend is None:
        out = F.scaled_dot_product_attention(win, k, v, attn_mask=mask)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(win, k, v, attn_mask=mask)
    return _sdpa_output(p, out, mask)


def flex_mask(p: Problem):
    """The block mask of CCA over q (B, H, N, D) and keys flattened to (B, H, L*K*R, D)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, N, H, D, L, K, R, m = p.dims
    real = p.mask.reshape(B, L * K * R)
    kr = K * R

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx + 1) // m - 1 == kv_idx // kr) & real[b, kv_idx]

    return create_block_mask(mask_mod, B, None, N, L * kr, device=p.q.device)


_flex = None


def flex(compiled: bool = True) -> Callable:
    """flex_attention, compiled once (its fused kernel; static shapes) or as it is (eager: the
    unfused reference computation, for the CPU rehearsal, where inductor's compile takes minutes)."""
    global _flex
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


def _flex_inputs(p: Problem):
    """q (B, H, N, D) and keys/values flattened to (B, H, L*K*R, D), views of p's tensors."""
    B, N, H, D, L, K, R, m = p.dims
    return (p.q.transpose(1, 2), p.k.reshape(B, L * K * R, H, D).transpose(1, 2),
            p.v.reshape(B, L * K * R, H, D).transpose(1, 2))


def flex_layer(p: Problem, block_mask, compiled: bool = True) -> Tensor:
    return flex(compiled)(*_flex_inputs(p), block_mask=block_mask).transpose(1, 2)


# ---- bare attention: inputs prepared outside the timed region -----------------------------------


def bare_eager(prep) -> Callable[[], Tensor]:
    win, k, v, mask = prep  # (B*U, H, m, D), (B*U, H, KR, D)
    def run():
        s = (win @ k.transpose(-1, -2)) * win.shape[-1] ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1) @ v
    return run


def bare_sdpa(prep, backend=None) -> Callable[[], Tensor]:
    win, k, v, mask = prep
    if backend is None:
        return lambda: F.scaled_dot_product_attention(win, k, v, attn_mask=mask)

    def run():
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(win, k, v, attn_mask=mask)
    return run


def bare_flex(prep, block_mask, compiled: bool = True) -> Callable[[], Tensor]:
    """FlexAttention on inputs already laid out as it wants them (prepared_flex_inputs)."""
    q, k, v = prep
    fn = flex(compiled)
    return lambda: fn(q, k, v, block_mask=block_mask)


def prepared_flex_inputs(p: Problem, requires_grad: bool):
    """Contiguous copies of _flex_inputs (leaves, with requires_grad as asked)."""
    return tuple(x.contiguous().detach().requires_grad_(requires_grad) for x in _flex_inputs(p))


def prepared_sdpa_inputs(p: Problem, requires_grad: bool):
    win, k, v, mask = _sdpa_inputs(p)
    win, k, v = (x.contiguous().detach().requires_grad_(requires_grad) for x in (win, k, v))
    return win, k, v, mask
