"""`retro.from_pretrained`: a saved model of either kind, a RetroModel or a RetrofittedLM, as its
config.json says. It sits here, above both model kinds, because it builds either (the saved format
itself is model/saved.py; each class's own from_pretrained loads its kind only)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.model import RetroModel
from ..model.saved import load_folder, load_pretrained
from .wrapper import RetrofittedLM

KINDS = {False: RetroModel, True: RetrofittedLM}  # by whether config.json holds a "retrofit" entry


def from_pretrained(source: str | Path, device=None, backend: str | None = None) -> torch.nn.Module:
    """A model saved by save_pretrained, a run folder, or a hub repository name: a RetroModel or a
    RetrofittedLM (loaded onto its base), in eval mode."""
    return load_pretrained(source, KINDS, device=device, backend=backend)


def model_from_folder(folder: str | Path, device=None, backend: str | None = None) -> torch.nn.Module:
    """The model of a saved folder or a run's checkpoint folder, of either kind, in eval mode."""
    return load_folder(folder, KINDS, device=device, backend=backend)
