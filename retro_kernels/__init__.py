"""retro_kernels: fused kernels for RETRO (Borgeaud et al. 2021) as torch custom ops, and the
drop-in layers built on them.

    from retro_kernels import chunked_cross_attention, ChunkedCrossAttention
"""
from ._extension import cpu_kernel_isa, has_cpu_kernels, has_cuda_kernels, has_triton
from .nn import ChunkedCrossAttention, RetroEncoder
from .ops import (
    chunked_cross_attention,
    chunked_cross_attention_decode,
    chunked_cross_attention_decode_reference,
    chunked_cross_attention_reference,
    neighbour_cross_attention,
    neighbour_cross_attention_reference,
    neighbour_self_attention,
    neighbour_self_attention_reference,
)

__version__ = "0.1.0"

__all__ = [
    "ChunkedCrossAttention",
    "RetroEncoder",
    "chunked_cross_attention",
    "chunked_cross_attention_decode",
    "chunked_cross_attention_decode_reference",
    "chunked_cross_attention_reference",
    "cpu_kernel_isa",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "has_triton",
    "neighbour_cross_attention",
    "neighbour_cross_attention_reference",
    "neighbour_self_attention",
    "neighbour_self_attention_reference",
]
