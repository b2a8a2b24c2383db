from .naive import neighbour_cross_attention_reference, neighbour_self_attention_reference
from .op import neighbour_cross_attention, neighbour_self_attention

__all__ = ["neighbour_cross_attention", "neighbour_cross_attention_reference",
           "neighbour_self_attention", "neighbour_self_attention_reference"]
