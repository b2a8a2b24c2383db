from .naive import chunked_cross_attention_decode_reference
from .op import chunked_cross_attention_decode

__all__ = ["chunked_cross_attention_decode", "chunked_cross_attention_decode_reference"]
