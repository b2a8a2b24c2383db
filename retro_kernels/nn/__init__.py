"""Drop-in nn.Modules built on the retro_kernels ops."""
from .chunked_cross_attention import ChunkedCrossAttention
from .rotary import apply_rotary, cca_query_positions, rotary_angles

__all__ = ["ChunkedCrossAttention", "apply_rotary", "cca_query_positions", "rotary_angles"]
