"""build-db's faiss index in parts, so that ranks fill it in parallel and a killed build resumes
part by part:

  train   rank 0 trains the empty index on a seeded sample of all the keys (index.train_faiss) and
          writes it as parts/index-trained.faiss (its settings first, as index-trained.json)
  fill    part p, keys [p * S, (p + 1) * S), is a copy of the trained index with those keys added,
          written as parts/index-PPPPPP.faiss; rank r fills the parts p with p % world == r that
          are not written yet
  merge   rank 0 appends the parts in order (faiss's merge_into for inverted lists, merge_from for
          flat keys): the index a single add of all the keys gives

The part size S depends on the number of keys and --block-size only (index_part_size), not on the
number of ranks, so one process and N processes, or a build resumed with another N, write the same
parts and the same index, byte for byte (ivf-fastscan: but for the padding of its lists' blocks of 32
codes, which faiss's merge leaves uninitialised; the codes, ids and search results are the same).
Each part file holds a copy of the trained quantiser as
well as its keys' codes, so parts are large: INDEX_PART_BLOCKS blocks at least, at most
MAX_INDEX_PARTS of them.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..base import distributed as dist
from ..base import hooks
from ..base.atomic import atomic_path, read_json, write_json
from .index import IndexSettings, fill_faiss, read_faiss_index, train_faiss

INDEX_PART_BLOCKS = 32  # embedding blocks (--block-size chunks) per index part, at least
MAX_INDEX_PARTS = 1024  # parts at most: above it a part holds more blocks


def index_part_size(n: int, block_size: int) -> int:
    """Keys per index part for n keys: INDEX_PART_BLOCKS blocks, or more (whole blocks) to keep
    the parts at most MAX_INDEX_PARTS."""
    blocks = -(-n // block_size)
    return block_size * max(INDEX_PART_BLOCKS, -(-blocks // MAX_INDEX_PARTS))


def release_pages(array: np.ndarray) -> None:
    """Drops the pages a read-only memory map (np.load(..., mmap_mode="r")) has brought into this
    process's memory: they stay in the page cache and are read back if touched again, but no longer
    count in the process's RSS (at 1M chunks, 1.5 GB of keys beside the index being merged).
    Anything but a memory map: nothing to do."""
    import mmap

    held = getattr(array, "_mmap", None)
    if isinstance(held, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        held.madvise(mmap.MADV_DONTNEED)


def part_path(parts: Path, p: int) -> Path:
    return parts / f"index-{p:06d}.faiss"


def _write_index(index, path: Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def merge_index(into, part) -> None:
    """Appends the keys of `part` (a copy of the same trained index) to `into`, their ids after
    into's: inverted lists by faiss.merge_into, flat keys by merge_from; ivf-fastscan's IndexRefine
    (which faiss does not merge itself) by merging its inverted lists and its refining keys."""
    import faiss

    refine, other = faiss.downcast_index(into), faiss.downcast_index(part)
    if isinstance(refine, faiss.IndexRefine):
        faiss.merge_into(refine.base_index, other.base_index, True)
        refine.refine_index.merge_from(other.refine_index)
        refine.ntotal = refine.base_index.ntotal
    elif faiss.try_extract_index_ivf(into) is not None:
        faiss.merge_into(into, part, True)
    else:
        into.merge_from(part)


def build_faiss_in_parts(kind: str, vectors: np.ndarray, parts: Path, block_size: int, seed: int = 0,
                         rank: int = 0, world: int = 1, progress=None):
    """The faiss index of `kind` over vectors (n, dim) (a memory map every rank reads), trained,
    filled and merged as the module docstring says. Every one of the `world` ranks calls it (they
    meet at barriers when world > 1). Returns (index, IndexSettings) on rank 0, (None, None) on the
    others. progress(keys) after each part; hooks.reached("index-part", p) after part p is written."""
    import faiss

    parts = Path(parts)
    trained_file, settings_file = parts / "index-trained.faiss", parts / "index-trained.json"
    if rank == 0 and not trained_file.exists():
        index, settings = train_faiss(kind, vectors, seed)
        write_json(settings_file, asdict(settings))  # the settings first: the index marks the step done
        _write_index(index, trained_file)
    if world > 1:
        dist.barrier()
    trained = read_faiss_index(trained_file)
    n = len(vectors)
    size = index_part_size(n, block_size)
    n_parts = -(-n // size)
    for p in range(rank, n_parts, world):
        keys = vectors[p * size:(p + 1) * size]
        if not part_path(parts, p).exists():
            _write_index(fill_faiss(faiss.clone_index(trained), kind, keys), part_path(parts, p))
            hooks.reached("index-part", p)
        if progress is not None:
            progress(len(keys))
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None, None
    release_pages(vectors)  # the keys are in the parts now: the merged index holds them once
    index = read_faiss_index(part_path(parts, 0))
    for p in range(1, n_parts):
        merge_index(index, read_faiss_index(part_path(parts, p)))
    return index, IndexSettings(**read_json(settings_file))
