"""One optimizer step of training, the only copy: `retro train` (train.py), the benchmarks that
time or train a step (benchmarks/training.py, model.py, demo_neighbours.py, retrieval_learning.py,
large_vocab_memory.py) and the tests run this function. large_vocab_memory.py also keeps the step
as it was before sliced_loss.py (whole logits), the "before" it measures against.

A step: the learning rate set on every parameter group (times its "lr_scale"), the summed
next-token loss under bfloat16 autocast (bf16=True; the model computes it a slice of the sequence
at a time, sliced_loss.py), backward, gradient-norm clipping, AdamW's
step, gradients cleared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.defaults import IGNORE


@dataclass
class StepResult:
    """What one step measured on this rank: nll, the summed next-token NLL over the scored targets
    (float32 or float64 scalar, detached); count, how many targets were scored (int64 scalar);
    grad_norm, the gradient norm before clipping (scalar; a DTensor under FSDP: fsdp.full_value)."""
    nll: torch.Tensor
    count: torch.Tensor
    grad_norm: torch.Tensor


def sequence_loss(model, batch, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over this rank's scored targets, scaled so that DDP's gradient mean
    equals the gradient of (all ranks' NLL) / (all ranks' scored targets). batch: tokens and
    targets (B, n), neighbours (B, n / m, k, r) and neighbour_mask (B, n / m, k, r), or None and
    None without retrieval. -> (loss, nll, count), scalars."""
    # the model computes the loss inside its forward (FSDP's hooks fire on forward), a slice of the
    # sequence at a time (sliced_loss.py): per-token NLL (B, n), float32 under bf16, 0 at IGNORE
    nll = model(batch.tokens, batch.neighbours, batch.neighbour_mask, targets=batch.targets).sum()
    count = (batch.targets != IGNORE).sum()
    total = count.clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return nll * world / total.clamp(min=1), nll.detach(), count


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate: lr times the group's "lr_scale" (train.make_optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, *, grad_clip: float,
               lr: float | None = None, world: int = 1, bf16: bool = False) -> StepResult:
    """One training step of net (the model, or its DDP wrapper; an FSDP-sharded model) on batch
    (see sequence_loss; on net's device). lr None keeps the groups' learning rates; world: the
    number of data-parallel processes (the loss scaling); bf16: bfloat16 autocast."""
    if lr is not None:
        set_learning_rate(optimizer, lr)
    with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, nll, count = sequence_loss(net, batch, world)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(nll, count, grad_norm)
