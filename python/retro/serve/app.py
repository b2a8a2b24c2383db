"""The HTTP side of `retro serve`: FastAPI routes, OpenAI-compatible (legacy completions API).

    POST /v1/completions   a completion, or with "stream": true a stream of server-sent events
                           (one per token, then "data: [DONE]"), each choice carrying "retrieved":
                           the chunks completed so far and their neighbours (neighbours.py)
    POST /v1/documents     {"documents": [{"text", "source"} or a string, ...]} added to the database as
                           its next generation (live.py), which later requests retrieve from ->
                           {"generation", "data": [{"id", "chunks", "source"}]}; 409 while another add
                           runs or where the database cannot grow
    GET  /v1/models        the one model served
    GET  /health           {"status": "ok", "active", "waiting", "slots", "steps", "generation"}
    GET  /                 the page: a prompt box, the continuation streaming in, the neighbours
                           each chunk retrieved beside it (page.html)

The handlers only check requests and relay events: the Scheduler (scheduler.py) owns the model.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, format_sse_event

from ..base.errors import RetroError
from .errors import ApiError, error_body, install_error_handlers
from .live import AddInProgress, LiveDatabase
from .scheduler import Busy, Event, Job, Scheduler
from .schemas import CompletionRequest, DocumentsRequest


def check_lengths(prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    """ApiError (400) unless the prompt and its completion fit the model's max_len tokens."""
    if prompt_tokens == 0:
        raise ApiError(400, "prompt encodes to no token: give at least one character", param="prompt")
    if max_tokens >= max_len:
        raise ApiError(400, f"max_tokens must be below the model's length of {max_len} tokens, got {max_tokens}",
                       param="max_tokens", code="context_length_exceeded")
    if prompt_tokens >= max_len:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens long, more than the model's length of {max_len} "
                            "tokens allows (at least one token must follow it): shorten it",
                       param="prompt", code="context_length_exceeded")
    if prompt_tokens + max_tokens > max_len:
        raise ApiError(400, f"the model's length is {max_len} tokens, but the prompt ({prompt_tokens} tokens) and "
                            f"max_tokens ({max_tokens}) come to {prompt_tokens + max_tokens}: lower max_tokens to "
                            f"{max_len - prompt_tokens} or less", param="max_tokens", code="context_length_exceeded")


async def next_event(job: Job) -> Event:
    """The job's next event from the scheduler (an exception the scheduler hit is raised here)."""
    item = await job.events.get()
    if isinstance(item, RetroError):
        raise ApiError(400, " ".join(str(item).split()), param="prompt")
    if isinstance(item, BaseException):
        raise item
    return item


class Completion:
    """A completion being assembled from events, as OpenAI's response objects."""

    def __init__(self, model: str, prompt_tokens: int, logprobs: bool):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.prompt_tokens, self.tokens, self.text = prompt_tokens, 0, ""
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if logprobs \
            else None
        self.retrieved: list = []
        self.finish_reason = None

    def add(self, e: Event) -> None:
        self.text += e.text
        self.tokens += e.token is not None
        self.retrieved += e.retrieved
        self.finish_reason = e.finish_reason
        if self.logprobs is not None and e.logprobs is not None:
            for key, value in zip(self.logprobs, ("token", "token_logprob", "top_logprobs", "text_offset")):
                self.logprobs[key].append(e.logprobs[value])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}

    def body(self, text: str, logprobs, retrieved: list, finish_reason, usage: bool = True) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                            "retrieved": retrieved}]}
        if usage:
            out["usage"] = self.usage()
        return out

    def whole(self) -> dict:
        return self.body(self.text, self.logprobs, self.retrieved, self.finish_reason)

    def chunk(self, e: Event) -> dict:
        """A streamed event (added to the completion) as a completion chunk; the last one carries the usage."""
        self.add(e)
        logprobs = None
        if self.logprobs is not None and e.logprobs is not None:
            logprobs = {"tokens": [e.logprobs["token"]], "token_logprobs": [e.logprobs["token_logprob"]],
                        "top_logprobs": [e.logprobs["top_logprobs"]], "text_offset": [e.logprobs["text_offset"]]}
        return self.body(e.text, logprobs, e.retrieved, e.finish_reason, usage=e.finish_reason is not None)


def page_html() -> str:
    return resources.files("retro.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(scheduler: Scheduler, model_name: str, check_every: float = 2.0) -> FastAPI:
    """The app serving `scheduler`'s model as `model_name`; the scheduler's thread starts with the
    app and stops (after finishing every request in flight) when the app shuts down. With a
    retriever, its database is live (live.py): POST /v1/documents adds to it, and a generation
    another process switches in is picked up within check_every seconds."""
    live = LiveDatabase(scheduler, check_every) if scheduler.retriever is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        if live is not None:
            live.start()
        yield
        if live is not None:
            await asyncio.to_thread(live.stop)
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="retro serve", lifespan=lifespan)
    install_error_handlers(app)
    tok, max_len = scheduler.tok, scheduler.max_len

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "retro",
                                            "max_model_len": max_len}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html()

    @app.post("/v1/documents")
    async def documents(body: DocumentsRequest):
        if live is None:
            raise ApiError(409, "this server retrieves from no database: there is nothing to add documents to",
                           code="no_database")
        try:  # in a worker thread: decoding goes on meanwhile
            return await asyncio.to_thread(live.add, body.pairs())
        except AddInProgress as exc:
            raise ApiError(409, str(exc), code="add_in_progress") from None
        except RetroError as exc:
            raise ApiError(409, "the database cannot take these documents: " + " ".join(str(exc).split()),
                           param="documents", code="database_refused") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here: this server serves {model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        prompt_tokens = len(tok.encode([body.prompt])[0])
        check_lengths(prompt_tokens, body.max_tokens, max_len)
        job = Job(body.prompt, prompt_tokens, body.max_tokens, body.temperature, body.top_p, body.stops(), body.seed,
                  body.logprobs, body.retrieval).bind(asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except Busy as exc:
            raise ApiError(429, str(exc), code="server_busy") from None
        out = Completion(model_name, prompt_tokens, body.logprobs is not None)
        try:
            first = await next_event(job)  # errors before the first token still answer with a status
        except BaseException:
            job.cancel()
            raise
        if body.stream:
            return EventSourceResponse(_stream(job, out, first))
        try:
            event = first
            out.add(event)
            while event.finish_reason is None:
                event = await next_event(job)
                out.add(event)
        finally:
            job.cancel()
        return out.whole()

    return app


async def _stream(job: Job, out: Completion, event: Event):
    """The server-sent events of a streamed completion; a client that goes away cancels the job."""
    try:
        while True:
            yield format_sse_event(data_str=json.dumps(out.chunk(event)))
            if event.finish_reason is not None:
                break
            try:
                event = await next_event(job)
            except ApiError as exc:
                yield format_sse_event(data_str=json.dumps(error_body(exc.status, exc.message, exc.param, exc.code)))
                return
            except Exception as exc:  # noqa: BLE001 - reported in the stream, whose status was already sent
                yield format_sse_event(data_str=json.dumps(error_body(500, f"internal error: {exc!r}")))
                return
        yield format_sse_event(data_str="[DONE]")
    finally:
        job.cancel()
