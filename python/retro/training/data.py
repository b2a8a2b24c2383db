"""Training sequences with their neighbours.

A sequence packs `seq_chunks` consecutive training chunks of the database, each padded to m, so
chunk u of the sequence is exactly positions u*m .. u*m+m-1. Targets are next tokens; padding and
the step from one document to the next are not scored. Each chunk's neighbours come from the
precomputed candidates (own document excluded); candidates from any other document in the same
sequence are dropped too, and the first k kept (missing ones masked), so a sequence never
retrieves its own text."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..base.defaults import IGNORE
from ..base.errors import RetroError
from ..retrieval.database import ChunkDatabase


@dataclass
class Batch:
    tokens: torch.Tensor          # (B, n) int64
    targets: torch.Tensor         # (B, n) int64, IGNORE where not scored
    neighbours: torch.Tensor | None      # (B, L, k, 2m) int64; None: trained without retrieval
    neighbour_mask: torch.Tensor | None  # (B, L, k, 2m) bool

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.tokens, self.targets, self.neighbours, self.neighbour_mask)))


class TrainSequences:
    """Training sequences of `seq_chunks` chunks with the neighbours of each chunk; with
    candidates=None, sequences without neighbours (a decoder trained without retrieval)."""

    def __init__(self, db: ChunkDatabase, seq_chunks: int, k: int, candidates: np.ndarray | None):
        if db.num_chunks < seq_chunks:
            raise RetroError(f"--seq-chunks {seq_chunks} is longer than the whole database ({db.num_chunks} chunks): "
                             f"expected at most {db.num_chunks}, or a larger corpus")
        self.db, self.L, self.k, self.candidates = db, seq_chunks, k, candidates
        self.m = db.chunk_size
        self.pad = db.pad_id

    def __len__(self) -> int:
        return self.db.num_chunks // self.L

    def sequence(self, i: int) -> tuple[np.ndarray, ...]:
        db, L, m = self.db, self.L, self.m
        chunks = np.arange(i * L, (i + 1) * L)
        toks = np.full(L * m + 1, self.pad, dtype=np.int64)
        doc = np.full(L * m + 1, -1, dtype=np.int64)  # document of each position, -1 = padding
        for j, c in enumerate(chunks):
            t = db.chunk_tokens(c)
            toks[j * m: j * m + len(t)] = t
            doc[j * m: j * m + len(t)] = db.chunk_doc[c]
        nxt = chunks[-1] + 1  # the token after the sequence, if its document goes on
        if nxt < db.num_chunks and db.chunk_doc[nxt] == db.chunk_doc[chunks[-1]] and db.chunk_len[chunks[-1]] == m:
            toks[L * m] = db.chunk_tokens(nxt)[0]
            doc[L * m] = db.chunk_doc[nxt]
        targets = toks[1:].copy()
        targets[(doc[1:] < 0) | (doc[1:] != doc[:-1])] = IGNORE
        if self.candidates is None:
            return toks[:-1], targets, None, None
        ids = np.full((L, self.k), -1, dtype=np.int64)
        in_seq = np.unique(db.chunk_doc[chunks])
        for j, c in enumerate(chunks):
            cand = np.asarray(self.candidates[c])
            cand = cand[(cand >= 0)]
            cand = cand[~np.isin(db.chunk_doc[cand], in_seq)][: self.k]
            ids[j, : len(cand)] = cand
        nb, mask = db.values(ids)
        return toks[:-1], targets, nb, mask

    def batch(self, indices) -> Batch:
        parts = [self.sequence(int(i)) for i in indices]
        return Batch(*(None if x[0] is None else torch.from_numpy(np.stack(x)) for x in zip(*parts)))


class Sampler:
    """A seeded permutation per epoch; the position is one integer (sequences drawn so far), so a
    resumed run draws exactly the sequences the uninterrupted one would have."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("no training sequence: the database has fewer chunks than one sequence")
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, None

    def take(self, start: int, count: int) -> np.ndarray:
        out = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, self.n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n)
            out.append(self._order[pos])
        return np.array(out)
