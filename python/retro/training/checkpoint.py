"""Checkpoints: RUN/checkpoint/ holds model.safetensors (weights), config.json, optimizer.pt
(optimizer, schedule and RNG states) and state.json (step, data position, options). A new
checkpoint is written into a temporary folder and swapped in by renames, so a crash leaves the
previous or the new checkpoint, never half of one. A file that is missing or damaged (truncated,
overwritten) is a RetroError naming it and what to do, whichever command reads it."""
from __future__ import annotations

import json
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..base.atomic import write_folder
from ..base.errors import RetroError, damaged_file

# what to do about a checkpoint file that is missing or damaged
REMEDY = "restore the checkpoint from a copy, or train a new run (another --out)"


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
    if (run / "checkpoint").is_dir():
        raise RetroError(f"{str(run / 'checkpoint' / 'state.json')!r} is missing: the checkpoint is incomplete; "
                         f"{REMEDY}")
    if any((run / "checkpoints").glob("step-*/COMPLETE")):  # a --fsdp run (fsdp.py)
        raise RetroError(f"{str(run)!r} holds sharded checkpoints only (a --fsdp run); convert the newest with "
                         f"`retro convert-checkpoint {run}`")
    raise RetroError(f"{str(run)!r} holds no checkpoint (expected {str(run / 'checkpoint')!r}); "
                     "train one with `retro train`")


def _present(path: Path, remedy: str) -> Path:
    if not path.is_file():
        raise RetroError(f"{str(path)!r} is missing; {remedy}")
    return path


def read_json_file(path: Path, remedy: str = REMEDY) -> dict:
    """The JSON object in `path` (a checkpoint's config.json or state.json); a RetroError naming the
    file if it is missing or is not a JSON object (cut short, overwritten)."""
    try:
        value = json.loads(_present(Path(path), remedy).read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise damaged_file(path, f"not JSON: {exc}", remedy) from None
    if not isinstance(value, dict):
        raise damaged_file(path, f"a JSON object was expected, got {type(value).__name__}", remedy)
    return value


def read_config(path: Path, remedy: str = REMEDY) -> dict:
    """A saved model's config.json: a JSON object holding the "model" configuration."""
    config = read_json_file(path, remedy)
    if not isinstance(config.get("model"), dict):
        raise damaged_file(path, 'no "model" configuration in it', remedy)
    return config


def load_weights(path: Path, remedy: str = REMEDY) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a RetroError naming it if it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(_present(Path(path), remedy)))
    except (SafetensorError, OSError) as exc:
        raise damaged_file(path, f"not a complete safetensors file: {exc}", remedy) from None


def load_state_dict(model: torch.nn.Module, weights: dict, path: Path, strict: bool = True,
                    remedy: str = REMEDY) -> None:
    """model.load_state_dict(weights); a RetroError naming the file the weights came from if they do
    not fit the model (other names or shapes than its config.json describes)."""
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        raise damaged_file(path, f"its weights do not fit the model its config.json describes: {exc}",
                           remedy) from None


def load_tensors(path: Path, remedy: str = REMEDY):
    """torch.load of a file of tensors, numbers, strings and containers only (weights_only=True):
    a file holding any other object (a pickle that could run code) is refused, never unpickled; a
    missing or damaged file (not the zip archive torch.save writes, or cut short) is a RetroError
    naming it."""
    path = Path(path)
    if not zipfile.is_zipfile(_present(path, remedy)):
        raise damaged_file(path, "not a complete file written by torch.save", remedy)
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RetroError(f"refusing to load {str(path)!r}: it holds objects other than tensors and numbers, "
                         f"which loading would unpickle (run code); checkpoints of this version never do "
                         f"({str(exc).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise damaged_file(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, remedy) from None


def load_checkpoint(run: Path, with_optimizer: bool = True) -> dict:
    """-> {"weights", "config", "state", "optimizer" (or None), "dir"}; with_optimizer: optimizer.pt is
    required (--resume continues the optimizer exactly)."""
    d = checkpoint_dir(run)
    out = {"config": read_json_file(d / "config.json"), "state": read_json_file(d / "state.json"),
           "weights": load_weights(d / "model.safetensors"), "optimizer": None, "dir": d}
    if with_optimizer:
        remedy = f"--resume needs it to continue the run exactly: {REMEDY}; generate and evaluate do not need it"
        out["optimizer"] = load_tensors(d / "optimizer.pt", remedy)
        if not isinstance(out["optimizer"], dict) or not {"optimizer", "rng"} <= set(out["optimizer"]):
            raise damaged_file(d / "optimizer.pt", "no optimizer and RNG states in it", remedy)
    return out
