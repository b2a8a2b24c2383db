"""`retro serve` under load, on the loopback address: 1, 4 and 16 concurrent streaming clients,
each sending requests one after another; tokens/s (all tokens streamed / wall time), time to first
token and the gap between tokens (per-token latency) at p50 and p99, and the server's resident
memory over 500 short requests (16 at a time). The server runs as `retro serve` in a subprocess;
the clients are threads here (httpx2, server-sent events). Every phase is bounded in requests and
in seconds (--max-seconds): the run stops by itself.

Without --run/--db it builds its own: a BM25 database of 40 Python files of the demo's corpus
(chunks of 64 tokens) and the "tiny" preset trained for 2 steps (max_seq_len 512), so the numbers
are those of the serving path (HTTP, scheduler, retrieval at every chunk boundary, a small model),
not of a model worth reading. Each request: a 100-token prompt of held-out text, 64 new tokens
(at least one chunk boundary, so one search and one encoding per request).

    python -m benchmarks.serve [--run RUN --db DB] [--max-batch 16] [--max-seconds 120]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2
import numpy as np
import psutil

from benchmarks.harness import bar_plot, machine_name, write_results

ROOT = Path(__file__).resolve().parents[1]


def build_run(folder: Path) -> tuple[Path, Path, list[str]]:
    """(run, db, prompts): a BM25 database of 40 files of the demo's corpus, the tiny preset
    trained on it for 2 steps, and prompts from its held-out documents."""
    from retro.app.default_corpus import default_corpus
    from retro.app.demo.corpus import sample_corpus
    from retro.retrieval import BuildOptions, ChunkDatabase, build_database, compute_neighbours
    from retro.training.train import TrainOptions, train

    corpus = sample_corpus(default_corpus(), 40, 0, folder / "corpus.jsonl")
    build_database(BuildOptions(corpus=str(corpus), out=str(folder / "db"), embedder="bm25", vocab_size=2000,
                                chunk_size=64, valid_fraction=0.1, progress=False), log=lambda *_: None)
    compute_neighbours(folder / "db", k=2, extra=2, progress=False, log=lambda *_: None)
    run = train(TrainOptions(db=str(folder / "db"), out=str(folder / "run"), config="tiny", steps=2, batch_size=2,
                             seq_chunks=2, overrides={"max_seq_len": 512}, progress=False, device="cpu"),
                log=lambda *_: None)
    return Path(run), folder / "db", held_out_prompts(ChunkDatabase(folder / "db"))


def held_out_prompts(db, n: int = 32, length: int = 100) -> list[str]:
    """n prompts of `length` tokens from the database's held-out documents."""
    tokens = [t for d in db.documents("valid") for t in [db.document_tokens(int(d))] if len(t) > length]
    return [db.tokenizer.decode(tokens[i % len(tokens)][:length].tolist()) for i in range(n)]


def start_server(run: Path, db: Path, port: int, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retro", "serve", str(run), "--db", str(db), "--host", "127.0.0.1",
                             "--port", str(port), "--max-batch", str(max_batch), "--max-waiting", "1000",
                             "--log-level", "warning", "--device", "cpu"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"retro serve exited with status {proc.returncode}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx2.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("retro serve did not come up within 300 s")


def one_request(url: str, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """Streams one completion: (seconds to the first token, the gaps between tokens in seconds)."""
    t0 = time.perf_counter()
    stamps = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                stamps.append(time.perf_counter())
    return stamps[0] - t0, list(np.diff(stamps))


def load_phase(url: str, prompts: list[str], clients: int, requests_each: int, max_tokens: int,
               max_seconds: float) -> dict:
    """`clients` threads, each sending up to requests_each streamed requests in a row (none started
    after max_seconds) -> the row of the table."""
    ttft, gaps, tokens = [], [], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client(c: int) -> None:
        for i in range(requests_each):
            if time.monotonic() > deadline:
                return
            first, between = one_request(url, prompts[(c * requests_each + i) % len(prompts)], max_tokens)
            with lock:
                ttft.append(first)
                gaps.extend(between)
                tokens[0] += len(between) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = lambda v, q: float(np.percentile(v, q) * 1000)  # noqa: E731
    return {"clients": clients, "requests": len(ttft), "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "token_p50_ms": ms(gaps, 50), "token_p99_ms": ms(gaps, 99)}


def memory_phase(url: str, proc: subprocess.Popen, prompts: list[str], total: int, max_seconds: float) -> dict:
    """`total` short requests, 16 at a time: the server's RSS after the first 10% and at the end."""
    server = psutil.Process(proc.pid)
    rss, done, lock = {}, [0], threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client(c: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                if done[0] >= total:
                    return
                done[0] += 1
                n = done[0]
            one_request(url, prompts[n % len(prompts)], 8)
            if n == total // 10:
                rss["after_warmup"] = server.memory_info().rss

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss["end"] = server.memory_info().rss
    return {"requests": done[0], "rss_after_warmup_mb": rss.get("after_warmup", 0) / 2**20,
            "rss_end_mb": rss["end"] / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run")
    p.add_argument("--db")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--memory-requests", type=int, default=500)
    p.add_argument("--max-seconds", type=float, default=120, help="per phase: no request starts after it")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.run:
            from retro.retrieval import ChunkDatabase

            run, db, prompts = Path(a.run), Path(a.db), held_out_prompts(ChunkDatabase(a.db))
        else:
            run, db, prompts = build_run(Path(tmp))
        with socket.socket() as sock:  # a port free now
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = start_server(run, db, port, a.max_batch)
        url = f"http://127.0.0.1:{port}"
        try:
            one_request(url, prompts[0], 4)  # warm-up
            rows = [load_phase(url, prompts, c, r, a.max_tokens, a.max_seconds) for c, r in ((1, 4), (4, 4), (16, 2))]
            memory = memory_phase(url, proc, prompts, a.memory_requests, a.max_seconds * 2)
        finally:
            proc.terminate()
            proc.wait(60)
    machine = machine_name("cpu")
    notes = [f"`retro serve` ({a.max_batch} decoding slots) in a subprocess on 127.0.0.1, the clients threads of the "
             f"benchmark's process; {a.max_tokens} new tokens per request, greedy, streamed",
             "the tiny preset trained for 2 steps on a BM25 database of 40 files of the demo's corpus (chunks of 64)"
             if not a.run else f"run {a.run}, database {a.db}",
             "tokens/s: every token streamed to every client over the phase's wall time; time to first token and "
             "per-token latency (the gap between streamed tokens) as each client saw them",
             f"memory: the server's RSS over {memory['requests']} requests of 8 tokens, 16 at a time: "
             f"{memory['rss_after_warmup_mb']:.0f} MB after the first 10%, {memory['rss_end_mb']:.0f} MB at the end",
             "one run (repeat it for the spread: serve-*-runs.md has three); the load average below says "
             "how busy the machine was"]
    columns = [("clients", "clients"), ("requests", "requests"), ("tokens_per_s", "tokens/s"),
               ("ttft_p50_ms", "first token p50 (ms)"), ("ttft_p99_ms", "first token p99 (ms)"),
               ("token_p50_ms", "per token p50 (ms)"), ("token_p99_ms", "per token p99 (ms)")]

    def plot(path):
        bar_plot(path, [f"{r['clients']} client(s), {r['tokens_per_s']:.0f} tok/s" for r in rows],
                 {h: [r[k] for r in rows] for k, h in columns[3:]}, "ms", f"retro serve on {machine}")

    write_results("serve", machine, rows + [{"clients": "memory", **memory}], columns, notes, plot)


if __name__ == "__main__":
    main()
