"""RETROfitting a pretrained causal language model (paper section 4.2): freeze it, add chunked
cross-attention to some of its blocks and a neighbour encoder, and train only those.

`retrofit(hf_model)` works with GPT-2 and the Llama/Qwen/Mistral families (blocks in
`transformer.h` or `model.layers`). CCA sits inside a block by default (placement "inside", the
paper's: between its self-attention and its MLP; it reads H = block input + attention output and
its output joins the attention's, so the MLP sees both), or after the whole block (placement
"after"). The CCA output projections start at zero, so a fresh retrofit computes exactly the base
model's logits; `retro train --retrofit` (and the demo) then starts the new parts from the copy
prior fitted to the base (`RetrofittedLM.fit_copy_prior`, retrofit_prior.py), unless copy_prior is
off. The encoder embeds the neighbour tokens with the base model's (frozen) input embeddings and
runs once, in the first CCA layer, on the hidden states there (docs/semantics.md, "The neighbour
encoder").
"""
from __future__ import annotations

import inspect
from functools import partial
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from retro_kernels import ChunkedCrossAttention, RetroEncoder

from ..base.checks import check_int, check_neighbours
from ..base.defaults import CHUNK_SIZE, NEIGHBOURS
from ..base.errors import RetroError
from . import hf_head
from ..model.cache import NeighbourCache
from ..model.config import RetroConfig, check_config_fields, paper_cca_layers
from ..model.model import encode_completed_chunks, keep_after_prefill
from ..model.saved import load_pretrained, save_pretrained, weights_sha256
from ..retrieval.tokenizer import hf_source
from ..model.sliced_loss import sliced_nll


def _blocks(hf_model) -> nn.ModuleList:
    base = hf_model.base_model
    for attr in ("h", "layers"):
        if isinstance(getattr(base, attr, None), nn.ModuleList):
            return getattr(base, attr)
    raise RetroError(f"cannot find the transformer blocks of {type(hf_model).__name__}; supported: GPT-2 "
                     "(transformer.h) and Llama/Qwen/Mistral-style models (model.layers)")


PLACEMENTS = ("inside", "after")  # CCA between block i's attention and MLP (the paper's), or after block i
DEFAULT_PLACEMENT = "inside"
# RetroConfig fields a retrofit takes from its caller (the rest follows from the base model)
RETROFIT_SETTINGS = ("qk_norm", "smear_keys", "cca_rotary", "rotary_base", "dropout", "encoder_input_norm",
                     "copy_prior")
# no rotary in a retrofit's CCA: the frozen base's states carry positions already, and the copy
# prior matches neighbour tokens by content, which a position-dependent rotation would blur
RETROFIT_DEFAULTS = {"cca_rotary": False}


def _attention(block: nn.Module) -> nn.Module:
    """A block's self-attention module (Llama/Qwen/Mistral/Gemma: self_attn; GPT-2: attn)."""
    for attr in ("self_attn", "attn", "attention"):
        if isinstance(getattr(block, attr, None), nn.Module):
            return getattr(block, attr)
    raise RetroError(f"cannot find the self-attention of {type(block).__name__} for placement 'inside'; "
                     "use placement='after'")


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def _identity(x: Tensor) -> Tensor:
    return x


# The keyword argument that carries one call's _Pass to the CCA hooks: Hugging Face models hand
# their forward's extra keyword arguments down to every block.
PASS_KWARG = "retro_pass"


class _Pass:
    """What one call of the base model brings to the CCA after its blocks. A whole sequence:
    the neighbour tokens (B, L, K, R) and mask, states once the first CCA layer has encoded them; with cache
    (a prefill of row `row`), what decoding needs is kept. One token (positions set): the row's
    neighbour cache is read, recorded, and refreshed with `new` (neighbours, mask) of the chunk it
    completes.
    A plain object, not a dataclass: FSDP copies the dataclasses among a module's arguments when it
    moves them, and every block must see (and fill in) this same one."""

    def __init__(self, neighbour_tokens: Tensor | None = None, mask: Tensor | None = None,
                 cache: NeighbourCache | None = None, row: int = 0, positions: Tensor | None = None,
                 new: tuple[Tensor, Tensor] | None = None):
        self.neighbour_tokens, self.mask, self.cache, self.row = neighbour_tokens, mask, cache, row
        self.positions, self.new = positions, new
        self.states: Tensor | None = None  # the encoded neighbours
        self.block_input: Tensor | None = None  # placement "inside": the current block's input
        self.captured: dict[int, Tensor] | None = None  # residual_states: CCA's input per layer
        self.seen = 0


