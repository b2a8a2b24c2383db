"""`build_database`: a corpus -> the database folder that database.py describes, in stages that
stream (no stage holds the corpus's text or all the keys in memory at once) and resume.

Stages, each written atomically and skipped when a resumed build finds it done:
  catalogue   one pass over the corpus: each document's bytes and folder, then the held-out split
  tokenizer   (unless --tokenizer) SentencePiece trained on a seeded sample of the training lines
  tokenise    the corpus again, in parts of PART_DOCUMENTS documents (parts/tokens-*.npy), then the
              token and chunk arrays written from the parts
  embed       the chunks' keys in blocks of --block-size chunks (parts/embeddings-*.npy)
  merge       the blocks copied into embeddings.npy, one block at a time
  index       the faiss index (or shards): trained on a sample, filled in parts (parts/index-*.faiss,
              index_parts.py), merged; then manifest.json, last
With --embedder bm25 the stages terms and index of bm25_build.py replace embed, merge and index (no
embeddings.npy, no faiss index: the folder bm25/).
A build killed at any point (kill -9 included) and run again with --resume gives the database an
uninterrupted build gives: every stage's output is a function of the options and the corpus only.
Under torchrun every rank tokenises, embeds and adds to the index its share of the parts (the
ranks meet at barriers between stages); rank 0 reads the corpus, trains the tokenizer and the
index, merges and writes the rest.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import numpy as np

from ..base import distributed as dist
from ..base.atomic import atomic_path, read_json, write_json, write_npy
from ..base.checks import check_choice, check_float, check_int
from ..base.defaults import CHUNK_SIZE
from ..base.errors import RetroError
from ..base.options import EXCLUDE_HELP, INCLUDE_HELP, option
from ..base import hooks
from .corpus import CorpusReport, check_corpus, check_globs, iter_documents
from .bm25 import is_bm25
from .database import FORMAT_VERSION, OWN_NAMES, chunk_layout, chunk_texts, key_arrays, pending_chunk_blocks
from .generations import generation_of, index_file, index_remedy
from .embedder import DEFAULT_EMBEDDER, default_embedder
from .index import KINDS
from .neighbours import is_neighbours_entry
from .tokenizer import SentencePieceTokenizer, load_tokenizer

HOLDOUT = ("document", "folder", "both")
PART_DOCUMENTS = 4096  # documents per tokenisation part (the unit of --resume in that stage)



@dataclass
class BuildOptions:
    corpus: str = option(help="a text file, a directory of text files, or .jsonl/.jsonl.gz", positional=True)
    out: str = option(help="the database folder")
    tokenizer: str | None = option(None, "a SentencePiece file or a Hugging Face tokenizer name/path "
                                         "(default: train one into the database)")
    vocab_size: int = option(8000, "the trained tokenizer's vocabulary")
    tokenizer_lines: int = option(200_000, "lines of the training documents sampled (seeded) to train the "
                                           "tokenizer")
    chunk_size: int = option(CHUNK_SIZE, "tokens per chunk (m)")
    valid_fraction: float = option(0.05, "the fraction of documents held out for `retro evaluate` (at least one "
                                         "when the corpus has two or more; 0: none)")
    holdout_by: str = option("document", "what is held out: single documents chosen at random, whole folders "
                                         "(no file of a held-out folder is in the database), or both (half of "
                                         "the held-out documents each way)", choices=HOLDOUT)
    embedder: str | None = option(None, "the frozen BERT: a Hugging Face name or a local folder; static:NAME for its "
                                        "distilled static token embeddings (100x faster on a CPU); int8:NAME for "
                                        "the BERT with int8 Linear layers (CPU); bm25 for BM25 over the chunks' "
                                        f"words instead of keys (default: {DEFAULT_EMBEDDER} on a GPU, "
                                        f"static:{DEFAULT_EMBEDDER} without one)")
    index: str = option("auto", "the index kind (auto: flat below 50k chunks, ivf-fastscan below 5M (ivf-flat with "
                                "faiss on GPUs), then ivf-pq; "
                                "torch exact search without faiss)", choices=KINDS)
    target_recall: float = option(0.95, "10-recall@10 that nprobe is tuned to")
    block_size: int = option(2048, "chunks per embedding block (the unit of --resume)")
    text_field: str = option("text", "the text field of .jsonl documents")
    max_documents: int | None = option(None, "read at most this many documents (default: all)")
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
                                 ("--shards", self.shards, 1), ("--tokenizer-lines", self.tokenizer_lines, 1)):
            check_int(name, value, low)
        check_int("--batch-size", self.embed_batch_size, 1, optional=True)
        check_int("--max-documents", self.max_documents, 1, optional=True)
        check_float("--valid-fraction", self.valid_fraction, 0, 1, high_open=True)
        check_float("--target-recall", self.target_recall, 0, 1, low_open=True)
        check_choice("--index", self.index, KINDS)
        check_choice("--holdout-by", self.holdout_by, HOLDOUT)
        if is_bm25(self.embedder) and (self.index != "auto" or self.shards != 1):
            raise RetroError(f"--embedder bm25 scores every chunk exactly with its own index: leave --index at auto "
                             f"and --shards at 1, got --index {self.index} and --shards {self.shards}")
        if self.shards > 1 and self.index not in ("auto", "flat", "torch"):
            raise RetroError(f"--shards {self.shards} needs an exact index (--index auto, flat or torch), "
                             f"got --index {self.index}")
        check_globs(self.include, self.exclude)
        check_corpus(self.corpus)


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "chunk"):
    from retro.base.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit=unit, delay=1.0,  # shown after a second: quick stages stay quiet
                disable=not enabled or not dist.is_main(), dynamic_ncols=True, leave=False)


def _documents(opts: BuildOptions, report: CorpusReport | None = None):
    """(text, folder) of each document, streamed, at most --max-documents."""
    docs = iter_documents(opts.corpus, opts.text_field, report if report is not None else CorpusReport(),
                          opts.include, opts.exclude, with_folder=True)
    return islice(docs, opts.max_documents) if opts.max_documents is not None else docs


def _choose_embedder(opts: BuildOptions) -> str:
    """Sets opts.embedder where it is None: the embedder of the build being resumed (its state or its
    manifest), else the default for this machine (embedder.default_embedder). Returns how it was chosen."""
    if opts.embedder is not None:
        return "given (--embedder)"
    out = Path(opts.out)
    for record in (out / "build_state.json", out / "manifest.json"):
        if opts.resume and record.exists():
            saved = read_json(record).get("options", {}).get("embedder")
            if saved is not None:
                opts.embedder = saved
                return f"the resumed build's ({record.name})"
    opts.embedder, why = default_embedder(opts.device)
    return why


def _prepare_folder(opts: BuildOptions) -> dict:
    """Checks the output folder; returns the build state (new or resumed)."""
    out = Path(opts.out)
    state_path = out / "build_state.json"
    if out.exists() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in OWN_NAMES and not is_neighbours_entry(p.name) and not p.name.startswith("."))
        if opts.overwrite:
            if foreign:
                raise RetroError(f"--overwrite refuses to empty {str(out)!r}: it holds files that are not part of a "
                                 f"retro database ({', '.join(foreign[:5])})")
            shutil.rmtree(out)
        elif (out / "manifest.json").exists() and not state_path.exists():
            built = {k: v for k, v in opts.what().items() if k != "out"}
            if opts.resume and read_json(out / "manifest.json").get("options") == built:
                return {"complete": True}  # nothing left to resume
            raise RetroError(f"{str(out)!r} already holds a database; pass --overwrite to replace it")
        elif state_path.exists():
            if not opts.resume:
                raise RetroError(f"{str(out)!r} holds an unfinished build; pass --resume to complete it "
                                 "or --overwrite to start again")
            state = read_json(state_path)
            for tmp in [*out.glob(".*.tmp"), *(out / "parts").glob(".*.tmp")]:  # cut short by a kill
                tmp.unlink()
            if state.get("format_version") != FORMAT_VERSION:
                raise RetroError(f"{str(out)!r} holds an unfinished build of database format "
                                 f"{state.get('format_version')}; this version builds format {FORMAT_VERSION}: "
                                 "pass --overwrite to start again")
            saved = state["options"]
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


def split_documents(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Whole documents held out: a seeded random choice of round(fraction * D) documents (at
    least one when fraction > 0; none of a single document). (D,) uint8, 1 = held out."""
    split = np.zeros(n_docs, dtype=np.uint8)
    if n_docs < 2:
        return split
    n_valid = int(round(fraction * n_docs))
    if fraction > 0 and n_valid == 0:
        n_valid = 1
    if n_valid >= n_docs and n_docs > 0:
        raise RetroError(f"--valid-fraction {fraction} leaves no training document out of {n_docs}")
    split[np.random.default_rng(seed).permutation(n_docs)[:n_valid]] = 1
    return split


