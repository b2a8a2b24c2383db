"""The demo's recipes as data: how `retro demo` trains and measures, from scratch or RETROfitting a
pretrained LM, on the CPU or on a GPU. Every number in which the four runs differ is here; an option
given on the command line wins over its recipe's value."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from retro.retrieval.embedder import DEFAULT_EMBEDDER
from retro.retrieval.static_embedder import STATIC_PREFIX


def default_cca_layers(depth: int) -> tuple[int, ...]:
    """The CPU's CCA layers of a retrofit: every third block of the upper third, the last included
    (e.g. 23, 26, 29 of 30): backpropagation then runs through a third of the frozen blocks."""
    return tuple(range(depth - 1, depth - 1 - depth // 3, -3))[::-1]


@dataclass(frozen=True)
class Recipe:
    """How one kind of demo run trains and measures.

    train_minutes: RETRO's training time (the baseline as long); None: `steps` steps. steps: the
    steps, or their cap when it trains for a time. encoder: the neighbour encoder's settings (from
    scratch: config overrides, when no --config is given; retrofit: retrofit()'s `encoder`).
    eval_documents / eval_tokens: held-out documents per split (None: all) / tokens scored of each,
    a seeded span (None: whole); eval_window: tokens per evaluation window (None: the model's
    context). shown: retrievals whose neighbours are printed after the continuation."""
    name: str
    retrofit: bool
    train_minutes: float | None
    steps: int
    k: int
    embedder: str
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    save_every: int
    eval_documents: int | None
    eval_tokens: int | None
    eval_window: int | None = None
    eval_batch_size: int = 16
    config: str | None = None              # from scratch: the model preset (a retrofit: the base model's)
    encoder: Mapping | None = None
    vocab_size: int | None = None          # from scratch: the SentencePiece vocabulary it trains
    target_recall: float = 0.95            # the index's 10-recall@10 that nprobe is tuned to
    cca_layers: Callable[[int], tuple[int, ...]] | None = None  # a retrofit: None is the paper's spacing
    baseline_step_cap: int = 4             # from scratch: the baseline's steps at most this many times RETRO's
    shown: int = 2
    stop_at_eos: bool = True


_SCRATCH = dict(retrofit=False, lr=3e-3, warmup=20, weight_decay=0.1, save_every=50, eval_documents=None,
                vocab_size=4000)
_RETROFIT = dict(retrofit=True, k=2, steps=10_000, batch_size=2, lr=1e-3, warmup=5, weight_decay=0.0, save_every=25,
                 eval_tokens=512, eval_window=512, eval_batch_size=4, target_recall=0.8, shown=1, stop_at_eos=False)

RECIPES = {r.name: r for r in (
    # the tiny decoder with a one-layer, 64-wide encoder, which the k x 2m neighbour tokens of every
    # chunk (4x the decoder's tokens) make the costliest part of a step; one neighbour: in equal
    # training time the steps a cheaper step buys outweigh the second (benchmarks/results/demo_neighbours-*.md);
    # 3 minutes hold the demo's 10 on a slower machine; every held-out document on a seeded span
    # (the gain varies far more from document to document than within one), which bounds the time
    Recipe("scratch-cpu", train_minutes=3.0, steps=10_000, k=1, embedder=STATIC_PREFIX + DEFAULT_EMBEDDER,
           batch_size=4, eval_tokens=2048, config="tiny",
           encoder=MappingProxyType({"enc_dim": 64, "enc_heads": 2, "enc_head_dim": 32, "enc_depth": 1}), **_SCRATCH),
    # the paper's 172M decoder and k, its neighbour encoder 512 wide (< 150M parameters), whole documents
    Recipe("scratch-gpu", train_minutes=None, steps=1200, k=2, embedder=DEFAULT_EMBEDDER, batch_size=16,
           eval_tokens=None, config="172M", encoder=MappingProxyType({"enc_dim": 512, "enc_heads": 8}), **_SCRATCH),
    # measured: benchmarks/results/retrofit_demo-*.md: CCA in the upper blocks only, so that
    # backpropagation runs through few frozen blocks; a one-layer encoder
    Recipe("retrofit-cpu", train_minutes=6.0, embedder=STATIC_PREFIX + DEFAULT_EMBEDDER, eval_documents=20,
           encoder=MappingProxyType({"depth": 1}), cca_layers=default_cca_layers, **_RETROFIT),
    Recipe("retrofit-gpu", train_minutes=10.0, embedder=DEFAULT_EMBEDDER, eval_documents=None, **_RETROFIT),
)}


def recipe_for(retrofit: bool, on_gpu: bool) -> Recipe:
    return RECIPES[f"{'retrofit' if retrofit else 'scratch'}-{'gpu' if on_gpu else 'cpu'}"]
