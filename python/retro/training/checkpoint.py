"""Checkpoints: RUN/checkpoint/ holds model.safetensors (weights), config.json, optimizer.pt
(optimizer, schedule and RNG states) and state.json (step, data position, options). A new
checkpoint is written into a temporary folder and swapped in by renames, so a crash leaves the
previous or the new checkpoint, never half of one. A file that is missing or damaged (truncated,
overwritten) is a RetroError naming it and what to do, whichever command reads it."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..base.atomic import write_folder
from ..base.errors import damaged_file
from ..base.files import load_tensors, load_weights, read_json_file
from ..model.saved import REMEDY, checkpoint_dir



def rng_state() -> dict:
    """Every RNG's state in types torch.load(weights_only=True) reads: tensors, numbers, tuples
    (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, weights: dict[str, torch.Tensor], config: dict, state: dict,
                    optimizer_state: dict | None) -> Path:
    """Writes RUN/checkpoint atomically (temp folder, then renames)."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")

    return write_folder(Path(run) / "checkpoint", fill)


def load_checkpoint(run: Path, with_optimizer: bool = True) -> dict:
    """-> {"weights", "config", "state", "optimizer" (or None), "dir"}; with_optimizer: optimizer.pt is
    required (--resume continues the optimizer exactly)."""
    d = checkpoint_dir(run)
    out = {"config": read_json_file(d / "config.json", REMEDY), "state": read_json_file(d / "state.json", REMEDY),
           "weights": load_weights(d / "model.safetensors", REMEDY), "optimizer": None, "dir": d}
    if with_optimizer:
        remedy = f"--resume needs it to continue the run exactly: {REMEDY}; generate and evaluate do not need it"
        out["optimizer"] = load_tensors(d / "optimizer.pt", remedy)
        if not isinstance(out["optimizer"], dict) or not {"optimizer", "rng"} <= set(out["optimizer"]):
            raise damaged_file(d / "optimizer.pt", "no optimizer and RNG states in it", remedy)
    return out
