"""The command line: `retro <command>` (or `python -m retro <command>`). Every command's flags
come from its options dataclasses (commands(); options.add_options): each default and help text is
written once. A user mistake (a bad flag, a value out of range, a missing or damaged file:
argparse's errors and RetroError) ends as one line `retro <command>: error: ...` on stderr and exit
status 2, never a traceback; numbers are range-checked before any work starts. Ctrl-C (or SIGTERM)
ends as one line `retro <command>: interrupted ...` saying how to continue (build-db and train: the
same command with --resume; demo: the same command), exit status 130 (143). Any other exception is
a bug: its traceback is shown, with a line asking to report it, and the exit status is 1.
RETRO_TRACEBACK=1 in the environment shows the traceback of a RetroError or an interrupt too (for
debugging)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import traceback
from dataclasses import dataclass

from .command_options import (ConvertOptions, DedupOptions, EvaluateOptions, GenerateOptions, NeighboursOptions,
                              QueryOptions, ServeOptions, TokenizerOptions, TrainExtras)
from ..base.errors import RetroError
from ..base.interrupt import Interrupted, received_signal, terminate_as_interrupt
from ..base.options import add_options, options_from_args


class UsageError(Exception):
    """A command line argparse rejects: `prog` (e.g. "retro train") and argparse's message."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage text): main() prints them."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


def _cmd_tokenizer(o: TokenizerOptions) -> None:
    from ..retrieval import SentencePieceTokenizer
    from ..retrieval.corpus import read_documents

    tok = SentencePieceTokenizer.train(read_documents(o.corpus, o.text_field), o.vocab_size)
    tok.save(o.out)
    print(f"[tokenizer] {tok.vocab_size} pieces -> {o.out}")


def _cmd_build_db(o) -> None:
    from ..retrieval import build_database

    build_database(o)


def _cmd_neighbours(o: NeighboursOptions) -> None:
    from ..base.distributed import shutdown
    from ..retrieval import compute_neighbours

    compute_neighbours(o.db, k=o.k, extra=o.extra, block=o.block_size, device=o.device, index=o.index)
    shutdown()


def _cmd_query(o: QueryOptions) -> None:
    from ..retrieval import Retriever

    r = Retriever.load(o.db, device=o.device, index=o.index)
    res = r.search([o.text], o.k)
    for rank, (cid, dist) in enumerate(zip(res.ids[0], res.distances[0])):
        if cid < 0:
            print(f"#{rank}: (no neighbour)")
            continue
        doc = int(r.db.chunk_doc[cid])
        text = r.db.tokenizer.decode(res.tokens[0, rank][res.mask[0, rank]])
        measure = f"BM25 score {-dist:.4f}" if getattr(r.index, "kind", None) == "bm25" else f"distance {dist:.4f}"
        print(f"#{rank}: chunk {cid} of document {doc}, {measure}\n{text}\n{'-' * 60}")


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


def _cmd_train(o, extras: TrainExtras) -> None:
    from ..base.distributed import shutdown
    from ..training.train import train

    kwargs = {}
    if extras.retrofit:
        from ..retrofitting.wrapper import retrofit_factory

        kwargs["model_factory"] = retrofit_factory(extras.retrofit, extras.cca_layers, extras.placement,
                                                   settings=parse_overrides(extras.set))
        o = dataclasses.replace(o, overrides={})  # the base model gives the architecture
    else:
        o = dataclasses.replace(o, overrides=parse_overrides(extras.set))
    train(o, **kwargs)
    shutdown()


def _cmd_convert_checkpoint(o: ConvertOptions) -> None:
    from ..training.fsdp import convert_checkpoint

    convert_checkpoint(o.run, o.out, o.step)


def _cmd_generate(o: GenerateOptions, sampling) -> None:
    from ..decoding.generate import generate
    from ..retrieval import ChunkDatabase, Retriever
    from ..training.train import check_run_database, load_model

    model, state = load_model(o.run, device=o.device)
    retriever = Retriever.load(o.db, device=o.device) if o.retrieval else None
    db = retriever.db if retriever is not None else ChunkDatabase(o.db)
    check_run_database(state, db, o.run)
    _note_k("generate", sampling.k, model)
    gens = generate(model, retriever, list(o.prompt), **dataclasses.asdict(sampling),
                    tokenizer=None if retriever is not None else db.tokenizer, compile=o.compile)
    for g in gens:
        print(f"{g.prompt}\033[1m{g.text}\033[0m" if sys.stdout.isatty() else f"{g.prompt}{g.text}")
        if o.show_neighbours and retriever is not None:
            note = short_prompt_note(g, model.cfg.chunk_size)
            if note:
                print(f"  ({note})")
            for r in g.retrieved:
                for rank, (cid, text) in enumerate(zip(r["ids"], r["texts"])):
                    shown = "(none)" if text is None else text[:200].replace("\n", "\n    ")
                    print(f"  [chunk {r['chunk']} neighbour {rank}: id {cid}]\n    {shown}")
        print("=" * 60)


