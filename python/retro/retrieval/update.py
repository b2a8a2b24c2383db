"""A database that grows without a rebuild (docs/usage.md, "A database that grows"); its
removal and compaction are compact.py's:

  add_documents     a corpus's documents tokenised by the database's tokenizer and chunked at its
                    chunk size, their keys from its embedder, appended as a new array segment; the
                    index grows with them: faiss's add into the trained flat or IVF index (no
                    retraining), nothing to do for torch exact search, and BM25 scored again over all
                    the chunks (its idf and mean length depend on every chunk, so a second segment
                    would score differently from the same database built at once). The new documents
                    are training documents with new ids and folders after the existing ones.

Each change is a new generation (generations.py), written beside the current one and switched in by
one atomic replace of manifest.json, under the writer lock (the helpers here: pending, next_manifest,
finish; compact.py uses them too). add_documents' stages (tokenise, embed,
index) are each written atomically into generations/G/ with its state update_state.json; a kill at
any point leaves the current generation as it was, and `--resume` completes the change. An add holds
its corpus's text and new keys in memory (an update is small beside its database; build-db streams).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.atomic import atomic_path, read_json, write_json, write_npy
from ..base.checks import check_int
from ..base.errors import RetroError
from ..base.options import EXCLUDE_HELP, INCLUDE_HELP, option
from ..base import hooks
from .bm25 import BM25Index, is_bm25, words
from .corpus import CorpusReport, check_corpus, check_globs, iter_documents
from .database import ChunkDatabase, chunk_layout, chunk_texts, key_arrays
from .generations import GROWN_VERSION, generation_dir, generation_of, index_file, segments, writer_lock

STATE = "update_state.json"
SOURCES = "doc_source.json"  # each document's path in its corpus (what remove-documents --path matches)


@dataclass
class AddOptions:
    db: str = option(help="the database folder", positional=True)
    corpus: str = option(help="a text file, a directory of text files, or .jsonl/.jsonl.gz", positional=True)
    text_field: str = option("text", "the text field of .jsonl documents")
    include: tuple[str, ...] = option((), INCLUDE_HELP, metavar="GLOB")
    exclude: tuple[str, ...] = option((), EXCLUDE_HELP, metavar="GLOB")
    resume: bool = option(False, "complete an interrupted add-documents")
    device: str | None = option(None, "where to embed (default: cuda if there is one)")
    embed_batch_size: int | None = option(None, "texts per embedder batch (default as build-db: 32 on the CPU, "
                                                "128 on a GPU)", flag="batch-size")

    def validate(self) -> None:
        check_int("--batch-size", self.embed_batch_size, 1, optional=True)
        check_globs(self.include, self.exclude)
        open_database(self.db, writes_index=True)
        check_corpus(self.corpus)


def open_database(db, writes_index: bool = False) -> ChunkDatabase:
    """The database in folder `db`; one-line RetroError if there is none (or one of another format,
    or a sharded one), or, for a change that writes its faiss index, if faiss is not installed."""
    from .index import faiss_available

    if not Path(db).is_dir():
        raise RetroError(f"database {str(db)!r} does not exist; build it first with `retro build-db CORPUS --out {db}`")
    database = ChunkDatabase(db)
    index = database.manifest["index"]
    if index.get("extra", {}).get("shards"):
        raise RetroError(f"{str(db)!r} has a sharded index (build-db --shards): it cannot grow in place; "
                         "build it again with the new documents")
    if writes_index and index["kind"] not in ("torch", "bm25") and not faiss_available():
        raise RetroError(f"{str(db)!r} has a faiss index ({index['kind']}), and faiss is not installed here: install "
                         "faiss-cpu (or faiss-gpu) to change the database")
    return database


def relative(db: Path, path: Path) -> str:
    return path.relative_to(db).as_posix()


def array_infos(folder: Path, names) -> dict:
    infos = {}
    for name in names:
        a = np.load(folder / f"{name}.npy", mmap_mode="r")
        infos[name] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    return infos


def _counts(db: ChunkDatabase) -> dict:
    """build-db's counts (every stored document, token and chunk, as the arrays and the index hold
    them; train and valid documents without the removed ones), and the removed documents."""
    live = db.live_chunks
    return {"documents": int(len(db.doc_split)), "train_documents": int(len(db.documents("train"))),
            "valid_documents": int(len(db.documents("valid"))), "tokens": int(len(db.tokens)),
            "chunks": int(db.num_chunks), "removed_documents": int(len(db.removed)),
            "removed_chunks": int(0 if live is None else (~live).sum())}


def next_manifest(db: ChunkDatabase, action: dict, **changes) -> dict:
    """The manifest of db's next generation: its changes, the update's line and the identity of the
    generation it follows; counts come once the new generation can be opened (_switch)."""
    old = db.manifest
    generation = generation_of(old) + 1
    earlier = list(old.get("earlier_identities", []))
    if not earlier or earlier[-1] != db.identity():
        earlier.append(db.identity())
    return {**old, "format_version": GROWN_VERSION, "generation": generation, "segments": segments(old),
            "earlier_identities": earlier, "updates": [*old.get("updates", []), {"generation": generation, **action}],
            **changes}


def switch(path: Path, manifest: dict) -> ChunkDatabase:
    """Writes the new generation's manifest: the one atomic step of a change."""
    manifest["counts"] = _counts(ChunkDatabase(path, manifest=manifest))
    write_json(path / "manifest.json", manifest)
    return ChunkDatabase(path)


