"""Argument checks of the fused ops (torch.ops.retro_kernels.*), in Python: the Triton ops and the
fake (meta) implementations of every op run them. The C++ ops run the same checks in
csrc/torch/arg_checks.h, with the same messages (layouts.py describes the arguments):

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

ROWS_Q = "(batch, rows, heads, head_dim)"
GROUPS_KV = "(batch, key_groups, keys, heads, head_dim)"
GROUPS_MASK = "(batch, key_groups, keys)"
DECODE_Q = "(batch, key_groups, heads, head_dim)"
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


def _check_keys(c: ArgChecker, q: Tensor, k, v, key_mask, q_name_sizes: str, decode: bool) -> None:
    """k, v and key_mask against q; k's key_groups are q's rows for the decode op."""
    c.ndim("k", k, 5, GROUPS_KV)
    B, rows, H, D = q.shape
    c.tensor("k", k, (B, rows if decode else k.shape[1], k.shape[2], H, D), GROUPS_KV, _from(q_name_sizes, q))
    c.tensor("v", v, k.shape, GROUPS_KV, _from("the shape", k, "k"))
    c.mask("key_mask", key_mask, k.shape[:3], GROUPS_MASK, _from("the first three sizes", k, "k"))


def check_block(op: str, q, k, v, key_mask, q_rows: int, groups: int, prefix_rows: int, scale: float,
                dtypes=ALL_DTYPES, grad_out=None, out=None, lse=None) -> None:
    """The arguments of block_attention_fwd (layouts.py describes them); with grad_out (backward
    ops): grad_out and out like q, lse (batch, heads, rows)."""
    c = ArgChecker(op, q, ROWS_Q, 4, dtypes)
    _check_keys(c, q, k, v, key_mask, "batch, heads and head_dim", decode=False)
    rows, key_groups = q.shape[1], k.shape[1]
    c.at_least("q_rows", q_rows, 1)
    c.at_most("groups", groups, key_groups, _from("key_groups", k, "k"))
    c.at_least("prefix_rows", prefix_rows, 0)
    c.at_most("prefix_rows", prefix_rows, rows, _from("rows", q))
    needed = -(-(rows - prefix_rows) // q_rows)  # >= 0, so this also refuses a negative groups
    if groups < needed:
        raise ValueError(f"{op}: groups is {groups}, expected >= {needed} = ceil((rows - prefix_rows) / q_rows) "
                         f"= ceil(({rows} - {prefix_rows}) / {q_rows}) ({_from('rows', q)})")
    c.finite("softmax_scale", scale)
    if grad_out is not None or out is not None or lse is not None:
        c.tensor("grad_out", grad_out, q.shape, ROWS_Q, _from("the shape", q))
        c.tensor("out", out, q.shape, ROWS_Q, _from("the shape", q))
        c.tensor("lse", lse, (q.shape[0], q.shape[2], rows), LSE, _from("batch, heads and rows", q),
                 lse_dtype(c.dtype), "the accumulation dtype of q's dtype")


def check_decode(op: str, q, k, v, key_mask, scale: float, dtypes=ALL_DTYPES) -> None:
    """The arguments of block_attention_decode: q (B, G, H, D); k, v (B, G, keys, H, D);
    key_mask (B, G, keys)."""
    c = ArgChecker(op, q, DECODE_Q, 4, dtypes)
    _check_keys(c, q, k, v, key_mask, "batch, key_groups, heads and head_dim", decode=True)
    c.finite("softmax_scale", scale)
