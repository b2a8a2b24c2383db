"""build-db's stages for `--embedder bm25` (bm25.py), in place of embed, merge and the faiss index:

  terms   each block of --block-size chunks decoded and split into words (bm25.words), written as
          parts/terms-*.npz: the block's sorted vocabulary, each chunk's terms as ids into it, and
          the number of terms of each chunk (the unit of --resume; ranks share the blocks as in embed)
  index   the blocks' vocabularies merged (sorted union: the same whatever order the blocks were
          written in), bm25s's index built over all the chunks, then written as the folder bm25/
          at once (atomic.write_folder); bm25s takes the chunks' terms as Python lists, so this
          stage holds them all in memory (tens of bytes per term: fine for the demo's 200,000
          chunks, not for a database of billions)
Both are functions of the tokens and the options only, so a build killed anywhere and resumed gives
the database an uninterrupted build gives.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..base import distributed as dist
from ..base.atomic import atomic_path, write_folder
from ..base import hooks
from .bm25 import BM25Index, describe, words
from .database import chunk_texts, pending_chunk_blocks


def _part(parts: Path, b: int) -> Path:
    return parts / f"terms-{b:06d}.npz"


def terms_stage(opts, tokenizer, progress) -> dict:
    """Writes the missing terms-*.npz of this rank's blocks; returns the manifest's embedder entry."""
    out = Path(opts.out)
    parts = out / "parts"
    tokens, starts, lens, n, todo = pending_chunk_blocks(out, opts.block_size, lambda b: _part(parts, b),
                                                         dist.rank(), dist.world_size())
    bar = progress(sum(min(opts.block_size, n - b * opts.block_size) for b in todo), "splitting chunks into words")
    for b in todo:
        sl = slice(b * opts.block_size, min(n, (b + 1) * opts.block_size))
        terms = words(chunk_texts(tokenizer, tokens, starts[sl], lens[sl]))
        vocab = sorted({w for ws in terms for w in ws})
        local = {w: i for i, w in enumerate(vocab)}
        ids = np.fromiter((local[w] for ws in terms for w in ws), dtype=np.int32)
        with atomic_path(_part(parts, b)) as tmp, open(tmp, "wb") as f:
            np.savez(f, vocab=np.frombuffer("\n".join(vocab).encode("utf-8"), dtype=np.uint8), ids=ids,
                     lengths=np.array([len(ws) for ws in terms], dtype=np.int32))
        bar.update(sl.stop - sl.start)
        hooks.reached("terms", b)
    bar.close()
    dist.barrier()
    return describe()


def _read_part(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with np.load(path) as z:
        text = z["vocab"].tobytes().decode("utf-8")
        return (text.split("\n") if text else []), z["ids"], z["lengths"]


def index_stage(opts, state: dict, log, save_state) -> dict:
    """bm25/ from the terms parts (rank 0), then save_state(state) marks the stage done; returns the
    manifest's index entry."""
    out = Path(opts.out)
    if "index" in state["stages"]:
        return state["stages"]["index"]
    n = len(np.load(out / "chunk_start.npy", mmap_mode="r"))
    n_blocks = (n + opts.block_size - 1) // opts.block_size
    paths = [_part(out / "parts", b) for b in range(n_blocks)]
    vocab = sorted(set().union(*(_read_part(p)[0] for p in paths)))
    ids = {w: i for i, w in enumerate(vocab)}
    term_ids = []
    for p in paths:  # each chunk's terms as ids into the merged vocabulary
        local, flat, lengths = _read_part(p)
        flat = np.array([ids[w] for w in local], dtype=np.int64)[flat] if len(flat) else flat.astype(np.int64)
        term_ids += np.split(flat, np.cumsum(lengths)[:-1])
    index = BM25Index.build(term_ids, vocab)
    for stale in out.glob(".bm25-*"):  # a write_folder cut short by a kill
        shutil.rmtree(stale, ignore_errors=True)
    write_folder(out / "bm25", index.save)
    info = {"kind": "bm25", "exact": True, "vocabulary": len(vocab), "postings": int(len(index.data)),
            "mean_terms_per_chunk": float(sum(len(t) for t in term_ids) / max(1, n))}
    log(f"[build-db] BM25 index over {n} chunks: {len(vocab)} terms, {info['postings']} postings")
    hooks.reached("index", 0)
    state["stages"]["index"] = info
    save_state(state)
    return info
