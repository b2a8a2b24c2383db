"""Evaluation (`retro evaluate RUN --db DIR`): bits per byte on the held-out documents, with
retrieval (RETRO[ON], k neighbours per chunk retrieved from the database by the chunk's own
tokens) and without (RETRO[OFF]), on the same text (SPEC "Evaluation").

Each document is cut into windows of the model's sequence length; every token but a document's
first is scored from the tokens before it in its window. bits per byte = total NLL in bits / the
documents' UTF-8 bytes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RetroError
from .retrieval.retriever import Retriever


@dataclass
class EvalResult:
    documents: int
    bytes: int
    tokens: int              # scored tokens
    bpb_on: float | None     # with retrieval (None when not run)
    bpb_off: float
    k: int
    per_chunk: dict = field(default_factory=dict)  # filled for the overlap report: arrays per scored chunk

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_chunk")
        return d


def _windows(tokens: np.ndarray, n: int):
    """(start, inputs, targets) of consecutive windows; targets[i] = tokens[start + i + 1]."""
    for s in range(0, len(tokens) - 1, n):
        inp = tokens[s:s + n]
        tgt = tokens[s + 1:s + n + 1]
        yield s, inp[: len(tgt)], tgt


@torch.no_grad()
def evaluate(model, retriever: Retriever, k: int = 2, max_documents: int | None = None, seq_len: int | None = None,
             retrieval: bool = True, device=None, collect_chunks: bool = False, progress: bool = True,
             batch_size: int = 16) -> EvalResult:
    """NLL of the held-out documents with and without neighbours. The neighbours of every
    complete chunk are retrieved in one batched search; windows of equal length run as a batch."""
    from tqdm.auto import tqdm

    db = retriever.db
    docs = db.documents("valid")
    if len(docs) == 0:
        raise RetroError(f"{str(db.path)!r} has no held-out document: build it with --valid-fraction > 0")
    if max_documents:
        docs = docs[:max_documents]
    m, n = db.chunk_size, seq_len or model.cfg.max_seq_len
    device = device or next(model.parameters()).device
    windows = [(inp, tgt) for d in docs for _, inp, tgt in _windows(db.document_tokens(d), n)]
    n_bytes = int(sum(int(db.doc_bytes[d]) for d in docs))
    chunk_tokens = [inp[u * m:(u + 1) * m] for inp, _ in windows for u in range(len(inp) // m)]
    if retrieval and chunk_tokens:
        found = retriever.search(chunk_tokens, k)
        ids, nb_all, mask_all = found.ids, found.tokens, found.mask
    else:
        ids = np.full((len(chunk_tokens), k), -1, dtype=np.int64)
        nb_all = mask_all = None
    first_chunk = np.cumsum([0] + [len(inp) // m for inp, _ in windows])  # window -> its first chunk row
    nll = {"on": 0.0, "off": 0.0}
    per_chunk = {"on": [], "off": []}
    order = sorted(range(len(windows)), key=lambda w: -len(windows[w][0]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups = [[w for w in g if len(windows[w][0]) == len(windows[g[0]][0])] for g in groups] + \
             [[w] for g in groups for w in g if len(windows[w][0]) != len(windows[g[0]][0])]
    scored = 0
    for group in tqdm(groups, desc="evaluating", unit="batch", disable=not progress, leave=False):
        x = torch.tensor(np.stack([windows[w][0] for w in group]), dtype=torch.long, device=device)
        y = torch.tensor(np.stack([windows[w][1] for w in group]), dtype=torch.long, device=device)
        chunks = x.shape[1] // m
        modes = {"off": (None, None)}
        if retrieval:
            modes["on"] = (None, None)
            if chunks:
                rows = np.stack([np.arange(first_chunk[w], first_chunk[w] + chunks) for w in group])
                modes["on"] = (torch.as_tensor(nb_all[rows], device=device),
                               torch.as_tensor(mask_all[rows], device=device))
        for mode, (nb, mask) in modes.items():
            logits = model(x, nb, mask).float()
            token_nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (b, n)
            nll[mode] += float(token_nll.sum())
            if collect_chunks:  # chunk u of a window is tokens u*m .. u*m+m-1; position t scores token t+1
                per_token = F.pad(token_nll, (1, 0)).cpu().numpy()[:, : chunks * m].reshape(len(group), chunks, m)
                for j, w in enumerate(group):
                    per_chunk[mode] += [(first_chunk[w] + u, float(per_token[j, u].sum())) for u in range(chunks)]
        scored += int(y.numel())
    to_bpb = lambda v: v / math.log(2) / max(1, n_bytes)  # noqa: E731
    result = EvalResult(documents=len(docs), bytes=n_bytes, tokens=scored,
                        bpb_on=to_bpb(nll["on"]) if retrieval else None, bpb_off=to_bpb(nll["off"]), k=k)
    if collect_chunks:
        order_on = sorted(per_chunk["on"])
        order_off = sorted(per_chunk["off"])
        result.per_chunk = {"chunk_tokens": chunk_tokens, "neighbour_ids": ids,
                            "nll_on": np.array([v for _, v in order_on]), "nll_off": np.array([v for _, v in order_off])}
    return result
