"""Chunk embedding on the CPU: chunks/s of the frozen BERT (all-MiniLM-L6-v2) by batch size, and
the ceiling the machine's float32 matrix products put on it.

    python -m benchmarks.embedding_cpu --db runs/demo/db [--chunks 768] [--reps 3]

Text: a seeded sample of the database's chunks (64 SentencePiece tokens each, decoded). Each
repetition embeds the whole sample once per batch size, the sizes interleaved (a shared machine's
load drifts); the table gives the median chunks/s and the ratio to batch 128 (the default before).
Ceiling: FLOPs per chunk = 2 x (the encoder's Linear weights) x (word pieces per chunk, measured),
attention and element-wise work left out; over the measured float32 matmul rate (torch.mm at
BERT's shapes, median) that is the most any float32 implementation could reach here. Agreement:
each chunk's nearest other chunk of the sample with each batch size's keys against batch 128's.
int8 rows: torch's dynamic int8 quantisation (per-channel weights, activations quantised per
batch) of all, or some, of the encoder's Linear layers, at batch 32: the only route past the
float32 ceiling on this CPU, kept only if its neighbours agree with float32's (>= 0.95).

Writes benchmarks/results/embedding_cpu-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.harness import machine_name, write_results

SIZES = (128, 64, 32, 16, 8)
# int8 variants: the encoder's Linear layers quantised, chosen by a substring of their names
INT8 = {"int8 all Linear": ("",), "int8 q/k/v": ("query", "key", "value"),
        "int8 attention output": ("attention.output.dense",)}


def quantised(model, parts: tuple[str, ...]):
    """A copy of model whose nn.Linear layers named with one of `parts` run in dynamic int8 (the
    package's int8_linear, which `--embedder int8:NAME` uses with parts ("",): all of them)."""
    from retro.retrieval.embedder import int8_linear

    return int8_linear(model, parts)


def matmul_rate(dim: int, hidden: int, reps: int = 10) -> float:
    """Median GFLOP/s of torch.mm at the encoder's shapes (2048 rows)."""
    rates = []
    for k, n in ((dim, hidden), (hidden, dim), (dim, dim)):
        a, b = torch.randn(2048, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        rates.append(2 * 2048 * k * n * reps / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def nearest(keys: np.ndarray) -> np.ndarray:
    d = ((keys[:, None] - keys[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return d.argmin(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="runs/demo/db")
    p.add_argument("--chunks", type=int, default=768)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help="only batch 128, batch 32 and the int8 variants, written "
                                                        "as embedding_cpu_int8-<machine>")
    a = p.parse_args()

    from retro.retrieval.database import ChunkDatabase, chunk_texts
    from retro.retrieval.embedder import make_embedder

    db = ChunkDatabase(a.db)
    idx = np.sort(np.random.default_rng(a.seed).choice(db.num_chunks, min(a.chunks, db.num_chunks), replace=False))
    texts = chunk_texts(db.tokenizer, np.asarray(db.tokens), db.chunk_start[idx], db.chunk_len[idx])
    e = make_embedder(db.manifest["embedder"]["name"], device="cpu")
    e.embed(texts[:32])  # warm-up
    pieces = float(np.mean([len(x) for x in e.tokenizer(texts)["input_ids"]]))
    weights = sum(m.weight.numel() for m in e.model.encoder.modules() if isinstance(m, torch.nn.Linear))
    flops = 2 * weights * pieces
    cfg = e.model.config
    rate = matmul_rate(cfg.hidden_size, cfg.intermediate_size)

    float_model = e.model
    models = {b: (b, float_model) for b in ((128, 32) if a.int8 else SIZES)}
    models.update({name: (32, quantised(float_model, parts)) for name, parts in INT8.items()})
    speed, keys = {v: [] for v in models}, {}
    for _ in range(a.reps):
        for v, (b, model) in models.items():
            e.batch_size, e.model = b, model
            t = time.perf_counter()
            keys[v] = e.embed(texts)
            speed[v].append(len(texts) / (time.perf_counter() - t))
    ref = nearest(keys[128])
    rows = [{"batch": v, "chunks_per_s": statistics.median(speed[v]),
             "vs_128": statistics.median(s / r for s, r in zip(speed[v], speed[128])),
             "gflops": statistics.median(speed[v]) * flops / 1e9,
             "max_abs_diff": float(np.abs(keys[v] - keys[128]).max()),
             "top1_agreement": float((nearest(keys[v]) == ref).mean())} for v in models]
    ceiling = rate * 1e9 / flops

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.bar([str(r["batch"]).replace("int8 ", "int8\n") for r in rows], [r["chunks_per_s"] for r in rows],
               color=["C0" if isinstance(r["batch"], int) else "C1" for r in rows])
        ax.axhline(ceiling, color="C3", ls="--", label=f"float32 matmul ceiling {ceiling:.0f}")
        ax.axhline(2 * rows[0]["chunks_per_s"], color="C2", ls=":", label="2x batch 128")
        ax.set_xlabel("texts per batch (float32) / int8 variant (batch 32)")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("chunks/s")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    write_results("embedding_cpu_int8" if a.int8 else "embedding_cpu", machine_name(), rows, [
        ("batch", "texts per batch"), ("chunks_per_s", "chunks/s"), ("vs_128", "x batch 128"),
        ("gflops", "GFLOP/s"), ("max_abs_diff", "max |key - key(128)|"), ("top1_agreement", "top-1 = batch 128's")], [
        f"{len(texts)} chunks of {db.path} ({pieces:.1f} word pieces each on average), "
        f"{db.manifest['embedder']['name']}, float32, {torch.get_num_threads()} threads, median of {a.reps} "
        "interleaved repetitions",
        f"FLOPs per chunk: 2 x {weights / 1e6:.2f}M Linear weights x {pieces:.1f} word pieces = "
        f"{flops / 1e9:.2f} GFLOP "
        "(attention, GELU, LayerNorm left out)",
        f"float32 matmul rate here (torch.mm at the encoder's shapes, median): {rate:.0f} GFLOP/s, so no float32 "
        f"implementation exceeds {ceiling:.0f} chunks/s = {ceiling / rows[0]['chunks_per_s']:.2f}x batch 128",
        "the default is now 32 texts per batch on the CPU (128 on a GPU); int8 rows run at batch 32 "
        "(GFLOP/s there counts the same FLOPs, done in int8)",
        "int8 verdict: " + int8_verdict(rows)], plot)


def int8_verdict(rows: list[dict]) -> str:
    """Which int8 variants keep the neighbours (top-1 agreement >= 0.95), and their speed."""
    int8 = [r for r in rows if str(r["batch"]).startswith("int8")]
    kept = [r for r in int8 if r["top1_agreement"] >= 0.95]
    parts = ", ".join(f"{r['batch']}: {r['vs_128']:.2f}x, top-1 agreement {r['top1_agreement']:.2f}" for r in int8)
    if not kept:
        return f"no int8 variant keeps the neighbours ({parts}); the keys stay float32"
    best = max(kept, key=lambda r: r["vs_128"])
    return f"{best['batch']} keeps them at {best['vs_128']:.2f}x ({parts})"


if __name__ == "__main__":
    main()
