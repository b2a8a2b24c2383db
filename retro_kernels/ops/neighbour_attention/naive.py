"""The neighbour encoder's attentions in plain PyTorch (paper section 2.4, "Encoder"): the
references the fused backends are tested against. Self-attention runs within each retrieved
neighbour; cross-attention lets every neighbour token attend to the decoder states of the chunk
that retrieved it."""
from __future__ import annotations

import torch
from torch import Tensor


def _masked_softmax(scores: Tensor, real: Tensor | None) -> Tensor:
    """Softmax over the last dim, masked keys excluded; a row with no real key gives zeros."""
    if real is None:
        return scores.softmax(-1)
    any_real = real.any(-1, keepdim=True)
    scores = scores.masked_fill(~real, float("-inf")).masked_fill(~any_real, 0.0)
    return scores.softmax(-1) * any_real


def neighbour_self_attention_reference(q: Tensor, k: Tensor, v: Tensor, neighbour_mask: Tensor | None = None,
                                       softmax_scale: float | None = None) -> Tensor:
    """Bidirectional attention within each retrieved neighbour.

    q, k, v (B, L, K, R, H, D); neighbour_mask (B, L, K, R) bool, True = real token
    -> (B, L, K, R, H, D). Padding keys are excluded; a padding query still gets a finite value;
    a neighbour with no real token gives 0."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("blkihd,blkjhd->blkhij", q, k) * scale
    real = None if neighbour_mask is None else neighbour_mask[:, :, :, None, None, :]
    return torch.einsum("blkhij,blkjhd->blkihd", _masked_softmax(scores, real), v)


def neighbour_cross_attention_reference(q: Tensor, k: Tensor, v: Tensor, chunk_mask: Tensor | None = None,
                                        softmax_scale: float | None = None) -> Tensor:
    """Every token of the K neighbours of chunk u attends to the decoder states H_u of chunk u
    (unshifted), the same keys for all K neighbours.

    q (B, L, K, R, H, D); k, v (B, L, C, H, D); chunk_mask (B, L, C) bool -> (B, L, K, R, H, D)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("blkrhd,blchd->blkhrc", q, k) * scale
    real = None if chunk_mask is None else chunk_mask[:, :, None, None, None, :]
    return torch.einsum("blkhrc,blchd->blkrhd", _masked_softmax(scores, real), v)
