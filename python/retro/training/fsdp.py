"""Sharded data parallelism for `retro train --fsdp` (FSDP2) and its sharded checkpoints.

Sharding: `fully_shard` on every decoder block (RetroModel.layers, or the base model's blocks of a
retrofitted one) and every neighbour-encoder layer, then on the root (embedding, final norm,
encoder input projection). Each rank keeps 1/N of every weight, gradient and AdamW moment; a
block's weights are all-gathered just before it runs and freed after. Gradients are reduce-
scattered as a mean over ranks, like DDP's all-reduce, so `sequence_loss`'s scaling serves both.
On GPUs the gathered weights are bfloat16 (`MixedPrecisionPolicy`, gradients reduced in
float32); on the CPU everything stays float32. Activation checkpointing (`--checkpointing`)
composes: the model checkpoints each block's call, FSDP's hooks run inside it and skip the
unshard/reshard during the recomputation.

Checkpoints (torch.distributed.checkpoint): RUN/checkpoints/step-XXXXXXXX/ holds every rank's
shards of the model's trainable weights and of the optimizer states (`*.distcp`, `.metadata`),
config.json, state.json, rng.pt (the RNG state of every rank) and COMPLETE. Frozen weights (a
retrofitted model's base) are left out: they are loaded from the base model. All ranks write into
RUN/checkpoints/.step-XXXXXXXX.tmp; rank 0 then adds COMPLETE and renames the folder, so a folder
named step-* is always whole. A checkpoint loads on any number of processes (the shards are re-cut
on loading), and `convert_checkpoint` turns one into the single-file RUN/checkpoint that
`generate` and `evaluate` read. With one process (no process group) `--fsdp` shards nothing but
writes and reads the same sharded checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..base import distributed as dist
from ..base.files import load_tensors
from .checkpoint import REMEDY
from ..base.errors import RetroError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
KEEP = 2  # complete step folders kept; older ones are removed after a new one is complete
_STEP = re.compile(r"^step-(\d{8})$")


# ---- sharding -----------------------------------------------------------------------------------

def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded one by one: decoder blocks, then encoder layers."""
    return [*model.blocks, *model.encoder.layers]


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Shards `model` in place over all ranks (FSDP2) and returns it. bf16 (on a GPU only): the
    gathered weights are bfloat16, gradients reduced in float32; otherwise float32 throughout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # float32: no casts
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_value(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over sharded gradients returns one)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


# ---- sharded checkpoints -------------------------------------------------------------------------

def step_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:08d}"


def complete_steps(run: Path) -> list[Path]:
    """The complete step folders of RUN, oldest first."""
    folder = Path(run) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def latest_step_dir(run: Path) -> Path:
    """The newest complete step folder of RUN; RetroError if there is none."""
    steps = complete_steps(run)
    if not steps:
        raise RetroError(f"{str(run)!r} holds no sharded checkpoint (expected {str(Path(run) / CHECKPOINTS)!r}/"
                         "step-*/COMPLETE); train one with `retro train --fsdp`")
    return steps[-1]


def _options(model):
    """Frozen weights (a retrofitted model's base) are not saved: they come from the base model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def _state_dicts(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    return {"model": model_sd, "optim": optim_sd}


@contextlib.contextmanager
def _one_process_quiet():
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(run: Path, step: int, model, optimizer, config: dict, state: dict, rngs: list) -> Path:
    """Called by every rank: writes RUN/checkpoints/step-XXXXXXXX atomically (see the module's
    docstring) and keeps the newest KEEP complete ones."""
    import torch.distributed.checkpoint as dcp

    final = step_dir(run, step)
    tmp = final.parent / f".{final.name}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with _one_process_quiet():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp), no_dist=not torch.distributed.is_initialized())
    dist.barrier()
    if dist.is_main():
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        torch.save(rngs, tmp / "rng.pt")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        (tmp / COMPLETE).write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_steps(run)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_sharded_meta(path: Path) -> dict:
    """A step folder's {"config", "state", "rng" (a list: one RNG state per rank that saved)}."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise RetroError(f"{str(path)!r} is not a complete sharded checkpoint (no {COMPLETE} marker)")
    return {"config": json.loads((path / "config.json").read_text()),
            "state": json.loads((path / "state.json").read_text()),
            "rng": load_tensors(path / "rng.pt", REMEDY), "dir": path}


def load_sharded(path: Path, model, optimizer) -> None:
    """Loads a step folder's model and optimizer states into `model` (sharded or not, on any
    number of ranks) and `optimizer` (built on the model's current parameters)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _state_dicts(model, optimizer)
    with _one_process_quiet():
        dcp.load(sd, checkpoint_id=str(path), no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_options(model))


def convert_checkpoint(run: str | Path, out: str | Path | None = None, step: int | None = None,
                       log=print) -> Path:
    """The sharded checkpoint of RUN (the newest, or `step`) as the single-file checkpoint of
    checkpoint.py (OUT/checkpoint: model.safetensors, config.json, state.json; no optimizer), which
    `retro generate OUT` and `retro evaluate OUT` load. OUT defaults to RUN. Runs in one process,
    whatever the number of processes that saved it; a retrofitted model keeps its new weights only."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from .checkpoint import save_checkpoint

    run = Path(run)
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise RetroError(f"--step must be an integer >= 1, got {step!r}")
        src = step_dir(run, step)
        if not (src / COMPLETE).exists():
            have = ", ".join(str(int(_STEP.match(p.name).group(1))) for p in complete_steps(run)) or "none"
            raise RetroError(f"--step {step}: {str(run)!r} has no complete sharded checkpoint of that step "
                             f"(complete steps: {have})")
    else:
        src = latest_step_dir(run)
    meta = read_sharded_meta(src)
    with tempfile.TemporaryDirectory() as tmp, _one_process_quiet():
        dcp_to_torch_save(str(src), os.path.join(tmp, "full.pt"))
        full = load_tensors(os.path.join(tmp, "full.pt"), REMEDY)
    weights = full["model"]
    if meta["config"].get("retrofit"):
        weights = {k: v for k, v in weights.items() if not k.startswith("base.")}
    out = Path(out) if out is not None else run
    dest = save_checkpoint(out, weights, meta["config"], {**meta["state"], "converted_from": str(src)}, None)
    log(f"[convert-checkpoint] {src} (step {meta['state']['step']}) -> {dest}")
    return dest
