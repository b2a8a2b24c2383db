"""Argument checks of the fused ops (torch.ops.retro_kernels.*), in Python: the Triton ops and the
fake (meta) implementations of every op run them. The C++ ops run the same checks in
csrc/torch/arg_checks.h, with the same messages:

    "<op>: <argument> has shape [..], expected [..] <layout> (<where the sizes come from>)"

Every tensor argument is checked against the others -- dimensions, every size, dtype, device and
the contiguous layout the kernels assume -- and every integer argument against its range, before
any kernel runs. Shape and layout errors raise ValueError, dtype errors TypeError.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

CCA_Q = "(batch, seq_len, heads, head_dim)"
NEIGHBOURS = "(batch, num_chunks, num_neighbours, neighbour_len, heads, head_dim)"
NEIGHBOUR_MASK = "(batch, num_chunks, num_neighbours, neighbour_len)"
CHUNK_KV = "(batch, num_chunks, chunk_len, heads, head_dim)"
CHUNK_MASK = "(batch, num_chunks, chunk_len)"
DECODE_Q = "(batch, heads, head_dim)"
DECODE_KV = "(batch, num_neighbours, neighbour_len, heads, head_dim)"
DECODE_MASK = "(batch, num_neighbours, neighbour_len)"
LSE = "(batch, heads, rows)"

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DECODE_DTYPES = TRITON_DTYPES


def _str(sizes: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in sizes) + "]"


def _contiguous_strides(sizes: Sequence[int]) -> list[int]:
    strides, s = [], 1
    for n in reversed(sizes):
        strides.append(s)
        s *= max(int(n), 1)
    return strides[::-1]


def _from(what: str, t: Tensor, name: str = "q") -> str:
    return f"{what} from {name} of shape {_str(t.shape)}"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ArgChecker:
    """The checks of one op call. q fixes the device and the dtype of every floating-point
    argument; the op derives the expected shapes from the sizes it reads."""

    def __init__(self, op: str, q, q_layout: str, q_ndim: int, dtypes: Sequence[torch.dtype]):
        self.op = op
        self.ndim("q", q, q_ndim, q_layout)
        self.device, self.dtype = q.device, q.dtype
        if q.dtype not in dtypes:
            raise TypeError(f"{op}: q has dtype {q.dtype}, expected one of "
                            + ", ".join(str(d) for d in dtypes))
        self.tensor("q", q, q.shape, q_layout, "")

    def ndim(self, name: str, t, n: int, layout: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.op}: {name} is a {type(t).__name__}, expected a tensor {layout}")
        if t.dim() != n:
            raise ValueError(f"{self.op}: {name} has {t.dim()} dimensions (shape {_str(t.shape)}), "
                             f"expected {n}: {layout}")

    def tensor(self, name: str, t, shape: Sequence[int], layout: str, origin: str,
               dtype: torch.dtype | None = None, dtype_origin: str = "q's dtype") -> None:
        """t lives on q's device, has `dtype` (q's when None), exactly `shape` and contiguous
        strides. `origin` says where the expected sizes come from."""
        self.ndim(name, t, len(shape), layout)
        if t.device != self.device:
            raise ValueError(f"{self.op}: {name} is on {t.device}, expected {self.device} (q's device)")
        want = self.dtype if dtype is None else dtype
        if t.dtype != want:
            raise TypeError(f"{self.op}: {name} has dtype {t.dtype}, expected {want} ({dtype_origin})")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.op}: {name} has shape {_str(t.shape)}, expected {_str(shape)} {layout}"
                             + (f" ({origin})" if origin else ""))
        if not t.is_contiguous():
            raise ValueError(f"{self.op}: {name} has strides {_str(t.stride())}, expected the contiguous "
                             f"strides {_str(_contiguous_strides(t.shape))} of shape {_str(t.shape)} "
                             "(call .contiguous())")

    def mask(self, name: str, m, shape: Sequence[int], layout: str, origin: str) -> None:
        if m is not None:
            self.tensor(name, m, shape, layout, origin, torch.bool, "True = real token")

    def at_least(self, name: str, value: int, minimum: int) -> None:
        if value < minimum:
            raise ValueError(f"{self.op}: {name} is {value}, expected >= {minimum}")

    def at_most(self, name: str, value: int, maximum: int, why: str) -> None:
        if value > maximum:
            raise ValueError(f"{self.op}: {name} is {value}, expected <= {maximum} ({why})")

    def finite(self, name: str, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"{self.op}: {name} is {value}, expected a finite number")


def _backward_extras(c: ArgChecker, q: Tensor, q_layout: str, grad_out, out, lse, lse_rows: int) -> None:
    c.tensor("grad_out", grad_out, q.shape, q_layout, _from("the shape", q))
    c.tensor("out", out, q.shape, q_layout, _from("the shape", q))
    c.tensor("lse", lse, (q.shape[0], q.shape[-2], lse_rows), LSE, _from("batch, heads and rows", q),
             lse_dtype(c.dtype), "the accumulation dtype of q's dtype")


def check_cca(op: str, q, k, v, mask, chunk_size: int, scale: float, dtypes=ALL_DTYPES,
              grad_out=None, out=None, lse=None) -> None:
    """q (B, N, H, D); k, v (B, L, K, R, H, D) with L >= N // chunk_size; mask (B, L, K, R).
    With grad_out (backward ops): grad_out and out like q, lse (B, H, N)."""
    c = ArgChecker(op, q, CCA_Q, 4, dtypes)
    c.ndim("k", k, 6, NEIGHBOURS)
    c.at_least("chunk_size", chunk_size, 1)
    B, N, H, D = q.shape
    L, K, R = k.shape[1:4]
    c.tensor("k", k, (B, L, K, R, H, D), NEIGHBOURS, _from("batch, heads and head_dim", q))
    if L < N // chunk_size:
        raise ValueError(f"{op}: k has {L} chunks (shape {_str(k.shape)}), expected at least "
                         f"seq_len // chunk_size = {N} // {chunk_size} = {N // chunk_size} (seq_len from q)")
    c.tensor("v", v, k.shape, NEIGHBOURS, _from("the shape", k, "k"))
    c.mask("neighbour_mask", mask, (B, L, K, R), NEIGHBOUR_MASK, _from("the first four sizes", k, "k"))
    c.finite("softmax_scale", scale)
    if grad_out is not None or out is not None or lse is not None:
        _backward_extras(c, q, CCA_Q, grad_out, out, lse, N)


def check_self(op: str, q, k, v, mask, scale: float, dtypes=ALL_DTYPES, grad_out=None, out=None,
               lse=None) -> None:
    """q, k, v (B, L, K, R, H, D); mask (B, L, K, R)."""
    c = ArgChecker(op, q, NEIGHBOURS, 6, dtypes)
    c.tensor("k", k, q.shape, NEIGHBOURS, _from("the shape", q))
    c.tensor("v", v, q.shape, NEIGHBOURS, _from("the shape", q))
    c.mask("neighbour_mask", mask, q.shape[:4], NEIGHBOUR_MASK, _from("the first four sizes", q))
    c.finite("softmax_scale", scale)
    if grad_out is not None or out is not None or lse is not None:
        _backward_extras(c, q, NEIGHBOURS, grad_out, out, lse, q.shape[1] * q.shape[2] * q.shape[3])


def check_cross(op: str, q, k, v, mask, scale: float, dtypes=ALL_DTYPES, grad_out=None, out=None,
                lse=None) -> None:
    """q (B, L, K, R, H, D); k, v (B, L, C, H, D); mask (B, L, C)."""
    c = ArgChecker(op, q, NEIGHBOURS, 6, dtypes)
    c.ndim("k", k, 5, CHUNK_KV)
    B, L, _, _, H, D = q.shape
    C = k.shape[2]
    c.tensor("k", k, (B, L, C, H, D), CHUNK_KV, _from("batch, num_chunks, heads and head_dim", q))
    c.tensor("v", v, k.shape, CHUNK_KV, _from("the shape", k, "k"))
    c.mask("chunk_mask", mask, (B, L, C), CHUNK_MASK, _from("the first three sizes", k, "k"))
    c.finite("softmax_scale", scale)
    if grad_out is not None or out is not None or lse is not None:
        _backward_extras(c, q, NEIGHBOURS, grad_out, out, lse, q.shape[1] * q.shape[2] * q.shape[3])


def check_cca_decode(op: str, q, k, v, mask, scale: float, dtypes=ALL_DTYPES) -> None:
    """q (B, H, D); k, v (B, K, R, H, D); mask (B, K, R)."""
    c = ArgChecker(op, q, DECODE_Q, 3, dtypes)
    c.ndim("k", k, 5, DECODE_KV)
    B, H, D = q.shape
    K, R = k.shape[1:3]
    c.tensor("k", k, (B, K, R, H, D), DECODE_KV, _from("batch, heads and head_dim", q))
    c.tensor("v", v, k.shape, DECODE_KV, _from("the shape", k, "k"))
    c.mask("neighbour_mask", mask, (B, K, R), DECODE_MASK, _from("the first three sizes", k, "k"))
    c.finite("softmax_scale", scale)
