"""Argument checks shared by the public ops. Every failure names the argument, the value it got
and what was expected, and happens before any kernel is launched."""
from __future__ import annotations

from collections.abc import Sequence

import torch

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, layout: str, ndim: int) -> None:
    """x must be a floating-point tensor with `ndim` dimensions, described by `layout`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dtype not in _FLOATING:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dimensions), got shape {tuple(x.shape)}")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """x must share ref's dtype and device."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; expected one device")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; expected one dtype")


def check_sizes(name: str, x: torch.Tensor, expected: dict[int, tuple[int, str]]) -> None:
    """expected maps a dimension of x to (size, description of where the size comes from)."""
    for dim, (size, origin) in expected.items():
        if x.shape[dim] != size:
            raise ValueError(
                f"{name} has size {x.shape[dim]} in dimension {dim} (shape {tuple(x.shape)}), "
                f"expected {size} to match {origin}"
            )


def check_mask(name: str, mask, expected_shape: Sequence[int], layout: str, device: torch.device) -> None:
    """mask is None or a bool tensor of exactly expected_shape on device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be None or a bool torch.Tensor of shape {layout}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}; expected one device")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """softmax_scale or the default 1/sqrt(head_dim)."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    if not softmax_scale > 0 or softmax_scale == float("inf"):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return float(softmax_scale)
