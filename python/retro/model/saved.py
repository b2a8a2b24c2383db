"""Models saved the Hugging Face way: a folder with config.json (the model's RetroConfig and, for a
retrofitted model, its base), model.safetensors (the weights; a retrofitted model's new ones only)
and the tokenizer beside them (tokenizer.model for SentencePiece, tokenizer/ for a Hugging Face one).

A run's checkpoint folder (RUN/checkpoint) has the same layout, so `from_pretrained` reads a saved
model, a run folder or a Hugging Face hub repository (downloaded with huggingface_hub where the
network allows) through one function, `load_folder`, which builds the model with the class its kind
names (each class's `from_saved`; `retro.from_pretrained`, which takes either kind, is in
retrofitting/load.py, above both). A retrofitted model records its base's
name and a hash of the base's weights, and loads back onto that base only. A model trained on a
database records that database's identity (ChunkDatabase.identity(): tokenizer, chunk size, keys,
held-out documents) as `model.trained_on`, read from a run's state.json or a saved config.json and
written again by save_pretrained, so that evaluate and generate refuse another database.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.atomic import write_folder
from ..base.errors import RetroError
from ..base.files import load_weights, read_config, read_json_file
from .config import RetroConfig

FORMAT = "retro-kernels/1"

# what to do about a checkpoint file that is missing or damaged
REMEDY = "restore the checkpoint from a copy, or train a new run (another --out)"


def weights_sha256(module: torch.nn.Module) -> str:
    """A hash of a module's weights: every tensor of its state dict, by name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_pretrained(model: torch.nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Writes `model` (a RetroModel or a retrofitted model) and, if given, its tokenizer to `folder`.
    Refuses to replace a folder that is not a saved model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "config.json").exists():
        raise RetroError(f"{str(folder)!r} is not empty and holds no saved model; choose another folder")
    config = {"format": FORMAT, "model": model.cfg.to_dict(), **model.extra_config}
    if model.trained_on:
        config["database"] = model.trained_on
    weights = model.trainable_state_dict()

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if tokenizer is not None:
            if hasattr(tokenizer, "model_bytes"):  # SentencePiece
                (tmp / "tokenizer.model").write_bytes(tokenizer.model_bytes)
            else:
                tokenizer.tok.save_pretrained(str(tmp / "tokenizer"))

    return write_folder(folder, fill)


@dataclass
class Saved:
    """A saved folder, read and checked: its config.json, the RetroConfig in it and its weights;
    `remedy` is what to do if a file is missing or damaged."""
    folder: Path
    config: dict
    cfg: RetroConfig
    weights: dict
    remedy: str


def read_saved(folder: str | Path, backend: str | None = None) -> Saved:
    """A saved folder or a run's checkpoint folder (config.json + model.safetensors). A missing or
    damaged file is a RetroError naming it and what to do."""
    folder = Path(folder)
    remedy = REMEDY if (folder / "state.json").exists() else "save or download the model again"
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).exists():
            raise RetroError(f"{str(folder)!r} holds no saved model: {name} is missing; {remedy}")
    config = read_config(folder / "config.json", remedy)
    cfg = RetroConfig.from_dict(config["model"])
    if backend is not None:
        cfg.backend = backend
    return Saved(folder, config, cfg, load_weights(folder / "model.safetensors", remedy), remedy)


def load_folder(folder: str | Path, kinds: dict, device=None, backend: str | None = None,
                source: str | Path | None = None) -> torch.nn.Module:
    """The model of a saved folder or a run's checkpoint folder, in eval mode, built by
    `kinds[retrofitted]` (a class with `from_saved(saved)`: kinds[False] for a RetroModel,
    kinds[True] for a retrofitted model); a kind not in `kinds` is a RetroError before anything is
    built. `source` (default: the folder) is what errors name."""
    source = str(source or folder)
    saved = read_saved(folder, backend)
    retrofitted = bool(saved.config.get("retrofit"))
    if retrofitted not in kinds:
        held, wanted = ("RetrofittedLM", "RetroModel") if retrofitted else ("RetroModel", "retrofitted model")
        raise RetroError(f"{source!r} holds a {held}, not a {wanted}: load it with retro.from_pretrained")
    model = kinds[retrofitted].from_saved(saved)
    model.trained_on = saved.config.get("database")
    if model.trained_on is None and (saved.folder / "state.json").exists():  # a run's checkpoint
        model.trained_on = database_of(read_json_file(saved.folder / "state.json", saved.remedy))
    model.source = source
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval()


def database_of(state: dict) -> dict:
    """The identity of the database a run (its checkpoint state) was trained on; a run saved before
    identities were recorded, its tokenizer's hash alone."""
    return state.get("database") or {"tokenizer_sha256": state.get("tokenizer_sha256")}


def resolve(source: str | Path) -> Path:
    """The local folder of a saved model: the folder itself, a run's checkpoint, or a Hugging Face
    hub repository fetched into the hub cache."""
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        return checkpoint_dir(path)
    if path.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise RetroError(f"{str(source)!r} is neither a saved model folder, a run folder nor a Hugging Face "
                         "repository name (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source)))
    except Exception as exc:  # noqa: BLE001 - network, authorisation, missing repository
        raise RetroError(f"cannot fetch {str(source)!r} from the Hugging Face hub: {exc}") from exc


def load_pretrained(source: str | Path, kinds: dict, device=None, backend: str | None = None) -> torch.nn.Module:
    """A model saved by save_pretrained, a run folder, or a hub repository name, of one of `kinds`
    (load_folder), in eval mode."""
    return load_folder(resolve(source), kinds, device=device, backend=backend, source=source)


def load_tokenizer_beside(source: str | Path):
    """The tokenizer saved beside a model (None if none was)."""
    folder = resolve(source)
    if (folder / "tokenizer.model").exists():
        from ..retrieval.tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.load(folder / "tokenizer.model")
    if (folder / "tokenizer").is_dir():
        from ..retrieval.tokenizer import HFTokenizer

        return HFTokenizer(str(folder / "tokenizer"))
    return None


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
