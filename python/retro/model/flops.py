"""Model FLOPs of RETRO training and model FLOP utilisation (MFU).

Counted: the matrix products (2 FLOPs per multiply-add) of the forward pass, as the PaLM paper
(Chowdhery et al. 2022, appendix B) counts them: attention scores and values over the full
context (no halving for the causal mask), no norms, softmax, rotary, GELU or biases; training
is 3x the forward (the backward pass computes two products for each forward one). Recomputation
(activation checkpointing) is not counted: these are model FLOPs, not hardware FLOPs.

Symbols (RetroConfig fields): d = dim, a = heads * head_dim, f = ff_dim, V = vocab_size,
N = depth, c = len(cca_layers), m = chunk_size, k = neighbours, r = 2m (neighbour length),
e = enc_dim, b = enc_heads * enc_head_dim, D_e = enc_depth, x = 1 (the encoder layers that
cross-attend to the chunk: the first), n = the training sequence length (a multiple of m).

Forward FLOPs per decoder token:

    decoder      N * (8 d a + 4 d f)          q, k, v, out projections; feed-forward
               + N * 4 n a                    self-attention scores and values (12 N a n for training)
               + 2 d V                        the tied output embedding
    CCA          c * (4 d a                   query and output projections
                      + 4 k r a               scores and values over the k r neighbour tokens
                      + (k r / m) 4 e a)      key and value projections of the neighbours
    encoder      (k r / m) * (2 d e [e != d]  the input projection d -> e
                      + D_e (8 e b + 4 r b + 16 e^2)   self-attention in a neighbour; FF 4e
                      + x (4 e b + 4 m b))    cross-attention queries, outputs, scores, values
               + x * 4 d b                    its keys and values from the chunk's m states

k r / m = 2k neighbour tokens are encoded per decoder token. Without retrieval (RETRO[OFF])
only the decoder terms count. Training FLOPs per token = 3 * forward.
"""
from __future__ import annotations

from .model import RetroConfig

# Dense bfloat16 tensor-core peak, FLOP/s: NVIDIA's datasheets state the figures "with
# sparsity"; the dense peak is half (H100 SXM5 and H200 SXM: 1979 -> 989.4 TFLOP/s; H100 PCIe:
# 1513 -> 756.5 TFLOP/s). Matched against torch.cuda.get_device_name(), first match wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756.5e12),
    ("H100", 989.4e12),   # "NVIDIA H100 80GB HBM3" is the SXM5 part
    ("H200", 989.4e12),
)


def _check_config(cfg) -> None:
    if not isinstance(cfg, RetroConfig):
        raise ValueError(f"cfg must be a RetroConfig, got {type(cfg).__name__}")


def forward_flops_per_token(cfg: RetroConfig, seq_len: int, retrieval: bool = True) -> int:
    """Forward-pass model FLOPs per decoder token of a sequence of seq_len tokens (the formula of
    this module's docstring). seq_len must be a positive multiple of cfg.chunk_size."""
    _check_config(cfg)
    m = cfg.chunk_size
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < m or seq_len % m:
        raise ValueError(f"seq_len must be a positive multiple of chunk_size={m}, got {seq_len!r}")
    d, a, f, V, n = cfg.dim, cfg.heads * cfg.head_dim, cfg.ff_dim, cfg.vocab_size, seq_len
    flops = cfg.depth * (8 * d * a + 4 * d * f + 4 * n * a) + 2 * d * V
    if not retrieval:
        return flops
    k, r, e = cfg.num_neighbours, cfg.neighbour_len, cfg.enc_dim
    b, cross = cfg.enc_heads * cfg.enc_head_dim, 1
    per_token_neighbours = k * r // m  # = 2k
    flops += len(cfg.cca_layers) * (4 * d * a + 4 * k * r * a + per_token_neighbours * 4 * e * a)
    encoder_per_neighbour_token = ((2 * d * e if e != d else 0)
                                   + cfg.enc_depth * (8 * e * b + 4 * r * b + 16 * e * e)
                                   + cross * (4 * e * b + 4 * m * b))
    return flops + per_token_neighbours * encoder_per_neighbour_token + cross * 4 * d * b


def training_flops_per_token(cfg: RetroConfig, seq_len: int, retrieval: bool = True) -> int:
    """Model FLOPs of one training token (forward and backward): 3 * forward_flops_per_token."""
    return 3 * forward_flops_per_token(cfg, seq_len, retrieval)


def peak_flops(device_name: str) -> float | None:
    """The dense bfloat16 peak FLOP/s of a GPU named like torch.cuda.get_device_name()
    ('NVIDIA H100 80GB HBM3'), or None for a device not in PEAK_BF16_FLOPS."""
    if not isinstance(device_name, str):
        raise ValueError(f"device_name must be a string, got {device_name!r}")
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: tokens_per_s * flops_per_token / peak (a fraction), None without a peak."""
    for name, value in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if peak is None:
        return None
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not peak > 0:
        raise ValueError(f"peak must be a positive number of FLOP/s or None, got {peak!r}")
    return tokens_per_s * flops_per_token / peak
