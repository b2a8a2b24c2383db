"""The demo's documents: a seeded sample of a tree of Python files, and its held-out documents by how
they were held out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from retro.base.errors import RetroError

SPLIT_WORDS = {"folder": "whole model folders held out (no file of their folder in the database)",
               "file": "single files held out (their folder's other files in the database)"}


def python_files(root: str) -> list[Path]:
    """The .py files under root, installed packages (site-packages, dist-packages) below it left out."""
    base = Path(root)
    return sorted(p for p in base.rglob("*.py")
                  if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(base).parts))


def sample_corpus(root: str, n: int | None, seed: int, out: Path) -> Path:
    """A seeded random sample of n Python files under root (None: all), taken folder by folder (whole
    model packages, in random order, as a crawl takes whole repositories), written atomically to out
    as .jsonl (one document per file, with its path). Which are held out is decided by build-db."""
    from retro.base.atomic import write_bytes
    from retro.retrieval.corpus import CorpusReport, iter_documents

    files = python_files(root)
    if len(files) < 3:
        raise RetroError(f"{root!r} has {len(files)} Python files; the demo needs at least 3")
    folders: dict[Path, list[int]] = {}
    for i, f in enumerate(files):
        folders.setdefault(f.parent, []).append(i)
    groups = list(folders.values())
    pick = []
    n = len(files) if n is None else n
    for g in np.random.default_rng(seed).permutation(len(groups)):
        pick.extend(groups[g][:n - len(pick)])
        if len(pick) >= n:
            break
    pick.sort()
    lines, report = [], CorpusReport()
    for i in pick:
        for text in iter_documents(files[i], report=report):
            lines.append(json.dumps({"text": text, "path": str(files[i].relative_to(root))}))
    write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


def held_out_by_split(db) -> dict[str, np.ndarray]:
    """The held-out documents by how they were held out: "folder" (no document of their folder is in
    the database) and "file" (their folder's other files are). Document ids, sorted."""
    valid = db.documents("valid")
    train_folders = np.unique(np.asarray(db.doc_folder)[db.documents("train")])
    sibling = np.isin(np.asarray(db.doc_folder)[valid], train_folders)
    return {"folder": valid[~sibling], "file": valid[sibling]}


def near_duplicated(db, docs: np.ndarray) -> set[int]:
    """The held-out documents (ids among docs) that have a near-duplicate (13-gram Jaccard >= 0.8)
    among the database's training documents."""
    from retro.evaluation.dedup import duplicated_documents

    texts = [db.tokenizer.decode(db.document_tokens(int(d))) for d in docs]
    train_texts = [db.tokenizer.decode(db.document_tokens(int(d))) for d in db.documents("train")]
    return {int(docs[i]) for i in duplicated_documents(texts, train_texts, 0.8, progress=False)}