def short_prompt_note(g, chunk_size: int) -> str | None:
    """Why a generation (generate.Generation) shows no neighbours, or shows them late: retrieval
    happens at chunk boundaries, so a prompt shorter than one chunk has none of its own."""
    if g.prompt_tokens >= chunk_size:
        return None
    if not g.retrieved:
        return (f"no neighbours: the prompt ({g.prompt_tokens} tokens) and its continuation ({len(g.tokens)}) never "
                f"completed a chunk of {chunk_size} tokens; RETRO retrieves once per complete chunk")
    return (f"the prompt ({g.prompt_tokens} tokens) is shorter than one chunk of {chunk_size} tokens: its continuation "
            f"retrieves from token {chunk_size} on")


def _note_k(command: str, k: int | None, model) -> None:
    """A note on stderr when -k differs from the neighbours per chunk the model was trained with."""
    trained = model.cfg.num_neighbours
    if k is not None and k != trained:
        print(f"retro {command}: note: -k {k}, but the model was trained with {trained} neighbours per chunk; it "
              f"reads {k} here (leave -k out for the trained {trained})", file=sys.stderr)


def _cmd_evaluate(o: EvaluateOptions) -> None:
    from ..evaluation.evaluate import evaluate, prepare
    from ..retrieval import Retriever
    from ..retrieval.retriever import database_fraction
    from ..training.train import check_run_database, load_model

    model, state = load_model(o.run, device=o.device)
    retriever = Retriever.load(o.db, device=o.device)
    check_run_database(state, retriever.db, o.run)
    _note_k("evaluate", o.k, model)
    k = o.k if o.k is not None else model.cfg.num_neighbours
    if o.overlap:
        from ..evaluation.overlap import overlap_report

        overlap_report(model, retriever, k=k, max_documents=o.max_documents, out=o.overlap_out or o.run)
        return
    allowed = None if o.db_fraction is None else database_fraction(retriever.db, o.db_fraction, o.seed)
    texts = None
    if o.text is not None:
        from ..retrieval.corpus import read_documents

        texts = read_documents(o.text, o.text_field)
    es = prepare(retriever, k, max_documents=o.max_documents, seq_len=model.cfg.max_seq_len, allowed_chunks=allowed,
                 texts=texts)
    res = evaluate(model, retriever, k=k, eval_set=es)
    report = res.as_dict()
    if allowed is not None:
        report.update(db_fraction=o.db_fraction, db_chunks=int(len(allowed)))
    print(json.dumps(report, indent=1))


def _cmd_add_documents(o) -> None:
    from ..retrieval.update import add_documents

    add_documents(o.db, o.corpus, text_field=o.text_field, include=o.include, exclude=o.exclude, resume=o.resume,
                  device=o.device, batch_size=o.embed_batch_size)


def _cmd_remove_documents(o) -> None:
    from ..retrieval.compact import remove_documents

    remove_documents(o.db, ids=o.ids, paths=o.paths)


def _cmd_compact(o) -> None:
    from ..retrieval.compact import compact

    compact(o.db)


def _cmd_demo(o) -> None:
    from retro.app.demo import run_demo

    run_demo(o)


def _cmd_serve(o: ServeOptions) -> None:
    from ..serve import serve

    serve(o)


