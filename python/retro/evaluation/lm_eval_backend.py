"""The `retro` model of lm-evaluation-harness (lm-eval): a RETRO model (a run, a saved model or a
retrofit) scored and decoded with its database, retrieval on or off.

    retro lm-eval --model retro --model_args run=RUN,db=DB,retrieval=on,k=2 --tasks lambada_openai

(`retro lm-eval ARGS` is lm-eval's own command line, `lm-eval ARGS`, with this model registered:
the installed lm-eval has no entry point through which a package adds a model.) From Python:
`import retro.evaluation.lm_eval_backend` registers it, then `lm_eval.simple_evaluate(model="retro", ...)`,
or pass `RetroLM(run=..., db=...)` itself as the model.

Retrieval is RETRO's, causal: each complete chunk of m tokens of what the model reads is looked
up by its own tokens, and chunk u's neighbours reach positions u*m + m - 1 on only, so one pass
over context + continuation scores every continuation token from its past alone.
- loglikelihood(context, continuation): the continuation's log-probability given the context
  (context and continuation tokenised as lm-eval's Hugging Face model does: trailing spaces of the
  context move to the continuation, the continuation's tokens are those of the whole text after
  the context's); the last max_length + 1 tokens are read; an empty context is the tokenizer's
  end-of-text token.
- loglikelihood_rolling(text): the text's total log-likelihood as `retro evaluate` scores it
  (evaluate.prepare and evaluate.score): windows of max_length tokens, every token but the first
  scored (the model never predicts a document's first token: it trains without a start token).
- generate_until(context, gen_kwargs): retro.generate's decoding (retrieval at every chunk
  boundary) until a string of `until`, end of text or max_gen_toks tokens (default 256); greedy
  unless do_sample (then temperature, top_k and top_p); the context keeps its last
  max_length - max_gen_toks tokens.
"""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import torch
import torch.nn.functional as F

from retro.base.progress import progress_bar

from ..base.checks import check_float, check_int, check_neighbours
from ..base.errors import RetroError
from .evaluate import prepare, score
from ..decoding.generate import continue_inputs
from ..decoding.inputs import check_database, tokens_for_model
from ..retrofitting.load import from_pretrained
from ..retrieval import ChunkDatabase, Retriever

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # the optional dependency
    raise RetroError("the lm-evaluation-harness backend needs lm-eval: pip install 'retro-kernels[lmeval]'") from exc

