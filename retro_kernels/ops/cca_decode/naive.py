"""One decoding step of chunked cross-attention in plain PyTorch: the new token's query attends
to the k*r neighbour tokens retrieved for its sequence's current chunk, under one softmax."""
from __future__ import annotations

from torch import Tensor


def chunked_cross_attention_decode_reference(q: Tensor, k: Tensor, v: Tensor,
                                             neighbour_mask: Tensor | None = None,
                                             softmax_scale: float | None = None) -> Tensor:
    """q (B, H, D); k, v (B, K, R, H, D); neighbour_mask (B, K, R) bool -> (B, H, D).
    A sequence whose neighbour tokens are all masked gets 0."""
    B, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    keys = k.reshape(B, -1, H, D)
    values = v.reshape(B, -1, H, D)
    scores = (q[:, None] * keys).sum(-1).transpose(1, 2) * scale  # (B, H, K*R)
    if neighbour_mask is None:
        attn = scores.softmax(-1)
    else:
        real = neighbour_mask.reshape(B, 1, -1)
        any_real = real.any(-1, keepdim=True)
        scores = scores.masked_fill(~real, float("-inf")).masked_fill(~any_real, 0.0)
        attn = scores.softmax(-1) * any_real
    return (attn.transpose(1, 2)[..., None] * values).sum(1)
