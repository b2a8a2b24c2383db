"""The public ops. Per op: naive.py (the reference that reads like the paper) beside op.py
(validation, backend dispatch); the fused kernels they share live in block_attention/ (block-local attention)."""
from ._backends import BackendFallbackWarning, resolved_backend
from .cca_decode import chunked_cross_attention_decode, chunked_cross_attention_decode_reference
from .cca import chunked_cross_attention, chunked_cross_attention_reference
from .neighbour_attention import (
    neighbour_cross_attention,
    neighbour_cross_attention_reference,
    neighbour_self_attention,
    neighbour_self_attention_reference,
)

__all__ = [
    "BackendFallbackWarning",
    "chunked_cross_attention",
    "chunked_cross_attention_decode",
    "chunked_cross_attention_decode_reference",
    "chunked_cross_attention_reference",
    "neighbour_cross_attention",
    "neighbour_cross_attention_reference",
    "neighbour_self_attention",
    "neighbour_self_attention_reference",
    "resolved_backend",
]
