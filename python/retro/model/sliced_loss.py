"""The next-token NLL from the final hidden states, a slice of the sequence at a time, so that a
large vocabulary's logits (B, n, V) never exist whole: the one place training (training/step.py)
and evaluation (evaluate.py) compute their loss, through the models' forward(..., targets=...).

Each slice computes its logits, their float32 copy (under bfloat16) and log-softmax, and keeps
only the per-token NLL (B, s). With gradients enabled each slice runs under
torch.utils.checkpoint (use_reentrant=False): its logits are recomputed in the backward pass, so
at most one slice's logits and their gradient exist at a time, in the forward and in the backward.
The price is one more output-layer product per training step (a sequence that fits in one slice
runs without the checkpoint, as before).

The slice length comes from a budget of logit elements, LOGITS_BUDGET = 2**25 (B * s * V <= 2**25,
at least one position): 128 MiB per float32 copy of a slice's logits. A slice holds a handful of
such tensors at once (the logits, their float32 copy, log-softmax, and in the backward their
gradients), so the loss adds about 0.5 GB at most, whatever V and n, and a slice is still one
large matrix product: 128 rows at V = 262,144, 1,024 at V = 32,768 (a batch with B * n * V <=
2**25 is one slice). A budget of rows rather than positions keeps that bound for any batch size;
only a batch of more than 2**25 / V sequences exceeds it (slices of one position, B rows).
benchmarks/large_vocab_memory.py measures it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base.defaults import IGNORE

LOGITS_BUDGET = 2 ** 25  # logit elements per slice: B * slice length * V


def slice_length(batch: int, vocab: int, budget: int | None = None) -> int:
    """Positions per slice for `batch` rows of a `vocab`-way softmax: the most that keep
    batch * positions * vocab <= budget (default LOGITS_BUDGET), at least 1."""
    budget = LOGITS_BUDGET if budget is None else budget
    for name, value in (("batch", batch), ("vocab", vocab), ("budget", budget)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return max(1, budget // (batch * vocab))


def _slice_nll(hidden: Tensor, targets: Tensor, logits_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """hidden (B, s, d), targets (B, s) -> NLL (B, s) in float32 (float64 for float64 logits), 0 at IGNORE."""
    # contiguous: a (B, s, d) view of a longer sequence would reach the output layer's matmul as B
    # products with the weight expanded B times (bmm), whose weight gradient is a (B, d, V) tensor
    logits = logits_fn(hidden.contiguous())
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 from bf16; float64 stays
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return nll.view(targets.shape)


def sliced_nll(hidden: Tensor, targets: Tensor, logits_fn: Callable[[Tensor], Tensor], vocab: int,
               length: int | None = None) -> Tensor:
    """Per-token next-token NLL of final hidden states, a slice of positions at a time.

    hidden (B, n, d): the states the output layer reads; targets (B, n) integer ids (int64, int32,
    ...), IGNORE (-100) where not scored; logits_fn: hidden slice (B, s, d) -> logits (B, s, vocab)
    (the output projection and any post-processing; it must read its weights when called, not
    before, so that FSDP's gathered weights are the ones used in the recomputation); vocab: V, for
    the slice length;
    length: positions per slice (default slice_length(B, vocab)).
    -> NLL (B, n) in nats, float32 (float64 where the logits are float64), 0 at IGNORE targets.
    Its sum over the scored targets equals F.cross_entropy(logits, targets, reduction="sum") on
    the whole logits, up to rounding; gradients flow to hidden and to logits_fn's weights."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a (B, n, d) tensor, got {_describe(hidden)}")
    if not isinstance(targets, Tensor) or targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be a (B, n) = {tuple(hidden.shape[:2])} tensor (the hidden states' batch and "
                         f"positions), got {_describe(targets)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids (int64, or the tokenizers' int32), got dtype "
                        f"{targets.dtype}")
    targets = targets.long()
    B, n = targets.shape
    length = slice_length(max(B, 1), vocab) if length is None else length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an integer >= 1, got {length!r}")
    # one slice: nothing to gain (its logits would be recomputed at the start of the backward pass,
    # when the forward's are still needed by nothing else), so no recomputation either
    checkpointed = torch.is_grad_enabled() and n > length
    parts = []
    for s in range(0, n, length):
        h, t = hidden[:, s:s + length], targets[:, s:s + length]
        if checkpointed:
            parts.append(torch.utils.checkpoint.checkpoint(_slice_nll, h, t, logits_fn, use_reentrant=False))
        else:
            parts.append(_slice_nll(h, t, logits_fn))
    if not parts:  # n = 0
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return hidden.new_zeros((B, 0), dtype=dtype)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