def split_folders(doc_folder: np.ndarray, fraction: float, seed: int, share: float = 1.0) -> np.ndarray:
    """Whole folders held out: folders in a seeded random order until share * round(fraction * D)
    documents are held out; with share < 1 (holdout "both") the rest are single documents drawn
    from the folders that stay. doc_folder (D,) int32 folder ids -> (D,) uint8, 1 = held out."""
    n_docs = len(doc_folder)
    target = max(1, int(round(fraction * n_docs))) if fraction > 0 and n_docs > 1 else 0
    split = np.zeros(n_docs, dtype=np.uint8)
    if target == 0:
        return split
    rng = np.random.default_rng(seed)
    folders, counts = np.unique(doc_folder, return_counts=True)
    held = 0
    want = int(round(share * target))
    for i in rng.permutation(len(folders)):
        if held >= want:
            break
        if held + counts[i] > max(want, 1) * 1.5 and held > 0:
            continue  # a folder that would overshoot by half: try a smaller one
        split[doc_folder == folders[i]] = 1
        held += int(counts[i])
    rest = target - held
    if rest > 0 and share < 1:
        kept_folders = np.setdiff1d(folders, np.unique(doc_folder[split == 1]))
        candidates = np.flatnonzero(np.isin(doc_folder, kept_folders))
        if len(candidates) > rest:
            split[rng.permutation(candidates)[:rest]] = 1
    if split.all():
        raise RetroError(f"--valid-fraction {fraction} leaves no training document out of {n_docs}")
    return split


