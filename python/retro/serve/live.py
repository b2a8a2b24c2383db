"""Live knowledge for `retro serve`: POST /v1/documents adds documents to the served database
through its update path (retrieval/update.py's add_documents: a new generation), and every new
generation, the server's own or one another process switched in (retro add-documents,
remove-documents, compact), reaches the scheduler between two decoding steps (Scheduler.swap).

A watcher thread compares the generation manifest.json names with the served one every
`check_every` seconds (one small JSON read); when they differ it loads a Retriever at the new
generation, off the scheduler's thread, and swaps it in. An add through the API swaps before it
answers, so a request sent after the answer retrieves the new documents.

The documents of a POST are written as a .jsonl corpus into DB/api-documents/ for the add and
deleted once it is done; a server killed in the middle of an add leaves the file beside an
unfinished generation, which `retro add-documents DB DB/api-documents/FILE --resume` completes.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from ..base.atomic import read_json, write_bytes
from ..retrieval import Retriever
from ..retrieval.generations import current_generation, generation_dir
from ..retrieval.update import SOURCES, STATE, add_documents
from .scheduler import Scheduler

API_CORPUS = "api-documents"  # the folder of the database where a POST's documents wait for their add


class AddInProgress(Exception):
    """Another POST /v1/documents is adding documents (HTTP 409)."""


class LiveDatabase:
    """The served database as it changes: add() for POST /v1/documents, a watcher thread for the
    generations other processes switch in (start, stop)."""

    def __init__(self, scheduler: Scheduler, check_every: float = 2.0):
        retriever = scheduler.retriever
        self.scheduler, self.path, self.device = scheduler, Path(retriever.db.path), retriever.device
        self.check_every = check_every
        self.adding = threading.Lock()  # one add at a time (a second one: AddInProgress)
        self.reloading = threading.Lock()  # one Retriever load at a time
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="retro-db-watch", daemon=True)

    def start(self) -> "LiveDatabase":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stopped.wait(self.check_every):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the server keeps the generation it has and tries again
                print(f"[serve] cannot load generation {current_generation(self.path)} of {str(self.path)!r} "
                      f"(still serving generation {self.scheduler.generation()}): {exc}", file=sys.stderr, flush=True)

    def refresh(self) -> int:
        """Swaps a Retriever at the database's current generation into the scheduler unless it has
        it already; -> the generation served."""
        with self.reloading:
            if current_generation(self.path) != self.scheduler.generation():
                self.scheduler.swap(Retriever.load(self.path, device=self.device))
            return self.scheduler.generation()

    def add(self, documents: list[tuple[str, str | None]]) -> dict:
        """Adds documents ((text, source or None), non-empty texts) as the database's next generation
        and swaps it in -> {"generation", "data": [{"id", "chunks", "source"}]}. RetroError where the
        update path refuses (a sharded index, faiss missing, another process changing the database);
        AddInProgress while another add runs."""
        if not self.adding.acquire(blocking=False):
            raise AddInProgress("another POST /v1/documents is adding documents to this database: retry when "
                                "it has answered")
        try:
            return self._add(documents)
        finally:
            self.adding.release()

    def _add(self, documents: list[tuple[str, str | None]]) -> dict:
        folder = self.path / API_CORPUS
        folder.mkdir(exist_ok=True)
        corpus = folder / f"post-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.jsonl"
        lines = [json.dumps({"text": text, **({"path": source} if source is not None else {})})
                 for text, source in documents]
        write_bytes(corpus, ("\n".join(lines) + "\n").encode())
        try:
            db = add_documents(self.path, corpus, log=lambda *_: None)
        except BaseException:
            if not self._unfinished(corpus):
                self._drop(corpus)
            raise
        self._drop(corpus)
        self.refresh()
        first, end = db.manifest["updates"][-1]["documents"]
        chunks = np.bincount(np.asarray(db.chunk_doc), minlength=end)[first:end]
        sources = read_json(generation_dir(self.path, db.generation) / SOURCES)
        return {"object": "list", "generation": db.generation,
                "data": [{"object": "document", "id": first + i, "chunks": int(c), "source": s}
                         for i, (c, s) in enumerate(zip(chunks, sources))]}

    def _unfinished(self, corpus: Path) -> bool:
        """Whether an unfinished generation is the add of corpus (kept, then, for --resume)."""
        state = generation_dir(self.path, current_generation(self.path) + 1) / STATE
        try:
            return read_json(state).get("corpus") == str(corpus.resolve())
        except (OSError, ValueError):
            return False

    @staticmethod
    def _drop(corpus: Path) -> None:
        corpus.unlink(missing_ok=True)
        try:
            corpus.parent.rmdir()  # only when empty
        except OSError:
            pass

