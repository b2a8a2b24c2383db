"""Drop-in nn.Modules built on the retro_kernels ops."""
from .chunked_cross_attention import ChunkedCrossAttention
from .encoder import FeedForward, NeighbourCrossAttention, NeighbourSelfAttention, RetroEncoder
from .rotary import apply_rotary, cca_query_positions, rotary_angles, rotary_table

__all__ = ["ChunkedCrossAttention", "FeedForward", "NeighbourCrossAttention", "NeighbourSelfAttention",
           "RetroEncoder", "apply_rotary", "cca_query_positions", "rotary_angles", "rotary_table"]
