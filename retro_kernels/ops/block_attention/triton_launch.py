"""Launchers for the block-attention Triton kernels (triton_kernels.py).

They take the description of layouts.py: q-like tensors (B, T, H, D) with T = prefix_rows + q_valid,
k-like tensors (B, G, keys, H, D) with G >= groups, all contiguous, and q_rows, groups, prefix_rows.
Both launchers check every tensor against that description and the kernels' limits (dtype,
head_dim, the grid, int32 offsets) before launching, and take optional preallocated outputs (which
the kernels must write in full). On a GPU the environment variable RETRO_TRITON_AUTOTUNE picks
what the autotuner times for each (dtype, head_dim, q_rows): unset or "shortlist", 2-3
configurations (shortlist(): each costs a compile, and a float32 one 10-70 s of ptxas); "full",
every configuration of CONFIGS["autotune"] that fits (the whole space, for finding new winners);
"0", the shortlist's first alone, launched without timing (quick test runs). Under
TRITON_INTERPRET=1 (CPU tests) a single small configuration runs, with row blocks of 16 so that
the multi-block paths are exercised too. candidate_configs is the one place that picks the block
sizes and configurations: only those whose estimated shared memory fits sm_90's 227 KiB (float32
at head_dim > 128 gets smaller row blocks); tests/kernels/test_triton_compile.py compiles them all.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..._extension import triton_interpreting
from . import triton_limits
from .layouts import lse_dtype
from .triton_kernels import block_attention_bwd_kernel, block_attention_fwd_kernel

_INTERPRET = triton_interpreting()
_KEY = ["q_rows", "n_keys", "head_dim"]


def _config(block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# mode -> (forward configs, backward configs): the whole space of a mode. "autotune"
# (RETRO_TRITON_AUTOTUNE=full) times every one that fits; "shortlist" (a GPU's default) and
# "default" (RETRO_TRITON_AUTOTUNE=0) take theirs from shortlist(), which picks among "autotune"'s
# (so tests/kernels/test_triton_compile.py's compiles of those cover them); "interpret" is TRITON_INTERPRET=1.
CONFIGS = {
    "interpret": ([triton.Config({"BLOCK_N": 16}, num_warps=1)], [triton.Config({"BLOCK_N": 16}, num_warps=1)]),
    "autotune": (
        [_config(n, w, s) for n in (64, 128) for w in (4, 8) for s in (2, 3)]
        + [_config(128, 8, 4)],  # no spills at head_dim 64 (sm_90)
        [_config(n, w, s) for n in (32, 64) for w in (4, 8) for s in (1, 2)],
    ),
}
CONFIGS["shortlist"] = CONFIGS["default"] = CONFIGS["autotune"]
MODES = {"0": "default", "full": "autotune", "shortlist": "shortlist", "1": "shortlist", "": "shortlist"}


def _mode() -> str:
    """The key of CONFIGS this process launches with (RETRO_TRITON_AUTOTUNE, see the docstring)."""
    if _INTERPRET:
        return "interpret"
    knob = os.environ.get("RETRO_TRITON_AUTOTUNE", "")
    if knob not in MODES:
        raise ValueError(f"RETRO_TRITON_AUTOTUNE is {knob!r}, expected one of {sorted(MODES)} "
                         "(0: one configuration; shortlist or unset: 2-3 timed; full: the whole space)")
    return MODES[knob]


_MODE = _mode()


def shared_memory(dtype: torch.dtype, block_m: int, block_n: int, block_d: int, num_stages: int,
                  backward: bool, float32_partials: bool = False) -> int:
    """Estimated bytes of shared memory (sm_90) of one kernel instance: the tiles the compiler keeps
    there, q-like (BLOCK_M, BLOCK_D), k-like (BLOCK_N, BLOCK_D) once per pipeline buffer, and
    (BLOCK_M, BLOCK_N) probabilities, plus 1 KiB for reductions. Calibrated on Triton 3.9's sm_90
    compiles of every configuration at every block size the launchers use (1,119): it decides
    "fits in MAX_SHARED_MEMORY" as they do; it is 7 KiB low to 21 KiB high above 180 KiB, up to
    28 KiB off below. tests/kernels/test_triton_compile.py compiles every configuration it admits.

    16-bit dots run on tensor cores: with BLOCK_M >= 64 as Hopper warp-group MMAs reading both
    operands from shared memory (one k/v buffer per stage), below that as mma.sync (num_stages - 1
    buffers, the probabilities through shared memory); the backward's transposed dots have
    BLOCK_N rows, so where BLOCK_M reaches 64 and BLOCK_N does not, q and do are kept in both
    layouts. float32 ("ieee") dots run on FMA units, with one k/v buffer in the backward.
    float32_partials: the backward writes dk/dv as float32 partials (more than one row block)."""
    e = dtype.itemsize
    tensor_cores = e == 2
    if not backward:
        warp_group = tensor_cores and block_m >= 64
        kv_buffers = num_stages if warp_group else num_stages - 1
        probs = 0 if warp_group else block_m * block_n
        tiles = block_m * block_d + kv_buffers * 2 * block_n * block_d + probs
    else:
        q_copies = 4 if tensor_cores and block_m >= 64 > block_n else 2
        kv_buffers = num_stages if tensor_cores else 1
        tiles = q_copies * block_m * block_d + kv_buffers * 2 * block_n * block_d + block_m * block_n
        if float32_partials and tensor_cores:  # the float32 dk/dv stores take (stages + 1) / 2 k-tiles more
            tiles += (num_stages + 1) * block_n * block_d // 2
    return e * tiles + 1024


@dataclass(frozen=True)
class Candidates:
    """What a launch for (dtype, head_dim, q_rows) uses: its block sizes, whether the backward writes
    float32 dk/dv partials (q_rows > block_m), and the configurations it may choose among (all
    estimated to fit sm_90's shared memory; the autotuner times them, a single one just runs)."""
    block_m: int
    block_d: int
    float32_partials: bool
    configs: tuple[triton.Config, ...]


def _fitting(configs, dtype: torch.dtype, block_m: int, block_d: int, backward: bool,
             partials: bool) -> tuple[triton.Config, ...]:
    return tuple(c for c in configs if shared_memory(dtype, block_m, c.kwargs["BLOCK_N"], block_d, c.num_stages,
                                                     backward, partials) <= triton_limits.MAX_SHARED_MEMORY)


def shortlist(dtype: torch.dtype, block_m: int, block_d: int, backward: bool) -> list[triton.Config]:
    """The 2-3 configurations (of CONFIGS["autotune"]) worth timing at these block sizes, the likely
    winner first (what RETRO_TRITON_AUTOTUNE=0 runs). No H100 autotune winner has been recorded
    yet, so they follow how the kernels use sm_90 (shared_memory()'s notes) and the block sizes
    of Triton's own fused-attention tutorial on Hopper:
    - 16-bit forward with BLOCK_M >= 64 runs warp-group MMAs: 8 warps over 128 keys with 3-4
      pipeline stages at BLOCK_D <= 64 (the 128 x 128 score tile spread over 256 threads, no
      spills), 4 warps over 64 keys at BLOCK_D 128 (half the registers per k/v tile), and 2 stages
      at BLOCK_D 256 (the only depth whose k/v buffers fit beside a 128-row q tile);
    - 16-bit forward with BLOCK_M < 64 (short chunks, neighbour attention) is mma.sync with few
      rows: 4 warps, 64 or 128 keys, 2 stages;
    - the backward keeps q, do and both k/v tiles live: 64 keys at BLOCK_D <= 64, 32 keys beyond,
      1-2 stages;
    - float32 (FMA dots, unrolled: ptxas takes 10-70 s a configuration) gets two: the forward 4 and
      8 warps at 64 keys, the backward the 16-bit backward's first two.
    Those that do not fit shared memory are dropped by candidate_configs. Compiled for sm_90 by
    Triton 3.6, the bfloat16 shortlists at chunks of 64 (head_dim 64 and 128, forward and backward)
    use 136-203 registers and 45-208 KiB of shared memory, with no spills."""
    if backward:
        picks = [(64, 4, 2), (32, 4, 1), (64, 8, 2)] if block_d <= 64 else [(32, 4, 1), (64, 8, 1), (32, 8, 2)]
        picks = picks[:2] if dtype == torch.float32 else picks
    elif dtype == torch.float32:
        picks = [(64, 4, 2), (64, 8, 2)]
    elif block_m < 64:
        picks = [(64, 4, 2), (128, 4, 2)]
    elif block_d <= 64:
        picks = [(128, 8, 3), (64, 4, 3), (128, 8, 4)]
    elif block_d <= 128:
        picks = [(64, 4, 3), (128, 8, 3), (64, 8, 2)]
    else:
        picks = [(64, 8, 2), (64, 4, 2)]
    return [_config(*p) for p in picks]


def candidate_configs(dtype: torch.dtype, head_dim: int, q_rows: int, backward: bool,
                      mode: str | None = None) -> Candidates:
    """The launchers' choice for queries of `dtype` and `head_dim` in groups of `q_rows` rows
    (mode: a key of CONFIGS, default this process's). BLOCK_D is the next power of two >= head_dim
    (>= 16); BLOCK_M the next power of two >= q_rows in [16, cap] (cap 16 under the interpreter, 64
    for the backward beyond head_dim 64, else 128), halved while no configuration of the mode's
    space fits; the configurations are those that fit at these block sizes: all of them
    ("autotune", "interpret"), the shortlist's ("shortlist"; topped up to two with the space's
    first that fit where fewer do) or the first of those ("default")."""
    return _candidates(dtype, head_dim, q_rows, backward, _MODE if mode is None else mode)


@functools.cache  # per launch: keeps the launchers' per-call cost flat
def _candidates(dtype: torch.dtype, head_dim: int, q_rows: int, backward: bool, mode: str) -> Candidates:
    configs = CONFIGS[mode][backward]
    block_d = max(16, triton.next_power_of_2(head_dim))
    cap = 16 if mode == "interpret" else 64 if backward and head_dim > 64 else 128
    block_m = max(16, min(triton.next_power_of_2(max(q_rows, 1)), cap))
    while block_m > 16 and not _fitting(configs, dtype, block_m, block_d, backward, backward and q_rows > block_m):
        block_m //= 2
    partials = backward and q_rows > block_m
    fitting = _fitting(configs, dtype, block_m, block_d, backward, partials)
    if not fitting:
        raise RuntimeError(f"no {mode} configuration fits shared memory for {dtype}, head_dim {head_dim}")
    if mode in ("shortlist", "default"):
        short = _fitting(shortlist(dtype, block_m, block_d, backward), dtype, block_m, block_d, backward, partials)
        fitting = (short + tuple(c for c in fitting if c not in short))[:max(2, len(short))]
        fitting = fitting[:1] if mode == "default" else fitting
    return Candidates(block_m, block_d, partials, fitting)


def _prune(backward: bool):
    """The autotuner's early_config_prune: its list (this process's CONFIGS) cut to candidate_configs
    for the launch's dtype, head_dim and q_rows (all in the autotune key)."""
    def prune(configs, named_args, **kwargs):
        return list(candidate_configs(named_args["Q"].dtype, named_args["head_dim"], named_args["q_rows"],
                                      backward).configs)
    return prune


# Used only where a launch has more than one candidate; one candidate is launched directly (_launch):
# Triton 3.6's autotuner would time even a single configuration.
_fwd = triton.autotune(configs=CONFIGS[_MODE][0], key=_KEY,
                       prune_configs_by={"early_config_prune": _prune(False)})(block_attention_fwd_kernel)
_bwd = triton.autotune(configs=CONFIGS[_MODE][1], key=_KEY,
                       prune_configs_by={"early_config_prune": _prune(True)})(block_attention_bwd_kernel)


def _launch(backward: bool, blocks: Candidates, grid, *args, **constexprs) -> None:
    """The kernel over `grid`: autotuned among blocks.configs, or with the only one."""
    if len(blocks.configs) > 1:
        (_bwd if backward else _fwd)[grid](*args, **constexprs)
        return
    config = blocks.configs[0]
    kernel = block_attention_bwd_kernel if backward else block_attention_fwd_kernel
    kernel[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _precision(dtype: torch.dtype) -> str:
    # float32 stays float32 (IEEE) so the kernel matches a float32 PyTorch reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: Tensor | None, fallback: Tensor):
    if mask is None:
        return fallback, (0, 0, 0), False
    m = mask.view(torch.uint8)
    return m, (m.stride(0), m.stride(1), m.stride(2)), True


@dataclass(frozen=True)
class _Layout:
    """The kernels' integers, derived from the description (and the tensors' sizes)."""
    q_rows: int
    q_valid: int
    groups: int
    keys: int
    prefix_rows: int


def _layout(q: Tensor, k: Tensor, q_rows: int, groups: int, prefix_rows: int) -> _Layout:
    q_valid = q.shape[1] - prefix_rows
    # A group never has more rows than exist: a larger q_rows changes nothing (only group 0 can
    # then have rows) but would overflow g * q_rows and the grid.
    return _Layout(min(q_rows, max(q_valid, 1)), q_valid, groups, k.shape[2], prefix_rows)


def _grid(layout: _Layout, block_m: int, batch_heads: int):
    row_blocks = triton.cdiv(layout.q_rows, block_m)
    group_programs = layout.groups * row_blocks
    prefix = triton.cdiv(layout.prefix_rows, block_m)
    return row_blocks, group_programs, (group_programs + prefix, batch_heads)


def _fail(error, what: str, name: str, got, expected) -> None:
    raise error(f"triton block attention {what}: {name} {got}, expected {expected}")


def _check_tensor(what: str, name: str, t, shape, dtype, device) -> None:
    """t is a contiguous `dtype` tensor of exactly `shape` on `device`."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, what, name, f"is a {type(t).__name__}", "a tensor")
    if t.device != device:
        _fail(ValueError, what, name, f"is on {t.device}", f"{device} (q's device)")
    if t.dtype != dtype:
        _fail(TypeError, what, name, f"has dtype {t.dtype}", dtype)
    if tuple(t.shape) != tuple(shape):
        _fail(ValueError, what, name, f"has shape {tuple(t.shape)}", tuple(shape))
    if not t.is_contiguous():
        _fail(ValueError, what, name, f"has strides {t.stride()}", "contiguous strides")


def _check_launch(what: str, q: Tensor, k: Tensor, v: Tensor, mask, q_rows: int, groups: int,
                  prefix_rows: int, scale: float, **extra) -> _Layout:
    """Every tensor against q and the description, and the kernels' limits; returns the kernels'
    integers. extra: name -> (tensor or None, "q" (like q), "k" (like k) or "lse")."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        _fail(ValueError, what, "q", f"is {getattr(q, 'shape', type(q).__name__)}",
              "a (batch, rows, heads, head_dim) tensor")
    B, T, H, D = q.shape
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        _fail(ValueError, what, "q", f"is on {q.device}", "a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1)")
    if q.dtype not in triton_limits.DTYPES:
        _fail(TypeError, what, "q", f"has dtype {q.dtype}", "one of torch.float32, torch.bfloat16, torch.float16")
    _check_tensor(what, "q", q, q.shape, q.dtype, q.device)
    if not 1 <= D <= triton_limits.MAX_HEAD_DIM:
        _fail(ValueError, what, "head_dim", f"is {D}", f"1 .. {triton_limits.MAX_HEAD_DIM}")
    if q_rows < 1:
        _fail(ValueError, what, "q_rows", f"is {q_rows}", ">= 1")
    if not 0 <= prefix_rows <= T:
        _fail(ValueError, what, "prefix_rows", f"is {prefix_rows}", f"0 .. q's {T} rows")
    if groups < 0 or groups * q_rows < T - prefix_rows:
        _fail(ValueError, what, "groups", f"is {groups}",
              f"enough groups of q_rows = {q_rows} rows for q's {T} rows after prefix_rows = {prefix_rows}")
    if not isinstance(k, torch.Tensor) or k.dim() != 5:
        _fail(ValueError, what, "k", f"is {getattr(k, 'shape', type(k).__name__)}",
              "a (batch, key_groups, keys, heads, head_dim) tensor")
    if k.shape[1] < groups:
        _fail(ValueError, what, "k", f"has {k.shape[1]} key groups", f"at least groups = {groups}")
    layout = _layout(q, k, q_rows, groups, prefix_rows)
    k_shape = (B, k.shape[1], layout.keys, H, D)
    _check_tensor(what, "k", k, k_shape, q.dtype, q.device)
    _check_tensor(what, "v", v, k_shape, q.dtype, q.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
            _fail(ValueError, what, "mask", f"is {getattr(mask, 'shape', type(mask).__name__)}",
                  "a (batch, groups, keys) tensor")
        _check_tensor(what, "mask", mask, k_shape[:3], torch.bool, q.device)
    for name, (t, like) in extra.items():
        if t is None:
            continue
        shape = {"q": q.shape, "k": k.shape, "lse": (B, H, T)}[like]
        _check_tensor(what, name, t, shape, lse_dtype(q.dtype) if like == "lse" else q.dtype, q.device)
    if not math.isfinite(scale):
        _fail(ValueError, what, "softmax_scale", f"is {scale}", "a finite number")
    # The grid is (row blocks, batch * heads): the second dimension is limited to 65535.
    if B * H > triton_limits.MAX_GRID_Y:
        _fail(ValueError, what, "batch * heads", f"is {B} * {H} = {B * H}",
              f"<= {triton_limits.MAX_GRID_Y} (the grid's second dimension)")
    # In-batch offsets (row * row stride, group * group stride) are int32 products in the kernels.
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] and t.stride(0) > triton_limits.MAX_INT32:
            _fail(ValueError, what, name, f"has {t.stride(0)} elements per batch element",
                  f"<= {triton_limits.MAX_INT32} (the kernels' int32 offsets)")
    return layout


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_rows: int, groups: int, prefix_rows: int,
            scale: float, out: Tensor | None = None, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """-> out (B, T, H, D) like q, lse (B, H, T). out and lse, when given, are written in full."""
    layout = _check_launch("forward", q, k, v, mask, q_rows, groups, prefix_rows, scale, out=(out, "q"),
                           lse=(lse, "lse"))
    B, T, H, D = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, H, T), dtype=lse_dtype(q.dtype), device=q.device) if lse is None else lse
    if B * H == 0 or T == 0:
        return out, lse
    p = layout.prefix_rows
    blocks = candidate_configs(q.dtype, D, layout.q_rows, backward=False)
    row_blocks, group_programs, grid = _grid(layout, blocks.block_m, B * H)
    mask_t, (smb, smg, smr), has_mask = _mask_args(mask, q)
    qv, ov, lv = q[:, p:], out[:, p:], lse[:, :, p:]
    _launch(
        False, blocks, grid, qv, k, v, mask_t, ov, lv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        smb, smg, smr,
        lse.stride(0), lse.stride(1),
        H, layout.q_rows, layout.q_valid, layout.keys, D, p, row_blocks, group_programs, scale,
        HAS_MASK=has_mask, BLOCK_M=blocks.block_m, BLOCK_D=blocks.block_d,
        PRECISION=_precision(q.dtype),
    )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
             out: Tensor, lse: Tensor, q_rows: int, groups: int, prefix_rows: int, scale: float,
             dq: Tensor | None = None, dk: Tensor | None = None,
             dv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq like q, dk and dv like k (groups without query rows get 0). dq, dk and dv, when given,
    are written in full."""
    layout = _check_launch("backward", q, k, v, mask, q_rows, groups, prefix_rows, scale,
                           grad_out=(grad_out, "q"), out=(out, "q"), lse=(lse, "lse"), dq=(dq, "q"),
                           dk=(dk, "k"), dv=(dv, "k"))
    for name, t in (("grad_out", grad_out), ("out", out), ("lse", lse)):
        if t is None:
            _fail(ValueError, "backward", name, "is None", "a tensor")
    B, T, H, D = q.shape
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if layout.groups < k.shape[1]:
        dk[:, layout.groups:].zero_()
        dv[:, layout.groups:].zero_()
    if B * H == 0 or T == 0:
        return dq, dk, dv
    p = layout.prefix_rows
    blocks = candidate_configs(q.dtype, D, layout.q_rows, backward=True)
    row_blocks, group_programs, grid = _grid(layout, blocks.block_m, B * H)
    if not blocks.float32_partials:  # one row block per group
        dk_buf, dv_buf = dk, dv
        part_stride = 0
    else:  # one float32 partial per row block, summed below (deterministic)
        shape = (row_blocks, B, layout.groups) + tuple(k.shape[2:])
        if math.prod(shape) > triton_limits.MAX_INT32:  # block * block stride is an int32 product
            _fail(ValueError, "backward", "the dk/dv partials", f"have {math.prod(shape)} elements",
                  f"<= {triton_limits.MAX_INT32} (the kernel's int32 offsets; use a smaller chunk or batch)")
        dk_buf = torch.empty(shape, dtype=torch.float32, device=k.device)
        dv_buf = torch.empty_like(dk_buf)
        part_stride = dk_buf.stride(0)
    mask_t, (smb, smg, smr), has_mask = _mask_args(mask, q)
    _launch(
        True, blocks, grid,
        q[:, p:], k, v, mask_t, out[:, p:], grad_out[:, p:], lse[:, :, p:], dq[:, p:], dk_buf, dv_buf,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        part_stride, dk_buf.stride(-5), dk_buf.stride(-4), dk_buf.stride(-3), dk_buf.stride(-2),
        smb, smg, smr,
        lse.stride(0), lse.stride(1),
        H, layout.q_rows, layout.q_valid, layout.keys, D, p, row_blocks, group_programs, scale,
        HAS_MASK=has_mask, BLOCK_M=blocks.block_m, BLOCK_D=blocks.block_d,
        PRECISION=_precision(q.dtype),
    )
    if blocks.float32_partials:
        dk[:, : layout.groups] = dk_buf.sum(0).to(dk.dtype)
        dv[:, : layout.groups] = dv_buf.sum(0).to(dv.dtype)
    return dq, dk, dv
