"""The scheduler of `retro serve`: one thread owns the model and decodes every request in flight
together (continuous batching, as vLLM's engine loop), apart from the HTTP handlers.

The caches are a fixed number of slots (DecodeState of max_batch rows, each of the model's
max_seq_len). A request joins when a slot is free: its prompt is prefilled on its own (a one-row
state, copied into the slot: DecodeState.put_row), and from then on every loop iteration is one
model.step for all slots, one batched search for every row whose fed token completes a chunk, and
one sampled token per active row. Free slots are fed a dummy token at position 0 of their own
cache rows and their logits are ignored. A request leaves when it is done or cancelled (its
client went away): its slot is simply free again.

Rows never mix: every batched op of a step works row by row, and the step always has max_batch
rows, so a row's logits do not depend on what the other slots hold (tests/retro/serve/test_serve.py checks
greedy outputs of concurrent requests against each one run alone).

The handlers talk to the scheduler with Job objects: submit() queues one (Busy when the queue is
full), the loop pushes its Events onto the job's asyncio queue (thread-safe, through its event
loop), and job.cancel() makes the loop drop it.

The database can change under a running server (live.py): swap() hands over a Retriever loaded at
its new generation, which the loop takes at the top of its next iteration, before it admits jobs:
never between a search and the description of what it found. A request submitted after swap()
returned is prefilled against the new generation; rows already decoding keep the neighbours they
have and search the new generation from their next chunk boundary.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..decoding.generate import cut_at_stop, sample
from ..decoding.inputs import encode_for_model, search_chunks
from .neighbours import describe_retrievals


class Busy(Exception):
    """The scheduler's queue is full: the request is refused (HTTP 429)."""


@dataclass
class Event:
    """What one decoding step produced for a job: text (the new text, possibly ""), token (the id,
    None in the last event after a stop string), logprobs (the token's, when asked), retrieved
    (chunks completed since the previous event and their neighbours: neighbours.describe_retrievals),
    finish_reason ("stop", "length" or None while more follows)."""
    text: str = ""
    token: int | None = None
    logprobs: dict | None = None
    retrieved: list = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Job:
    """One completion request, as the scheduler runs it. prompt_tokens: the prompt, encoded (the
    handler checked its length); stop: stop strings; seed None: a random one; logprobs: how many
    top alternatives to return (None: no logprobs); retrieval False: RETRO[OFF]."""
    prompt: str
    prompt_tokens: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    retrieval: bool = True
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def bind(self, loop: asyncio.AbstractEventLoop) -> "Job":
        """Attaches the job to the handler's event loop (its events arrive on self.events)."""
        self.loop, self.events = loop, asyncio.Queue()
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, event: Event | BaseException) -> None:
        """From the scheduler thread: hands an event (or an exception to raise) to the handler."""
        if not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                self.cancel()