def _catalogue_stage(opts: BuildOptions, state: dict, log) -> dict:
    """One pass over the corpus: doc_bytes, doc_folder and doc_split; the corpus report."""
    out = Path(opts.out)
    if "catalogue" in state["stages"]:
        return state["stages"]["catalogue"]
    report = CorpusReport()
    sizes, folders, names = [], [], {}
    bar = _progress(None, "reading the corpus", opts.progress, unit="doc")
    for text, folder in _documents(opts, report):
        sizes.append(len(text.encode("utf-8")))
        folders.append(names.setdefault(folder, len(names)))
        bar.update(1)
    bar.close()
    if not sizes:
        raise RetroError(f"corpus {opts.corpus!r} has no non-empty document: {report.describe()}")
    doc_folder = np.asarray(folders, dtype=np.int32)
    if opts.holdout_by == "document":
        doc_split = split_documents(len(sizes), opts.valid_fraction, opts.seed)
    else:
        doc_split = split_folders(doc_folder, opts.valid_fraction, opts.seed,
                                  share=1.0 if opts.holdout_by == "folder" else 0.5)
    write_npy(out / "doc_bytes.npy", np.asarray(sizes, dtype=np.int64))
    write_npy(out / "doc_folder.npy", doc_folder)
    write_npy(out / "doc_split.npy", doc_split)
    state["stages"]["catalogue"] = {
        "documents": len(sizes), "folders": len(names),
        "report": {"files": report.files, "documents": report.documents,
                   "empty_documents_skipped": report.empty_documents, "files_found": report.found,
                   "files_skipped": report.skipped, "non_utf8_bytes_replaced": report.replaced_bytes},
        "describe": report.describe()}
    _save_state(opts, state)
    log(f"[build-db] {len(sizes)} documents in {len(names)} folders, {int(doc_split.sum())} held out "
        f"(by {opts.holdout_by})" + ("" if doc_split.any() else
                                     "; `retro evaluate RUN --db DB --text PATH` scores other text instead"))
    return state["stages"]["catalogue"]


