"""The defaults several stages share, in one place: the options dataclasses (flags), the model's
configuration and the Python functions read them from here."""
from __future__ import annotations

import os
from pathlib import Path

NEIGHBOURS = 2         # k: neighbours per chunk (training, evaluation, the configuration's num_neighbours)
EXTRA_NEIGHBOURS = 6   # neighbour candidates kept beyond k, for dropping a training sequence's own documents
CHUNK_SIZE = 64        # m: tokens per chunk (the database's, so the model's)
IGNORE = -100          # the target id of a position that is not scored (the loss is 0 there)


def cache_dir() -> Path:
    """The folder of what retro downloads or derives once (the demo's corpus, distilled static
    embeddings): $RETRO_CACHE, or ~/.cache/retro-kernels."""
    return Path(os.environ.get("RETRO_CACHE") or Path.home() / ".cache" / "retro-kernels")
