"""Documents removed from a database, and the database compacted without them (docs/usage.md,
"A database that grows"); adding is update.py's, whose generation helpers these use:

  remove_documents  documents (by id, or by their path's glob) marked removed: their chunks are never
                    returned by a search again; the arrays and the index are untouched
  compact           the arrays and the index written again without the removed documents: the
                    database a fresh build of the remaining documents gives (same tokenizer, keys,
                    index kind and seed); then the files of earlier generations are deleted. A
                    compact killed before its switch is completed by running it again; one whose
                    index is damaged or missing builds it afresh even with nothing removed
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from ..base.atomic import atomic_path, read_json, write_json, write_npy
from ..base.errors import RetroError
from ..base.options import option
from ..base import hooks
from .corpus import _matches, iter_documents
from .database import ARRAYS, ChunkDatabase, chunk_layout
from .generations import GENERATIONS, generation_dir, generation_of, segments, writer_lock
from .update import (SOURCES, STATE, discard, finish, next_manifest, open_database, pending, relative, segment,
                     switch, write_bm25)


@dataclass
class RemoveOptions:
    db: str = option(help="the database folder", positional=True)
    ids: tuple[str, ...] = option((), "a document id to remove; repeatable", flag="id", metavar="ID")
    paths: tuple[str, ...] = option((), "remove the documents whose path in their corpus matches GLOB (one without "
                                        "'/' also matches the file name); repeatable", flag="path", metavar="GLOB")

    def validate(self) -> None:
        document_ids(self.ids)
        if isinstance(self.paths, str) or not all(isinstance(g, str) and g for g in self.paths):
            raise RetroError(f"--path takes non-empty glob patterns, got {self.paths!r}")
        if not self.ids and not self.paths:
            raise RetroError("remove-documents needs --id ID or --path GLOB (repeatable), got neither")
        open_database(self.db)


@dataclass
class CompactOptions:
    db: str = option(help="the database folder", positional=True)

    def validate(self) -> None:
        open_database(self.db, writes_index=True)


def document_ids(ids) -> list[int]:
    """--id values (ints or strings of ints) -> ints; RetroError naming the first that is not one."""
    out = []
    for i in ids:
        try:
            out.append(int(i))
        except (TypeError, ValueError):
            raise RetroError(f"--id takes document ids (integers), got {i!r}") from None
    return out


def document_sources(db: ChunkDatabase) -> list[str]:
    """Each document's path in its corpus: recorded for added ones; for the build's own, read again
    from the corpus the build names (RetroError if it is gone or changed)."""
    sources = []
    for seg in segments(db.manifest):
        folder = db.path / seg["path"]
        if (folder / SOURCES).exists():
            sources += read_json(folder / SOURCES)
            continue
        o = db.manifest["options"]
        n = seg["arrays"]["doc_split"]["shape"][0]
        docs = iter_documents(o["corpus"], o.get("text_field", "text"), None, o.get("include", ()),
                              o.get("exclude", ()), with_source=True)
        try:
            found = [(len(t.encode("utf-8")), src) for t, _, src in islice(docs, n)]
        except RetroError as exc:
            raise RetroError(f"--path needs the corpus the database was built from to match paths: {exc}") from None
        if [b for b, _ in found] != np.asarray(db.doc_bytes[len(sources):len(sources) + n]).tolist():
            raise RetroError(f"--path: the corpus {o['corpus']!r} changed since {str(db.path)!r} was built, so its "
                             "documents' paths are unknown; remove them by --id")
        sources += [src for _, src in found]
    return sources


def remove_documents(db: str | Path, ids=(), paths=(), log=print) -> ChunkDatabase:
    """Marks the documents `ids` and those whose corpus path matches a glob of `paths` removed (the
    next generation): no search returns their chunks again. -> the database at the new generation."""
    RemoveOptions(str(db), tuple(str(i) for i in ids), tuple(paths)).validate()
    path = Path(db)
    with writer_lock(path):
        base = open_database(path)
        wanted = set(document_ids(ids))
        bad = sorted(i for i in wanted if not 0 <= i < len(base.doc_split) or i in set(base.removed.tolist()))
        if bad:
            raise RetroError(f"--id {bad[0]}: no such document in {str(path)!r} (ids are 0..{len(base.doc_split) - 1}"
                             f"{', removed ones excluded' if len(base.removed) else ''}); nothing removed")
        if paths:
            matched = {d for d, src in enumerate(document_sources(base)) if _matches(src, paths)}
            matched -= set(base.removed.tolist())
            if not matched:
                raise RetroError(f"--path {' '.join(paths)}: no document of {str(path)!r} matches; nothing removed")
            wanted |= matched
        pending(path, base, {"action": "remove"}, resume=False)
        removed = sorted(set(base.removed.tolist()) | wanted)
        manifest = next_manifest(base, {"action": "remove", "documents": sorted(wanted)},
                                  removed_documents=removed)
        db_now = switch(path, manifest)
        discard(generation_dir(path, db_now.generation))  # only its state
    log(f"[remove-documents] {str(path)!r} generation {db_now.generation}: {len(wanted)} documents removed "
        f"({len(removed)} in all); `retro compact {db}` rewrites the database without them")
    return db_now


def compact(db: str | Path, log=print) -> ChunkDatabase:
    """Writes the database again without its removed documents, as one segment with its index built
    afresh (the next generation), then deletes the files no generation refers to any more."""
    CompactOptions(str(db)).validate()
    path = Path(db)
    with writer_lock(path):
        base = open_database(path)
        if not len(base.removed) and len(segments(base.manifest)) == 1:
            if base.generation:  # what a compact killed after its switch left
                (generation_dir(path, base.generation) / STATE).unlink(missing_ok=True)
                _collect_garbage(path, base.manifest)
            damage = _index_damage(path)
            if damage is None:
                log(f"[compact] {str(path)!r}: no removed document, one segment: nothing to compact")
                return base
            log(f"[compact] {damage.split('; ')[0]}: writing the database again with its index built afresh")
        folder = pending(path, base, {"action": "compact"}, resume=True)
        keep = np.setdiff1d(np.arange(len(base.doc_split)), base.removed)
        _compact_arrays(folder, base, keep)
        hooks.reached("arrays")
        name = base.manifest["embedder"]["name"]
        manifest = next_manifest(base, {"action": "compact", "documents": int(len(keep))}, removed_documents=[],
                                  segments=[segment(path, folder, name)])
        manifest.pop("index_file", None)
        compacted = ChunkDatabase(path, manifest=manifest)
        _fresh_index(folder, compacted, manifest)
        db_now = finish(path, folder, manifest)
        _collect_garbage(path, db_now.manifest)
    log(f"[compact] {str(path)!r} generation {db_now.generation}: {len(base.removed)} removed documents dropped; "
        f"{len(keep)} documents, {db_now.num_chunks} chunks")
    return db_now


def _index_damage(path: Path) -> str | None:
    """Why the database's index cannot be loaded (missing, damaged), or None."""
    from .retriever import Retriever

    try:
        Retriever.load(path)
    except RetroError as exc:
        return str(exc)
    return None


