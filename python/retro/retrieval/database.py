"""The retrieval database: 64-token chunks of the training documents keyed by frozen-BERT
embeddings, with values [chunk, continuation] (docs/semantics.md, "Chunks and neighbours").

A database folder holds memory-mapped numpy arrays, the faiss index and manifest.json:
  tokens.npy       (T,)   int32   LM tokens of every document, training and held-out
  doc_start.npy    (D+1,) int64   document d is tokens[doc_start[d]:doc_start[d+1]]
  doc_split.npy    (D,)   uint8   0 = training (in the database), 1 = held out for evaluation
  doc_bytes.npy    (D,)   int64   UTF-8 bytes of each document (for bits per byte)
  chunk_start.npy  (C,)   int64   chunk c is tokens[chunk_start[c]:chunk_start[c]+chunk_len[c]]
  chunk_len.npy    (C,)   int16   chunk_size, or less for a document's last chunk
  chunk_doc.npy    (C,)   int32   the document of each chunk (training documents only)
  embeddings.npy   (C, dim) float32  the keys
  index.faiss              the faiss index of the keys (absent for the "torch" index)
  index-shards/            instead, with --shards N: the index in N shards by chunk id (sharded.py)
Chunks never cross a document boundary. The manifest is written last: a folder without one is an
unfinished build, which `--resume` completes block by block into exactly the database an
uninterrupted build gives.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .. import distributed as dist
from ..atomic import atomic_path, read_json, write_json, write_npy
from ..checks import check_choice, check_float, check_int
from ..errors import RetroError
from .corpus import CorpusReport, check_corpus, check_globs, read_documents
from ..options import EXCLUDE_HELP, INCLUDE_HELP, option
from .embedder import DEFAULT_EMBEDDER
from .index import KINDS
from .tokenizer import SentencePieceTokenizer, load_tokenizer, tokenizer_from_manifest

FORMAT_VERSION = 1
ARRAYS = ("tokens", "doc_start", "doc_split", "doc_bytes", "chunk_start", "chunk_len", "chunk_doc", "embeddings")
_OWN_NAMES = {f"{a}.npy" for a in ARRAYS} | {"index.faiss", "manifest.json", "build_state.json",
                                             "tokenizer.model", "parts", "index-shards"}


@dataclass
class BuildOptions:
    corpus: str = option(help="a text file, a directory of text files, or .jsonl/.jsonl.gz", positional=True)
    out: str = option(help="the database folder")
    tokenizer: str | None = option(None, "a SentencePiece file or a Hugging Face tokenizer name/path "
                                         "(default: train one into the database)")
    vocab_size: int = option(8000, "the trained tokenizer's vocabulary")
    chunk_size: int = option(64, "tokens per chunk (m)")
    valid_fraction: float = option(0.0, "whole documents held out for evaluation")
    embedder: str = option(DEFAULT_EMBEDDER, "the frozen BERT: a Hugging Face name or a local folder; "
                                             "static:NAME for its distilled static token embeddings (100x faster "
                                             "on a CPU)")
    index: str = option("auto", "the index kind (auto: flat below 50k chunks, ivf-flat below 5M, then ivf-pq; "
                                "torch exact search without faiss)", choices=KINDS)
    target_recall: float = option(0.95, "10-recall@10 that nprobe is tuned to")
    block_size: int = option(2048, "chunks per embedding block (the unit of --resume)")
    text_field: str = option("text", "the text field of .jsonl documents")
    max_documents: int | None = option(None, "read at most this many documents")
    seed: int = option(0, "seed of the held-out choice")
    include: tuple[str, ...] = option((), INCLUDE_HELP, metavar="GLOB")
    exclude: tuple[str, ...] = option((), EXCLUDE_HELP, metavar="GLOB")
    shards: int = option(1, "split the exact index by chunk id into N shards, searchable in one process or one per "
                            "rank")
    # how, not what: these do not change the database
    resume: bool = option(False, "complete an interrupted build")
    overwrite: bool = option(False, "replace an existing database")
    device: str | None = option(None, "where to embed (default: cuda if there is one)")
    embed_batch_size: int | None = option(None, "texts per BERT batch (default 32 on the CPU, which keeps them in "
                                                "cache, 128 on a GPU)", flag="batch-size")
    progress: bool = option(True, cli=False)

    _HOW = ("resume", "overwrite", "device", "embed_batch_size", "progress")

    def what(self) -> dict:
        """The options that determine the database's content."""
        what = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._HOW}
        return {**what, "include": list(self.include), "exclude": list(self.exclude)}  # as JSON stores them

    def validate(self) -> None:
        """RetroError for an option out of range, before any work starts."""
        for name, value, low in (("--chunk-size", self.chunk_size, 1), ("--vocab-size", self.vocab_size, 16),
                                 ("--block-size", self.block_size, 1), ("--seed", self.seed, 0),
                                 ("--shards", self.shards, 1)):
            check_int(name, value, low)
        check_int("--batch-size", self.embed_batch_size, 1, optional=True)
        check_int("--max-documents", self.max_documents, 1, optional=True)
        check_float("--valid-fraction", self.valid_fraction, 0, 1, high_open=True)
        check_float("--target-recall", self.target_recall, 0, 1, low_open=True)
        check_choice("--index", self.index, KINDS)
        if self.shards > 1 and self.index not in ("auto", "flat", "torch"):
            raise RetroError(f"--shards {self.shards} needs an exact index (--index auto, flat or torch), "
                             f"got --index {self.index}")
        check_globs(self.include, self.exclude)
        check_corpus(self.corpus)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    unit = "chunk" if "chunk" in desc or "embed" in desc else "doc" if "document" in desc else "it"
    return tqdm(total=total, desc=desc, unit=unit,
                disable=not enabled or not dist.is_main(), dynamic_ncols=True, leave=False)


