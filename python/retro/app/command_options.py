"""The options of the commands whose Python functions take plain arguments (tokenizer,
neighbours, query, convert-checkpoint, generate, evaluate, dedup-against), and train's flags
beyond TrainOptions. Each field is a command-line flag (options.add_options): its default and
help text are written here only. validate() raises RetroError for a value out of range, before
any work starts. build-db, train and demo take BuildOptions, TrainOptions and DemoOptions."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..base.checks import check_float, check_int, check_neighbours
from ..base.defaults import EXTRA_NEIGHBOURS, NEIGHBOURS
from ..base.errors import RetroError
from ..base.options import option

DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda if there is one)"
INDEX_HELP = "torch: search exactly in torch instead of the faiss index (default: the database's own index)"


@dataclass
class TokenizerOptions:
    corpus: str = option(help="the corpus: a folder, a text file or a .jsonl file", positional=True)
    out: str = option(help="the tokenizer model file to write")
    vocab_size: int = option(8000, "pieces in the vocabulary")
    text_field: str = option("text", "the field holding a document's text in .jsonl files")

    def validate(self) -> None:
        check_int("--vocab-size", self.vocab_size, 16)


@dataclass
class NeighboursOptions:
    db: str = option(help="the database folder", positional=True)
    k: int = option(NEIGHBOURS, "neighbours per chunk", short="-k")
    extra: int = option(EXTRA_NEIGHBOURS, "extra candidates kept for packed training sequences")
    block_size: int = option(8192, "chunks searched per batch")
    index: str | None = option(None, INDEX_HELP, choices=["torch"])
    device: str | None = option(None, DEVICE_HELP)

    def validate(self) -> None:
        check_neighbours("-k", self.k)
        check_int("--extra", self.extra, 0)
        check_int("--block-size", self.block_size, 1)


@dataclass
class QueryOptions:
    db: str = option(help="the database folder", positional=True)
    text: str = option(help="the text whose neighbours are printed", positional=True)
    k: int = option(4, "neighbours to print", short="-k")
    index: str | None = option(None, INDEX_HELP, choices=["torch"])
    device: str | None = option(None, DEVICE_HELP)

    def validate(self) -> None:
        check_neighbours("-k", self.k)


@dataclass
class ConvertOptions:
    run: str = option(help="the run folder of a --fsdp training", positional=True)
    step: int | None = option(None, "which saved step (default: the newest)")
    out: str | None = option(None, "the run folder to write OUT/checkpoint into (default: RUN)")

    def validate(self) -> None:
        check_int("--step", self.step, 0, optional=True)


@dataclass
class GenerateOptions:
    """generate's flags besides the sampling ones (generate.SamplingOptions)."""
    run: str = option(help="the run folder (its checkpoint)", positional=True)
    prompt: tuple[str, ...] = option(help="one or more prompts", positional=True)
    db: str = option(help="the database to retrieve from (its tokenizer also without retrieval)")
    show_neighbours: bool = option(False, "print what was retrieved")
    retrieval: bool = option(True, "--no-retrieval: generate without neighbours (RETRO[OFF])")
    compile: bool = option(False, "compile the one-token decoding step (torch.compile; CUDA graphs on a GPU)")
    device: str | None = option(None, DEVICE_HELP)


@dataclass
class ServeOptions:
    """serve's flags (retro.serve)."""
    run: str = option(help="the run folder (its checkpoint)", positional=True)
    db: str = option(help="the database to retrieve from")
    host: str = option("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "the port to listen on")
    max_batch: int = option(16, "requests decoded together (the decoding slots)")
    max_waiting: int = option(64, "requests queued while every slot is taken; more are refused (HTTP 429)")
    model_name: str | None = option(None, "the model's name in the API (default: the run folder's name)")
    log_level: str = option("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))
    device: str | None = option(None, DEVICE_HELP)
    check_every: float = option(2.0, "seconds between checks for a new generation of the database (another "
                                     "process's retro add-documents, remove-documents, compact)")

    def validate(self) -> None:
        check_float("--check-every", self.check_every, 0, low_open=True)
        check_int("--port", self.port, 0, 65535)
        check_int("--max-batch", self.max_batch, 1)
        check_int("--max-waiting", self.max_waiting, 0)


@dataclass
class EvaluateOptions:
    run: str = option(help="the run folder (its checkpoint)", positional=True)
    db: str = option(help="the database folder (its held-out documents are evaluated, unless --text)")
    text: str | None = option(None, "score this text file, folder or .jsonl(.gz) instead, retrieving from the database "
                                    "(a text that is in the database finds itself) (default: the database's "
                                    "held-out documents)")
    text_field: str = option("text", "--text: the field holding a document's text in .jsonl files")
    k: int | None = option(None, "neighbours per chunk (default: the model's, as it was trained)", short="-k")
    max_documents: int | None = option(None, "evaluate at most this many documents (default: all)")
    overlap: bool = option(False, "bits per byte against chunk overlap with the neighbours")
    overlap_out: str | None = option(None, "folder for the overlap table and plot (default: RUN)")
    db_fraction: float | None = option(None, "retrieve from a seeded random part (0, 1] of the database's "
                                             "training documents only (searched exactly) (default: all of it)")
    seed: int = option(0, "which part --db-fraction takes")
    device: str | None = option(None, DEVICE_HELP)

    def validate(self) -> None:
        check_neighbours("-k", self.k, optional=True)
        check_int("--max-documents", self.max_documents, 1, optional=True)
        if self.text is not None and self.overlap:
            raise RetroError(f"--overlap reports on the database's held-out documents; it does not take --text "
                             f"{self.text!r}: leave one out")
        check_float("--db-fraction", self.db_fraction, 0, 1, low_open=True, optional=True)
        check_int("--seed", self.seed, 0)


@dataclass
class DedupOptions:
    eval: str = option(help="the evaluation corpus", positional=True)
    train: str = option(help="the training corpus", positional=True)
    threshold: float = option(0.8, "13-gram Jaccard similarity from which a training document leaks")
    out: str | None = option(None, "write the kept training documents here (.jsonl) (default: only report the leaks)")
    text_field: str = option("text", "the field holding a document's text in .jsonl files")

    def validate(self) -> None:
        check_float("--threshold", self.threshold, 0, 1, low_open=True)


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


@dataclass
class TrainExtras:
    """train's flags beyond TrainOptions: RetroConfig overrides and retrofitting."""
    set: tuple[str, ...] = option((), "override a RetroConfig field (repeatable), e.g. --set dim=512",
                                  metavar="FIELD=VALUE")
    retrofit: str | None = option(None, "a Hugging Face causal LM to retrofit: a name, a folder or a .gguf file "
                                         "(default: train RETRO from scratch)")
    cca_layers: tuple[int, ...] | None = option(None, "--retrofit: the CCA layers, 0-based, e.g. 5,8,11 "
                                                      "(default: the paper's spacing)", parse=layer_list)
    placement: str = option("inside", "--retrofit: CCA between a block's attention and its MLP (inside, the paper's) "
                                      "or after the block", choices=("inside", "after"))