log = logging.getLogger(__name__)
SWITCH = {"on": True, "off": False, True: True, False: False}  # lm-eval parses true/false to bools
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def positive_int(name: str, value) -> int:
    """`value` (an int, or digits as lm-eval's command line passes them) as an int >= 1."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return check_int(name, value, 1)


@register_model("retro")
class RetroLM(LM):
    """lm-eval's model interface over a RETRO model and its database (model_args):
    run: a run folder, a saved model folder or a hub name (retro.from_pretrained); db: the
    database folder, the one the model was trained on; retrieval: on (RETRO[ON]) or off
    (RETRO[OFF], the database's tokenizer alone); k: neighbours per chunk (default: the model's);
    device (lm-eval's --device; its default cuda:0 falls back to the CPU where there is no GPU);
    batch_size: sequences per forward pass; max_length: tokens the model reads at once
    (default: its max_seq_len); seed: the sampling seed of do_sample generations. From Python,
    model= an in-memory RetroModel or RetrofittedLM (e.g. a fresh retro.retrofit(...)) instead of
    run; it stays on its device."""

    def __init__(self, run=None, db=None, retrieval="on", k=None, device=None, batch_size=1, max_length=None, seed=0,
                 max_batch_size=None, model=None):
        super().__init__()
        if (run is None) == (model is None):
            raise RetroError("give run= (a run folder, a saved model or a hub name) or, from Python, model= (one of "
                             f"them), got run={run!r} and model={type(model).__name__}")
        if db is None:
            raise RetroError("db= (the database folder the model reads) is required")
        if isinstance(retrieval, str):
            retrieval = retrieval.strip().lower()
        if retrieval not in SWITCH:
            raise RetroError(f"retrieval must be on or off, got {retrieval!r}")
        self.retrieval = SWITCH[retrieval]
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = check_int("seed", seed, 0)
        check_neighbours("k", k, optional=True)  # the arguments first, then the model (which may be large)
        if max_length is not None:
            positive_int("max_length", max_length)
        if str(device or "").startswith("cuda") and not torch.cuda.is_available():
            log.warning("retro: no CUDA device here; running on the CPU instead of %s", device)  # lm-eval's default
            device = "cpu"
        self.model = model.eval() if model is not None else from_pretrained(run, device=device)
        self.k = check_neighbours("k", self.model.cfg.num_neighbours if k is None else k)
        self.max_length = positive_int("max_length", self.model.cfg.max_seq_len if max_length is None else max_length)
        self.retriever = Retriever.load(db, device=device) if self.retrieval else None
        self.db = self.retriever.db if self.retriever is not None else ChunkDatabase(db)
        check_database(self.model, self.db)
        self.tok = self.db.tokenizer
        self._device = next(self.model.parameters()).device

    # ---- loglikelihood ----------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) requests -> (log-probability of the continuation, whether greedy
        decoding gives it), batch_size sequences per pass, the longest first."""
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = [(0.0, True)] * len(pairs)  # an empty continuation (no token) is certain
        order = sorted((i for i, (_, cont) in enumerate(pairs) if len(cont)), key=lambda i: -sum(map(len, pairs[i])))
        for start in progress_bar(range(0, len(order), self.batch_size), desc="loglikelihood", unit="batch",
                          disable=disable_tqdm):
            batch = order[start:start + self.batch_size]
            for i, res in zip(batch, self.score_continuations([pairs[i] for i in batch])):
                results[i] = res
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of context and of continuation: the whole text's tokens, split after as many as
        the context alone has (its trailing spaces moved to the continuation first, as lm-eval's
        Hugging Face model does)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok.encode([context + continuation, context])
        whole = np.asarray(whole, dtype=np.int64)
        if len(ctx) == 0:  # no context: the end-of-text token stands for it
            return np.asarray([self.end_of_text()], dtype=np.int64), whole
        return whole[:len(ctx)], whole[len(ctx):]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode([text])[0], dtype=np.int64)

    def end_of_text(self) -> int:
        eos = getattr(self.tok, "eos_id", -1)
        if eos is None or eos < 0:
            raise RetroError("an empty context stands for the tokenizer's end-of-text token, and this database's "
                             "tokenizer has none: give every request some context")
        return int(eos)

    @torch.no_grad()
    def score_continuations(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) pairs -> (log-probability, greedy) each, in one pass:
        each row reads the last max_length + 1 tokens of context + continuation but the last, with
        the neighbours of its complete chunks."""
        rows, scored = [], []
        for ctx, cont in pairs:
            full = np.concatenate([ctx, cont])[-(self.max_length + 1):]
            rows.append(full[:-1])
            scored.append(full[len(full) - min(len(cont), len(full) - 1):])
        inputs = tokens_for_model(self.model, self.retriever, rows, self.k)
        logits = self.model(inputs.tokens, inputs.neighbour_tokens, inputs.neighbour_mask)
        out = []
        for row, (inp, target) in enumerate(zip(rows, scored)):
            n, c = len(inp), len(target)
            picked = logits[row, n - c:n]
            logp = F.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), dim=-1)
            target = torch.as_tensor(target, device=logits.device)
            total = logp.gather(-1, target[:, None]).sum()
            out.append((float(total), bool((picked.argmax(-1) == target).all())))
        return out

    # ---- loglikelihood_rolling --------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """(text,) requests -> each text's total log-likelihood, as `retro evaluate` scores it."""
        texts = [req.args[0] for req in requests]
        out = np.zeros(len(texts), dtype=np.float64)
        scorable = [i for i, t in enumerate(self.tok.encode(texts)) if len(t) >= 2]  # fewer: nothing to score
        if scorable:
            # without retrieval nothing is searched: a Retriever of the database alone
            retriever = self.retriever or Retriever(self.db, None)
            es = prepare(retriever, self.k, seq_len=self.max_length, retrieval=self.retrieval,
                         texts=[texts[i] for i in scorable])
            nll = score(self.model, es, self.retrieval, batch_size=self.batch_size, progress=not disable_tqdm)
            out[scorable] = -np.bincount(es.group_doc, weights=nll, minlength=len(scorable))
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(ll))
        return [float(ll) for ll in out]

    # ---- generate_until ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """(context, gen_kwargs) requests -> the continuation of each context, cut before the first
        string of `until`. Requests with the same gen_kwargs run batch_size at a time."""
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        settings = {key: self.sampling(requests[members[0]].args[1]) for key, members in groups.items()}  # checked
        batches = [(settings[key], members[start:start + self.batch_size]) for key, members in groups.items()
                   for start in range(0, len(members), self.batch_size)]
        for sampling, batch in progress_bar(batches, desc="generate_until", unit="batch", disable=disable_tqdm):
            texts = self.continue_contexts([requests[i].args[0] for i in batch], **sampling)
            for i, text in zip(batch, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def sampling(self, gen_kwargs: dict) -> dict:
        """lm-eval's gen_kwargs -> continue_contexts' arguments; unknown keys are ignored (logged)."""
        gen_kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            log.warning("retro: generation ignores %s", ", ".join(unknown))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        settings = {"until": until, "max_gen_toks": positive_int("max_gen_toks",
                                                                 gen_kwargs.get("max_gen_toks", MAX_GEN_TOKS))}
        if gen_kwargs.get("do_sample", False):  # otherwise greedy (temperature 0)
            settings.update(temperature=check_float("temperature", gen_kwargs.get("temperature", 1.0), 0),
                            top_k=check_int("top_k", gen_kwargs.get("top_k"), 0, optional=True),
                            top_p=check_float("top_p", gen_kwargs.get("top_p"), 0, 1, low_open=True, optional=True))
        return settings

    def continue_contexts(self, contexts: list[str], until: list[str], max_gen_toks: int, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None) -> list[str]:
        """retro.generate on the contexts' last max_length - max_gen_toks tokens (at least one)."""
        keep = max(1, self.max_length - max_gen_toks)
        rows = [self.encode(c)[-keep:] if c else np.asarray([self.end_of_text()], dtype=np.int64) for c in contexts]
        inputs = tokens_for_model(self.model, self.retriever, rows, self.k)
        gens = continue_inputs(self.model, self.retriever, inputs, self.tok, contexts, max_gen_toks, temperature,
                               top_k, top_p, self.seed, self.k, stop=until)
        return [g.text for g in gens]


def run_harness(argv: list[str]) -> None:
    """lm-eval's command line on argv, with the `retro` model registered (`retro lm-eval ARGS`)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
