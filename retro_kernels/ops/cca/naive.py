"""Chunked cross-attention in plain PyTorch, as the paper writes it (Borgeaud et al. 2021,
section 2.4 and Fig. 2). The ground truth that every fused backend is tested against.

The sequence is shifted left by m - 1 so that the last token of chunk C_u and the first m - 1
tokens of C_{u+1} form chunk u's attending window; each window attends to the k neighbours of
its chunk, all k*r neighbour tokens under one softmax; the result is shifted back, and the first
m - 1 positions, which precede any complete chunk, get 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunked_cross_attention_reference(q: Tensor, k: Tensor, v: Tensor, chunk_size: int,
                                      neighbour_mask: Tensor | None = None,
                                      softmax_scale: float | None = None) -> Tensor:
    """q (B, N, H, D); k, v (B, L, K, R, H, D); neighbour_mask (B, L, K, R) bool or None
    -> (B, N, H, D), computed in q's dtype."""
    B, N, H, D = q.shape
    m = chunk_size
    K, R = k.shape[2], k.shape[3]
    chunks = N // m  # chunks whose neighbours are used
    scale = D ** -0.5 if softmax_scale is None else softmax_scale

    # Attending windows: positions m-1 .. N-1, padded at the end to whole chunks.
    windows = q[:, m - 1:]
    windows = F.pad(windows, (0, 0, 0, 0, 0, chunks * m - windows.shape[1]))
    windows = windows.reshape(B, chunks, m, H, D)
    # The k neighbours of a chunk, merged into one set of k*r tokens.
    keys = k[:, :chunks].reshape(B, chunks, K * R, H, D)
    values = v[:, :chunks].reshape(B, chunks, K * R, H, D)

    scores = torch.einsum("buihd,bujhd->buhij", windows, keys) * scale
    if neighbour_mask is not None:
        real = neighbour_mask[:, :chunks].reshape(B, chunks, 1, 1, K * R)
        scores = scores.masked_fill(~real, float("-inf"))
        any_real = real.any(-1, keepdim=True)  # a chunk whose neighbours are all masked gives 0
        scores = scores.masked_fill(~any_real, 0.0)
        attn = scores.softmax(-1) * any_real
    else:
        attn = scores.softmax(-1)
    out = torch.einsum("buhij,bujhd->buihd", attn, values).reshape(B, chunks * m, H, D)

    # Shift back: position t = m-1+i holds window row i; positions 0 .. m-2 attend to nothing.
    return torch.cat([q.new_zeros(B, min(m - 1, N), H, D), out[:, : max(N - m + 1, 0)]], dim=1)