def segment(path: Path, folder: Path, embedder: str) -> dict:
    """The manifest's entry for the array segment written into folder."""
    return {"path": relative(path, folder), "arrays": array_infos(folder, key_arrays(embedder))}


def finish(path: Path, folder: Path, manifest: dict) -> ChunkDatabase:
    """After the new generation's index: the switch, then its state file goes (hooks.reached after each)."""
    hooks.reached("index")
    db_now = switch(path, manifest)
    hooks.reached("manifest")
    (folder / STATE).unlink(missing_ok=True)
    return db_now


def discard(folder: Path) -> None:
    """Deletes a generation's folder, and generations/ with it if that leaves it empty."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.exists() and not any(folder.parent.iterdir()):
        folder.parent.rmdir()


def pending(path: Path, db: ChunkDatabase, action: dict, resume: bool) -> Path:
    """The folder of the next generation, its state written. Clears what a finished change left
    (a state file in the current generation) and what a kill left before any state was written;
    refuses an unfinished change other than `action` resumed."""
    current = generation_dir(path, db.generation)
    (current / STATE).unlink(missing_ok=True)  # the manifest names it: the change is complete
    folder = generation_dir(path, db.generation + 1)
    state = folder / STATE
    if folder.exists() and (not state.exists() or read_json(state)["action"] == "remove"):
        shutil.rmtree(folder)  # killed before the state was written, or a remove before its switch: nothing done
    if folder.exists():
        saved = read_json(state)
        if saved != action:
            what = "retro compact DB" if saved["action"] == "compact" else "retro add-documents DB CORPUS --resume"
            raise RetroError(f"{str(path)!r} holds an unfinished {saved['action']} ({saved}) as generation "
                             f"{db.generation + 1}: complete it with `{what}` (or delete {str(folder)!r} to abandon "
                             "it)")
        if not resume:
            raise RetroError(f"{str(path)!r} holds an unfinished {saved['action']} of this corpus (generation "
                             f"{db.generation + 1}): pass --resume to complete it")
        for tmp in folder.rglob(".*.tmp"):  # cut short by a kill
            tmp.unlink()
        return folder
    write_json(state, action)
    return folder


def add_documents(db: str | Path, corpus: str | Path, *, text_field: str = "text", include=(), exclude=(),
                  resume: bool = False, device=None, batch_size: int | None = None, log=print) -> ChunkDatabase:
    """Adds the documents of `corpus` to the built database `db` as its next generation; returns the
    database opened at it. With resume, completes an add that was interrupted (the same corpus)."""
    AddOptions(str(db), str(corpus), text_field, tuple(include), tuple(exclude), resume, device,
               batch_size).validate()
    path = Path(db)
    action = {"action": "add", "corpus": str(Path(corpus).resolve()), "text_field": text_field,
              "include": list(include), "exclude": list(exclude)}
    with writer_lock(path):
        base = open_database(path)
        if resume and not (generation_dir(path, base.generation + 1) / STATE).exists():
            last = (base.manifest.get("updates") or [{}])[-1]
            if {k: last.get(k) for k in action} != action:
                raise RetroError(f"--resume: {str(path)!r} holds no unfinished add-documents of {str(corpus)!r}; "
                                 "leave --resume out to add it")
            (generation_dir(path, base.generation) / STATE).unlink(missing_ok=True)
            log(f"[add-documents] {str(path)!r}: the add of {str(corpus)!r} is complete (generation "
                f"{base.generation}): nothing to resume")
            return base
        folder = pending(path, base, action, resume)
        try:
            n_docs = _tokenise_stage(folder, base, action, log)
        except RetroError:
            if not (folder / "chunk_doc.npy").exists():
                discard(folder)  # nothing built: no unfinished change left behind
            raise
        hooks.reached("tokenise")
        name = base.manifest["embedder"]["name"]
        if not is_bm25(name):
            _embed_stage(folder, base, device, batch_size)
            hooks.reached("embed")
        first = len(base.doc_split)
        manifest = next_manifest(base, {**action, "documents": [first, first + n_docs]})
        manifest["segments"] = [*manifest["segments"], segment(path, folder, name)]
        grown = ChunkDatabase(path, manifest=manifest)
        _grow_index(folder, base, grown, manifest)
        db_now = finish(path, folder, manifest)
    log(f"[add-documents] {str(path)!r} generation {db_now.generation}: documents {first}..{first + n_docs - 1} "
        f"added ({grown.num_chunks - base.num_chunks} chunks); {db_now.num_chunks} chunks in all")
    return db_now


def _tokenise_stage(folder: Path, db: ChunkDatabase, action: dict, log) -> int:
    """The new documents' arrays (doc_start, chunk_start and chunk_doc counting from 0 in the
    segment) and their sources; chunk_doc.npy, written last, marks the stage done. -> documents."""
    if (folder / "chunk_doc.npy").exists():
        return len(read_json(folder / SOURCES))
    report = CorpusReport()
    texts, folders, sources = [], [], []
    for text, where, source in iter_documents(action["corpus"], action["text_field"], report, action["include"],
                                              action["exclude"], with_source=True):
        texts.append(text)
        folders.append(where)
        sources.append(source)
    if not texts:
        raise RetroError(f"corpus {action['corpus']!r} has no non-empty document to add: {report.describe()}")
    encoded = []
    for s in range(0, len(texts), 256):
        encoded += db.tokenizer.encode(texts[s:s + 256])
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    doc_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    doc_split = np.zeros(len(texts), dtype=np.uint8)  # added documents are training documents
    chunk_start, chunk_len, chunk_doc = chunk_layout(doc_start, doc_split, db.chunk_size)
    if len(chunk_start) == 0:
        raise RetroError(f"corpus {action['corpus']!r} gives no chunk (its documents have no token)")
    names = {}
    first_folder = int(np.max(db.doc_folder, initial=-1)) + 1  # new folders: new ids after the existing ones
    write_json(folder / SOURCES, sources)
    for name, arr in (("tokens", np.concatenate(encoded).astype(np.int32)), ("doc_start", doc_start),
                      ("doc_split", doc_split),
                      ("doc_bytes", np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)),
                      ("doc_folder", np.array([first_folder + names.setdefault(f, len(names)) for f in folders],
                                              dtype=np.int32)),
                      ("chunk_start", chunk_start), ("chunk_len", chunk_len), ("chunk_doc", chunk_doc)):
        write_npy(folder / f"{name}.npy", arr)
    log(f"[add-documents] {len(texts)} documents, {int(doc_start[-1])} tokens, {len(chunk_start)} chunks of "
        f"{db.chunk_size}")
    return len(texts)


def _embed_stage(folder: Path, db: ChunkDatabase, device, batch_size) -> None:
    """embeddings.npy of the new chunks, by the database's own embedder."""
    from .embedder import make_embedder

    if (folder / "embeddings.npy").exists():
        return
    embedder = make_embedder(db.manifest["embedder"]["name"], device=device, batch_size=batch_size)
    want = db.manifest["embedder"]["dim"]
    if embedder.dim != want:
        raise RetroError(f"the embedder {db.manifest['embedder']['name']!r} gives {embedder.dim}-dim vectors; "
                         f"the database's keys have {want}")
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    starts, lens = np.load(folder / "chunk_start.npy"), np.load(folder / "chunk_len.npy")
    keys = [embedder.embed(chunk_texts(db.tokenizer, tokens, starts[s:s + 2048], lens[s:s + 2048]))
            for s in range(0, len(starts), 2048)]
    write_npy(folder / "embeddings.npy", np.concatenate(keys).astype(np.float32))


