"""`retro serve` in the tests: a tiny model trained for 2 steps on a small BM25 database (no
embedder: a subprocess server can load it too), and the server run in a thread of this process on
127.0.0.1 and a free port (uvicorn.Server), stopped as SIGTERM stops it."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2

from tests.helpers.retrieval_helpers import free_port, write_corpus

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1], "max_seq_len": 96}
CHUNK = 16


def trained_run(root: Path) -> tuple[Path, Path]:
    """(run, db): a BM25 database of 10 documents (chunks of 16 tokens) and a model of max_seq_len
    96 trained on it for 2 steps."""
    from retro.retrieval import BuildOptions, build_database, compute_neighbours
    from retro.training.train import TrainOptions, train

    corpus = write_corpus(root / "corpus", docs=10, words=330)
    build_database(BuildOptions(corpus=str(corpus), out=str(root / "db"), embedder="bm25", vocab_size=300,
                                chunk_size=CHUNK, block_size=64, valid_fraction=0.2, progress=False),
                   log=lambda *_: None)
    compute_neighbours(root / "db", k=2, extra=2, block=50, progress=False, log=lambda *_: None)
    run = train(TrainOptions(db=str(root / "db"), out=str(root / "run"), steps=2, batch_size=2, seq_chunks=2,
                             warmup=5, overrides=dict(SMALL), progress=False, device="cpu"), log=lambda *_: None)
    return Path(run), root / "db"


def wait_until_up(url: str, timeout: float, process=None) -> None:
    """Polls GET url/health until it answers (AssertionError after timeout s, or when process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode}")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no server answered at {url} within {timeout} s")


@contextmanager
def running_server(app):
    """Serves the ASGI app on 127.0.0.1 (a free port) in a thread; yields (base url, uvicorn.Server).
    On exit it shuts down as on SIGTERM (should_exit: requests in flight finish)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, 60)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(60)
