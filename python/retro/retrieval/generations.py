"""Generations of a database that grows (update.py: add-documents; compact.py: remove-documents, compact).

A change never rewrites what a reader may hold. It writes its new files into a folder of its own,
generations/GGGGGG/, and then switches the database to them by one atomic replace of manifest.json
(atomic.write_json): a reader sees the manifest it opened, old or new, never a mixture. A database
as build-db writes it is generation 0 (format version 2: no "generation" in its manifest); a changed
one has format version 3 and these manifest entries besides build-db's:
  generation          G, the number of changes made since the build
  segments            the array segments, in order: {"path": folder relative to the database ("" for
                      the build's own arrays), "arrays": {name: {"shape", "dtype"}}}; a segment's
                      doc_start, chunk_start and chunk_doc count from 0 within it (ChunkDatabase adds
                      the offsets of the segments before it)
  index_file          the index the generation searches (relative: index.faiss, generations/G/index.faiss,
                      generations/G/bm25), absent for the torch index
  removed_documents   document ids never returned again (tombstones; compact drops them)
  earlier_identities  the identities (ChunkDatabase.identity) of the generations before, so that a run
                      trained on an earlier generation still loads against this one
  updates             one line per change: {"generation", "action", ...}
Writers take the lock WRITER_LOCK (fcntl.flock): a second writer is refused at once.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..base.atomic import read_json
from ..base.errors import RetroError

GROWN_VERSION = 3  # the format version of a database changed after its build
GENERATIONS = "generations"
WRITER_LOCK = ".writer.lock"


def generation_of(manifest: dict) -> int:
    return int(manifest.get("generation", 0))


def generation_dir(db: str | Path, generation: int) -> Path:
    return Path(db) / GENERATIONS / f"{generation:06d}"


def current_generation(db: str | Path) -> int:
    """The generation manifest.json names now (0 where there is no manifest)."""
    path = Path(db) / "manifest.json"
    return generation_of(read_json(path)) if path.exists() else 0


def segments(manifest: dict) -> list[dict]:
    """The array segments of a manifest (one, the database folder itself, before any change)."""
    return manifest.get("segments") or [{"path": "", "arrays": manifest["arrays"]}]


def index_file(manifest: dict, default: str) -> str:
    """The index file (or folder) of the manifest's generation, relative to the database."""
    return manifest.get("index_file") or default


def index_remedy(db: str | Path) -> str:
    """What to do about a damaged index of a database changed after its build (build-db --resume
    rebuilds only a build's own index)."""
    return f"run `retro compact {db}`: it writes the database again with its index built afresh"


@contextmanager
def writer_lock(db: str | Path):
    """Holds the database's writer lock for the block; RetroError (one line) if another process
    holds it. The lock is the kernel's (flock): it goes with the process, kill -9 included."""
    path = Path(db) / WRITER_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RetroError(f"{str(db)!r} is being changed by another process (pid {holder}): wait until it "
                             "ends, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class ConcatArray:
    """The segments' arrays of one name as one read-only array along axis 0, without copying:
    slices and integer (or boolean) indexing as numpy gives them; np.asarray() copies them into one."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.bounds = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.bounds[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(p) for p in self.parts])
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                s = int(np.searchsorted(self.bounds, start, side="right")) - 1
                if s < len(self.parts) and stop <= self.bounds[s + 1]:
                    return self.parts[s][start - self.bounds[s]:max(start, stop) - self.bounds[s]]
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            key = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= key < len(self):
                raise IndexError(f"index {key} is out of bounds for {len(self)} rows")
            s = int(np.searchsorted(self.bounds, key, side="right")) - 1
            return self.parts[s][key - self.bounds[s]]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + len(self), idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"an index is out of bounds for {len(self)} rows")
        out = np.empty(idx.shape + self.shape[1:], dtype=self.dtype)
        seg = np.searchsorted(self.bounds, idx, side="right") - 1
        for s in np.unique(seg):
            where = seg == s
            out[where] = self.parts[s][idx[where] - self.bounds[s]]
        return out


# arrays whose values count within a segment, and what a later segment's values are shifted by
_OFFSET_BY = {"doc_start": "tokens", "chunk_start": "tokens", "chunk_doc": "doc_split"}


def join_segments(loaded: list[dict]) -> dict:
    """The arrays of each segment ({name: array}, in order) -> the database's arrays: tokens and
    embeddings as ConcatArray (memory-mapped), the others in memory with global offsets."""
    if len(loaded) == 1:
        return loaded[0]
    joined = {}
    for name in loaded[0]:
        parts = [seg[name] for seg in loaded]
        if name in ("tokens", "embeddings"):
            joined[name] = ConcatArray(parts)
            continue
        if name in _OFFSET_BY:
            sizes = np.cumsum([0] + [len(seg[_OFFSET_BY[name]]) for seg in loaded])
            parts = [np.asarray(p) + p.dtype.type(o) for p, o in zip(parts, sizes)]
            if name == "doc_start":  # each segment's doc_start ends where the next one's starts
                parts = [parts[0]] + [p[1:] for p in parts[1:]]
        joined[name] = np.concatenate([np.asarray(p) for p in parts])
    return joined
