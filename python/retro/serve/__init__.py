"""`retro serve RUN --db DB`: the model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn),
retrieving live from the database at every chunk boundary, with a page at / that shows the
neighbours. app.py: the routes; scheduler.py: continuous batching (one thread owns the model);
live.py: the database growing under the server (POST /v1/documents, other processes' changes);
schemas.py: the request bodies; errors.py: OpenAI-style error bodies; neighbours.py: what a response
says about retrieval; page.html: the page.

    from retro.serve import build_scheduler, create_app
    app = create_app(build_scheduler(model, retriever, tokenizer), "my-model")   # any ASGI server runs it
"""
from __future__ import annotations

from ..base.errors import RetroError
from .app import create_app
from .scheduler import Job, Scheduler


def build_scheduler(model, retriever, tokenizer, max_batch: int = 16, max_waiting: int = 64) -> Scheduler:
    """A Scheduler for model (a RetroModel, in eval mode), retrieving from retriever (None:
    RETRO[OFF] for every request), decoding with tokenizer. A retrofitted model is refused: its
    decoding keeps one Hugging Face cache per sequence, not rows that requests can join and leave."""
    from ..model.model import RetroModel

    if not isinstance(model, RetroModel):
        raise RetroError(f"retro serve serves RETRO models; this run holds a {type(model).__name__} (a retrofitted "
                         "model decodes one sequence at a time): use retro generate for it")
    model.eval()
    return Scheduler(model, retriever, tokenizer, max_batch=max_batch, max_waiting=max_waiting)


def serve(o) -> None:
    """Runs the server of ServeOptions o until SIGTERM or Ctrl-C (both finish the requests in flight)."""
    from pathlib import Path

    import uvicorn

    from ..retrieval import Retriever
    from ..training.train import check_run_database, load_model

    model, state = load_model(o.run, device=o.device)
    retriever = Retriever.load(o.db, device=o.device)
    check_run_database(state, retriever.db, o.run)
    scheduler = build_scheduler(model, retriever, retriever.db.tokenizer, o.max_batch, o.max_waiting)
    name = o.model_name or Path(o.run).resolve().name
    print(f"[serve] {name} on http://{o.host}:{o.port} ({o.max_batch} decoding slots of {scheduler.max_len} "
          "tokens); the page: /, the API: /v1/completions, /v1/documents", flush=True)
    uvicorn.run(create_app(scheduler, name, o.check_every), host=o.host, port=o.port, log_level=o.log_level)


__all__ = ["Job", "Scheduler", "build_scheduler", "create_app", "serve"]