def _grow_index(folder: Path, base: ChunkDatabase, grown: ChunkDatabase, manifest: dict) -> None:
    """The index of the grown database: faiss's add of the new keys into a copy of the current index;
    BM25 scored again over every chunk; torch exact search needs no file."""
    kind = base.manifest["index"]["kind"]
    if kind == "bm25":
        target = folder / "bm25"
        manifest["index"] = write_bm25(grown, target)
    elif kind != "torch":
        import faiss

        target = folder / "index.faiss"
        if not target.exists():
            index = faiss.read_index(str(base.path / index_file(base.manifest, "index.faiss")))
            index.add(np.ascontiguousarray(np.load(folder / "embeddings.npy"), dtype=np.float32))
            with atomic_path(target) as tmp:
                faiss.write_index(index, str(tmp))
    else:
        return
    manifest["index_file"] = relative(base.path, target)


def write_bm25(db: ChunkDatabase, target: Path) -> dict:
    """The BM25 index of every chunk of db, as build-db's bm25 stages make it (bm25_build.py), into
    the folder target (unless a resumed change wrote it already); -> the manifest's index entry."""
    from ..base.atomic import write_folder

    terms = []
    for s in range(0, db.num_chunks, 4096):
        terms += words(chunk_texts(db.tokenizer, db.tokens, db.chunk_start[s:s + 4096], db.chunk_len[s:s + 4096]))
    vocab = sorted({w for ws in terms for w in ws})
    ids = {w: i for i, w in enumerate(vocab)}
    index = BM25Index.build([np.array([ids[w] for w in ws], dtype=np.int64) for ws in terms], vocab)
    if not target.exists():
        write_folder(target, index.save)
    return {"kind": "bm25", "exact": True, "vocabulary": len(vocab), "postings": int(len(index.data)),
            "mean_terms_per_chunk": float(sum(len(t) for t in terms) / max(1, len(terms)))}