def _cmd_dedup(o: DedupOptions) -> None:
    from ..evaluation.dedup import dedup_against

    dedup_against(o.eval, o.train, threshold=o.threshold, out=o.out, text_field=o.text_field)


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, the options dataclasses its flags come from (the handler
    receives one instance of each, in this order) and the handler; `resumable`: interrupted at any
    point, it continues where it stopped (with --resume if it has that flag, else run again)."""
    help: str
    options: tuple
    handler: object
    resumable: bool = False


def commands() -> dict[str, Command]:
    """Every subcommand, by name (the option classes of the heavier modules imported here)."""
    from retro.app.demo import DemoOptions
    from ..decoding.generate import SamplingOptions
    from ..retrieval.build import BuildOptions
    from ..retrieval.compact import CompactOptions, RemoveOptions
    from ..retrieval.update import AddOptions
    from ..training.train import TrainOptions

    return {
        "tokenizer": Command("train a SentencePiece tokenizer on a corpus", (TokenizerOptions,), _cmd_tokenizer),
        "build-db": Command("build the chunk database, its embeddings and index", (BuildOptions,), _cmd_build_db,
                            resumable=True),
        "add-documents": Command("add a corpus's documents to a built database (no rebuild)", (AddOptions,),
                                 _cmd_add_documents, resumable=True),
        "remove-documents": Command("mark documents removed from a database (by id or path glob)", (RemoveOptions,),
                                    _cmd_remove_documents),
        "compact": Command("rewrite a database without its removed documents", (CompactOptions,), _cmd_compact,
                           resumable=True),
        "neighbours": Command("precompute the neighbours of every training chunk (own document excluded)",
                              (NeighboursOptions,), _cmd_neighbours),
        "query": Command("print the neighbours of a text", (QueryOptions,), _cmd_query),
        "train": Command("train a RETRO model on a database", (TrainOptions, TrainExtras), _cmd_train),
        "convert-checkpoint": Command("a sharded (--fsdp) checkpoint as the single-file one generate and evaluate "
                                      "load", (ConvertOptions,), _cmd_convert_checkpoint),
        "generate": Command("continue prompts, retrieving at every chunk boundary",
                            (GenerateOptions, SamplingOptions), _cmd_generate),
        "evaluate": Command("bits per byte on held-out documents, with and without retrieval",
                            (EvaluateOptions,), _cmd_evaluate),
        "serve": Command("an OpenAI-compatible HTTP server, retrieving live, with a page that shows the neighbours",
                         (ServeOptions,), _cmd_serve),
        "dedup-against": Command("find (and remove) training documents that leak evaluation ones",
                                 (DedupOptions,), _cmd_dedup),
        "demo": Command("the whole pipeline on an embedded corpus: RETRO against a baseline", (DemoOptions,),
                        _cmd_demo, resumable=True),
    }


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="retro", description="RETRO: retrieval database, training, decoding, evaluation")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in commands().items():
        sp = sub.add_parser(name, help=command.help)
        for cls in command.options:
            add_options(sp, cls)
        sp.set_defaults(command_spec=command)
    # `retro lm-eval ARGS` never reaches this parser (main hands ARGS to lm-eval's): listed for --help
    sub.add_parser("lm-eval", help="lm-evaluation-harness's command line (lm-eval's own flags) with the model "
                                   "`retro` registered: --model retro --model_args run=RUN,db=DB,retrieval=on")
    return p


def _lm_eval(argv: list[str]) -> int:
    """`retro lm-eval ARGS`: lm-eval's command line with the `retro` model registered
    (lm_eval_backend.py). Its own errors are lm-eval's; a RetroError (a bad run, database or
    model argument) is one line, as every command's."""
    prog = "retro lm-eval"
    try:
        from ..evaluation.lm_eval_backend import run_harness

        run_harness(argv)
    except RetroError as exc:
        if os.environ.get("RETRO_TRACEBACK"):
            raise
        return _fail(prog, _one_line(exc))
    return 0


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (an OSError with its file name)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _close_progress_bars() -> None:
    """Closes the progress bars still shown (a command stopped mid-stage), so that the line printed
    next starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def resume_command(argv: list[str], flag: bool = True) -> str:
    """The command line `argv` that continues it: with --resume if the command has that flag (and
    without --overwrite, which would start again), else as it was (it resumes by itself)."""
    if not flag:
        return "retro " + shlex.join(argv)
    words = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite")]
    return "retro " + shlex.join([*words, "--resume"])


def _interrupted(prog: str, argv: list[str], command: Command | None, exc: KeyboardInterrupt) -> int:
    """One line for Ctrl-C or SIGTERM: what was kept and how to continue; status 128 + the signal."""
    _close_progress_bars()
    done = getattr(exc, "done", "")
    text = f"{prog}: interrupted" + (f" {done}" if done else "")
    if command is not None and (done or command.resumable):
        flag = any(f.name == "resume" for cls in command.options for f in dataclasses.fields(cls))
        text += f"; continue with: {resume_command(argv, flag)}"
    print(text, file=sys.stderr)
    return getattr(exc, "status", 130)


def _fail(prog: str, message: str) -> int:
    _close_progress_bars()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _bug(prog: str) -> int:
    """The current exception's traceback, then a line saying it is a bug to report; status 1."""
    traceback.print_exc()
    print(f"{prog}: internal error: the traceback above is a bug in retro, not a mistake in the command; "
          "please report it with the command line and this traceback", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    """Runs `retro ARGV`; returns the exit status: 0, 2 after a one-line user error on stderr,
    130 (143) after Ctrl-C (SIGTERM), 1 after an internal error's traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # before HF_HUB_OFFLINE: lm-eval's tasks download their datasets
        return _lm_eval(argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prog, spec = "retro", None
    try:
        with terminate_as_interrupt():
            args, unknown = build_parser().parse_known_args(argv)
            prog = f"retro {args.command}"
            if unknown:
                raise UsageError(prog, f"unrecognized arguments: {' '.join(unknown)}")
            spec = args.command_spec
            options = [options_from_args(cls, args) for cls in spec.options]
            for o in options:
                if hasattr(o, "validate"):
                    o.validate()
            spec.handler(*options)
    except KeyboardInterrupt as exc:
        if os.environ.get("RETRO_TRACEBACK"):  # where it was when stopped (a command that hangs)
            raise
        return _interrupted(prog, argv, spec, exc)
    except UsageError as exc:
        return _fail(exc.prog, exc.message)
    except RetroError as exc:
        if os.environ.get("RETRO_TRACEBACK"):
            raise
        return _fail(prog, _one_line(exc))
    except Exception:  # noqa: BLE001 - anything else is a bug: shown, not hidden
        signum = received_signal()
        if signum is not None and not os.environ.get("RETRO_TRACEBACK"):  # raised by what the signal stopped
            return _interrupted(prog, argv, spec, Interrupted(signum))
        return _bug(prog)
    return 0
