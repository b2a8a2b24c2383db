"""Does the gain grow with the database? (The paper's Fig. 1, right, at small scale.)

Evaluates one trained RETRO model on the held-out documents while retrieving from 1/8, 1/4, 1/2
and all of its database's training documents (seeded random parts, each inside the next, searched
exactly), next to RETRO[OFF] and, when given, the baseline trained without retrieval. Run it on
the demo's outputs:

    python -m benchmarks.database_size --run runs/demo/run --db runs/demo/db --baseline runs/demo/baseline

Writes benchmarks/results/database_size-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.harness import machine_name, write_results

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo/run")
    p.add_argument("--db", default="runs/demo/db")
    p.add_argument("--baseline", default=None, help="a run trained without retrieval (optional)")
    p.add_argument("-k", "--k", type=int, default=None, help="neighbours per chunk (default: the model's k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args()

    from retro.evaluation.evaluate import bits_per_byte, prepare, score, summarise
    from retro.retrieval import Retriever
    from retro.retrieval.retriever import database_fraction
    from retro.training.train import load_model

    model, state = load_model(a.run, device=a.device)
    a.k = a.k or model.cfg.num_neighbours
    retriever = Retriever.load(a.db, device=a.device)
    db = retriever.db
    base = prepare(retriever, a.k, seq_len=model.cfg.max_seq_len, retrieval=False)
    off = summarise(base, None, score(model, base, False)).bpb_off
    baseline = None
    if a.baseline:
        bmodel, _ = load_model(a.baseline, device=a.device)
        baseline = summarise(base, None, score(bmodel, base, False)).bpb_off
    rows = []
    for f in FRACTIONS:
        allowed = database_fraction(db, f, a.seed)
        es = prepare(retriever, a.k, seq_len=model.cfg.max_seq_len, allowed_chunks=allowed)
        on = bits_per_byte(score(model, es, True), es.group_bytes)  # RETRO[OFF] does not change: scored once above
        rows.append({"fraction": f, "chunks": int(len(allowed)),
                     "documents": int(len(np.unique(db.chunk_doc[allowed]))), "bpb_on": on, "bpb_off": off,
                     "gain_vs_off_pct": 100 * (off - on) / off,
                     **({} if baseline is None else {"bpb_baseline": baseline,
                                                     "gain_vs_baseline_pct": 100 * (baseline - on) / baseline})})
        print(rows[-1], flush=True)

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        chunks = [r["chunks"] for r in rows]
        ax.plot(chunks, [r["bpb_on"] for r in rows], "o-", label="RETRO[ON]")
        ax.axhline(off, ls="--", color="gray", label="RETRO[OFF]")
        if baseline is not None:
            ax.axhline(baseline, ls=":", color="black", label="baseline (no retrieval)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("database size at evaluation (chunks)")
        ax.set_ylabel("bits per byte (held-out)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    columns = [("fraction", "database fraction"), ("chunks", "chunks"), ("documents", "documents"),
               ("bpb_on", "bits/byte RETRO[ON]"), ("bpb_off", "bits/byte RETRO[OFF]"),
               ("gain_vs_off_pct", "gain vs OFF %")]
    if baseline is not None:
        columns += [("bpb_baseline", "bits/byte baseline"), ("gain_vs_baseline_pct", "gain vs baseline %")]
    write_results("database_size", machine_name(a.device or "cpu"), rows, columns, [
        f"model: {a.run} ({state['step']} steps), database {a.db} ({db.num_chunks} chunks), k={a.k}",
        "each fraction is a seeded random part of the training documents (nested), searched exactly",
        "held-out documents and their scored tokens are the same in every row"], plot)


if __name__ == "__main__":
    main()
