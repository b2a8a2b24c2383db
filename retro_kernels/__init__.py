"""retro_kernels: fused kernels for RETRO (Borgeaud et al. 2021) as torch custom ops, and the
drop-in layers built on them.

    from retro_kernels import chunked_cross_attention, ChunkedCrossAttention
"""
from ._extension import has_cpu_kernels, has_cuda_kernels, has_triton
from .nn import ChunkedCrossAttention
from .ops import (
    available_backends,
    chunked_cross_attention,
    chunked_cross_attention_decode,
    chunked_cross_attention_decode_reference,
    chunked_cross_attention_reference,
)

__version__ = "0.1.0"

__all__ = [
    "ChunkedCrossAttention",
    "available_backends",
    "chunked_cross_attention",
    "chunked_cross_attention_decode",
    "chunked_cross_attention_decode_reference",
    "chunked_cross_attention_reference",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "has_triton",
]