class RetrofittedLM(nn.Module):
    """forward(tokens (B, n), neighbour_tokens (B, L, K, R) | None, neighbour_mask) -> logits (B, n, V);
    prefill/step decode as RetroModel does (one base-model cache per sequence)."""

    def __init__(self, hf_model, cfg: RetroConfig, base_name: str, placement: str = "inside"):
        super().__init__()
        if placement not in PLACEMENTS:
            raise RetroError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.base, self.cfg, self.base_name, self.placement = hf_model, cfg, base_name, placement
        self.base.requires_grad_(False)
        hidden = hf_model.config.hidden_size
        self.first_cca = min(cfg.cca_layers)
        self.cca = nn.ModuleDict()
        self.cca_norm = nn.ModuleDict()
        for i in cfg.cca_layers:
            layer = ChunkedCrossAttention(hidden, cfg.heads, cfg.head_dim, cfg.chunk_size, cfg.enc_dim,
                                          rotary=cfg.cca_rotary, rotary_base=cfg.rotary_base, backend=cfg.backend,
                                          qk_norm=cfg.qk_norm, smear_keys=cfg.smear_keys)
            nn.init.zeros_(layer.to_out.weight)  # starts as the identity on the residual stream
            self.cca[str(i)] = layer
            self.cca_norm[str(i)] = nn.LayerNorm(hidden)
        self.to_encoder = nn.Linear(hidden, cfg.enc_dim, bias=False)
        # the base's input embeddings have their own scale: normalised, every base starts alike
        self.encoder_in_norm = nn.LayerNorm(cfg.enc_dim) if cfg.encoder_input_norm else nn.Identity()
        self.encoder = RetroEncoder(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.enc_head_dim, context_dim=hidden,
                                    cross_attend_layers=(0,), dropout=cfg.dropout, backend=cfg.backend)

        # the base's name, a hash of its weights and where CCA sits: a saved retrofit loads back
        # onto this base only, and runs as it was trained
        self.extra_config = {"retrofit": {"base": base_name, "base_sha256": weights_sha256(hf_model),
                                          "placement": placement}}
        self._active: _Pass | None = None  # the pass of the base model's call in progress
        self.checkpointing = False
        self.trained_on: dict | None = None  # set by the loaders (model/saved.py)
        self.source: str | None = None
        for i in cfg.cca_layers:
            if placement == "after":
                self.blocks[i].register_forward_hook(self._hook(i), with_kwargs=True)
            else:
                self.blocks[i].register_forward_pre_hook(self._block_input_hook(i), with_kwargs=True)
                _attention(self.blocks[i]).register_forward_hook(self._attention_hook(i))
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.base.eval()
        self.check_sliced_head()  # once, here: a check inside a compiled forward would break its graph

    supports_checkpointing = False  # the base runs as Hugging Face wrote it; its blocks are not re-run

    @property
    def blocks(self) -> nn.ModuleList:
        """The base model's blocks. A property, not a submodule: an alias would put every frozen
        block into state_dict() a second time (as blocks.*), and so into every saved file."""
        return _blocks(self.base)

    def train(self, mode: bool = True) -> "RetrofittedLM":
        """Only the new parts change mode: the frozen base always runs as in evaluation (dropout
        off), so training and evaluation see the same base model."""
        super().train(mode)
        self.base.eval()
        return self

    # -- the hooks: CCA after block i ------------------------------------------------------------

    def encode(self, neighbours: Tensor, mask: Tensor | None, chunk_states: Tensor) -> Tensor:
        """neighbour tokens (B, L, K, R), chunk states (B, L, m, hidden) -> (B, L, K, R, enc_dim)."""
        emb = self.base.get_input_embeddings()(neighbours)
        return self.encoder(self.encoder_in_norm(self.to_encoder(emb)), chunk_states.to(emb.dtype), mask)

    def _hook(self, i: int):
        """placement "after": CCA's output added to block i's output."""
        def hook(module, args, kwargs, output):
            p = kwargs.get(PASS_KWARG)
            if p is None:
                return output
            p.seen += 1
            h = _hidden(output)
            delta = self._cca(i, h, p)
            return output if delta is None else _with_hidden(output, h + delta)
        return hook

    def _block_input_hook(self, i: int):
        """placement "inside": keeps block i's input (the residual stream) for its attention's hook."""
        def hook(module, args, kwargs):
            p = kwargs.get(PASS_KWARG)
            if p is not None:
                p.seen += 1
                p.block_input = args[0] if args else kwargs["hidden_states"]
        return hook

    def _attention_hook(self, i: int):
        """placement "inside" (the paper's): CCA reads the residual stream after block i's
        self-attention, H = input + attention output, and its output joins the attention's, so that
        the block's MLP sees both."""
        def hook(module, args, output):
            p = self._active
            if p is None or p.block_input is None:
                return output
            a = _hidden(output)
            delta = self._cca(i, p.block_input + a, p)
            p.block_input = None
            return output if delta is None else _with_hidden(output, a + delta)
        return hook

    def _cca(self, i: int, h: Tensor, p: _Pass) -> Tensor | None:
        """What CCA at layer i adds to the residual stream h (B, n, hidden), or None."""
        if p.captured is not None:
            p.captured[i] = h.detach()
            return None
        return self._sequence(i, h, p) if p.positions is None else self._token(i, h, p)

    def _sequence(self, i: int, h: Tensor, p: _Pass) -> Tensor | None:
        m = self.cfg.chunk_size
        chunks = h.shape[1] // m
        mask = p.mask[:, :chunks] if p.mask is not None and p.neighbour_tokens is not None else None
        if i == self.first_cca:
            if p.neighbour_tokens is not None:
                p.states = self.encode(p.neighbour_tokens[:, :chunks], mask,
                                       h[:, : chunks * m].reshape(h.shape[0], chunks, m, -1))
            if p.cache is not None:
                keep_after_prefill(p.cache, self.cca_modules(), h, p.states, mask, [h.shape[1]], [p.row])
        if p.states is None:
            return None
        return self.cca[str(i)](self.cca_norm[str(i)](h), p.states, mask).to(h.dtype)

    def _token(self, i: int, h: Tensor, p: _Pass) -> Tensor:
        rows = torch.tensor([p.row], device=h.device)
        if i == self.first_cca:
            p.cache.record(p.positions, h[:, 0], rows)
            if p.new is not None:
                encode_completed_chunks(self.encode, p.cache, self.cca_modules(), {p.row: p.new})
        out = self.cca[str(i)].step(self.cca_norm[str(i)](h), p.positions, *p.cache.read(i, slice(p.row, p.row + 1)))
        return out.to(h.dtype)

    def _run(self, p: _Pass, **kwargs):
        out = self._call(self.base, p, **kwargs)
        self._check_pass_seen(p)
        return out.logits

    def _call(self, fn, p: _Pass, **kwargs):
        """fn(**kwargs) with the pass p handed to the blocks (the keyword argument) and to the
        attention hooks (self._active, placement "inside")."""
        self._active = p
        try:
            return fn(**kwargs, **{PASS_KWARG: p})
        finally:
            self._active = None

    def _check_pass_seen(self, p: _Pass) -> None:
        if p.seen != len(self.cfg.cca_layers):
            raise RetroError(f"the base model's blocks did not receive the keyword argument {PASS_KWARG!r} "
                             "(a transformers version that hands the forward's keyword arguments to its blocks "
                             "is needed)")

    # -- the model -------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, neighbour_tokens: Tensor | None = None,
                neighbour_mask: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
        """As RetroModel.forward: logits (B, n, V), or with targets (B, n) the per-token NLL (B, n)."""
        if targets is not None:
            return self._nll(tokens, neighbour_tokens, neighbour_mask, targets)
        if neighbour_tokens is None or tokens.shape[1] // self.cfg.chunk_size == 0:
            return self.base(input_ids=tokens, use_cache=False).logits
        return self._run(_Pass(neighbour_tokens, neighbour_mask), input_ids=tokens, use_cache=False)

    @torch.no_grad()
    def residual_states(self, tokens: Tensor) -> dict[int, Tensor]:
        """The base model's residual stream where each CCA layer reads it: tokens (B, n) ->
        {layer: (B, n, hidden)} (CCA itself does not run)."""
        p = _Pass()
        p.captured = {}
        self._run(p, input_ids=tokens, use_cache=False)
        return p.captured

    def fit_copy_prior(self, batch, log=print) -> dict:
        """The copy-prior hook of the model contract: fits the copy prior (prior.py) on batch
        (training.data.Batch with neighbours) and records what it chose in extra_config."""
        from .prior import fit_copy_prior

        chosen = fit_copy_prior(self, batch, log)
        self.extra_config["retrofit"]["copy_prior"] = chosen
        return chosen

    def compile_decoding(self, mode: str | None = None, fullgraph: bool = True, backend: str = "inductor"):
        """Not supported: a retrofitted model decodes eagerly (one base-model cache per sequence)."""
        raise RetroError("compile (--compile) works for RETRO models; a retrofitted model decodes eagerly")

    def cca_modules(self) -> dict[int, ChunkedCrossAttention]:
        return {i: self.cca[str(i)] for i in self.cfg.cca_layers}

    # -- the loss: the next-token NLL a slice of the sequence at a time (sliced_loss.py) ----------

    # Whether hf_head.head_logits(the decoder's final states) reproduces the base model's logits,
    # checked once per model by check_sliced_head (in the constructor; None: not yet, checked at the
    # first loss); False: the loss falls back to the whole logits of self.base(...).
    sliced_head: bool | None = None

    def check_sliced_head(self) -> bool:
        """Checks (hf_head.head_mismatch, on 8 tokens) that the base's decoder states and output
        layer reproduce its logits, keeps the answer in self.sliced_head and warns when they do not:
        the loss then takes the whole logits (much more memory with a large vocabulary)."""
        reason = hf_head.head_mismatch(self.base)
        self.sliced_head = reason is None
        if reason is not None:
            warnings.warn(f"{type(self.base).__name__}: its decoder states and output layer do not reproduce its "
                          f"logits ({reason}); the loss is computed from the whole logits instead of a slice of the "
                          "sequence at a time, which with a large vocabulary takes much more memory",
                          RuntimeWarning, stacklevel=2)
        return self.sliced_head

    def _decoder_states(self, tokens: Tensor, neighbour_tokens: Tensor | None,
                        neighbour_mask: Tensor | None) -> Tensor:
        """The base's decoder with the CCA hooks -> final states (B, n, hidden)."""
        if neighbour_tokens is None or tokens.shape[1] // self.cfg.chunk_size == 0:
            return hf_head.decoder_states(self.base, input_ids=tokens, use_cache=False)
        p = _Pass(neighbour_tokens, neighbour_mask)
        states = self._call(partial(hf_head.decoder_states, self.base), p, input_ids=tokens, use_cache=False)
        self._check_pass_seen(p)
        return states

    def _head_logits(self, states: Tensor) -> Tensor:
        return hf_head.head_logits(self.base, states)

    def _nll(self, tokens: Tensor, neighbour_tokens: Tensor | None, neighbour_mask: Tensor | None,
             targets: Tensor) -> Tensor:
        """The per-token NLL (B, n) of targets (B, n) (IGNORE: 0), a slice of the sequence at a time."""
        if self.sliced_head is None:
            self.check_sliced_head()
        if self.sliced_head:
            states = self._decoder_states(tokens, neighbour_tokens, neighbour_mask)
            return sliced_nll(states, targets, self._head_logits, self.cfg.vocab_size)
        logits = self.forward(tokens, neighbour_tokens, neighbour_mask)  # the fallback: the whole logits
        return sliced_nll(logits, targets, _identity, logits.shape[-1])

    def save_pretrained(self, folder, tokenizer=None):
        """The new weights, the base's name and weights hash, and the tokenizer (model/saved.py)."""
        return save_pretrained(self, folder, tokenizer)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The new weights (CCA, their norms, the encoder and its input): what a checkpoint and a
        saved model hold; the frozen base is found again by its name and weights hash."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    @classmethod
    def from_pretrained(cls, source, device=None, backend: str | None = None) -> "RetrofittedLM":
        """A retrofitted model saved by save_pretrained (or a retrofit run's folder), loaded onto
        the base it was trained on (model/saved.py); a RetroModel is refused."""
        return load_pretrained(source, {True: cls}, device=device, backend=backend)

    @classmethod
    def from_saved(cls, saved) -> "RetrofittedLM":
        """The model of a saved folder already read: its base, the new weights on top."""
        return load_retrofitted(saved.config["retrofit"], saved.cfg, saved.weights)

    def new_state(self, batch: int, max_len: int, device=None, dtype=None,
                  num_neighbours: int | None = None) -> "RetrofitState":
        p = next(self.cca.parameters())
        return RetrofitState(self, batch, device or p.device, dtype or p.dtype, num_neighbours)

    @torch.no_grad()
    def prefill(self, state, tokens: Tensor, neighbour_tokens=None, neighbour_mask=None, lengths=None) -> Tensor:
        """As RetroModel.prefill: tokens (B, n), row r's prompt its first lengths[r] tokens ->
        logits (B, vocab). One row at a time: each has its own base-model cache."""
        return torch.stack([self._prefill_row(state, r, tokens[r, :n], neighbour_tokens, neighbour_mask)
                            for r, n in enumerate([tokens.shape[1]] * len(tokens) if lengths is None else lengths)])

    def _prefill_row(self, state, row: int, tokens: Tensor, neighbour_tokens, neighbour_mask) -> Tensor:
        from transformers import DynamicCache

        n, cache = tokens.shape[0], DynamicCache()
        chunks = n // self.cfg.chunk_size
        if neighbour_tokens is None or chunks == 0:
            neighbour_tokens = neighbour_mask = None  # the chunk states are still kept for the chunk in progress
        p = _Pass(None if neighbour_tokens is None else neighbour_tokens[row:row + 1, :chunks],
                  None if neighbour_mask is None else neighbour_mask[row:row + 1, :chunks],
                  cache=state.neighbour_cache, row=row)
        logits = self._run(p, input_ids=tokens[None], use_cache=True, **{self._cache_kw: cache})
        state.caches[row] = cache
        state.pos[row] = n
        return logits[0, -1]

    @torch.no_grad()
    def step(self, state, tokens: Tensor, new_neighbours: dict) -> Tensor:
        """One token per sequence, one sequence at a time (each has its own base-model cache)."""
        out = []
        for row in range(len(tokens)):
            pos = int(state.pos[row])
            positions = torch.tensor([pos], device=tokens.device)
            p = _Pass(cache=state.neighbour_cache, row=row, positions=positions, new=new_neighbours.get(row))
            logits = self._run(p, input_ids=tokens[row:row + 1, None], use_cache=True, position_ids=positions[None],
                               **{self._cache_kw: state.caches[row]})
            out.append(logits[0, -1])
            state.pos[row] += 1
        return torch.stack(out)


