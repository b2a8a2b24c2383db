"""The fused kernel family behind CCA and the neighbour-encoder attentions (see layouts.py)."""