def _training_lines(opts: BuildOptions, doc_split: np.ndarray) -> list[str]:
    """The non-empty lines of the training documents, or a seeded uniform sample of --tokenizer-lines of
    them, in corpus order: each line draws a seeded uniform key (a document's lines at once) and the lines
    of the smallest keys are kept (bottom-k sampling over the stream; lines whose key is above the kept
    ones' largest are never looked at)."""
    rng = np.random.default_rng(opts.seed)
    cap = opts.tokenizer_lines
    keys, lines, order = [], [], []  # the candidates: key, line, position among all lines
    threshold, seen = np.inf, 0

    def prune(size: int) -> float:
        nonlocal keys, lines, order
        keep = np.sort(np.argpartition(np.asarray(keys), size - 1)[:size])
        keys, lines, order = [keys[i] for i in keep], [lines[i] for i in keep], [order[i] for i in keep]
        return max(keys)

    for d, (text, _) in enumerate(_documents(opts)):
        if doc_split[d]:
            continue
        doc_lines = [line for line in text.splitlines() if line.strip()]
        drawn = rng.random(len(doc_lines))
        for i in np.flatnonzero(drawn < threshold).tolist():
            keys.append(float(drawn[i]))
            lines.append(doc_lines[i])
            order.append(seen + i)
        seen += len(doc_lines)
        if len(keys) >= 2 * cap:
            threshold = prune(cap)
    if len(keys) > cap:
        prune(cap)
    return [line for _, line in sorted(zip(order, lines))]


def _tokenizer_stage(opts: BuildOptions, state: dict, log):
    out = Path(opts.out)
    tok_path = out / "tokenizer.model"
    if opts.tokenizer is not None:
        tokenizer = load_tokenizer(opts.tokenizer)
        if dist.is_main() and isinstance(tokenizer, SentencePieceTokenizer):
            tokenizer.save(tok_path)
        return tokenizer
    if not tok_path.exists() and dist.is_main():
        lines = _training_lines(opts, np.load(out / "doc_split.npy"))
        log(f"[build-db] training a SentencePiece tokenizer (vocabulary {opts.vocab_size}) on {len(lines)} lines "
            "of the training documents")
        t0 = time.perf_counter()
        tokenizer = SentencePieceTokenizer.train_on_lines(lines, opts.vocab_size, log=log)
        tokenizer.save(tok_path)
        log(f"[build-db] tokenizer trained in {time.perf_counter() - t0:.0f} s")
        if tokenizer.vocab_size < opts.vocab_size:
            state["stages"]["vocab_reduced"] = {"asked": opts.vocab_size, "got": tokenizer.vocab_size}
            _save_state(opts, state)
    dist.barrier()
    return SentencePieceTokenizer.load(tok_path)