def _compact_arrays(folder: Path, db: ChunkDatabase, keep: np.ndarray) -> None:
    """The arrays of the documents `keep` (sorted ids), renumbered 0.. in order; chunk_doc last."""
    if (folder / "chunk_doc.npy").exists():
        return
    lengths = np.diff(np.asarray(db.doc_start))[keep]
    doc_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    with atomic_path(folder / "tokens.npy") as tmp:
        tokens = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(int(doc_start[-1]),))
        for new, d in enumerate(keep):
            tokens[doc_start[new]:doc_start[new + 1]] = db.document_tokens(int(d))
        tokens.flush()
        del tokens
    doc_split = np.asarray(db.doc_split)[keep]
    chunk_start, chunk_len, chunk_doc = chunk_layout(doc_start, doc_split, db.chunk_size)
    live = np.flatnonzero(db.live_chunks) if db.live_chunks is not None else np.arange(db.num_chunks)
    if len(live) != len(chunk_start):
        raise RetroError(f"{str(db.path)!r}: {len(live)} chunks remain but their documents give {len(chunk_start)}; "
                         "the database is damaged")
    try:
        sources = document_sources(db)
        write_json(folder / SOURCES, [sources[int(d)] for d in keep])
    except RetroError:
        pass  # the build's corpus is gone: --path cannot match the compacted documents (--id still can)
    if db.embeddings is not None:
        write_npy(folder / "embeddings.npy", np.asarray(db.embeddings[live], dtype=np.float32))
    for name, arr in (("doc_start", doc_start), ("doc_split", doc_split), ("doc_bytes", np.asarray(db.doc_bytes)[keep]),
                      ("doc_folder", np.asarray(db.doc_folder)[keep]), ("chunk_start", chunk_start),
                      ("chunk_len", chunk_len), ("chunk_doc", chunk_doc)):
        write_npy(folder / f"{name}.npy", arr)


def _fresh_index(folder: Path, db: ChunkDatabase, manifest: dict) -> None:
    """The compacted database's index, built as build-db builds it (same kind, seed, target recall)."""
    from .index import SearchIndex, build_faiss, tune_nprobe

    kind = manifest["index"]["kind"]
    if kind == "bm25":
        target = folder / "bm25"
        manifest["index"] = write_bm25(db, target)
    elif kind != "torch":
        import faiss

        target = folder / "index.faiss"
        options = manifest.get("options", {})
        vectors = np.asarray(db.embeddings, dtype=np.float32)
        index, settings = build_faiss(kind, vectors, seed=options.get("seed", 0))
        settings.nprobe, settings.recall = tune_nprobe(SearchIndex(settings, index), vectors,
                                                       options.get("target_recall", 0.95),
                                                       seed=options.get("seed", 0))
        with atomic_path(target) as tmp:
            faiss.write_index(index, str(tmp))
        manifest["index"] = asdict(settings)
    else:
        return
    manifest["index_file"] = relative(db.path, target)


def _collect_garbage(path: Path, manifest: dict) -> None:
    """Deletes the arrays, indexes and precomputed neighbours that the manifest's generation does not
    use (a reader that opened them keeps them: its memory maps and loaded index outlive the files'
    names)."""
    if not any(seg["path"] == "" for seg in segments(manifest)):
        for name in ARRAYS:
            (path / f"{name}.npy").unlink(missing_ok=True)
    named = {manifest.get("index_file")}
    if "index.faiss" not in named:
        (path / "index.faiss").unlink(missing_ok=True)
    if "bm25" not in named:
        shutil.rmtree(path / "bm25", ignore_errors=True)
    current = generation_dir(path, generation_of(manifest))
    for folder in (path / GENERATIONS).iterdir() if (path / GENERATIONS).exists() else ():
        if folder != current:
            shutil.rmtree(folder, ignore_errors=True)
    mine = f"-gen{generation_of(manifest):06d}"
    for stale in path.glob("neighbours-*"):  # precomputed for the chunk ids of an earlier generation
        if mine not in stale.name:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
