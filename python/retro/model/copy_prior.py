"""What the two copy priors share: RetroModel's (model.py, apply_copy_prior) and a retrofitted
model's (retrofitting/prior.py, fitted to its base). Both start the encoder's sublayers as the identity
and smear each CCA key 90% onto the token before it."""
from __future__ import annotations

import torch

SMEAR = 2.2  # smear_keys' logit at the start: sigmoid(2.2) = 0.9 of each key from the token before


@torch.no_grad()
def zero_encoder_outputs(encoder) -> None:
    """Zeroes the output projections of every encoder sublayer (self-attention, cross-attention,
    feed-forward), so that each starts as the identity on its residual stream: an encoded neighbour
    token is its input embedding."""
    for layer in encoder.layers:
        outs = [layer.self_attn.to_out, layer.ff[-1]] + ([layer.cross_attn.to_out] if layer.cross_attn else [])
        for lin in outs:
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