def _prepare_folder(opts: BuildOptions) -> dict:
    """Checks the output folder; returns the build state (new or resumed)."""
    out = Path(opts.out)
    state_path = out / "build_state.json"
    if out.exists() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_NAMES and not p.name.startswith("."))
        if opts.overwrite:
            if foreign:
                raise RetroError(f"--overwrite refuses to empty {str(out)!r}: it holds files that are not part of a "
                                 f"retro database ({', '.join(foreign[:5])})")
            shutil.rmtree(out)
        elif (out / "manifest.json").exists():
            raise RetroError(f"{str(out)!r} already holds a database; pass --overwrite to replace it")
        elif state_path.exists():
            if not opts.resume:
                raise RetroError(f"{str(out)!r} holds an unfinished build; pass --resume to complete it "
                                 "or --overwrite to start again")
            state = read_json(state_path)
            saved = {"include": [], "exclude": [], "shards": 1, **state["options"]}  # older builds
            if saved != opts.what():
                diff = {k: (saved.get(k), v) for k, v in opts.what().items() if saved.get(k) != v}
                raise RetroError(f"--resume: the options differ from the unfinished build's: {diff} "
                                 "(was, now)")
            return state
        else:
            raise RetroError(f"{str(out)!r} is not empty and holds no retro database; choose another --out")
    state = {"format_version": FORMAT_VERSION, "options": opts.what(), "stages": {}}
    write_json(state_path, state)
    return state


def _save_state(opts: BuildOptions, state: dict) -> None:
    write_json(Path(opts.out) / "build_state.json", state)