def _tokenise_stage(opts: BuildOptions, tokenizer, n_docs: int, log) -> None:
    """Each rank tokenises its parts (part p: documents [p * PART_DOCUMENTS, ...), rank p % world);
    rank 0 then writes tokens.npy part by part and the chunk arrays (chunk_doc last: the stage's mark)."""
    out = Path(opts.out)
    if (out / "chunk_doc.npy").exists():
        return
    parts = out / "parts"
    r, w = dist.rank(), dist.world_size()
    n_parts = (n_docs + PART_DOCUMENTS - 1) // PART_DOCUMENTS
    done = lambda p: (parts / f"lengths-{p:06d}.npy").exists()  # noqa: E731 - written after the tokens
    mine = [p for p in range(r, n_parts, w) if not done(p)]
    bar = _progress(n_docs, "tokenising documents", opts.progress, unit="doc")
    bar.update(sum(min(PART_DOCUMENTS, n_docs - p * PART_DOCUMENTS) for p in range(n_parts) if done(p)))
    if mine:
        docs = _documents(opts)
        todo = set(mine)
        for p in range(n_parts):
            texts = [t for t, _ in islice(docs, PART_DOCUMENTS)]
            if p not in todo:
                continue
            encoded = []
            for s in range(0, len(texts), 256):
                encoded += tokenizer.encode(texts[s:s + 256])
                bar.update(min(256, len(texts) - s))
            lengths = np.array([len(e) for e in encoded], dtype=np.int64)
            write_npy(parts / f"tokens-{p:06d}.npy",
                      np.concatenate(encoded).astype(np.int32) if encoded else np.zeros(0, np.int32))
            write_npy(parts / f"lengths-{p:06d}.npy", lengths)
            hooks.reached("tokenise", p)
            todo.discard(p)
            if not todo:
                break
    bar.close()
    dist.barrier()
    if not dist.is_main():
        dist.barrier()
        return
    doc_len = np.concatenate([np.load(parts / f"lengths-{p:06d}.npy") for p in range(n_parts)])
    if len(doc_len) != n_docs:
        raise RetroError(f"the corpus changed during the build: {n_docs} documents read first, {len(doc_len)} "
                         "tokenised; run build-db again with --overwrite")
    doc_start = np.concatenate([[0], np.cumsum(doc_len)]).astype(np.int64)
    with atomic_path(out / "tokens.npy") as tmp:
        tokens = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(int(doc_start[-1]),))
        at = 0
        for p in range(n_parts):
            part = np.load(parts / f"tokens-{p:06d}.npy")
            tokens[at:at + len(part)] = part
            at += len(part)
        tokens.flush()
        del tokens
    doc_split = np.load(out / "doc_split.npy")
    chunk_start, chunk_len, chunk_doc = chunk_layout(doc_start, doc_split, opts.chunk_size)
    if len(chunk_start) == 0:
        raise RetroError("the corpus gives no training chunk (no training document has a token)")
    for name, arr in (("doc_start", doc_start), ("chunk_start", chunk_start), ("chunk_len", chunk_len),
                      ("chunk_doc", chunk_doc)):  # chunk_doc last: it marks the stage done
        write_npy(out / f"{name}.npy", arr)
    log(f"[build-db] {n_docs} documents ({int(doc_split.sum())} held out), {int(doc_start[-1])} tokens, "
        f"{len(chunk_start)} chunks of {opts.chunk_size}")
    dist.barrier()


def _embed_stage(opts: BuildOptions, tokenizer, embedder) -> dict:
    out = Path(opts.out)
    parts = out / "parts"
    tokens, starts, lens, n, todo = pending_chunk_blocks(out, opts.block_size,
                                                         lambda b: parts / f"embeddings-{b:06d}.npy",
                                                         dist.rank(), dist.world_size())
    bar = _progress(sum(min(opts.block_size, n - b * opts.block_size) for b in todo), "embedding chunks",
                    opts.progress)
    for b in todo:
        sl = slice(b * opts.block_size, min(n, (b + 1) * opts.block_size))
        emb = embedder.embed(chunk_texts(tokenizer, tokens, starts[sl], lens[sl]))
        write_npy(parts / f"embeddings-{b:06d}.npy", emb)
        bar.update(sl.stop - sl.start)
        hooks.reached("embed", b)
    bar.close()
    dist.barrier()
    return embedder.describe()


def _merge_embeddings(opts: BuildOptions) -> None:
    """embeddings.npy (C, dim) float32 from the blocks, one block in memory at a time."""
    out = Path(opts.out)
    if (out / "embeddings.npy").exists():
        return
    n = len(np.load(out / "chunk_start.npy", mmap_mode="r"))
    n_blocks = (n + opts.block_size - 1) // opts.block_size
    dim = np.load(out / "parts" / "embeddings-000000.npy", mmap_mode="r").shape[1]
    with atomic_path(out / "embeddings.npy") as tmp:
        keys = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for b in range(n_blocks):
            keys[b * opts.block_size:(b + 1) * opts.block_size] = np.load(out / "parts" / f"embeddings-{b:06d}.npy")
            hooks.reached("merge", b)
        keys.flush()
        del keys


