"""Evaluation (`retro evaluate RUN --db DIR`): bits per byte on the held-out documents, with
retrieval (RETRO[ON], k neighbours per chunk retrieved from the database by the chunk's own
tokens) and without (RETRO[OFF]), on the same text.

Each document is cut into windows of the model's sequence length; every token but a document's
first is scored from the tokens before it in its window. Bits per byte = the scored tokens' NLL in
bits / the UTF-8 bytes of exactly those tokens (a document's first token is never predicted, so its
bytes are left out; a one-token document adds nothing).

The scored tokens fall into groups by the neighbours they attended: in a window, the targets of
positions m-1 .. 2m-2 (the tokens of chunk 1) attend RET(chunk 0), and so on; the first m-1
targets of a window attend nothing. The overlap report (evaluate_overlap.py) and the database-size
sweep are sums over these groups, so their totals equal `evaluate`'s exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..base.defaults import NEIGHBOURS
from ..base.errors import RetroError
from ..decoding.inputs import check_database
from ..retrieval.retriever import Retriever


@dataclass
class EvalSet:
    """Windows of held-out documents, their neighbours and the groups of scored tokens.

    windows[w] = (inputs (L,), targets (L,)); first_chunk[w] = the row of window w's chunk 0 in
    chunk_tokens / neighbours / neighbour_mask / neighbour_ids (one row per complete input chunk).
    Groups g (G of them): group_doc (G,), group_window (G,), group_chunk (G,) (the window chunk whose
    neighbours the group attended, -1 for none), group_tokens (G,) scored tokens, group_bytes (G,)
    their UTF-8 bytes, group_targets[g] the token ids scored; window_groups[w] (L,) = the group of
    each target of window w."""
    documents: np.ndarray
    chunk_size: int
    k: int
    windows: list
    first_chunk: np.ndarray
    chunk_tokens: list
    neighbours: np.ndarray | None        # (C, k, 2m) int64, or None without retrieval
    neighbour_mask: np.ndarray | None    # (C, k, 2m) bool
    neighbour_ids: np.ndarray            # (C, k) int64, -1 = none
    group_doc: np.ndarray
    group_window: np.ndarray
    group_chunk: np.ndarray
    group_tokens: np.ndarray
    group_bytes: np.ndarray
    group_targets: list
    window_groups: list

    def group_neighbour_row(self, g: int) -> int:
        """The row (in neighbours) of the neighbours group g attended, or -1."""
        u = int(self.group_chunk[g])
        return -1 if u < 0 else int(self.first_chunk[self.group_window[g]]) + u


@dataclass
class EvalResult:
    documents: int
    bytes: int               # UTF-8 bytes of the scored tokens
    tokens: int              # scored tokens
    bpb_on: float | None     # with retrieval (None when not run)
    bpb_off: float
    k: int
    groups: dict = field(default_factory=dict)  # per group of scored tokens: nll_on, nll_off (nats)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "groups"}
        return d


def _windows(tokens: np.ndarray, n: int):
    """(start, inputs, targets) of consecutive windows; targets[i] = tokens[start + i + 1]."""
    for s in range(0, len(tokens) - 1, n):
        tgt = tokens[s + 1:s + n + 1]
        yield s, tokens[s:s + len(tgt)], tgt


def prepare(retriever: Retriever, k: int = NEIGHBOURS, documents=None, max_documents: int | None = None,
            seq_len: int = 2048, retrieval: bool = True, allowed_chunks: np.ndarray | None = None,
            span_tokens: int | None = None, seed: int = 0, texts: list[str] | None = None) -> EvalSet:
    """Cuts the held-out documents (or `documents`, ids; or `texts`, any text, tokenised with the
    database's tokenizer, document d being texts[d]) into windows of seq_len tokens, retrieves
    the k neighbours of every complete chunk in one batched search (only among `allowed_chunks`
    when given), and lays out the groups of scored tokens with their exact byte counts.
    span_tokens: score only a span of each longer document, span_tokens + 1 tokens from a
    chunk-aligned start drawn with `seed` (the whole document when it is shorter), so that a
    large model can read many documents in little time without only ever seeing their headers."""
    db = retriever.db
    text_tokens = None if texts is None else db.tokenizer.encode(list(texts))
    docs = (np.arange(len(text_tokens)) if text_tokens is not None else
            db.documents("valid") if documents is None else np.asarray(documents, dtype=np.int64))
    if len(docs) == 0:
        raise RetroError(f"{str(db.path)!r} has no held-out document: build it with --valid-fraction > 0, or "
                         "evaluate other text (`retro evaluate --text PATH`, prepare(texts=...))")
    if max_documents:
        docs = docs[:max_documents]
    m, n = db.chunk_size, seq_len
    if n < 1:
        raise RetroError(f"seq_len must be >= 1, got {n}")
    if span_tokens is not None and span_tokens < 1:
        raise RetroError(f"span_tokens must be >= 1 or None, got {span_tokens}")
    rng = np.random.default_rng(seed)
    windows, first_chunk, chunk_tokens = [], [], []
    g_doc, g_win, g_chunk, g_tok, g_bytes, g_targets, window_groups = [], [], [], [], [], [], []
    for d in docs:
        tokens = db.document_tokens(int(d)) if text_tokens is None else text_tokens[d]
        if span_tokens is not None and len(tokens) > span_tokens + 1:
            start = int(rng.integers(0, (len(tokens) - span_tokens - 1) // m + 1)) * m
            tokens = tokens[start:start + span_tokens + 1]
        if len(tokens) < 2:
            continue
        cuts = set()
        spans = []
        for s, inp, tgt in _windows(tokens, n):
            w = len(windows)
            windows.append((inp, tgt))
            first_chunk.append(len(chunk_tokens))
            chunk_tokens += [inp[u * m:(u + 1) * m] for u in range(len(inp) // m)]
            L = len(tgt)
            j = np.arange(1, L + 1)                      # target j of the window is tokens[s + j]
            u = j // m - 1                                # the chunk whose neighbours it attended
            local = np.unique(u)
            gid = len(g_doc) + np.searchsorted(local, u)
            window_groups.append(gid)
            for uu in local:
                sel = j[u == uu]
                a, b = s + int(sel[0]), s + int(sel[-1]) + 1  # document tokens [a, b) are scored here
                g_doc.append(int(d))
                g_win.append(w)
                g_chunk.append(int(uu))
                g_tok.append(b - a)
                g_targets.append(tokens[a:b])
                spans.append((a, b))
                cuts.update((a, b))
        prefix = dict(zip(sorted(cuts), db.tokenizer.prefix_bytes(tokens, sorted(cuts))))
        g_bytes += [prefix[b] - prefix[a] for a, b in spans]
    if not windows:
        raise RetroError("the evaluation documents have no token to score (every one is shorter than 2 tokens)")
    ids = np.full((len(chunk_tokens), k), -1, dtype=np.int64)
    nb = mask = None
    if retrieval and chunk_tokens:
        found = retriever.search(chunk_tokens, k, allowed_chunks=allowed_chunks)
        ids, nb, mask = found.ids, found.tokens, found.mask
    return EvalSet(np.asarray(docs), m, k, windows, np.asarray(first_chunk), chunk_tokens, nb, mask, ids,
                   np.asarray(g_doc), np.asarray(g_win), np.asarray(g_chunk), np.asarray(g_tok),
                   np.asarray(g_bytes, dtype=np.int64), g_targets, window_groups)


@torch.no_grad()
def score(model, es: EvalSet, retrieval: bool = True, device=None, batch_size: int = 16,
          progress: bool = True) -> np.ndarray:
    """NLL in nats of every group of scored tokens (G,), with the neighbours (retrieval=True) or
    without. Windows of equal length run as one batch."""
    from retro.base.progress import progress_bar

    if retrieval and es.neighbours is None:
        raise RetroError("this evaluation set was prepared without retrieval")
    m = es.chunk_size
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = np.zeros(len(es.group_doc), dtype=np.float64)
    by_len: dict[int, list[int]] = {}
    for w, (inp, _) in enumerate(es.windows):
        by_len.setdefault(len(inp), []).append(w)
    batches = [ws[i:i + batch_size] for _, ws in sorted(by_len.items(), reverse=True)
               for i in range(0, len(ws), batch_size)]
    for group in progress_bar(batches, desc="evaluating", unit="batch", disable=not progress, leave=False):
        x = torch.tensor(np.stack([es.windows[w][0] for w in group]), dtype=torch.long, device=device)
        y = torch.tensor(np.stack([es.windows[w][1] for w in group]), dtype=torch.long, device=device)
        chunks = x.shape[1] // m
        nb = mask = None
        if retrieval and chunks:
            rows = np.stack([np.arange(es.first_chunk[w], es.first_chunk[w] + chunks) for w in group])
            nb = torch.as_tensor(es.neighbours[rows], device=device)
            mask = torch.as_tensor(es.neighbour_mask[rows], device=device)
        # per-token NLL (B, n) computed in the model a slice of the sequence at a time (sliced_loss.py)
        token_nll = model(x, nb, mask, targets=y).double().cpu().numpy()
        for j, w in enumerate(group):
            np.add.at(nll, es.window_groups[w], token_nll[j])
    model.train(was_training)
    return nll


def bits_per_byte(nll: np.ndarray, nbytes: np.ndarray) -> float:
    total = int(np.sum(nbytes))
    return float(np.sum(nll)) / math.log(2) / total if total else float("nan")


def summarise(es: EvalSet, nll_on: np.ndarray | None, nll_off: np.ndarray,
              select: np.ndarray | None = None) -> EvalResult:
    """EvalResult over the groups `select` (bool (G,), default all)."""
    sel = np.ones(len(es.group_doc), dtype=bool) if select is None else np.asarray(select, dtype=bool)
    nbytes = es.group_bytes[sel]
    return EvalResult(documents=int(len(np.unique(es.group_doc[sel]))), bytes=int(nbytes.sum()),
                      tokens=int(es.group_tokens[sel].sum()),
                      bpb_on=None if nll_on is None else bits_per_byte(nll_on[sel], nbytes),
                      bpb_off=bits_per_byte(nll_off[sel], nbytes), k=es.k,
                      groups={"nll_on": nll_on, "nll_off": nll_off})


def evaluate(model, retriever: Retriever, k: int = NEIGHBOURS, max_documents: int | None = None,
             seq_len: int | None = None, retrieval: bool = True, device=None, progress: bool = True,
             batch_size: int = 16, documents=None, eval_set: EvalSet | None = None) -> EvalResult:
    """Bits per byte of the held-out documents with (RETRO[ON]) and without (RETRO[OFF]) neighbours.
    The retriever's database must be one the model reads (the one it was trained on where the
    model records it, as the command line checks: inputs.check_database)."""
    check_database(model, retriever.db)
    es = eval_set or prepare(retriever, k, documents, max_documents, seq_len or model.cfg.max_seq_len, retrieval)
    nll_on = score(model, es, True, device, batch_size, progress) if retrieval else None
    nll_off = score(model, es, False, device, batch_size, progress)
    return summarise(es, nll_on, nll_off)
