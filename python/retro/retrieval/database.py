"""The retrieval database: 64-token chunks of the training documents keyed by frozen-BERT
embeddings, with values [chunk, continuation] (docs/semantics.md, "Chunks and neighbours").
build.py writes it; ChunkDatabase reads it.

A database folder holds memory-mapped numpy arrays, the faiss index and manifest.json:
  tokens.npy       (T,)   int32   LM tokens of every document, training and held-out
  doc_start.npy    (D+1,) int64   document d is tokens[doc_start[d]:doc_start[d+1]]
  doc_split.npy    (D,)   uint8   0 = training (in the database), 1 = held out for evaluation
  doc_bytes.npy    (D,)   int64   UTF-8 bytes of each document (for bits per byte)
  doc_folder.npy   (D,)   int32   the folder of each document (files of one folder share an id)
  chunk_start.npy  (C,)   int64   chunk c is tokens[chunk_start[c]:chunk_start[c]+chunk_len[c]]
  chunk_len.npy    (C,)   int16   chunk_size, or less for a document's last chunk
  chunk_doc.npy    (C,)   int32   the document of each chunk (training documents only)
  embeddings.npy   (C, dim) float32  the keys
  index.faiss              the faiss index of the keys (absent for the "torch" index)
  index-shards/            instead, with --shards N: the index in N shards by chunk id (sharded.py)
  bm25/                    instead of the keys and their index, with --embedder bm25: the BM25 index (bm25.py)
Chunks never cross a document boundary. The manifest is written last: a folder without one is an
unfinished build, which `--resume` completes into exactly the database an uninterrupted build gives.
A database changed after its build (add-documents, remove-documents, compact) holds its later array
segments, index and removed documents in generations/ (generations.py); ChunkDatabase reads both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.atomic import read_json
from ..base.errors import RetroError
from .generations import GENERATIONS, GROWN_VERSION, current_generation, generation_of, join_segments, segments
from .tokenizer import tokenizer_from_manifest

FORMAT_VERSION = 2  # 2: doc_folder.npy, the build's stage timings
BASE_ARRAYS = ("tokens", "doc_start", "doc_split", "doc_bytes", "doc_folder", "chunk_start", "chunk_len",
               "chunk_doc")
ARRAYS = (*BASE_ARRAYS, "embeddings")
OWN_NAMES = {f"{a}.npy" for a in ARRAYS} | {"index.faiss", "manifest.json", "build_state.json",
                                            "tokenizer.model", "parts", "index-shards", "bm25", GENERATIONS}


def key_arrays(embedder: str) -> tuple[str, ...]:
    """The arrays a database built with this embedder holds: all of ARRAYS, but no embeddings for BM25."""
    from .bm25 import is_bm25

    return BASE_ARRAYS if is_bm25(embedder) else ARRAYS


def chunk_layout(doc_start: np.ndarray, doc_split: np.ndarray, chunk_size: int):
    """Chunks of the training documents: (chunk_start int64, chunk_len int16, chunk_doc int32)."""
    starts, lens, docs = [], [], []
    for d in np.flatnonzero(doc_split == 0):
        a, b = int(doc_start[d]), int(doc_start[d + 1])
        s = np.arange(a, b, chunk_size, dtype=np.int64)
        starts.append(s)
        lens.append(np.minimum(chunk_size, b - s).astype(np.int16))
        docs.append(np.full(len(s), d, dtype=np.int32))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(starts, np.int64), cat(lens, np.int16), cat(docs, np.int32)


def chunk_texts(tokenizer, tokens: np.ndarray, chunk_start: np.ndarray, chunk_len: np.ndarray) -> list[str]:
    """The decoded text of each chunk (tokens[start:start + len]), decoded in one batch."""
    return tokenizer.decode_batch([tokens[s:s + n] for s, n in zip(chunk_start, chunk_len)])


class ChunkDatabase:
    """A finished database, memory-mapped. values(ids) gives the neighbour tokens [chunk,
    continuation] and their mask; train/valid documents give the language-model data."""

    def __init__(self, path: str | Path, manifest: dict | None = None):
        """Opens the generation manifest.json names (or, for update.py and compact.py, the one `manifest`
        describes)."""
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if manifest is None and not mpath.exists():
            hint = " (an unfinished build: run build-db again with --resume)" if \
                (self.path / "build_state.json").exists() else ""
            raise RetroError(f"{str(self.path)!r} is not a retro database: no manifest.json{hint}")
        self.manifest = manifest if manifest is not None else read_json(mpath)
        version = self.manifest.get("format_version")
        if version not in (FORMAT_VERSION, GROWN_VERSION):
            raise RetroError(f"{str(self.path)!r} has database format version {version}; this version of retro "
                             f"reads versions {FORMAT_VERSION} and {GROWN_VERSION}: rebuild it with "
                             "`retro build-db --overwrite`")
        self.embeddings = None  # a BM25 database has no keys
        while True:
            try:
                loaded = [self._load_segment(seg) for seg in segments(self.manifest)]
                break
            except RetroError:  # files gone: unless a compact switched generations meanwhile, damage
                if manifest is not None or current_generation(self.path) == generation_of(self.manifest):
                    raise
                self.manifest = read_json(mpath)
        for name, arr in join_segments(loaded).items():
            setattr(self, name, arr)
        self.generation = generation_of(self.manifest)
        self.removed = np.asarray(sorted(self.manifest.get("removed_documents", [])), dtype=np.int64)
        # (C,) bool, False for the chunks of removed documents; None when nothing is removed
        self.live_chunks = ~np.isin(self.chunk_doc, self.removed) if len(self.removed) else None
        self.chunk_size = int(self.manifest["chunk_size"])
        self.num_chunks = len(self.chunk_start)
        self._tokenizer = None

    def _load_segment(self, segment: dict) -> dict:
        """{name: memory-mapped array} of one segment, each checked against the manifest."""
        folder = self.path / segment["path"]
        loaded = {}
        for name in key_arrays(self.manifest["embedder"]["name"]):
            p = folder / f"{name}.npy"
            if not p.exists():
                raise RetroError(f"{str(self.path)!r}: {p.relative_to(self.path)} is missing")
            arr = np.load(p, mmap_mode="r")
            want = segment["arrays"][name]
            if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                raise RetroError(f"{str(self.path)!r}: {p.relative_to(self.path)} has shape {list(arr.shape)} and "
                                 f"dtype {arr.dtype}, but the manifest says {want['shape']} {want['dtype']}; the "
                                 "database is damaged")
            loaded[name] = arr
        return loaded

    def is_current(self) -> bool:
        """False once another generation has been switched in (add-documents, remove-documents,
        compact): load the database again to see it."""
        return current_generation(self.path) == self.generation

    def identity(self) -> dict:
        """What a model trained on this database depends on: its tokenizer, chunk size, keys, and
        which documents are held out (a hash of the split and the document lengths), so that a run
        can refuse a database where its held-out documents would be training ones."""
        import hashlib

        split = hashlib.sha256(np.ascontiguousarray(self.doc_split).tobytes())
        split.update(np.ascontiguousarray(np.diff(self.doc_start)).tobytes())
        return {"tokenizer_sha256": self.manifest["tokenizer"]["sha256"], "chunk_size": self.chunk_size,
                "embedder": self.manifest["embedder"]["name"], "documents": int(len(self.doc_split)),
                "split_sha256": split.hexdigest()}

    def check_identity(self, trained_on: dict | None, run: str | Path) -> None:
        """RetroError (one line) unless this database is the one a run was trained on (its
        identity()); a run saved before identities were recorded is checked by its tokenizer."""
        if not trained_on:
            return
        mine = self.identity()
        for earlier in self.manifest.get("earlier_identities", []):  # trained before documents were added
            if all(earlier.get(key) == trained_on.get(key) for key in ("documents", "split_sha256")):
                mine = {**mine, "documents": earlier["documents"], "split_sha256": earlier["split_sha256"]}
        words = {"tokenizer_sha256": "another tokenizer", "chunk_size": "another chunk size",
                 "embedder": "other keys (embedder, or BM25)", "documents": "other documents",
                 "split_sha256": "other held-out documents (a build with another --seed, --valid-fraction or corpus)"}
        for key, what in words.items():
            if key in trained_on and trained_on[key] != mine[key]:
                raise RetroError(f"{str(run)!r} was trained on a database with {what} than {str(self.path)!r} "
                                 f"({key}: {trained_on[key]!r} there, {mine[key]!r} here): pass the database it was "
                                 "trained on")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_manifest(self.path, self.manifest["tokenizer"])
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_id)

    def chunk_tokens(self, c: int) -> np.ndarray:
        s = int(self.chunk_start[c])
        return np.asarray(self.tokens[s:s + int(self.chunk_len[c])])

    def values(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids (...,) int64 (-1 = none) -> tokens (..., 2m) int64, mask (..., 2m) bool:
        [chunk, continuation], the continuation being the next chunk of the same document."""
        m = self.chunk_size
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        tokens = np.full((len(flat), 2 * m), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(flat), 2 * m), dtype=bool)
        for row, c in enumerate(flat):
            if c < 0:
                continue
            for part, cc in enumerate((c, c + 1)):
                if part == 1 and (cc >= self.num_chunks or self.chunk_doc[cc] != self.chunk_doc[c]):
                    break
                t = self.chunk_tokens(cc)
                tokens[row, part * m: part * m + len(t)] = t
                mask[row, part * m: part * m + len(t)] = True
        shape = tuple(np.shape(ids)) + (2 * m,)
        return tokens.reshape(shape), mask.reshape(shape)

    def documents(self, split: str = "train") -> np.ndarray:
        """Document ids of the training ("train") or held-out ("valid") split, removed ones left out."""
        ids = np.flatnonzero(self.doc_split == (0 if split == "train" else 1))
        return ids[~np.isin(ids, self.removed)] if len(self.removed) else ids

    def document_tokens(self, d: int) -> np.ndarray:
        return np.asarray(self.tokens[int(self.doc_start[d]):int(self.doc_start[d + 1])])

    def chunk_text(self, c: int) -> str:
        return self.tokenizer.decode(self.chunk_tokens(c))


def pending_chunk_blocks(out: Path, block_size: int, part, rank: int = 0, world: int = 1):
    """A build stage's work on the chunks of the database being built in `out`, block by block:
    (tokens (memory-mapped), chunk starts (C,), chunk lengths (C,), C, the blocks of this rank
    whose part file part(b) does not exist yet)."""
    out = Path(out)
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    starts = np.load(out / "chunk_start.npy")
    lens = np.load(out / "chunk_len.npy")
    n = len(starts)
    blocks = range(rank, (n + block_size - 1) // block_size, world)
    return tokens, starts, lens, n, [b for b in blocks if not part(b).exists()]