class RetrofitState:
    """Per-sequence base-model caches and positions, plus the neighbour cache."""

    def __init__(self, model: RetrofittedLM, batch: int, device, dtype, num_neighbours: int | None = None):
        cfg = model.cfg
        heads = {i: (cca.heads, cca.head_dim) for i, cca in model.cca_modules().items()}
        self.neighbour_cache = NeighbourCache(heads, batch, cfg.chunk_size, model.base.config.hidden_size,
                                              cfg.num_neighbours if num_neighbours is None else num_neighbours,
                                              cfg.neighbour_len, device, dtype)
        self.pos = torch.zeros(batch, dtype=torch.long)
        self.caches = [None] * batch


def retrofit(hf_model, cca_layers=None, encoder: dict | None = None, k: int = NEIGHBOURS, chunk_size: int = CHUNK_SIZE,
             backend: str = "auto", base_name: str = "", max_seq_len: int | None = None,
             placement: str = DEFAULT_PLACEMENT,
             **settings) -> RetrofittedLM:
    """Adds CCA (default: the paper's layers 6, 9, 12, ... or the nearest fit) and a neighbour
    encoder to a Hugging Face causal LM; the base weights are frozen. hf_model: the model, or
    what load_causal_lm loads (a name, a folder or a .gguf file; it is then the base_name).
    encoder: RetroEncoder settings (dim, depth, heads, head_dim); default 2 layers of the base
    model's width (at most 896, the paper's). placement: "inside" (CCA between a block's
    attention and its MLP, the paper's) or "after" (after the block). settings: RetroConfig
    fields of the new parts (qk_norm, smear_keys, cca_rotary, rotary_base, dropout,
    encoder_input_norm)."""
    unknown = sorted(set(settings) - set(RETROFIT_SETTINGS))
    if unknown:
        raise TypeError(f"retrofit() got unexpected settings {unknown}; expected some of {list(RETROFIT_SETTINGS)}")
    settings = {**RETROFIT_DEFAULTS, **settings}
    if isinstance(hf_model, (str, Path)):
        base_name = base_name or str(hf_model)
        hf_model = load_causal_lm(hf_model)
    check_neighbours("k", k)
    check_int("chunk_size", chunk_size, 1)
    blocks = _blocks(hf_model)
    depth, hidden = len(blocks), hf_model.config.hidden_size
    layers = tuple(cca_layers(depth) if callable(cca_layers) else cca_layers or paper_cca_layers(depth))
    if any(not 0 <= i < depth for i in layers):
        raise RetroError(f"cca_layers {layers} must index the model's {depth} blocks")
    heads = hf_model.config.num_attention_heads
    head_dim = hidden // heads
    enc = {"dim": min(hidden, 896), "depth": 2, "heads": None, "head_dim": 64, **(encoder or {})}
    enc_head_dim = min(enc["head_dim"], enc["dim"])
    enc_heads = enc["heads"] or max(1, enc["dim"] // enc_head_dim)
    positions = (getattr(hf_model.config, "n_positions", None)
                 or getattr(hf_model.config, "max_position_embeddings", 2048))
    cfg = RetroConfig(vocab_size=hf_model.config.vocab_size, dim=hidden, depth=depth, heads=heads, head_dim=head_dim,
                      ff_dim=4 * hidden, chunk_size=chunk_size, cca_layers=layers, enc_dim=enc["dim"],
                      enc_depth=enc["depth"], enc_heads=enc_heads, enc_head_dim=enc_head_dim, num_neighbours=k,
                      backend=backend, max_seq_len=min(max_seq_len or 2048, positions), **settings)
    return RetrofittedLM(hf_model, cfg, base_name, placement)


def load_causal_lm(name: str | Path):
    """A Hugging Face causal LM: a hub name, a local folder, or a .gguf file (de-quantised to
    float32 by transformers; needs the gguf package)."""
    from transformers import AutoModelForCausalLM

    source, kwargs = hf_source(name)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - OSError/ValueError/ImportError from transformers
        raise RetroError(f"cannot load the causal LM {str(name)!r} to retrofit: {exc}") from exc


def retrofit_factory(base: str, cca_layers=None, placement: str | None = None, settings: dict | None = None,
                     encoder: dict | None = None):
    """model_factory for train(): retrofits `base` for the database's chunk size and k. cca_layers:
    layer indices, a function depth -> indices, or None (the paper's spacing); settings:
    RetroConfig fields of the new parts (`retro train --retrofit ... --set qk_norm=false`);
    encoder: as retrofit()'s."""
    unknown = sorted(set(settings or {}) - set(RETROFIT_SETTINGS))
    settings = check_config_fields(dict(settings or {}), "--set") if settings and not unknown else settings
    if unknown:
        raise RetroError(f"--set {unknown[0]}: a retrofit takes its architecture from the base model; only "
                         f"{', '.join(RETROFIT_SETTINGS)} can be set")

    def factory(cfg: RetroConfig, db) -> RetrofittedLM:
        hf = load_causal_lm(base)
        if hf.config.vocab_size < db.tokenizer.vocab_size:
            raise RetroError(f"the database's tokenizer has {db.tokenizer.vocab_size} tokens but {base!r} only "
                             f"{hf.config.vocab_size}: build the database with --tokenizer {base}")
        return retrofit(hf, cca_layers, encoder, k=cfg.num_neighbours, chunk_size=cfg.chunk_size, backend=cfg.backend,
                        base_name=base, max_seq_len=cfg.max_seq_len, placement=placement or DEFAULT_PLACEMENT,
                        **(settings or {}))
    return factory


def load_retrofitted(info: dict, cfg: RetroConfig, weights: dict[str, Tensor]) -> RetrofittedLM:
    """Rebuilds a saved retrofitted model: the base from info["base"], the new weights on top."""
    if "placement" not in info:  # saved before retrofits had a placement: after the block, no encoder input norm
        cfg = replace(cfg, encoder_input_norm=False)
    model = RetrofittedLM(load_causal_lm(info["base"]), replace(cfg), info["base"], info.get("placement", "after"))
    if "copy_prior" in info:
        model.extra_config["retrofit"]["copy_prior"] = info["copy_prior"]
    want, got = info.get("base_sha256"), model.extra_config["retrofit"]["base_sha256"]
    if want is not None and want != got:
        raise RetroError(f"this model was retrofitted onto another {info['base']!r} than the one found now (weights "
                         f"sha256 {want[:12]}... when saved, {got[:12]}... now): load it with the base it was "
                         "trained on")
    missing = [k for k in model.trainable_state_dict() if k not in weights]
    if missing:
        raise RetroError(f"the checkpoint lacks {len(missing)} retrofit weights (e.g. {missing[0]})")
    model.load_state_dict(weights, strict=False)
    return model
