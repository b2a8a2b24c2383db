"""`retro train --compile`: the model's forward, and with it the backward AOTAutograd derives from
it, compiled by torch.compile as one graph (fullgraph=True: a graph break is an error, not a
silent fallback), and AdamW's fused kernel on CUDA.

The model is compiled in place (nn.Module.compile): its state_dict keeps its names, and DDP,
which wraps it afterwards, runs its own hooks eagerly around the compiled forward (checked by hand
on 2 CPU processes: the gradients equal one process's to 1.5e-8; not in the test suite). The
retro_kernels ops trace through their fake implementations and autograd registrations (beside each
op in retro_kernels/ops/block_attention/); the CPU test compares compiled training with eager
training in float32.
"""
from __future__ import annotations

import torch
from torch import nn

# What torch.compile may build a training graph with: "inductor" (the default: generated
# kernels), or the debugging backends that trace the same graphs (forward and backward, with
# the custom ops' fakes) but run them op by op: the tests use these on the CPU, where inductor's
# C++ code generation takes minutes.
COMPILE_BACKENDS = ("inductor", "aot_eager", "aot_eager_decomp_partition", "eager")


def compile_for_training(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compiles model's forward in place with fullgraph=True and static shapes (training batches
    all have one shape) and returns it. The first call traces and compiles; a graph break there
    raises torch._dynamo.exc.Unsupported naming its cause."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"backend must be one of {COMPILE_BACKENDS}, got {backend!r}")
    model.compile(fullgraph=True, dynamic=False, backend=backend)
    return model


def use_fused_adamw(device: torch.device, compiled: bool) -> bool:
    """Whether training uses AdamW's fused kernel: with --compile on a CUDA device."""
    return compiled and torch.device(device).type == "cuda"


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Sets AdamW's implementation on every parameter group (fused kernel, or the default
    for-each one) after a checkpoint's state_dict, which carries the saving run's choice, was
    loaded; the step counters move where that implementation keeps them (the fused kernel: a
    float32 tensor on the parameter's device; the for-each one: on the CPU)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, False) if fused else (None, None)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(torch.float32).to(p.device if fused else "cpu")
