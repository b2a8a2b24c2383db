"""Generation with retrieval (`retro generate RUN "prompt" --db DIR`, docs/semantics.md, "Decoding").

Each prompt is prefilled in one pass (with the neighbours of its complete chunks); then every
step feeds one token per sequence through the caches. When the fed token completes a chunk, the
chunk's neighbours are retrieved from the database and encoded once; the next window of
positions attends to them. Sampling: temperature, top-k, top-p, a seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_float, check_int, check_neighbours
from .errors import RetroError
from .options import option
from .retrieval.retriever import Retriever


@dataclass
class Generation:
    prompt: str
    text: str                      # the generated continuation
    tokens: list[int]
    retrieved: list[dict] = field(default_factory=list)  # per retrieval: chunk, ids, texts
    prompt_tokens: int = 0         # the prompt's length in tokens


@dataclass
class SamplingOptions:
    """How generate() decodes; validate() checks the ranges (the command line's options)."""
    max_new_tokens: int = option(64, "tokens generated per prompt")
    temperature: float = option(0.8, "sampling temperature; 0: greedy")
    top_k: int | None = option(50, "sample among the top-k tokens; 0: no top-k cut")
    top_p: float | None = option(0.95, "nucleus sampling: the smallest set of tokens reaching this probability; "
                                       "1: no nucleus cut")
    seed: int = option(0, "the sampling seed")
    k: int | None = option(None, "neighbours per chunk (default: the model's)", short="-k")

    def validate(self) -> None:
        check_int("--max-new-tokens", self.max_new_tokens, 1)
        check_float("--temperature", self.temperature, 0)
        check_int("--top-k", self.top_k, 0, optional=True)
        check_float("--top-p", self.top_p, 0, 1, low_open=True, optional=True)
        check_int("--seed", self.seed, 0)
        check_neighbours("-k", self.k, optional=True)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def _retrieve(retriever: Retriever, chunks: list[np.ndarray], k: int, device):
    res = retriever.search(chunks, k)
    return (torch.as_tensor(res.tokens, device=device), torch.as_tensor(res.mask, device=device), res.ids)


@torch.no_grad()
def generate(model, retriever: Retriever | None, prompts: list[str],
             max_new_tokens: int = SamplingOptions.max_new_tokens, temperature: float = SamplingOptions.temperature,
             top_k: int | None = SamplingOptions.top_k, top_p: float | None = SamplingOptions.top_p,
             seed: int = SamplingOptions.seed, k: int | None = SamplingOptions.k, stop_at_eos: bool = True,
             tokenizer=None, compile: bool = False) -> list[Generation]:
    """Continues each prompt (the sampling arguments: SamplingOptions, whose defaults they take).
    retriever None generates without retrieval (RETRO[OFF]); the
    tokenizer is then required (otherwise the database's is used). compile: the one-token step
    through torch.compile (CUDA graphs on a GPU; RETRO models, not retrofitted ones); retrieval and
    the encoder at chunk completions stay eager."""
    SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed, k).validate()
    if not prompts:
        raise RetroError("no prompt given")
    tok = tokenizer or (retriever.db.tokenizer if retriever is not None else None)
    if tok is None:
        raise RetroError("generate without a retriever needs tokenizer= (the database's tokenizer)")
    cfg, m = model.cfg, model.cfg.chunk_size
    k = k or cfg.num_neighbours
    device = next(model.parameters()).device
    encoded = [np.asarray(t, dtype=np.int64) for t in tok.encode(prompts)]
    if any(len(t) == 0 for t in encoded):
        raise RetroError("a prompt encodes to no token; give at least one character")
    max_len = max(len(t) for t in encoded) + max_new_tokens  # the caches' length (any length works)
    if compile:
        if not hasattr(model, "compile_decoding"):
            raise RetroError("compile (--compile) works for RETRO models; a retrofitted model decodes eagerly")
        model.compile_decoding(mode="reduce-overhead" if device.type == "cuda" else None)
        max_len = 1 << max(max_len - 1, 63).bit_length()  # few cache lengths, few compiled graphs
    state = model.new_state(len(prompts), max_len, num_neighbours=k)
    gens = [Generation(p, "", [], prompt_tokens=len(t)) for p, t in zip(prompts, encoded)]
    history = [list(t) for t in encoded]
    lengths = [len(t) for t in encoded]
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=device)  # right padding
    for row, t in enumerate(encoded):
        tokens[row, :len(t)] = torch.as_tensor(t, device=device)
    nb = mask = None
    if retriever is not None and max(lengths) >= m:  # the neighbours of every row's complete chunks
        L, R = max(lengths) // m, 2 * m
        nb = torch.zeros(len(prompts), L, k, R, dtype=torch.long, device=device)
        mask = torch.ones(len(prompts), L, k, R, dtype=torch.bool, device=device)  # padding chunks: finite states
        for row, t in enumerate(encoded):
            chunks = len(t) // m
            if chunks:
                nb[row, :chunks], mask[row, :chunks], ids = _retrieve(
                    retriever, [t[u * m:(u + 1) * m] for u in range(chunks)], k, device)
                gens[row].retrieved += [{"chunk": u, "ids": ids[u].tolist()} for u in range(chunks)]
    logits = model.prefill(state, tokens, nb, mask, lengths)
    gen = torch.Generator().manual_seed(seed)
    nxt = sample(logits, temperature, top_k, top_p, gen)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        for row in range(len(prompts)):
            if not done[row]:
                history[row].append(int(nxt[row]))
                gens[row].tokens.append(int(nxt[row]))
        eos = getattr(tok, "eos_id", -1)
        if stop_at_eos:
            done |= (nxt.cpu() == eos)
        if done.all():
            break
        new = {}
        pos = state.pos.tolist()
        complete = [r for r in range(len(prompts)) if pos[r] % m == m - 1]
        if retriever is not None and complete:  # the token fed now completes chunk pos // m
            chunks = [np.asarray(history[r][pos[r] - m + 1:pos[r] + 1]) for r in complete]
            nb, mask, ids = _retrieve(retriever, chunks, k, device)
            for j, r in enumerate(complete):
                new[r] = (nb[j], mask[j])
                gens[r].retrieved.append({"chunk": pos[r] // m, "ids": ids[j].tolist()})
        logits = model.step(state, nxt.to(device), new)
        nxt = sample(logits, temperature, top_k, top_p, gen)
    for g in gens:
        g.text = tok.decode(g.tokens)
        if retriever is not None:
            for r in g.retrieved:
                r["texts"] = [retriever.db.chunk_text(i) if i >= 0 else None for i in r["ids"]]
    return gens
