"""Checkpoints: RUN/checkpoint/ holds model.safetensors (weights), config.json, optimizer.pt
(optimizer, schedule and RNG states) and state.json (step, data position, options). A new
checkpoint is written into a temporary folder and swapped in by renames, so a crash leaves the
previous or the new checkpoint, never half of one."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .atomic import write_folder
from .errors import RetroError


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


def checkpoint_dir(run: Path) -> Path:
    """RUN/checkpoint, or the previous one if a crash hit between the two renames."""
    run = Path(run)
    for name in ("checkpoint", ".checkpoint-old"):
        if (run / name / "state.json").exists():
            return run / name
    if any((run / "checkpoints").glob("step-*/COMPLETE")):  # a --fsdp run (fsdp.py)
        raise RetroError(f"{str(run)!r} holds sharded checkpoints only (a --fsdp run); convert the newest with "
                         f"`retro convert-checkpoint {run}`")
    raise RetroError(f"{str(run)!r} holds no checkpoint (expected {str(run / 'checkpoint')!r}); "
                     "train one with `retro train`")


def load_tensors(path: Path):
    """torch.load of a file of tensors, numbers, strings and containers only (weights_only=True):
    a file holding any other object (a pickle that could run code) is refused, never unpickled."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RetroError(f"refusing to load {str(path)!r}: it holds objects other than tensors and numbers, "
                         f"which loading would unpickle (run code); checkpoints of this version never do "
                         f"({str(exc).splitlines()[0][:200]})") from None


def load_checkpoint(run: Path, with_optimizer: bool = True) -> dict:
    """-> {"weights", "config", "state", "optimizer" (or None)}."""
    from safetensors.torch import load_file

    d = checkpoint_dir(run)
    out = {"weights": load_file(str(d / "model.safetensors")), "config": json.loads((d / "config.json").read_text()),
           "state": json.loads((d / "state.json").read_text()), "optimizer": None}
    if with_optimizer and (d / "optimizer.pt").exists():
        out["optimizer"] = load_tensors(d / "optimizer.pt")
    return out