def _split_documents(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Whole documents held out: a seeded random choice of round(fraction * D) documents."""
    split = np.zeros(n_docs, dtype=np.uint8)
    n_valid = int(round(fraction * n_docs))
    if fraction > 0 and n_valid == 0:
        n_valid = 1
    if n_valid >= n_docs and n_docs > 0:
        raise RetroError(f"--valid-fraction {fraction} leaves no training document out of {n_docs}")
    split[np.random.default_rng(seed).permutation(n_docs)[:n_valid]] = 1
    return split


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


def _tokenize_stage(opts: BuildOptions, tokenizer, documents: list[str], log) -> None:
    out = Path(opts.out)
    if (out / "chunk_doc.npy").exists():
        return
    r, w = dist.rank(), dist.world_size()
    parts = out / "parts"
    mine = list(range(r, len(documents), w))
    encoded = []
    bar = _progress(len(mine), "tokenising documents", opts.progress)
    for s in range(0, len(mine), 256):
        encoded += tokenizer.encode([documents[i] for i in mine[s:s + 256]])
        bar.update(min(256, len(mine) - s))
    bar.close()
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    flat = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
    write_npy(parts / f"tokens-rank{r}.npy", flat)
    write_npy(parts / f"lengths-rank{r}.npy", lengths)
    dist.barrier()
    if dist.is_main():
        per_rank = [(np.load(parts / f"tokens-rank{i}.npy"), np.load(parts / f"lengths-rank{i}.npy")) for i in range(w)]
        seqs: list[np.ndarray] = [None] * len(documents)  # type: ignore[list-item]
        for i, (flat_i, len_i) in enumerate(per_rank):
            offsets = np.concatenate([[0], np.cumsum(len_i)])
            for j, d in enumerate(range(i, len(documents), w)):
                seqs[d] = flat_i[offsets[j]:offsets[j + 1]]
        doc_len = np.array([len(s) for s in seqs], dtype=np.int64)
        doc_start = np.concatenate([[0], np.cumsum(doc_len)]).astype(np.int64)
        doc_split = _split_documents(len(documents), opts.valid_fraction, opts.seed)
        tokens = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32)
        chunk_start, chunk_len, chunk_doc = chunk_layout(doc_start, doc_split, opts.chunk_size)
        if len(chunk_start) == 0:
            raise RetroError("the corpus gives no training chunk (no training document has a token)")
        doc_bytes = np.array([len(d.encode("utf-8")) for d in documents], dtype=np.int64)
        for name, arr in (("tokens", tokens), ("doc_start", doc_start), ("doc_split", doc_split),
                          ("doc_bytes", doc_bytes), ("chunk_start", chunk_start), ("chunk_len", chunk_len),
                          ("chunk_doc", chunk_doc)):  # chunk_doc last: it marks the stage done
            write_npy(out / f"{name}.npy", arr)
        log(f"[build-db] {len(documents)} documents ({int(doc_split.sum())} held out), {len(tokens)} tokens, "
            f"{len(chunk_start)} chunks of {opts.chunk_size}")
    dist.barrier()


def chunk_texts(tokenizer, tokens: np.ndarray, chunk_start: np.ndarray, chunk_len: np.ndarray) -> list[str]:
    return [tokenizer.decode(tokens[s:s + n]) for s, n in zip(chunk_start, chunk_len)]


def _embed_stage(opts: BuildOptions, tokenizer, log) -> dict:
    from .embedder import make_embedder

    out = Path(opts.out)
    parts = out / "parts"
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    starts = np.load(out / "chunk_start.npy")
    lens = np.load(out / "chunk_len.npy")
    n = len(starts)
    blocks = range(dist.rank(), (n + opts.block_size - 1) // opts.block_size, dist.world_size())
    todo = [b for b in blocks if not (parts / f"embeddings-{b:06d}.npy").exists()]
    embedder = make_embedder(opts.embedder, device=opts.device, batch_size=opts.embed_batch_size)
    fail_after = int(os.environ.get("RETRO_TEST_FAIL_AFTER_BLOCKS", "-1"))  # tests: simulate a crash
    bar = _progress(sum(min(opts.block_size, n - b * opts.block_size) for b in todo), "embedding chunks",
                    opts.progress)
    for done, b in enumerate(todo):
        if done == fail_after:
            raise SystemExit(f"[build-db] simulated crash after {done} blocks (RETRO_TEST_FAIL_AFTER_BLOCKS)")
        sl = slice(b * opts.block_size, min(n, (b + 1) * opts.block_size))
        emb = embedder.embed(chunk_texts(tokenizer, tokens, starts[sl], lens[sl]))
        write_npy(parts / f"embeddings-{b:06d}.npy", emb)
        bar.update(sl.stop - sl.start)
    bar.close()
    dist.barrier()
    return embedder.describe()


def _merge_embeddings(opts: BuildOptions) -> None:
    out = Path(opts.out)
    if (out / "embeddings.npy").exists():
        return
    n = len(np.load(out / "chunk_start.npy", mmap_mode="r"))
    blocks = [np.load(out / "parts" / f"embeddings-{b:06d}.npy")
              for b in range((n + opts.block_size - 1) // opts.block_size)]
    write_npy(out / "embeddings.npy", np.concatenate(blocks).astype(np.float32))


def _index_stage(opts: BuildOptions, state: dict, log) -> dict:
    from .index import IndexSettings, SearchIndex, build_faiss, choose_kind, tune_nprobe

    out = Path(opts.out)
    if "index" in state["stages"]:
        return state["stages"]["index"]
    vectors = np.load(out / "embeddings.npy", mmap_mode="r")
    kind = choose_kind(len(vectors)) if opts.index == "auto" else opts.index
    if opts.shards > 1:
        from .index import faiss_available
        from .sharded import build_shards

        kind = kind if kind in ("flat", "torch") else "flat" if faiss_available() else "torch"
        bounds = build_shards(vectors, opts.shards, out, kind)
        settings = IndexSettings(kind=kind, recall=1.0, extra={"shards": opts.shards, "bounds": bounds.tolist()})
        log(f"[build-db] {kind} index over {len(vectors)} chunks in {opts.shards} shards")
    elif kind == "torch":
        settings = IndexSettings(kind="torch", recall=1.0)
    else:
        import faiss

        log(f"[build-db] training the {kind} index on a sample" if kind != "flat" else "[build-db] flat index")
        bar = _progress(len(vectors), f"adding to the {kind} index", opts.progress)
        index, settings = build_faiss(kind, vectors, seed=opts.seed, progress=bar.update)
        bar.close()
        nprobe, recall = tune_nprobe(SearchIndex(settings, index), vectors, opts.target_recall, seed=opts.seed)
        settings.nprobe, settings.recall = nprobe, recall
        with atomic_path(out / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        log(f"[build-db] {kind} index over {len(vectors)} chunks; nprobe {nprobe}, "
            f"recall@{settings.recall_k} {recall:.3f} against exact search")
    state["stages"]["index"] = asdict(settings)
    _save_state(opts, state)
    return state["stages"]["index"]


def build_database(opts: BuildOptions, log=print) -> Path:
    """Builds (or, with opts.resume, completes) the database in opts.out. Runs alone or under
    torchrun: every rank tokenises and embeds its share, rank 0 merges, indexes and writes."""
    opts.validate()
    dist.init_from_env()
    out = Path(opts.out)
    report = CorpusReport()  # read first: a corpus with nothing usable leaves no folder behind
    documents = read_documents(opts.corpus, opts.text_field, report, opts.include, opts.exclude)
    if opts.max_documents is not None:
        documents = documents[: opts.max_documents]
    state = dist.broadcast_object(_prepare_folder(opts) if dist.is_main() else None)
    if state is None:
        raise RetroError("build preparation failed on rank 0")

    tok_path = out / "tokenizer.model"
    if opts.tokenizer is not None:
        tokenizer = load_tokenizer(opts.tokenizer)
        if dist.is_main() and isinstance(tokenizer, SentencePieceTokenizer):
            tokenizer.save(tok_path)
    elif tok_path.exists():
        tokenizer = SentencePieceTokenizer.load(tok_path)
    else:
        if dist.is_main():
            train_docs = [d for d, s in zip(documents, _split_documents(len(documents), opts.valid_fraction,
                                                                         opts.seed)) if s == 0]
            log(f"[build-db] training a SentencePiece tokenizer (vocabulary {opts.vocab_size}) on "
                f"{len(train_docs)} documents")
            t0 = time.perf_counter()
            SentencePieceTokenizer.train(train_docs, opts.vocab_size, log=log).save(tok_path)
            log(f"[build-db] tokenizer trained in {time.perf_counter() - t0:.0f} s")
        dist.barrier()
        tokenizer = SentencePieceTokenizer.load(tok_path)
    if tokenizer.vocab_size < opts.vocab_size and opts.tokenizer is None:
        state["stages"]["vocab_reduced"] = {"asked": opts.vocab_size, "got": tokenizer.vocab_size}

    _tokenize_stage(opts, tokenizer, documents, log)
    embedder_info = _embed_stage(opts, tokenizer, log)
    if dist.is_main():
        _merge_embeddings(opts)
        index_info = _index_stage(opts, state, log)
        manifest = {
            "format_version": FORMAT_VERSION,
            "chunk_size": opts.chunk_size,
            "counts": _counts(out),
            "tokenizer": tokenizer.describe(),
            "embedder": embedder_info,
            "index": index_info,
            "arrays": {a: _array_info(out / f"{a}.npy") for a in ARRAYS},
            "report": {"files": report.files, "documents": report.documents,
                       "empty_documents_skipped": report.empty_documents, "files_found": report.found,
                       "files_skipped": report.skipped,
                       "non_utf8_bytes_replaced": report.replaced_bytes,
                       "vocab_reduced": state["stages"].get("vocab_reduced")},
            "options": {k: v for k, v in opts.what().items() if k not in ("out",)},
        }
        write_json(out / "manifest.json", manifest)
        shutil.rmtree(out / "parts", ignore_errors=True)
        (out / "build_state.json").unlink(missing_ok=True)
        log(f"[build-db] wrote {str(out)!r}: {manifest['counts']['chunks']} chunks; "
            f"{report.replaced_bytes} non-UTF-8 bytes replaced; {report.describe()}")
    dist.barrier()
    return out


def _array_info(path: Path) -> dict:
    a = np.load(path, mmap_mode="r")
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def _counts(out: Path) -> dict:
    split = np.load(out / "doc_split.npy")
    return {"documents": int(len(split)), "train_documents": int((split == 0).sum()),
            "valid_documents": int((split == 1).sum()),
            "tokens": int(len(np.load(out / "tokens.npy", mmap_mode="r"))),
            "chunks": int(len(np.load(out / "chunk_start.npy", mmap_mode="r")))}


class ChunkDatabase:
    """A finished database, memory-mapped. values(ids) gives the neighbour tokens [chunk,
    continuation] and their mask; train/valid documents give the language-model data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            hint = " (an unfinished build: run build-db again with --resume)" if \
                (self.path / "build_state.json").exists() else ""
            raise RetroError(f"{str(self.path)!r} is not a retro database: no manifest.json{hint}")
        self.manifest = read_json(mpath)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise RetroError(f"{str(self.path)!r} has database format version {version}; this version of retro "
                             f"reads version {FORMAT_VERSION}: rebuild it with `retro build-db --overwrite`")
        for name in ARRAYS:
            p = self.path / f"{name}.npy"
            if not p.exists():
                raise RetroError(f"{str(self.path)!r}: {name}.npy is missing")
            arr = np.load(p, mmap_mode="r")
            want = self.manifest["arrays"][name]
            if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                raise RetroError(f"{str(self.path)!r}: {name}.npy has shape {list(arr.shape)} and dtype {arr.dtype}, "
                                 f"but the manifest says {want['shape']} {want['dtype']}; the database is damaged")
            setattr(self, name, arr)
        self.chunk_size = int(self.manifest["chunk_size"])
        self.num_chunks = len(self.chunk_start)
        self._tokenizer = None

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
        """Document ids of the training ("train") or held-out ("valid") split."""
        return np.flatnonzero(self.doc_split == (0 if split == "train" else 1))

    def document_tokens(self, d: int) -> np.ndarray:
        return np.asarray(self.tokens[int(self.doc_start[d]):int(self.doc_start[d + 1])])

    def chunk_text(self, c: int) -> str:
        return self.tokenizer.decode(self.chunk_tokens(c))