@dataclass
class _Row:
    """A job in a slot: its tokens so far (prompt and generated), the generated ones, the sampling
    generator, how much of its text was sent, the token to feed next, the generated tokens' text
    (decoded once per step)."""
    job: Job
    history: list[int]
    generated: list[int]
    generator: torch.Generator
    sent: int = 0
    next_token: int = 0
    text: str = ""


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of text could begin a stop string (not sent yet: the next
    tokens may complete it)."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class Scheduler:
    """Continuous batching of completion jobs on one model (see the module's docstring).
    retriever None serves without retrieval (every job RETRO[OFF]); tokenizer: the database's."""

    def __init__(self, model, retriever, tokenizer, max_batch: int = 16, max_waiting: int = 64,
                 max_len: int | None = None):
        self.model, self.retriever, self.tok = model, retriever, tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.max_len = max_len or model.cfg.max_seq_len
        self.k = model.cfg.num_neighbours
        self.device = next(model.parameters()).device
        self.state = model.new_state(max_batch, self.max_len, num_neighbours=self.k)
        self.slots: list[_Row | None] = [None] * max_batch
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.swapping = None  # a Retriever to take at the next iteration (swap)
        self.steps = 0  # batched decoding steps run (for /health and the tests)
        self.thread = threading.Thread(target=self._run, name="retro-scheduler", daemon=True)

    # ---- the handlers' side ----------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Finishes the jobs in flight and queued, then ends the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def submit(self, job: Job) -> Job:
        """Queues a bound job; Busy when max_waiting jobs already wait beyond those the free slots take."""
        with self.cond:
            if len(self.waiting) >= self.max_waiting + self.slots.count(None):
                raise Busy(f"the server is busy: {len(self.waiting)} requests are waiting for one of its "
                           f"{self.max_batch} decoding slots; retry later")
            self.waiting.append(job)
            self.cond.notify()
        return job

    def load(self) -> dict:
        """{"active": rows decoding, "waiting": jobs queued, "slots": max_batch, "steps": steps run,
        "generation": the database generation that jobs submitted now retrieve from (None: no retriever)}."""
        with self.cond:
            return {"active": sum(r is not None for r in self.slots), "waiting": len(self.waiting),
                    "slots": self.max_batch, "steps": self.steps, "generation": self.generation()}

    def generation(self) -> int | None:
        """The database generation of the retriever that the next iteration uses (None: no retriever)."""
        retriever = self.swapping if self.swapping is not None else self.retriever
        return None if retriever is None else retriever.db.generation

    def swap(self, retriever) -> None:
        """Hands over a Retriever (the database at a newer generation): the loop takes it at the top
        of its next iteration, before admitting jobs, so every job submitted after this returns uses it."""
        with self.cond:
            self.swapping = retriever
            self.cond.notify()

    # ---- the scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while self._iteration():
            pass

    def _iteration(self) -> bool:
        """Admits the jobs that fit, runs one batched step; False once stopping with nothing left.
        (A method, so that no finished job outlives its iteration in a local variable.)"""
        with self.cond:
            while not self.waiting and not any(self.slots) and not self.stopping:
                self.cond.wait()
            if self.stopping and not self.waiting and not any(self.slots):
                return False
            if self.swapping is not None:  # between steps: no search is under way
                self.retriever, self.swapping = self.swapping, None
            joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.slots.count(None)))]
        for job in joining:
            self._guard(job, self._admit, job)
        self._drop_cancelled()
        if any(self.slots):
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a bug: every job in flight gets it, the server stays up
                for slot, row in enumerate(self.slots):
                    if row is not None:
                        row.job.push(exc)
                        self._free(slot)
        return True

    def _guard(self, job: Job, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the job's handler, which answers with an error
            job.push(exc)
            for slot, row in enumerate(self.slots):
                if row is not None and row.job is job:
                    self._free(slot)

    def _free(self, slot: int) -> None:
        with self.cond:
            self.slots[slot] = None

    def _drop_cancelled(self) -> None:
        for slot, row in enumerate(self.slots):
            if row is not None and row.job.cancelled.is_set():
                self._free(slot)

    def _admit(self, job: Job) -> None:
        """Prefills job's prompt in a one-row state, copies it into a free slot, emits the first token."""
        if job.cancelled.is_set():
            return
        retriever = self.retriever if job.retrieval else None
        inputs = encode_for_model(self.model, retriever, [job.prompt], self.k, tokenizer=self.tok, name="prompt")
        one = self.model.new_state(1, inputs.lengths[0], num_neighbours=self.k)
        logits = self.model.prefill(one, inputs.tokens, inputs.neighbour_tokens, inputs.neighbour_mask)
        slot = self.slots.index(None)
        self.state.put_row(slot, one)
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        row = _Row(job, inputs.tokens[0].tolist(), [], torch.Generator().manual_seed(seed))
        with self.cond:
            self.slots[slot] = row
        retrieved = []
        if retriever is not None:
            ids = inputs.neighbour_ids[0]
            retrieved = self._describe(row, list(range(len(ids))), ids)
        self._emit(slot, row, logits, retrieved)

    def _describe(self, row: _Row, chunks: list[int], ids) -> list[dict]:
        m = self.model.cfg.chunk_size
        return describe_retrievals(self.retriever.db, self.tok, [row.history[u * m:(u + 1) * m] for u in chunks],
                                   chunks, ids)

    def _step(self) -> None:
        """One batched step for every slot, one batched search for the rows completing a chunk."""
        m = self.model.cfg.chunk_size
        active = [s for s, r in enumerate(self.slots) if r is not None]
        tokens = torch.zeros(self.max_batch, dtype=torch.long)
        pos = self.state.pos.tolist()
        for s in range(self.max_batch):
            if self.slots[s] is None:
                pos[s] = 0  # a free slot decodes a dummy token at position 0 of its own rows
            else:
                tokens[s] = self.slots[s].next_token
        self.state.pos.copy_(torch.tensor(pos))
        complete = [s for s in active if pos[s] % m == m - 1 and self.slots[s].job.retrieval]
        new, retrieved = {}, {s: [] for s in active}
        if self.retriever is not None and complete:  # the fed token completes chunk pos // m
            chunks = [np.asarray(self.slots[s].history[pos[s] - m + 1:pos[s] + 1]) for s in complete]
            nb, mask, ids = search_chunks(self.retriever, chunks, self.k, self.device)
            for j, s in enumerate(complete):
                new[s] = (nb[j], mask[j])
                retrieved[s] = self._describe(self.slots[s], [pos[s] // m], ids[j:j + 1])
        logits = self.model.step(self.state, tokens.to(self.device), new)
        with self.cond:
            self.steps += 1
        for s in active:
            self._emit(s, self.slots[s], logits[s:s + 1], retrieved[s])

    def _emit(self, slot: int, row: _Row, logits: torch.Tensor, retrieved: list) -> None:
        """Samples the row's next token from logits (1, vocab), sends its event; frees the slot when done."""
        job = row.job
        token = int(sample(logits, job.temperature, None, job.top_p, row.generator)[0])
        logprobs = self._logprobs(logits[0], token, job.logprobs) if job.logprobs is not None else None
        before = row.text
        row.generated.append(token)
        row.history.append(token)
        row.next_token = token
        finish = None
        if token == getattr(self.tok, "eos_id", -1):
            text, finish = before, "stop"
        else:
            row.text = self.tok.decode(row.generated)
            text, stopped = cut_at_stop(row.text, job.stop)
            if stopped:
                finish = "stop"
            elif len(row.generated) >= job.max_tokens:
                finish = "length"
        if logprobs is not None:
            logprobs["text_offset"] = len(before)
        end = len(text) if finish else len(text) - held_back(text, job.stop)
        delta = text[row.sent:end]
        row.sent = max(row.sent, end)
        if finish:  # free before the last event: a client that has it finds the slot free
            self._free(slot)
        job.push(Event(delta, token, logprobs, retrieved, finish))

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """The model's log-probabilities (before temperature) of `token` and of the `top` most likely."""
        lp = torch.log_softmax(logits.float(), -1)
        values, ids = lp.topk(top) if top else (lp[:0], lp[:0].long())
        return {"token": self.tok.decode([token]), "token_logprob": float(lp[token]),
                "top_logprobs": {self.tok.decode([int(i)]): float(v) for v, i in zip(values, ids)}}

