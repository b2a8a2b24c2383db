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

from ..base.checks import check_float, check_int, check_neighbours
from .inputs import as_texts, encode_for_model, search_chunks
from ..base.options import option
from ..retrieval.retriever import Retriever


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


def generate(model, retriever: Retriever | None, prompts: str | list[str],
             max_new_tokens: int = SamplingOptions.max_new_tokens, temperature: float = SamplingOptions.temperature,
             top_k: int | None = SamplingOptions.top_k, top_p: float | None = SamplingOptions.top_p,
             seed: int = SamplingOptions.seed, k: int | None = SamplingOptions.k, stop_at_eos: bool = True,
             tokenizer=None, compile: bool = False, stop: list[str] | None = None) -> list[Generation]:
    """Continues each prompt, one Generation per prompt; one prompt given as a str gives a list of
    one (the sampling arguments: SamplingOptions, whose defaults they take). retriever: the
    database's (refused unless the model reads it, as the command line refuses it:
    inputs.check_database); None generates without retrieval (RETRO[OFF]), and the tokenizer is
    then required (otherwise the database's is used). compile: the one-token step through
    torch.compile (CUDA graphs on a GPU; RETRO models, not retrofitted ones); retrieval and the
    encoder at chunk completions stay eager. stop: strings that end a prompt's continuation: it
    stops at the first token whose text completes one of them, and its text ends before it (its
    tokens keep every token generated)."""
    SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed, k).validate()
    prompts = as_texts("prompts", prompts)
    stop = as_texts("stop", stop) if stop else None
    k = k or model.cfg.num_neighbours
    # the prompts' tokens, right-padded, and the neighbours of every row's complete chunks
    inputs = encode_for_model(model, retriever, prompts, k, tokenizer, name="prompts")
    return continue_inputs(model, retriever, inputs, tokenizer or retriever.db.tokenizer, prompts, max_new_tokens,
                           temperature, top_k, top_p, seed, k, stop_at_eos, compile, stop)


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """`text` up to the first occurrence of any of the `stop` strings, and whether one occurs."""
    cut = min((i for i in (text.find(s) for s in stop or () if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


@torch.no_grad()
def continue_inputs(model, retriever: Retriever | None, inputs, tok, prompts: list[str], max_new_tokens: int,
                    temperature: float, top_k: int | None, top_p: float | None, seed: int, k: int,
                    stop_at_eos: bool = True, compile: bool = False, stop: list[str] | None = None
                    ) -> list[Generation]:
    """generate() on prompts already encoded: inputs (inputs.ModelInputs, from encode_for_model
    or tokens_for_model, with k neighbours per chunk) holds the B prompts' tokens and neighbours;
    tok decodes the continuations; prompts (B str) names them in the Generations. The arguments
    are generate()'s, checked by the caller."""
    m = model.cfg.chunk_size
    device, lengths = inputs.tokens.device, inputs.lengths
    max_len = max(lengths) + max_new_tokens  # the caches' length (any length works)
    if compile:
        model.compile_decoding(mode="reduce-overhead" if device.type == "cuda" else None)
        max_len = 1 << max(max_len - 1, 63).bit_length()  # few cache lengths, few compiled graphs
    state = model.new_state(len(prompts), max_len, num_neighbours=k)
    gens = [Generation(p, "", [], prompt_tokens=n) for p, n in zip(prompts, lengths)]
    history = [row[:n].tolist() for row, n in zip(inputs.tokens.cpu(), lengths)]
    if retriever is not None:
        for g, ids in zip(gens, inputs.neighbour_ids):
            g.retrieved += [{"chunk": u, "ids": ids[u].tolist()} for u in range(len(ids))]
    logits = model.prefill(state, inputs.tokens, inputs.neighbour_tokens, inputs.neighbour_mask, lengths)
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
        for row in range(len(prompts) if stop else 0):
            if not done[row] and cut_at_stop(tok.decode(gens[row].tokens), stop)[1]:
                done[row] = True
        if done.all():
            break
        new = {}
        pos = state.pos.tolist()
        complete = [r for r in range(len(prompts)) if pos[r] % m == m - 1]
        if retriever is not None and complete:  # the token fed now completes chunk pos // m
            chunks = [np.asarray(history[r][pos[r] - m + 1:pos[r] + 1]) for r in complete]
            nb, mask, ids = search_chunks(retriever, chunks, k, device)
            for j, r in enumerate(complete):
                new[r] = (nb[j], mask[j])
                gens[r].retrieved.append({"chunk": pos[r] // m, "ids": ids[j].tolist()})
        logits = model.step(state, nxt.to(device), new)
        nxt = sample(logits, temperature, top_k, top_p, gen)
    for g in gens:
        g.text = cut_at_stop(tok.decode(g.tokens), stop)[0]
        if retriever is not None:
            for r in g.retrieved:
                r["texts"] = [retriever.db.chunk_text(i) if i >= 0 else None for i in r["ids"]]
    return gens
