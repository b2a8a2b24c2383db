"""How a retrofit starts, and where its CCA sits: the same short training of a retrofitted
SmolLM2-135M (the demo's database and settings) from the copy prior or from zero-initialised CCA,
with CCA inside the blocks (between attention and MLP, the paper's) or after them; bits per byte of
the held-out files (whole model folders held out) before training (step 0) and after.

    python -m benchmarks.retrofit_init --db runs/demo/retrofit-smollm2-135m-instruct.q4-1/db \\
        --variants inside-prior,after-prior,inside-zero --steps 20

Each variant runs in its own process (--variant), so the variants can share the machine; the
results are gathered into benchmarks/results/retrofit_init-<machine>.md/.json with a plot.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine_name, pyplot, save_figure, write_results


def run_variant(db_dir: str, variant: str, steps: int, batch: int, eval_docs: int, seed: int,
                encoder_depth: int = 2) -> dict:
    from retro.training.data import TrainSequences
    from retro.app.demo.base_model import SMOLLM2, resolve_base
    from retro.app.demo.corpus import held_out_by_split
    from retro.app.demo.recipes import RECIPES, default_cca_layers
    from retro.evaluation.evaluate import prepare, score, summarise
    from retro.retrieval import Retriever
    from retro.retrieval.neighbours import load_neighbours
    from retro.retrofitting.wrapper import retrofit
    from retro.training.step import train_step

    placement, init = variant.split("-")
    torch.manual_seed(seed)
    retriever = Retriever.load(db_dir)
    db = retriever.db
    model = retrofit(resolve_base(SMOLLM2), default_cca_layers, k=2, chunk_size=db.chunk_size, backend="cpu",
                     placement=placement, encoder={"depth": encoder_depth})
    docs = held_out_by_split(db)["folder"][:eval_docs]
    span = RECIPES["retrofit-cpu"].eval_tokens
    es = prepare(retriever, 2, documents=docs, seq_len=span, span_tokens=span, seed=seed)
    base_nll = score(model, es, False, batch_size=4, progress=False)
    seqs = TrainSequences(db, 8, 2, load_neighbours(db_dir, 8))
    order = np.random.default_rng(seed).permutation(len(seqs))
    prior = None
    if init == "prior":
        prior = model.fit_copy_prior(seqs.batch(order[:4]))
    at_start = summarise(es, score(model, es, True, batch_size=4, progress=False), base_nll)
    params = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, t0 = [], time.perf_counter()
    for s in range(steps):
        b = seqs.batch(order[4 + batch * s: 4 + batch * (s + 1)])
        r = train_step(model, opt, b, grad_clip=1.0, lr=1e-3 * min(1.0, (s + 1) / 5))
        losses.append(float(r.nll / r.count))
    seconds = time.perf_counter() - t0
    model.eval()
    end = summarise(es, score(model, es, True, batch_size=4, progress=False), base_nll)
    return {"variant": variant, "placement": placement, "init": init, "steps": steps, "batch": batch,
            "base_bpb": end.bpb_off, "start_bpb": at_start.bpb_on, "end_bpb": end.bpb_on,
            "start_below_pct": 100 * (end.bpb_off - at_start.bpb_on) / end.bpb_off,
            "end_below_pct": 100 * (end.bpb_off - end.bpb_on) / end.bpb_off, "train_losses": losses,
            "train_seconds": seconds, "documents": end.documents, "tokens": end.tokens, "prior": prior,
            "cca_layers": list(model.cfg.cca_layers), "encoder_depth": model.cfg.enc_depth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--variants", default="inside-prior,after-prior,inside-zero")
    ap.add_argument("--variant", help="run one variant, print its JSON (used by the parent)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eval-docs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoder-depth", type=int, default=2)
    a = ap.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(run_variant(a.db, a.variant, a.steps, a.batch, a.eval_docs, a.seed,
                                                     a.encoder_depth)), flush=True)
        return
    args = ["--db", a.db, "--steps", str(a.steps), "--batch", str(a.batch), "--eval-docs", str(a.eval_docs),
            "--seed", str(a.seed), "--encoder-depth", str(a.encoder_depth)]
    procs = {v: subprocess.Popen([sys.executable, "-m", "benchmarks.retrofit_init", *args, "--variant", v],
                                 stdout=subprocess.PIPE, text=True)
             for v in a.variants.split(",")}
    rows = []
    for v, p in procs.items():
        out, _ = p.communicate()
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"variant {v} failed (exit {p.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    notes = [f"SmolLM2-135M-Instruct retrofitted (CCA at layers {rows[0]['cca_layers']}, k=2, "
             f"encoder {a.encoder_depth} layer(s)), "
             f"{a.steps} steps of {a.batch} x 512 tokens at lr 1e-3 (AdamW, 5 warm-up steps), seed {a.seed}",
             f"held-out: {rows[0]['documents']} files of whole held-out model folders, {rows[0]['tokens']} tokens "
             "(a seeded 512-token window of each)",
             "the variants ran side by side, sharing the machine (train s is not a speed comparison)"]
    columns = [("variant", "variant"), ("base_bpb", "base bits/byte"), ("start_bpb", "RETRO[ON] at step 0"),
               ("end_bpb", f"after {a.steps} steps"), ("start_below_pct", "% below base at step 0"),
               ("end_below_pct", "% below base after"), ("train_seconds", "train s")]

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in rows:
            ax.plot([0, r["steps"]], [r["start_bpb"], r["end_bpb"]], marker="o", label=r["variant"])
        ax.axhline(rows[0]["base_bpb"], color="gray", ls="--", label="base model")
        ax.set_xlabel("training steps")
        ax.set_ylabel("held-out bits per byte")
        ax.legend()
        save_figure(fig, path)

    write_results("retrofit_init", machine_name(), rows, columns, notes, plot)


if __name__ == "__main__":
    main()
