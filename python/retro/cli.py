"""The command line: `retro <command>` (or `python -m retro <command>`). Every user mistake (a
bad option, a value out of range, a missing file) ends as one line `retro <command>: error: ...`
on stderr and exit status 2, never a traceback; numbers are range-checked before any work starts.
RETRO_TRACEBACK=1 in the environment re-raises instead (for debugging)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .checks import check_float, check_int, check_neighbours
from .errors import RetroError
from .options import add_options, options_from_args


class UsageError(Exception):
    """A command line argparse rejects: `prog` (e.g. "retro train") and argparse's message."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage text): main() prints them."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


def _cmd_tokenizer(a) -> None:
    from .retrieval import SentencePieceTokenizer
    from .retrieval.corpus import read_documents

    check_int("--vocab-size", a.vocab_size, 16)
    tok = SentencePieceTokenizer.train(read_documents(a.corpus, a.text_field), a.vocab_size)
    tok.save(a.out)
    print(f"[tokenizer] {tok.vocab_size} pieces -> {a.out}")


def _cmd_build_db(a) -> None:
    from .retrieval import BuildOptions, build_database

    build_database(options_from_args(BuildOptions, a))


def _cmd_neighbours(a) -> None:
    from .retrieval import compute_neighbours

    check_neighbours("-k", a.k)
    check_int("--extra", a.extra, 0)
    check_int("--block-size", a.block_size, 1)
    compute_neighbours(a.db, k=a.k, extra=a.extra, block=a.block_size, device=a.device, index=a.index)


def _cmd_query(a) -> None:
    from .retrieval import Retriever

    check_neighbours("-k", a.k)
    r = Retriever.load(a.db, device=a.device, index=a.index)
    res = r.search([a.text], a.k)
    for rank, (cid, dist) in enumerate(zip(res.ids[0], res.distances[0])):
        if cid < 0:
            print(f"#{rank}: (no neighbour)")
            continue
        doc = int(r.db.chunk_doc[cid])
        text = r.db.tokenizer.decode(res.tokens[0, rank][res.mask[0, rank]])
        print(f"#{rank}: chunk {cid} of document {doc}, distance {dist:.4f}\n{text}\n{'-' * 60}")


def parse_overrides(items) -> dict:
    """--set FIELD=VALUE items -> {field: value}: JSON values (numbers, lists, true/false), else
    the plain string (backend=triton). TrainOptions.validate checks them against RetroConfig."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RetroError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _cmd_train(a) -> None:
    from .train import TrainOptions, train

    train(options_from_args(TrainOptions, a, overrides=parse_overrides(a.set)), **_retrofit_kwargs(a))
    from .distributed import shutdown

    shutdown()


def _cmd_convert_checkpoint(a) -> None:
    from .fsdp import convert_checkpoint

    convert_checkpoint(a.run, a.out, a.step)


def layer_list(text: str) -> tuple[int, ...]:
    """argparse type of --cca-layers: "5,8,11" -> (5, 8, 11)."""
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated 0-based layer indices such as 5,8,11, "
                                         f"got {text!r}")
    return layers


def _retrofit_kwargs(a) -> dict:
    if getattr(a, "retrofit", None):
        from .retrofit import retrofit_factory

        return {"model_factory": retrofit_factory(a.retrofit, a.cca_layers)}
    return {}


def _cmd_generate(a) -> None:
    from .generate import generate
    from .retrieval import Retriever
    from .train import load_model

    from .generate import SamplingOptions
    from .retrieval import ChunkDatabase

    sampling = SamplingOptions(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                               top_p=a.top_p, seed=a.seed, k=a.k)
    sampling.validate()
    model, _ = load_model(a.run, device=a.device)
    retriever = Retriever.load(a.db, device=a.device) if not a.no_retrieval else None
    gens = generate(model, retriever, a.prompt, **asdict(sampling),
                    tokenizer=None if retriever is not None else ChunkDatabase(a.db).tokenizer, compile=a.compile)
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

    check_neighbours("-k", a.k)
    check_int("--max-documents", a.max_documents, 1, optional=True)
    check_float("--db-fraction", a.db_fraction, 0, 1, low_open=True, optional=True)
    check_int("--seed", a.seed, 0)
    model, _ = load_model(a.run, device=a.device)
    retriever = Retriever.load(a.db, device=a.device)
    if a.overlap:
        from .evaluate_overlap import overlap_report

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

    run_demo(options_from_args(DemoOptions, a))


def _cmd_dedup(a) -> None:
    from .dedup import dedup_against

    dedup_against(a.eval, a.train, threshold=a.threshold, out=a.out, text_field=a.text_field)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="retro", description="RETRO: retrieval database, training, decoding, evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer on a corpus")
    t.add_argument("corpus")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--out", required=True)
    t.add_argument("--text-field", default="text")
    t.set_defaults(handler=_cmd_tokenizer)

    from .retrieval.build import BuildOptions

    b = sub.add_parser("build-db", help="build the chunk database, its embeddings and index")
    add_options(b, BuildOptions)
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

    from .train import TrainOptions

    tr = sub.add_parser("train", help="train a RETRO model on a database")
    add_options(tr, TrainOptions)
    tr.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a RetroConfig field")
    tr.add_argument("--retrofit", help="a Hugging Face causal LM to retrofit: a name, a folder or a .gguf file")
    tr.add_argument("--cca-layers", type=layer_list, help="e.g. 5,8,11")
    tr.set_defaults(handler=_cmd_train)

    cc = sub.add_parser("convert-checkpoint", help="a sharded (--fsdp) checkpoint as the single-file one "
                                                   "generate and evaluate load")
    cc.add_argument("run")
    cc.add_argument("--step", type=int, help="which saved step (default: the newest)")
    cc.add_argument("--out", help="the run folder to write OUT/checkpoint into (default: RUN)")
    cc.set_defaults(handler=_cmd_convert_checkpoint)

    g = sub.add_parser("generate", help="continue prompts, retrieving at every chunk boundary")
    g.add_argument("run")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--db", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=50, help="0: no top-k cut")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-k", "--k", type=int)
    g.add_argument("--show-neighbours", action="store_true", help="print what was retrieved")
    g.add_argument("--no-retrieval", action="store_true", help="RETRO[OFF]")
    g.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step (torch.compile; CUDA graphs on a GPU)")
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

    from .demo import DemoOptions

    d = sub.add_parser("demo", help="the whole pipeline on an embedded corpus: RETRO against a baseline")
    add_options(d, DemoOptions)
    d.set_defaults(handler=_cmd_demo)
    return p


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (an OSError with its file name)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Runs `retro ARGV`; returns the exit status (2 after a one-line error on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prog = "retro"
    try:
        args, unknown = build_parser().parse_known_args(argv)
        prog = f"retro {args.command}"
        if unknown:
            raise UsageError(prog, f"unrecognized arguments: {' '.join(unknown)}")
        args.handler(args)
    except UsageError as exc:
        return _fail(exc.prog, exc.message)
    except (ValueError, TypeError, OSError) as exc:  # RetroError is a ValueError
        if os.environ.get("RETRO_TRACEBACK"):
            raise
        return _fail(prog, _one_line(exc))
    return 0
