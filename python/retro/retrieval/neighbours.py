"""Precomputed neighbours of every training chunk, its own document excluded, for training
(`retro neighbours DIR`). Computed in blocks that are written atomically, so an interrupted run
resumes where it stopped; under torchrun each rank searches its share of the blocks (block b on
rank b % world, each rank with the whole index loaded) and rank 0 joins them. The file keeps
k + extra candidates per chunk: a training sequence that packs several documents drops
candidates from any of them and keeps the first k."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from ..base.defaults import EXTRA_NEIGHBOURS, NEIGHBOURS
from ..base.atomic import atomic_path, read_json, write_json, write_npy
from ..base.errors import RetroError
from ..base import hooks
from ..base import distributed as dist
from .generations import current_generation
from .retriever import Retriever


def neighbours_path(db_dir: str | Path, candidates: int) -> Path:
    """The neighbours file of the database's current generation (a database that grew needs its own)."""
    generation = current_generation(db_dir)
    return Path(db_dir) / (f"neighbours-{candidates}.npy" if generation == 0 else
                           f"neighbours-{candidates}-gen{generation:06d}.npy")


def is_neighbours_entry(name: str) -> bool:
    """Whether `name`, an entry of a database folder, is one compute_neighbours writes there (the
    .npy, its .json description, the -parts folder of an unfinished run): derived from the
    database, so `build-db --overwrite` removes it with the database."""
    return re.fullmatch(r"neighbours-\d+(-gen\d{6})?(\.npy|\.json|-parts)", name) is not None


def compute_neighbours(db_dir: str | Path, k: int = NEIGHBOURS, extra: int = EXTRA_NEIGHBOURS, block: int = 8192,
                       device=None, index: str | None = None, progress: bool = True, log=print) -> Path:
    """Writes neighbours-{k+extra}.npy: (chunks, k + extra) int64 chunk ids, -1 where fewer exist.
    Alone or under torchrun (every rank calls it; rank 0 writes the file, the others wait for it).
    hooks.reached("neighbours", b) is called after each block is written."""
    from ..base.progress import progress_bar

    if k < 1 or extra < 0:
        raise RetroError(f"need k >= 1 and extra >= 0, got k={k}, extra={extra}")
    rank, world = dist.init_from_env()
    retriever = Retriever.load(db_dir, device=device, index=index)
    db = retriever.db
    cand = min(k + extra, db.num_chunks - 1)
    if cand < 1:
        raise RetroError(f"the database has {db.num_chunks} chunk(s): too few to have neighbours")
    out = neighbours_path(db_dir, k + extra)
    if out.exists():
        return out
    parts = out.with_name(f"{out.stem}-parts")
    n = db.num_chunks
    blocks = range((n + block - 1) // block)
    bar = progress_bar(total=sum(min(block, n - b * block) for b in blocks[rank::world]), desc="neighbours",
                       unit="chunk", disable=not progress or rank != 0, leave=False, dynamic_ncols=True)
    for b in blocks[rank::world]:
        part = parts / f"part-{b:06d}.npy"
        sl = slice(b * block, min(n, (b + 1) * block))
        if not part.exists():
            ids, _ = retriever.search_chunks(np.arange(sl.start, sl.stop), cand, exclude_doc_ids=db.chunk_doc[sl])
            full = np.full((sl.stop - sl.start, k + extra), -1, dtype=np.int64)
            full[:, :cand] = ids
            write_npy(part, full)
            hooks.reached("neighbours", b)
        bar.update(sl.stop - sl.start)
    bar.close()
    dist.barrier()
    if rank != 0:
        dist.barrier()  # until rank 0 has written the file
        return out
    # the description first: the .npy, written last, marks the file complete
    write_json(out.with_suffix(".json"), {"k": k, "extra": extra, "index": retriever.index.kind,
                                          "own_document_excluded": True})
    with atomic_path(out) as tmp:  # one block in memory at a time
        ids = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n, k + extra))
        for b in blocks:
            ids[b * block:(b + 1) * block] = np.load(parts / f"part-{b:06d}.npy")
        ids.flush()
        del ids
    shutil.rmtree(parts, ignore_errors=True)
    log(f"[neighbours] {n} chunks x {k + extra} candidates -> {out}")
    dist.barrier()
    return out


def load_neighbours(db_dir: str | Path, candidates: int) -> np.ndarray:
    path = neighbours_path(db_dir, candidates)
    if not path.exists():
        raise RetroError(f"{str(path)!r} does not exist: run `retro neighbours {db_dir}` first")
    info = read_json(path.with_suffix(".json"))
    if not info.get("own_document_excluded"):
        raise RetroError(f"{str(path)!r} was not computed with same-document exclusion")
    return np.load(path, mmap_mode="r")
