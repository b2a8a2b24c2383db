"""Which RETRO set-up wins in equal wall time on the CPU demo? (Why the CPU demo uses k = 1.)

In the demo RETRO and the baseline each train for the same wall time, so a RETRO variant is worth
what it reaches in the steps its cost per step buys. This benchmark separates the two factors, so
that a loaded machine cannot blur them:

1. cost: seconds per training step of each variant and of the baseline (the same decoder without
   retrieval), the variants interleaved step by step (load drifts alike for all), median; the
   ratio to the baseline's step (--ratio-threads 1 keeps the ratios steady on a loaded machine,
   where small parallel ops stall in each other's thread barriers);
2. quality at equal wall time: each variant trains for round(baseline_steps / ratio) steps (the
   baseline's step count in the demo's 2 minutes, measured there), the baseline for baseline_steps,
   all with the demo's recipe and seed, at fixed step counts (a wall-clock budget would put the
   machine's load into the result); then bits per byte on the demo's held-out files, RETRO[ON]
   with the variant's k.

    python -m benchmarks.demo_neighbours --db runs/demo/db [--baseline-steps 369]

Variants: k2 (the paper's two neighbours, CCA in layers 1 and 3), k1 (one neighbour), k2-cca1 (two
neighbours, CCA in layer 1 only). Writes benchmarks/results/demo_neighbours-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import machine_name, write_results

VARIANTS = {"k2": (2, {}), "k1": (1, {}), "k2-cca1": (2, {"cca_layers": (1,)})}


def step_seconds(config, variants: dict, batch: int, seq_chunks: int, steps: int = 12) -> dict[str, float]:
    """Median seconds of one training step (retro.training.step, as the demo's training runs it: loss,
    backward, clipping at retro train's default 1.0, AdamW) on random tokens for the baseline
    ("baseline", no neighbours) and each variant, interleaved step by step."""
    from retro.training.data import Batch
    from retro.model.model import RetroModel
    from retro.training.step import train_step

    torch.manual_seed(0)
    n = seq_chunks * config.chunk_size
    vocab = config.vocab_size
    tokens, targets = torch.randint(0, vocab, (batch, n)), torch.randint(0, vocab, (batch, n))
    setups = {}
    for name, (k, over) in {"baseline": (1, {}), **variants}.items():
        model = RetroModel(type(config).from_dict({**config.to_dict(), "num_neighbours": k, **over}))
        neighbours = (None if name == "baseline"
                      else torch.randint(0, vocab, (batch, seq_chunks, k, 2 * config.chunk_size)))
        setups[name] = (model, neighbours, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(steps):
        for name, (model, neighbours, opt) in setups.items():
            t = time.perf_counter()
            train_step(model, opt, Batch(tokens, targets, neighbours, None), grad_clip=1.0)  # the demo's step
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v[2:]) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="runs/demo/db")
    p.add_argument("--out", default="runs/demo_neighbours")
    p.add_argument("--baseline-steps", type=int, default=369,
                   help="the baseline's steps in the demo's 2 minutes (its log says)")
    p.add_argument("--ratio-threads", type=int, default=None, help="threads while timing steps (default: all)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args()

    from retro.app.demo.recipes import RECIPES
    from retro.evaluation.evaluate import prepare, score, summarise
    from retro.model.model import preset
    from retro.retrieval import Retriever
    from retro.training.train import TrainOptions, load_model, train

    DEMO_CPU_ENCODER = dict(RECIPES["scratch-cpu"].encoder)
    retriever = Retriever.load(a.db)
    config = preset("tiny", **DEMO_CPU_ENCODER, vocab_size=retriever.db.tokenizer.vocab_size, max_seq_len=512)
    variants = {v: VARIANTS[v] for v in a.variants}
    threads = torch.get_num_threads()
    torch.set_num_threads(a.ratio_threads or threads)
    seconds = step_seconds(config, variants, batch=4, seq_chunks=8)
    torch.set_num_threads(threads)
    print({k: round(v, 3) for k, v in seconds.items()}, flush=True)

    common = dict(db=a.db, config="tiny", batch_size=4, seq_chunks=8, lr=3e-3, warmup=20, save_every=100_000,
                  seed=0, progress=False)
    rows = []
    for name, (k, over) in {"baseline": (1, {}), **variants}.items():
        ratio = seconds[name] / seconds["baseline"]
        steps = round(a.baseline_steps / ratio)
        out = Path(a.out) / name
        if not (out / "checkpoint" / "state.json").exists():
            train(TrainOptions(out=str(out), overrides={**DEMO_CPU_ENCODER, **over}, steps=steps, k=k,
                               retrieval=name != "baseline", **common), log=lambda *_: None)
        model, _ = load_model(out)
        es = prepare(retriever, k, seq_len=model.cfg.max_seq_len)
        on = score(model, es, True) if name != "baseline" else None
        res = summarise(es, on, score(model, es, False))
        rows.append({"variant": name, "k": k if name != "baseline" else 0,
                     "cca_layers": ("-" if name == "baseline"
                                    else ",".join(map(str, over.get("cca_layers", config.cca_layers)))),
                     "step_s": seconds[name], "ratio": ratio, "steps": steps,
                     "bpb_on": res.bpb_on if on is not None else res.bpb_off, "bpb_off": res.bpb_off})
        print(rows[-1], flush=True)
    base = rows[0]["bpb_on"]
    for r in rows:
        r["below_baseline_pct"] = 100 * (base - r["bpb_on"]) / base
        r.update(on=f"{r['bpb_on']:.4f}", off=f"{r['bpb_off']:.4f}", below=f"{r['below_baseline_pct']:.1f}")

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.bar([f"{r['variant']}\n{r['steps']} steps" for r in rows], [r["bpb_on"] for r in rows],
               color=["C7"] + ["C0"] * (len(rows) - 1))
        ax.axhline(0.9 * base, color="C3", ls="--", label="10% below the baseline")
        ax.set_ylabel("bits/byte, held-out files (RETRO[ON])")
        ax.set_ylim(0.8 * min(r["bpb_on"] for r in rows), 1.05 * max(r["bpb_on"] for r in rows))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    write_results("demo_neighbours", machine_name(), rows, [
        ("variant", "variant"), ("k", "k"), ("cca_layers", "CCA layers"), ("step_s", "s/step"),
        ("ratio", "x baseline step"), ("steps", "steps in the baseline's time"), ("on", "bits/byte (ON)"),
        ("off", "bits/byte (OFF)"), ("below", "% below baseline")], [
        f"database {a.db} ({retriever.db.num_chunks} chunks); the demo's CPU model: tiny decoder, encoder 1 x 64, "
        "batch 4 x 512 tokens, AdamW lr 3e-3, seed 0",
        f"steps: the baseline's {a.baseline_steps} (its count in the demo's 2 minutes), each variant "
        "round(baseline steps / step-cost ratio); the ratios come from steps on random tokens, interleaved, "
        f"with {a.ratio_threads or threads} thread(s)",
        "bits/byte of the baseline row: the baseline model (no retrieval)"], plot)


if __name__ == "__main__":
    main()
