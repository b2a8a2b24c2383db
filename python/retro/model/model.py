"""The RETRO model (Borgeaud et al. 2021, arXiv 2112.04426), readable in one sitting.

A decoder of pre-norm layers: self-attention (rotary, causal) -> chunked cross-attention (in the
layers cfg.cca_layers) -> feed-forward. The neighbour encoder runs once, called by the model
between the first CCA layer's self-attention and its CCA, on the hidden states there:
E_u = Encoder(RET(C_u), H_u). Without neighbours the model is RETRO[OFF]: the CCA blocks leave
the residual stream untouched.

One code path for training, prefill and decoding: every layer has one forward(x, positions, kv,
neighbours), where positions None is a whole sequence from position 0 (training; a prefill also
writes the caches) and positions (B,) one token per sequence (a decoding step against the
caches). The caches (cache.py) are passive storage; the model computes what goes in them
(`keep_after_prefill`, `store_encoded_neighbours`). A step is two static-shape halves around the
eager encoder, which compile_decoding() hands to torch.compile; on a GPU (mode
"reduce-overhead") each half is a CUDA graph, recorded once per cache shape.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retro_kernels import ChunkedCrossAttention, RetroEncoder
from retro_kernels.nn import FeedForward, apply_rotary, rotary_table

from .cache import DecodeState, KVCache, NeighbourCache
from .copy_prior import SMEAR, zero_encoder_outputs
from .config import PRESETS, RetroConfig, check_config_fields, check_preset, paper_cca_layers, preset  # noqa: F401
from ..base.errors import RetroError
from ..base.files import load_state_dict
from .saved import Saved, load_pretrained, save_pretrained
from .sliced_loss import sliced_nll

# (states (B, L, K, R, enc_dim), mask (B, L, K, R) or None) for a sequence; the layer's cached
# (keys, values, mask) from NeighbourCache.read for a step
NeighbourInput = tuple


class SelfAttention(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.heads, self.head_dim, self.base = cfg.heads, cfg.head_dim, cfg.rotary_base
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.heads * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor):
        """x (B, n, dim), rotary tables (B or 1, n, head_dim) -> rotated q, k and v, each (B, H, n, D)."""
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rotary(q, cos[:, :, None], sin[:, :, None]), apply_rotary(k, cos[:, :, None], sin[:, :, None])
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _table(self, length: int, x: Tensor):
        return rotary_table(length, self.head_dim, self.base, x.device, torch.promote_types(x.dtype, torch.float32))

    def forward(self, x: Tensor, positions: Tensor | None = None, kv: KVCache | None = None) -> Tensor:
        """x (B, n, dim) -> (B, n, dim), causal.
        positions None: the sequence at positions 0 .. n-1 (with kv, a prefill: its keys/values
        are written to kv). positions (B,): one token per sequence (n = 1) at those positions,
        attending to kv, which is updated in place."""
        B, n, _ = x.shape
        if positions is None:
            cos, sin = self._table(n, x)
            q, k, v = self._qkv(x, cos[None], sin[None])
            if kv is not None:
                kv.write(k, v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.out(o.transpose(1, 2).reshape(B, n, -1))
        cos, sin = self._table(kv.max_len, x)
        q, k, v = self._qkv(x, cos[positions][:, None], sin[positions][:, None])
        kv.write(k, v, positions)
        seen = torch.arange(kv.max_len, device=x.device)[None, :] <= positions[:, None]  # (B, T)
        # One query per sequence: two small products. (SDPA with a mask picks cuDNN here, whose
        # per-call set-up costs milliseconds of CPU time, more than the whole step.)
        scores = (q @ kv.k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
        scores = scores * self.head_dim ** -0.5  # (B, H, 1, T)
        o = scores.masked_fill(~seen[:, None, None, :], float("-inf")).softmax(-1).to(q.dtype) @ kv.v
        return self.out(o.transpose(1, 2).reshape(B, 1, -1))


class DecoderLayer(nn.Module):
    """Self-attention -> chunked cross-attention (if the layer has it) -> feed-forward, pre-norm,
    residual around each."""

    def __init__(self, cfg: RetroConfig, index: int):
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(cfg.dim), SelfAttention(cfg)
        self.cca = None
        if index in cfg.cca_layers:
            self.cca_norm = nn.LayerNorm(cfg.dim)
            self.cca = ChunkedCrossAttention(cfg.dim, cfg.heads, cfg.head_dim, cfg.chunk_size, cfg.enc_dim,
                                             rotary=cfg.cca_rotary, backend=cfg.backend, rotary_base=cfg.rotary_base,
                                             qk_norm=cfg.qk_norm, smear_keys=cfg.smear_keys)
        self.ff_norm, self.ff = nn.LayerNorm(cfg.dim), FeedForward(cfg.dim, dropout=cfg.dropout, hidden=cfg.ff_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, positions: Tensor | None = None, kv: KVCache | None = None,
                neighbours: NeighbourInput | None = None, part: str = "whole") -> Tensor:
        """x (B, n, dim) -> (B, n, dim); positions and kv as SelfAttention's. neighbours: what the
        CCA block reads, None for none (RETRO[OFF], or no complete chunk yet): for a sequence the
        encoded neighbours (states (B, L, K, R, enc_dim), mask (B, L, K, R) or None), for a step
        this layer's cached (keys, values, mask). part: "whole"; the first CCA layer runs as
        "attention" (returns H, the encoder's input) then "rest" (CCA and feed-forward on H)."""
        # dropout only where it acts: in evaluation (every decoding step) it is the identity, and
        # three module calls per layer and step are a measurable part of a small model's step
        drop = self.drop if self.training and self.drop.p > 0 else _identity
        if part != "rest":
            x = x + drop(self.attn(self.attn_norm(x), positions, kv))
            if part == "attention":
                return x
        if self.cca is not None and neighbours is not None:
            if positions is None:
                x = x + drop(self.cca(self.cca_norm(x), *neighbours))
            else:
                x = x + drop(self.cca.step(self.cca_norm(x), positions, *neighbours))
        return x + drop(self.ff(self.ff_norm(x)))


def _identity(x: Tensor) -> Tensor:
    return x


def store_encoded_neighbours(cache: NeighbourCache, cca_modules: dict[int, ChunkedCrossAttention], rows: Tensor,
                             states: Tensor, mask: Tensor) -> None:
    """Caches, for `rows` (b,), every CCA layer's keys/values of the encoded neighbours states
    (b, K, R, enc_dim), and their mask (b, K, R)."""
    cache.store(rows, {i: layer.project_neighbours(states) for i, layer in cca_modules.items()}, mask)


def keep_after_prefill(cache: NeighbourCache, cca_modules: dict[int, ChunkedCrossAttention], h: Tensor,
                       states: Tensor | None, mask: Tensor | None, lengths: list[int],
                       rows: list[int] | None = None) -> None:
    """After a prefill of rows of lengths n_r (padded to n): h (B, n, hidden), the first CCA layer's
    states; states (B, L, K, R, enc_dim) the encoded neighbours of the complete chunks (None
    without), mask (B, L, K, R) or None. Keeps each row's states of its chunk in progress and the
    keys/values of the chunk that position n_r (its next) attends, unless position n_r itself
    completes a chunk (its step then encodes the neighbours of that chunk). rows: the cache rows
    of h's rows (default 0 .. B-1)."""
    m = cache.chunk_size
    rows = list(range(len(lengths))) if rows is None else rows
    cache.mask[rows] = False
    kept, last = [], []
    for b, (r, n) in enumerate(zip(rows, lengths)):
        start = (n // m) * m
        cache.chunk_states[r, : n - start] = h[b, start:n].to(cache.chunk_states.dtype)
        if states is not None and n >= m and n % m != m - 1:
            kept.append(b)
            last.append((n + 1) // m - 1)
    if kept:
        kept_t, last_t = torch.tensor(kept, device=h.device), torch.tensor(last, device=h.device)
        chunk_mask = mask[kept_t, last_t] if mask is not None else \
            torch.ones((len(kept),) + states.shape[2:4], dtype=torch.bool, device=h.device)
        cache_rows = torch.tensor([rows[b] for b in kept], device=h.device)
        store_encoded_neighbours(cache, cca_modules, cache_rows, states[kept_t, last_t], chunk_mask)


def encode_completed_chunks(encode, cache: NeighbourCache, cca_modules: dict[int, ChunkedCrossAttention],
                            new: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Chunks just completed: new maps a row to its chunk's retrieved neighbour tokens (K, R) and
    mask (K, R). encode(neighbour_tokens, mask, chunk_states) runs once on them with the rows'
    recorded chunk states, and every CCA layer caches their keys/values."""
    order = sorted(new)
    rows = torch.tensor(order, device=cache.mask.device)
    tokens = torch.stack([new[r][0] for r in order])[:, None]      # (b, 1, K, R)
    mask = torch.stack([new[r][1] for r in order])[:, None]
    states = encode(tokens, mask, cache.chunk_states[rows][:, None])   # (b, 1, K, R, enc_dim)
    store_encoded_neighbours(cache, cca_modules, rows, states[:, 0], mask[:, 0])


class RetroModel(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        bad = [i for i in cfg.cca_layers if not 0 <= i < cfg.depth]
        if bad or not cfg.cca_layers:
            raise RetroError(f"cca_layers must be non-empty 0-based layer indices < depth={cfg.depth}, "
                             f"got {cfg.cca_layers}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.depth))
        self.first_cca = min(cfg.cca_layers)
        self.to_encoder = nn.Linear(cfg.dim, cfg.enc_dim, bias=False) if cfg.enc_dim != cfg.dim else nn.Identity()
        # the embeddings are small (std 0.02): normalised, the tokens' identity survives the encoder's
        # first residual blocks instead of drowning in them
        self.encoder_in_norm = nn.LayerNorm(cfg.enc_dim) if cfg.encoder_input_norm else nn.Identity()
        self.encoder = RetroEncoder(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.enc_head_dim, context_dim=cfg.dim,
                                    cross_attend_layers=(0,), dropout=cfg.dropout, backend=cfg.backend)
        self.norm = nn.LayerNorm(cfg.dim)
        self.checkpointing = False  # activation checkpointing of the decoder layers
        self.extra_config: dict = {}  # the model contract (protocol.py): nothing beside the configuration
        self.trained_on: dict | None = None  # set by the loaders (saved.py)
        self.source: str | None = None
        self._compiled_step = self._compiled_mode = None  # compile_decoding()
        self._static_states: dict[tuple, DecodeState] = {}  # compiled decoding: one per cache shape
        self.apply(self._init)
        if cfg.copy_prior:
            self.apply_copy_prior()

    supports_checkpointing = True

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks (RetrofittedLM.blocks: its base's), which FSDP shards one by one."""
        return self.layers

    def fit_copy_prior(self, batch, log=print) -> None:
        """The copy-prior hook of the model contract: a RetroModel's prior needs no data (it is set
        at construction, apply_copy_prior), so there is nothing to fit."""
        return None

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every weight trains: the whole state dict."""
        return self.state_dict()

    @torch.no_grad()
    def apply_copy_prior(self) -> None:
        """Initialises the retrieval path as a copying circuit, so that reading the neighbours pays
        from the first steps instead of after a long plateau (measured in
        benchmarks/results/retrieval_learning-*):
        - the encoder's sublayers start as the identity (zero output projections): an encoded
          neighbour token is its (normalised) embedding;
        - each CCA block's key projection is its query projection seen through the encoder's input
          projection, so a query finds the neighbour tokens equal to its own token; with
          smear_keys the keys start 90% the previous token's, so it finds the token *after* it;
        - each CCA block's output projection is the transpose of its value projection, mapped back
          through the encoder's input projection: the found token's embedding goes back into the
          residual stream, where the tied unembedding reads it as a prediction.
        Every weight stays trainable; only the starting point changes."""
        zero_encoder_outputs(self.encoder)
        # encoder input = W_e @ embedding (W_e the identity when enc_dim == dim)
        w_e = self.to_encoder.weight.float() if isinstance(self.to_encoder, nn.Linear) else None
        for layer in self.layers:
            cca = layer.cca
            if cca is None:
                continue
            q, v = cca.to_q.weight.float(), cca.to_v.weight.float()
            back = None if w_e is None else torch.linalg.pinv(w_e)  # (dim, enc_dim): encoder space -> decoder's
            k = q if back is None else q @ back
            out = v.T if back is None else back @ v.T
            cca.to_k.weight.copy_(k)
            cca.to_out.weight.copy_(out)
            if cca.smear is not None:
                cca.smear.fill_(SMEAR)  # 0.9 of the previous token's key

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def encode(self, neighbour_tokens: Tensor, neighbour_mask: Tensor | None, chunk_states: Tensor) -> Tensor:
        """neighbour tokens (B, L, K, R), chunk states H_u (B, L, m, dim) -> neighbour states (B, L, K, R, enc_dim)."""
        return self.encoder(self.encoder_in_norm(self.to_encoder(self.embed(neighbour_tokens))), chunk_states,
                            neighbour_mask)

    def cca_modules(self) -> dict[int, ChunkedCrossAttention]:
        """The CCA blocks by layer index (the layers cfg.cca_layers)."""
        return {i: self.layers[i].cca for i in self.cfg.cca_layers}

    # ---- the decoder: one path for training, prefill and decoding steps ---------------------------

    def _layer(self, i: int, x: Tensor, positions: Tensor | None, state: DecodeState | None,
               neighbours: NeighbourInput | None = None, part: str = "whole") -> Tensor:
        kv = None if state is None else state.self_attn[i]
        if self.checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(self.layers[i], x, positions, kv, neighbours, part,
                                                     use_reentrant=False)
        return self.layers[i](x, positions, kv, neighbours, part)

    def _below(self, x: Tensor, positions: Tensor | None, state: DecodeState | None) -> Tensor:
        """The layers below the first CCA layer and its self-attention: x (B, n, dim) -> H (B, n, dim)."""
        for i in range(self.first_cca):
            x = self._layer(i, x, positions, state)
        return self._layer(self.first_cca, x, positions, state, part="attention")

    def _above(self, h: Tensor, positions: Tensor | None, state: DecodeState | None,
               neighbours: dict[int, NeighbourInput], targets: Tensor | None = None) -> Tensor:
        """The first CCA layer's CCA and feed-forward on H, the layers above it -> logits, or with
        targets (B, n) the per-token NLL (B, n) (sliced_loss.py); neighbours maps a CCA layer to
        what it reads (none: RETRO[OFF])."""
        x = self._layer(self.first_cca, h, positions, state, neighbours.get(self.first_cca), part="rest")
        for i in range(self.first_cca + 1, len(self.layers)):
            x = self._layer(i, x, positions, state, neighbours.get(i))
        if targets is not None:
            return sliced_nll(self.norm(x), targets, self._logits, self.cfg.vocab_size)
        return self._logits(self.norm(x))

    def _logits(self, x: Tensor) -> Tensor:
        """Final (normed) states (..., dim) -> logits (..., vocab): the tied output embedding."""
        return F.linear(x, self.embed.weight)

    def _encode_sequence(self, h: Tensor, neighbour_tokens: Tensor | None, neighbour_mask: Tensor | None):
        """The encoder on the states H (B, n, dim) of the complete chunks -> (states, mask) for CCA,
        or (None, None) without neighbours or a complete chunk."""
        m = self.cfg.chunk_size
        chunks = h.shape[1] // m
        if neighbour_tokens is None or chunks == 0:
            return None, None
        mask = None if neighbour_mask is None else neighbour_mask[:, :chunks]
        args = (neighbour_tokens[:, :chunks], mask, h[:, : chunks * m].reshape(h.shape[0], chunks, m, -1))
        if self.checkpointing and self.training:  # recomputed in the backward pass, as the layers
            return torch.utils.checkpoint.checkpoint(self.encode, *args, use_reentrant=False), mask
        return self.encode(*args), mask

    def _sequence(self, tokens: Tensor, neighbour_tokens: Tensor | None, neighbour_mask: Tensor | None,
                  state: DecodeState | None = None, lengths: list[int] | None = None,
                  targets: Tensor | None = None) -> Tensor:
        h = self._below(self.embed(tokens), None, state)
        states, mask = self._encode_sequence(h, neighbour_tokens, neighbour_mask)
        if state is not None:
            keep_after_prefill(state.neighbour_cache, self.cca_modules(), h, states, mask, lengths)
        neighbours = {} if states is None else {i: (states, mask) for i in self.cfg.cca_layers}
        return self._above(h, None, state, neighbours, targets)

    def forward(self, tokens: Tensor, neighbour_tokens: Tensor | None = None,
                neighbour_mask: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
        """tokens (B, n); neighbour_tokens (B, L, K, R): token ids of the K neighbours [chunk,
        continuation] of chunks 0 .. L-1 (L >= n // m), neighbour_mask (B, L, K, R) -> logits (B, n, vocab).
        With targets (B, n) (integer ids, int64 or the tokenizers' int32; IGNORE where not scored;
        TypeError for floats): the per-token next-token NLL (B, n)
        instead (float32, float64 for a float64 model; 0 at IGNORE), computed a slice of the
        sequence at a time so that the whole logits never exist (sliced_loss.py)."""
        return self._sequence(tokens, neighbour_tokens, neighbour_mask, targets=targets)

    # ---- incremental decoding ---------------------------------------------------------------------

    def new_state(self, batch: int, max_len: int, device=None, dtype=None,
                  num_neighbours: int | None = None) -> DecodeState:
        """Caches for decoding `batch` sequences of up to max_len tokens with num_neighbours per
        chunk (default: the configuration's k; any k works, the paper evaluates with more than it
        trains with)."""
        p = next(self.parameters())
        device, dtype = torch.device(device or p.device), dtype or p.dtype
        k = self.cfg.num_neighbours if num_neighbours is None else num_neighbours
        if self._compiled_step is None:
            return self._new_state(batch, max_len, device, dtype, k)
        # Compiled: static caches, as CUDA graphs need. One set per shape, reset in place, so the
        # graphs recorded for it replay in every later generation of that shape.
        key = (batch, max_len, device, dtype, k)
        state = self._static_states.get(key)
        if state is None:
            state = self._static_states[key] = self._new_state(batch, max_len, device, dtype, k)
            if device.type == "cuda":
                state.mark_static()
        else:
            state.reset()
        state.ticket += 1
        return copy.copy(state)  # this generation's handle; an older one is refused by step()

    def _new_state(self, batch, max_len, device, dtype, num_neighbours) -> DecodeState:
        cfg = self.cfg
        heads = {i: (cca.heads, cca.head_dim) for i, cca in self.cca_modules().items()}
        neighbour_cache = NeighbourCache(heads, batch, cfg.chunk_size, cfg.dim, num_neighbours, cfg.neighbour_len,
                                         device, dtype)
        return DecodeState(batch, max_len, cfg.heads, cfg.head_dim, cfg.depth, neighbour_cache, device, dtype)

    @torch.no_grad()
    def prefill(self, state: DecodeState, tokens: Tensor, neighbour_tokens: Tensor | None = None,
                neighbour_mask: Tensor | None = None, lengths: list[int] | None = None) -> Tensor:
        """Runs the batch's prompts in one parallel pass, filling the caches: tokens (B, n), row r's
        prompt its first lengths[r] tokens (default n; right padding after it); neighbour_tokens
        (B, L, K, R) and neighbour_mask of the complete chunks (a row's chunks beyond its prompt
        are padding too) -> logits (B, vocab) after each row's last prompt token."""
        B, n = tokens.shape
        lengths = [n] * B if lengths is None else [int(v) for v in lengths]
        if B != state.batch or len(lengths) != B or not all(1 <= v <= n for v in lengths):
            raise RetroError(f"prefill: tokens {tuple(tokens.shape)} and lengths {lengths} must hold the state's "
                             f"{state.batch} prompts, each of 1 .. {n} tokens")
        logits = self._sequence(tokens, neighbour_tokens, neighbour_mask, state, lengths)
        last = torch.tensor(lengths, device=tokens.device)
        state.pos.copy_(last)
        return logits[torch.arange(B, device=tokens.device), last - 1]

    @torch.no_grad()
    def step(self, state: DecodeState, tokens: Tensor, new_neighbours: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
        """Feeds one token per sequence (tokens (B,), at positions state.pos) -> logits (B, vocab).
        new_neighbours maps a row whose token completes chunk u (pos % m == m - 1) to that chunk's
        retrieved neighbour tokens (K, R) and mask (K, R); the model encodes them once and caches
        their keys/values. Two static-shape halves around the encoder (compile_decoding() compiles
        them). Compiled, the logits are a copy: CUDA graphs reuse their output memory at the next step."""
        compiled = self._compiled_step is not None
        if compiled:
            self._check_current(state)
            # One step = one CUDA-graph generation: without the mark, each compiled call would start
            # its own and free the previous one's outputs, h among them, before `above` reads it.
            torch.compiler.cudagraph_mark_step_begin()
        below, above = self._compiled_step or (self._step_below, self._step_above)
        h = below(state, tokens)
        if new_neighbours:  # the chunk just completed: encode its neighbours once, cache their keys/values
            encode_completed_chunks(self.encode, state.neighbour_cache, self.cca_modules(), new_neighbours)
        logits = above(state, h)
        return logits.clone() if compiled else logits

    def _check_current(self, state: DecodeState) -> None:
        """Compiled decoding shares one set of caches per shape: a state handed out before the
        latest new_state() of its shape has been reset and must not step."""
        static = next((s for s in self._static_states.values() if s.pos is state.pos), None)
        if static is None or static.ticket != state.ticket:
            raise RetroError("this DecodeState is stale: compiled decoding keeps one set of caches per "
                             "(batch, max_len) and a later new_state() of its shape reset them "
                             "(or it was made before compile_decoding()); make a new one")

    def _step_below(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """The first half of a step, up to H of the first CCA layer; records H in the chunk in progress."""
        h = self._below(self.embed(tokens)[:, None], state.pos, state)
        state.neighbour_cache.record(state.pos, h[:, 0])
        return h

    def _step_above(self, state: DecodeState, h: Tensor) -> Tensor:
        """The second half: the rest, each CCA layer reading its cached neighbours -> logits (B, vocab)."""
        neighbours = {i: state.neighbour_cache.read(i) for i in self.cfg.cca_layers}
        logits = self._above(h, state.pos, state, neighbours)
        state.pos.add_(1)
        return logits[:, 0]

    def save_pretrained(self, folder, tokenizer=None):
        """Writes config.json, model.safetensors and, if given, the tokenizer into folder
        (saved.py); from_pretrained reads it back."""
        return save_pretrained(self, folder, tokenizer)

    @classmethod
    def from_pretrained(cls, source, device=None, backend: str | None = None) -> "RetroModel":
        """A RetroModel saved by save_pretrained, a run folder, or a Hugging Face hub repository (a
        retrofitted model is refused: retro.from_pretrained loads either kind)."""
        return load_pretrained(source, {False: cls}, device=device, backend=backend)

    @classmethod
    def from_saved(cls, saved: Saved) -> "RetroModel":
        """The model of a saved folder already read (saved.py's load_folder builds it with this)."""
        model = cls(saved.cfg)
        load_state_dict(model, saved.weights, saved.folder / "model.safetensors", remedy=saved.remedy)
        return model

    def compile_decoding(self, mode: str | None = None, fullgraph: bool = True,
                         backend: str = "inductor") -> "RetroModel":
        """Compiles the two halves of step() with torch.compile (mode "reduce-overhead": CUDA graphs
        on a GPU); retrieval and the encoder at chunk completions stay eager. Compiles once per
        mode: calling it again with the same mode keeps the compiled step.

        The caches become static, as gpt-fast's: new_state() hands out one preallocated set per
        (batch, max_len, device, dtype, k), reset in place, so the CUDA graphs recorded in the
        first generation of a shape are replayed by every later one (a state from before the
        latest new_state() of its shape is refused). Each step marks a new CUDA-graph generation
        (torch.compiler.cudagraph_mark_step_begin), so the two halves run as graphs of one step
        and the first half's output survives the eager encoder between them. backend: torch.compile's
        ("eager" traces the same fullgraph halves and runs them op by op, without inductor's code
        generation: the CPU rehearsal of benchmarks/gpu_check.sh)."""
        if self._compiled_step is None or self._compiled_mode != (mode, fullgraph, backend):
            self._compiled_step = tuple(torch.compile(half, mode=mode, fullgraph=fullgraph, backend=backend)
                                        for half in (self._step_below, self._step_above))
            self._compiled_mode = (mode, fullgraph, backend)
            self._static_states = {}
        return self

    def eager_decoding(self) -> "RetroModel":
        """Undoes compile_decoding(): step() runs eagerly again, the static caches are freed."""
        self._compiled_step = self._compiled_mode = None
        self._static_states = {}
        return self


def recorded_cuda_graphs(device: int | None = None) -> int:
    """How many CUDA graphs torch.compile's CUDA-graph trees hold on a device (default: the
    current one): compiled decoding records them once per cache shape, later generations replay."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_container(torch.cuda.current_device() if device is None else device).tree_manager
    if manager is None:
        return 0

    def count(nodes) -> int:
        return sum(1 + count([c for cs in n.children.values() for c in cs]) for n in nodes)
    return count([n for nodes in manager.roots.values() for n in nodes])
