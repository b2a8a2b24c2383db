from .naive import chunked_cross_attention_reference
from .op import chunked_cross_attention

__all__ = ["chunked_cross_attention", "chunked_cross_attention_reference"]
