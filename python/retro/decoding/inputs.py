"""What a model reads from a database: the check that a database is one the model can read
(check_database, shared by evaluate, generate and encode_for_model), and the tokens of texts with
the neighbours of their complete chunks, as RetroModel and RetrofittedLM take them
(encode_for_model).

    inputs = retro.encode_for_model(model, retriever, "def parse_args(argv):")
    logits = model(inputs.tokens, inputs.neighbour_tokens, inputs.neighbour_mask)   # (1, n, vocab)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..base.checks import check_neighbours
from ..base.errors import RetroError


def check_database(model, db) -> None:
    """RetroError (one line) unless `db` (a ChunkDatabase) is a database `model` can read: the one
    it was trained on where the model records it (`model.trained_on`, from a run or a saved model:
    the command line's check, ChunkDatabase.check_identity), and in any case one of the model's
    chunk size whose tokenizer the model's vocabulary holds (a model never trained on a database,
    e.g. a fresh retrofit)."""
    db.check_identity(model.trained_on, model.source or "the model")
    cfg = model.cfg
    if db.chunk_size != cfg.chunk_size:
        raise RetroError(f"the model reads chunks of {cfg.chunk_size} tokens but {str(db.path)!r} has chunks of "
                         f"{db.chunk_size}: pass a database built with --chunk-size {cfg.chunk_size}")
    if db.tokenizer.vocab_size > cfg.vocab_size:
        raise RetroError(f"{str(db.path)!r}'s tokenizer has {db.tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary of {cfg.vocab_size} tokens: pass a database built with the model's tokenizer "
                         "(build-db --tokenizer)")


def as_texts(name: str, texts) -> list[str]:
    """`texts` as a list: one str is a list of one. TypeError naming `name` for anything else but a
    list (or tuple) of str; RetroError for an empty one."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (list, tuple)):
        odd = next((t for t in texts if not isinstance(t, str)), None)
        if odd is None:
            if not texts:
                raise RetroError(f"no {name} given: {name} must be a str or a non-empty list of str")
            return list(texts)
        raise TypeError(f"{name} must be a str or a list of str, got a {type(texts).__name__} holding "
                        f"{type(odd).__name__}")
    raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")


@dataclass
class ModelInputs:
    """Texts as a model reads them (B texts, n the longest one's tokens, m the chunk size, k
    neighbours per chunk, L = n // m):
    tokens (B, n) int64, row b its text's lengths[b] tokens, right-padded with 0;
    neighbour_tokens (B, L, k, 2m) int64 and neighbour_mask (B, L, k, 2m) bool (True = real token):
    the k neighbours [chunk, continuation] of every complete chunk (None without a retriever, or
    when no text has a complete chunk); a row's chunks past its own complete ones are padding (0,
    unmasked) that none of its real positions reads;
    neighbour_ids: per row, (its complete chunks, k) int64 database chunk ids, -1 = none."""
    tokens: Tensor
    lengths: list[int]
    neighbour_tokens: Tensor | None
    neighbour_mask: Tensor | None
    neighbour_ids: list[np.ndarray]


def search_chunks(retriever, chunks: list[np.ndarray], k: int, device):
    """The k neighbours of chunks (their tokens) -> tokens (Q, k, 2m), mask (Q, k, 2m) on device, ids (Q, k)."""
    res = retriever.search(chunks, k)
    return torch.as_tensor(res.tokens, device=device), torch.as_tensor(res.mask, device=device), res.ids


def encode_for_model(model, retriever, texts, k: int | None = None, tokenizer=None, name: str = "texts"
                     ) -> ModelInputs:
    """The tokens of `texts` (a str, or a list of str) and the neighbours of their complete chunks,
    on the model's device, for model(inputs.tokens, inputs.neighbour_tokens, inputs.neighbour_mask).
    retriever: the database's Retriever (checked to be one the model reads, check_database), or
    None for the tokens alone, encoded with `tokenizer` (otherwise the database's tokenizer is
    used). k: neighbours per chunk (default: the model's). name: what the error messages call
    `texts`."""
    texts = as_texts(name, texts)
    if retriever is not None:
        check_database(model, retriever.db)
    tok = tokenizer or (retriever.db.tokenizer if retriever is not None else None)
    if tok is None:
        raise RetroError("without a retriever, tokenizer= is needed (the database's tokenizer)")
    k = check_neighbours("k", k or model.cfg.num_neighbours)
    encoded = [np.asarray(t, dtype=np.int64) for t in tok.encode(texts)]
    if any(len(t) == 0 for t in encoded):
        raise RetroError(f"one of the {name} encodes to no token; give at least one character")
    return tokens_for_model(model, retriever, encoded, k)


def tokens_for_model(model, retriever, encoded: list[np.ndarray], k: int) -> ModelInputs:
    """ModelInputs of texts already tokenised: encoded, B non-empty int64 arrays of token ids; the
    neighbours (k per chunk) of each row's complete chunks from `retriever` (None: no neighbours),
    which the caller has checked (check_database)."""
    m = model.cfg.chunk_size
    device = next(model.parameters()).device
    lengths = [len(t) for t in encoded]
    tokens = torch.zeros(len(encoded), max(lengths), dtype=torch.long, device=device)
    for row, t in enumerate(encoded):
        tokens[row, :len(t)] = torch.as_tensor(t, device=device)
    nb = mask = None
    ids = [np.full((n // m, k), -1, dtype=np.int64) for n in lengths]
    if retriever is not None and max(lengths) >= m:
        shape = (len(encoded), max(lengths) // m, k, 2 * m)
        nb = torch.zeros(shape, dtype=torch.long, device=device)
        mask = torch.ones(shape, dtype=torch.bool, device=device)  # padding chunks: finite states
        for row, t in enumerate(encoded):
            chunks = len(t) // m
            if chunks:
                nb[row, :chunks], mask[row, :chunks], ids[row] = search_chunks(
                    retriever, [t[u * m:(u + 1) * m] for u in range(chunks)], k, device)
    return ModelInputs(tokens, lengths, nb, mask, ids)
