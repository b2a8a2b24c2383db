"""`retro demo`: the whole pipeline on an embedded default corpus that every machine with Python
has, the standard library's own source files: build the database (a subset), train the tiny
model for a few minutes, report bits per byte with and without retrieval, and continue a held-out
prompt, printing what was retrieved. Each stage resumes if the demo is run again."""
from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import torch

from .errors import RetroError


def default_corpus() -> str:
    return sysconfig.get_paths()["stdlib"]


def python_files(root: str) -> list[Path]:
    """The .py files under root, installed packages (site-packages, dist-packages) left out: for
    the standard library's folder, its own sources."""
    return sorted(p for p in Path(root).rglob("*.py")
                  if p.is_file() and not {"site-packages", "dist-packages"} & set(p.parts))


def sample_corpus(root: str, n: int, seed: int, out: Path) -> Path:
    """A seeded random sample of n Python files under root (installed packages left out), written
    atomically to out as .jsonl (one document per file)."""
    import numpy as np

    from .atomic import write_bytes
    from .retrieval.corpus import CorpusReport, iter_documents

    files = python_files(root)
    if len(files) < 3:
        raise RetroError(f"{root!r} has {len(files)} Python files; the demo needs at least 3")
    pick = sorted(np.random.default_rng(seed).choice(len(files), min(n, len(files)), replace=False))
    lines, report = [], CorpusReport()
    for i in pick:
        for text in iter_documents(files[i], report=report):
            lines.append(json.dumps({"text": text, "path": str(files[i].relative_to(root))}))
    write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


def run_demo(corpus: str | None = None, out: str = "runs/demo", max_documents: int = 120, train_minutes: float = 4.0,
             eval_documents: int | None = None, k: int = 2, device: str | None = None, prompt: str | None = None,
             max_new_tokens: int = 96, seed: int = 0, log=print) -> dict:
    from .evaluate import evaluate
    from .generate import generate
    from .retrieval import BuildOptions, Retriever, build_database, compute_neighbours
    from .train import TrainOptions, load_model, train

    t0 = time.time()
    out = Path(out)
    db_dir, run_dir = out / "db", out / "run"
    on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if corpus is None:
        corpus = str(out / "stdlib-sample.jsonl")
        if not Path(corpus).exists():
            sample_corpus(default_corpus(), max_documents, seed, Path(corpus))
        log(f"[demo] 1/5 database from {max_documents} files sampled from {default_corpus()} -> {db_dir}")
    else:
        log(f"[demo] 1/5 database from {corpus} (at most {max_documents} documents) -> {db_dir}")
    if not (db_dir / "manifest.json").exists():
        build_database(BuildOptions(corpus=corpus, out=str(db_dir), vocab_size=4000, chunk_size=64,
                                    valid_fraction=0.05, max_documents=max_documents, seed=seed,
                                    resume=(db_dir / "build_state.json").exists(), device=device,
                                    block_size=1024), log=log)
    log(f"[demo] 2/5 neighbours of every training chunk ({time.time() - t0:.0f} s)")
    compute_neighbours(db_dir, k=k, extra=6, device=device, log=log)
    log(f"[demo] 3/5 training the tiny model for {train_minutes:g} min ({time.time() - t0:.0f} s)")
    if not (run_dir / "checkpoint" / "state.json").exists() or \
            json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] < \
            json.loads((run_dir / "checkpoint" / "state.json").read_text())["total_steps"]:
        train(TrainOptions(db=str(db_dir), out=str(run_dir), config="tiny", steps=100_000,
                           batch_size=16 if on_gpu else 8, seq_chunks=4, lr=2e-3, warmup=20, k=k, save_every=50,
                           time_budget=train_minutes * 60, seed=seed, device=device,
                           resume=(run_dir / "checkpoint").exists()), log=log)
    model, state = load_model(run_dir, device=device)
    log(f"[demo]    trained {state['step']} steps")
    retriever = Retriever.load(db_dir, device=device)
    log(f"[demo] 4/5 bits per byte on {eval_documents or 'all'} held-out documents ({time.time() - t0:.0f} s)")
    res = evaluate(model, retriever, k=k, max_documents=eval_documents)
    log(f"[demo]    RETRO[ON]  {res.bpb_on:.4f} bits/byte\n[demo]    RETRO[OFF] {res.bpb_off:.4f} bits/byte"
        f"\n[demo]    ({res.documents} documents, {res.bytes} bytes, {res.tokens} tokens, k={k})")
    if prompt is None:
        d = retriever.db.documents("valid")[0]
        prompt = retriever.db.tokenizer.decode(retriever.db.document_tokens(d)[:130])
    log(f"[demo] 5/5 generating ({time.time() - t0:.0f} s)")
    g = generate(model, retriever, [prompt], max_new_tokens=max_new_tokens, temperature=0.7, top_k=40,
                 top_p=0.95, seed=seed)[0]
    log("=" * 70 + f"\nPROMPT:\n{prompt}\n" + "-" * 70 + f"\nCONTINUATION:\n{g.text}\n" + "-" * 70)
    for r in g.retrieved[-2:]:
        for rank, text in enumerate(r["texts"]):
            snippet = (text or "(none)")[:300].replace("\n", "\n    ")
            log(f"retrieved for chunk {r['chunk']}, neighbour {rank} (chunk id {r['ids'][rank]}):\n    {snippet}")
    log(f"[demo] done in {time.time() - t0:.0f} s")
    return {"eval": res.as_dict(), "steps": state["step"], "seconds": time.time() - t0, "generation": g.text}


def check_args(train_minutes: float, max_documents: int) -> None:
    if train_minutes <= 0:
        raise RetroError(f"--train-minutes must be > 0, got {train_minutes}")
    if max_documents < 3:
        raise RetroError(f"--max-documents must be >= 3 (some are held out), got {max_documents}")
