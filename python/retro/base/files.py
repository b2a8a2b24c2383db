"""Reading the files a run or a saved model is made of (JSON, safetensors, torch.save): a missing or
damaged file is a RetroError naming it and what to do (`remedy`), never a traceback. Writing them:
atomic.py."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import RetroError, damaged_file


def _present(path: Path, remedy: str) -> Path:
    if not path.is_file():
        raise RetroError(f"{str(path)!r} is missing; {remedy}")
    return path


def read_json_file(path: Path, remedy: str) -> dict:
    """The JSON object in `path` (a saved model's or a checkpoint's config.json, state.json); a RetroError naming the
    file if it is missing or is not a JSON object (cut short, overwritten)."""
    try:
        value = json.loads(_present(Path(path), remedy).read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise damaged_file(path, f"not JSON: {exc}", remedy) from None
    if not isinstance(value, dict):
        raise damaged_file(path, f"a JSON object was expected, got {type(value).__name__}", remedy)
    return value


def read_config(path: Path, remedy: str) -> dict:
    """A saved model's config.json: a JSON object holding the "model" configuration."""
    config = read_json_file(path, remedy)
    if not isinstance(config.get("model"), dict):
        raise damaged_file(path, 'no "model" configuration in it', remedy)
    return config


def load_weights(path: Path, remedy: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a RetroError naming it if it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(_present(Path(path), remedy)))
    except (SafetensorError, OSError) as exc:
        raise damaged_file(path, f"not a complete safetensors file: {exc}", remedy) from None


def load_state_dict(model: torch.nn.Module, weights: dict, path: Path, remedy: str, strict: bool = True) -> None:
    """model.load_state_dict(weights); a RetroError naming the file the weights came from if they do
    not fit the model (other names or shapes than its config.json describes)."""
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        raise damaged_file(path, f"its weights do not fit the model its config.json describes: {exc}",
                           remedy) from None


def load_tensors(path: Path, remedy: str):
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