def _index_stage(opts: BuildOptions, state: dict, log,
                 ranks: tuple[int, int] | None = None) -> dict | None:
    """Every rank (of ranks = (rank, world), by default torchrun's) fills its parts of a faiss
    index (index_parts.py); rank 0 does the rest and returns the manifest's index entry, the
    others None."""
    from .index import IndexSettings, SearchIndex, choose_kind, tune_nprobe

    out = Path(opts.out)
    if "index" in state["stages"]:
        return state["stages"]["index"]
    rank, world = ranks or (dist.rank(), dist.world_size())
    vectors = np.load(out / "embeddings.npy", mmap_mode="r")
    kind = choose_kind(len(vectors)) if opts.index == "auto" else opts.index
    if rank != 0 and (opts.shards > 1 or kind == "torch"):
        return None  # rank 0 writes the shards; torch exact search has no index file
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

        from .index_parts import build_faiss_in_parts

        if rank == 0:
            log(f"[build-db] training the {kind} index on a sample" if kind != "flat" else "[build-db] flat index")
        bar = _progress(len(vectors), f"adding to the {kind} index", opts.progress)
        index, settings = build_faiss_in_parts(kind, vectors, out / "parts", opts.block_size, opts.seed, rank, world,
                                               bar.update)
        bar.close()
        if index is None:
            return None  # rank 0 merged the parts
        search = SearchIndex(settings, index)
        held = search.stored_keys()  # the same keys, in the index's memory: the file's pages let go
        if held is not None:
            vectors = held
        nprobe, recall = tune_nprobe(search, vectors, opts.target_recall, seed=opts.seed)
        settings.nprobe, settings.recall = nprobe, recall
        with atomic_path(out / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        log(f"[build-db] {kind} index over {len(vectors)} chunks; nprobe {nprobe}, "
            f"recall@{settings.recall_k} {recall:.3f} against exact search")
    hooks.reached("index", 0)
    state["stages"]["index"] = asdict(settings)
    _save_state(opts, state)
    return state["stages"]["index"]


def _timed(seconds: dict, stage: str, fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)
    return result


def build_database(opts: BuildOptions, log=print) -> Path:
    """Builds (or, with opts.resume, completes) the database in opts.out. Runs alone or under
    torchrun: every rank tokenises, embeds and fills index parts, rank 0 reads, merges and writes.
    hooks.reached(stage, i) is called after each unit of work is written."""
    opts.validate()
    dist.init_from_env()
    out = Path(opts.out)
    choice = _choose_embedder(opts)
    if dist.is_main():
        log(f"[build-db] embedder {opts.embedder}: {choice}")
    embedder = None  # loaded first: a name that is no embedder fails before any stage, leaving no folder
    if not is_bm25(opts.embedder):
        from .embedder import make_embedder

        embedder = make_embedder(opts.embedder, device=opts.device, batch_size=opts.embed_batch_size)
    state = dist.broadcast_object(_prepare_folder(opts) if dist.is_main() else None)
    if state is None:
        raise RetroError("build preparation failed on rank 0")
    choice = state.setdefault("embedder_choice", choice)  # a resumed build keeps the reason it started with
    if state.get("complete"):
        if dist.is_main():
            _repair_index(opts, log)
        dist.barrier()
        return out
    if (out / "manifest.json").exists():  # killed after the manifest: only the clean-up was left
        if dist.is_main():
            _clean_up(out)
        dist.barrier()
        return out
    seconds = state.setdefault("seconds", {})  # per stage, this run's and earlier runs' (resumed) together
    try:
        catalogue = dist.broadcast_object(_timed(seconds, "catalogue", _catalogue_stage, opts, state, log)
                                          if dist.is_main() else None)
    except RetroError:
        if not (out / "doc_split.npy").exists():  # nothing usable: leave no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    hooks.reached("catalogue", 0)
    tokenizer = _timed(seconds, "tokenizer", _tokenizer_stage, opts, state, log)
    hooks.reached("tokenizer", 0)
    _timed(seconds, "tokenise", _tokenise_stage, opts, tokenizer, catalogue["documents"], log)
    if is_bm25(opts.embedder):
        from . import bm25_build

        progress = lambda total, desc: _progress(total, desc, opts.progress)  # noqa: E731
        embedder_info = _timed(seconds, "terms", bm25_build.terms_stage, opts, tokenizer, progress)
    else:
        embedder_info = _timed(seconds, "embed", _embed_stage, opts, tokenizer, embedder)
    if dist.is_main():
        _save_state(opts, state)
        if is_bm25(opts.embedder):
            index_info = _timed(seconds, "index", bm25_build.index_stage, opts, state, log,
                                lambda st: _save_state(opts, st))
        else:
            _timed(seconds, "merge", _merge_embeddings, opts)
    if not is_bm25(opts.embedder):  # every rank fills its parts of the index
        dist.barrier()
        index_info = _timed(seconds, "index", _index_stage, opts, state, log)
    if dist.is_main():
        manifest = {
            "format_version": FORMAT_VERSION,
            "chunk_size": opts.chunk_size,
            "counts": _counts(out),
            "tokenizer": tokenizer.describe(),
            "embedder": embedder_info,
            "embedder_choice": choice,
            "index": index_info,
            "arrays": {a: _array_info(out / f"{a}.npy") for a in key_arrays(opts.embedder)},
            "report": {**catalogue["report"], "vocab_reduced": state["stages"].get("vocab_reduced")},
            "options": {k: v for k, v in opts.what().items() if k not in ("out",)},
            "build_seconds": seconds,
        }
        write_json(out / "manifest.json", manifest)
        hooks.reached("manifest", 0)
        _clean_up(out)
        log(f"[build-db] wrote {str(out)!r}: {manifest['counts']['chunks']} chunks; "
            f"{catalogue['report']['non_utf8_bytes_replaced']} non-UTF-8 bytes replaced; {catalogue['describe']}")
    dist.barrier()
    return out


def _index_damage(out: Path, manifest: dict) -> str | None:
    """What is wrong with a finished database's faiss index (index.faiss, or the shards' files):
    missing, unreadable or of the wrong size, as "...; rebuilding it"; None if nothing is (or it has
    no faiss index)."""
    from .index import read_faiss_index
    from .sharded import shard_path

    info = manifest["index"]
    shards = info.get("extra", {}).get("shards")
    if is_bm25(manifest["embedder"]["name"]) or info["kind"] == "torch":
        return None
    files = [shard_path(out, s) for s in range(shards)] if shards else [out / index_file(manifest, "index.faiss")]
    try:
        vectors = sum(read_faiss_index(f, "rebuilding it").ntotal for f in files)
    except RetroError as exc:
        return str(exc)
    chunks = manifest["counts"]["chunks"]
    return None if vectors == chunks else f"the index holds {vectors} vectors, the database {chunks}; rebuilding it"


def _repair_index(opts: BuildOptions, log) -> None:
    """--resume of a finished database: its faiss index rebuilt from embeddings.npy if it is
    missing or damaged (the index stage again, its settings into the manifest); else nothing to do."""
    out = Path(opts.out)
    manifest = read_json(out / "manifest.json")
    damage = _index_damage(out, manifest)
    if damage is None:
        log(f"[build-db] {str(out)!r} is complete: nothing to resume")
        return
    if not (out / "embeddings.npy").exists():
        raise RetroError(f"the index of {str(out)!r} is damaged and embeddings.npy, which it is built from, is "
                         "missing: build the database again with --overwrite")
    if generation_of(manifest):  # embeddings.npy holds the build's keys only
        raise RetroError(f"{damage.removesuffix('; rebuilding it')}; {str(out)!r} was changed after its build "
                         f"(generation {generation_of(manifest)}): {index_remedy(out)}")
    log(f"[build-db] {damage}")
    state = {"format_version": FORMAT_VERSION, "options": opts.what(), "stages": {}}
    manifest["index"] = _index_stage(opts, state, log, ranks=(0, 1))  # rank 0 alone
    write_json(out / "manifest.json", manifest)
    _clean_up(out)


def _clean_up(out: Path) -> None:
    """The build's working files go once the manifest is written (the state last)."""
    shutil.rmtree(out / "parts", ignore_errors=True)
    (out / "build_state.json").unlink(missing_ok=True)


def _array_info(path: Path) -> dict:
    a = np.load(path, mmap_mode="r")
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def _counts(out: Path) -> dict:
    split = np.load(out / "doc_split.npy")
    return {"documents": int(len(split)), "train_documents": int((split == 0).sum()),
            "valid_documents": int((split == 1).sum()),
            "tokens": int(len(np.load(out / "tokens.npy", mmap_mode="r"))),
            "chunks": int(len(np.load(out / "chunk_start.npy", mmap_mode="r")))}
