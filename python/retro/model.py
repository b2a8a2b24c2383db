"""The RETRO model (Borgeaud et al. 2021, arXiv 2112.04426), readable in one sitting.

A decoder of pre-norm blocks: self-attention (rotary, SDPA, causal) -> chunked cross-attention
(in the layers `cca_layers`) -> feed-forward. The neighbour encoder runs once, inside the first
CCA layer, on the hidden states there: E_u = Encoder(RET(C_u), H_u). Without neighbours the
model is RETRO[OFF]: the CCA blocks leave the residual stream untouched.

Decoding (`prefill`, `step`): each DecoderLayer has `step`, its CCA block
ChunkedCrossAttention.step; the caches are preallocated and written in place (KVCache for
self-attention, NeighbourCache for what CCA reads: when a chunk completes, its neighbours are
encoded once and each CCA layer caches their keys/values for the next window). The step is two
static-shape halves around that encoding, which compile_decoding() hands to torch.compile; on a
GPU (mode "reduce-overhead") each half is a CUDA graph, recorded once per cache shape.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retro_kernels import ChunkedCrossAttention, RetroEncoder
from retro_kernels.nn import FeedForward, apply_rotary, rotary_table

from .checks import MAX_NEIGHBOURS, check_float, check_int
from .errors import RetroError


def paper_cca_layers(depth: int, start: int = 6, every: int = 3) -> tuple[int, ...]:
    """0-based CCA layers: the paper's layers 6, 9, 12, ... (1-based); for a model too shallow for
    layer 6, every 3rd layer counted back from the last."""
    layers = tuple(range(start - 1, depth, every))
    return layers or tuple(range(depth - 1, -1, -every))[::-1]


@dataclass
class RetroConfig:
    vocab_size: int = 8000
    dim: int = 896
    depth: int = 12
    heads: int = 16
    head_dim: int = 64
    ff_dim: int = 3584
    chunk_size: int = 64
    cca_layers: tuple[int, ...] = field(default_factory=lambda: paper_cca_layers(12))
    enc_dim: int = 896
    enc_depth: int = 2
    enc_heads: int = 14
    enc_head_dim: int = 64
    neighbours: int = 2           # k
    dropout: float = 0.0
    max_seq_len: int = 2048
    rotary_base: float = 10000.0
    qk_norm: bool = True          # CCA: unit-length queries/keys times a learned gain (learns to read sooner)
    smear_keys: bool = True       # CCA: each neighbour key mixed with the previous token's (copying in one step)
    copy_init: bool = True        # initialise the encoder and CCA blocks as a copying circuit (RetroModel.copy_prior)
    encoder_input_norm: bool = True  # LayerNorm on the embedded neighbour tokens entering the encoder
    cca_rotary: bool = True       # CCA: rotary relative positions between queries and neighbour tokens
    backend: str = "auto"         # retro_kernels backend for CCA and the encoder

    @property
    def neighbour_len(self) -> int:  # r = 2m: [chunk, continuation]
        return 2 * self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)

    # fields added after the first release, with the value that reproduces older checkpoints
    LEGACY = {"qk_norm": False, "smear_keys": False, "encoder_input_norm": False, "cca_rotary": True,
              "copy_init": False}

    @classmethod
    def from_dict(cls, d: dict) -> "RetroConfig":
        d = {**cls.LEGACY, **d}
        d["cca_layers"] = tuple(d["cca_layers"])
        return cls(**d)


def _paper(dim, ff, heads, head_dim, depth) -> dict:
    return dict(dim=dim, ff_dim=ff, heads=heads, head_dim=head_dim, depth=depth, cca_layers=paper_cca_layers(depth))


# Paper Table 2 sizes (RETRO 172M, 425M, 1.5B, 7.5B), 2-layer encoder of width 896 that
# cross-attends in its first layer; "tiny" for tests and the CPU demo.
PRESETS = {
    "tiny": dict(dim=128, ff_dim=512, heads=4, head_dim=32, depth=4, cca_layers=(1, 3), enc_dim=128, enc_depth=2,
                 enc_heads=4, enc_head_dim=32, max_seq_len=1024),
    "172M": _paper(896, 3584, 16, 64, 12),
    "425M": _paper(1536, 6144, 12, 128, 12),
    "1.5B": _paper(2048, 8192, 16, 128, 24),
    "7.5B": _paper(4096, 16384, 32, 128, 32),
}


def preset(name: str, **overrides) -> RetroConfig:
    """The preset `name` with some fields replaced (checked by check_config_fields)."""
    check_preset(name)
    return RetroConfig(**{**PRESETS[name], **check_config_fields(overrides)})


def check_preset(name) -> str:
    """RetroError unless `name` is one of PRESETS (the error lists them)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise RetroError(f"unknown config {name!r} (--config); expected one of the presets {', '.join(PRESETS)}")
    return name


# ranges of RetroConfig's numeric fields beyond "integers >= 1" and "numbers > 0"
_FIELD_RANGE = {"neighbours": dict(low=1, high=MAX_NEIGHBOURS),
                "dropout": dict(low=0, high=1, high_open=True)}


def _check_field(name: str, key: str, hint, value):
    """One RetroConfig field's value (`name` is how errors call it), converted where unambiguous
    (a list or "1,3" to a tuple of layers, an int to a float); RetroError if it has the wrong
    type or range."""
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise RetroError(f"{name} must be {'true or false' if hint is bool else 'a string'}, got {value!r}")
        return value
    if hint is int:
        return check_int(name, value, **_FIELD_RANGE.get(key, dict(low=1)))
    if hint is float:
        return float(check_float(name, value, **_FIELD_RANGE.get(key, dict(low=0, low_open=True))))
    if typing.get_origin(hint) is tuple:  # cca_layers
        if isinstance(value, str):
            value = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)) or not value:
            raise RetroError(f"{name} must be a non-empty list of layer indices such as [1, 3], got {value!r}")
        return tuple(check_int(name, v, 0) for v in value)
    return value


def check_config_fields(overrides: dict, label: str = "--set") -> dict:
    """RetroConfig overrides checked against its fields and their types: an unknown field lists
    the valid ones, a wrong type names the type expected. Returns them converted."""
    hints = typing.get_type_hints(RetroConfig)
    valid = [f.name for f in fields(RetroConfig)]
    out = {}
    for key, value in overrides.items():
        if key not in hints:
            raise RetroError(f"{label} {key}: unknown RetroConfig field; valid fields: {', '.join(valid)}")
        out[key] = _check_field(f"{label} {key}", key, hints[key], value)
    return out


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

    def forward(self, x: Tensor, kv: "KVCache | None" = None, row: int = 0) -> Tensor:
        """x (B, n, dim) at positions 0 .. n-1 -> (B, n, dim), causal. With kv (a prefill, B = 1):
        the keys/values of every position are kept in row `row` of kv."""
        B, n, _ = x.shape
        cos, sin = self._table(n, x)
        q, k, v = self._qkv(x, cos[None], sin[None])
        if kv is not None:
            kv.fill(row, k[0], v[0])
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, n, -1))

    def step(self, x: Tensor, pos: Tensor, kv: "KVCache") -> Tensor:
        """x (B, 1, dim) at positions pos (B,) -> (B, 1, dim), attending to kv (updated in place)."""
        cos, sin = self._table(kv.max_len, x)
        q, k, v = self._qkv(x, cos[pos][:, None], sin[pos][:, None])
        kv.update(pos, k[:, :, 0], v[:, :, 0])
        seen = torch.arange(kv.max_len, device=x.device)[None, :] <= pos[:, None]  # (B, T)
        # One query per sequence: two small products. (SDPA with a mask picks cuDNN here, whose
        # per-call set-up costs milliseconds of CPU time, more than the whole step.)
        scores = (q @ kv.k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
        scores = scores * self.head_dim ** -0.5  # (B, H, 1, T)
        o = scores.masked_fill(~seen[:, None, None, :], float("-inf")).softmax(-1).to(q.dtype) @ kv.v
        return self.out(o.transpose(1, 2).reshape(x.shape[0], 1, -1))


class DecoderLayer(nn.Module):
    """Self-attention -> chunked cross-attention (if the layer has it) -> feed-forward, pre-norm,
    residual around each. forward runs a whole sequence, step one token per sequence."""

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

    def forward(self, x: Tensor, enc: Tensor | None = None, mask: Tensor | None = None,
                encode: "typing.Callable[[Tensor], tuple] | None" = None, kv: "KVCache | None" = None,
                row: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, n, dim) -> (x, enc, mask). enc (B, L, K, R, enc_dim), mask (B, L, K, R): the
        encoded neighbours the CCA block reads. encode (the first CCA layer): a function of the
        states H after self-attention returning (enc, mask), the encoder's run. kv, row: a prefill's
        self-attention cache and row."""
        x = x + self.drop(self.attn(self.attn_norm(x), kv, row))
        if encode is not None:
            enc, mask = encode(x)
        if self.cca is not None and enc is not None:
            x = x + self.drop(self.cca(self.cca_norm(x), enc, mask))
        return x + self.drop(self.ff(self.ff_norm(x))), enc, mask

    def step_attention(self, x: Tensor, pos: Tensor, kv: "KVCache") -> Tensor:
        """The self-attention block of one decoding step: x (B, 1, dim) at positions pos (B,)."""
        return x + self.attn.step(self.attn_norm(x), pos, kv)

    def step_rest(self, x: Tensor, pos: Tensor, neighbours: "tuple[Tensor, Tensor, Tensor] | None") -> Tensor:
        """The CCA (reading the cached neighbour keys, values and mask) and feed-forward blocks of
        one decoding step."""
        if self.cca is not None:
            x = x + self.cca.step(self.cca_norm(x), pos, *neighbours)
        return x + self.ff(self.ff_norm(x))

    def step(self, x: Tensor, pos: Tensor, kv: "KVCache", neighbours=None) -> Tensor:
        """One token per sequence: x (B, 1, dim) at positions pos (B,) -> (B, 1, dim); kv is
        updated in place, neighbours = NeighbourCache.read(layer index) for a CCA layer."""
        return self.step_rest(self.step_attention(x, pos, kv), pos, neighbours)


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
        self._compiled_step = self._compiled_mode = None  # compile_decoding()
        self._static_states: dict[tuple, DecodeState] = {}  # compiled decoding: one per cache shape
        self.apply(self._init)
        if cfg.copy_init:
            self.copy_prior()

    @torch.no_grad()
    def copy_prior(self) -> None:
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
        for layer in self.encoder.layers:
            outs = [layer.self_attn.to_out, layer.ff[-1]] + ([layer.cross_attn.to_out] if layer.cross_attn else [])
            for lin in outs:
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
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
                cca.smear.fill_(2.2)  # sigmoid(2.2) = 0.9 of the previous token's key

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def encode(self, neighbours: Tensor, neighbour_mask: Tensor | None, chunk_states: Tensor) -> Tensor:
        """neighbour tokens (B, L, K, R), chunk states H_u (B, L, m, dim) -> E (B, L, K, R, enc_dim)."""
        return self.encoder(self.encoder_in_norm(self.to_encoder(self.embed(neighbours))), chunk_states, neighbour_mask)

    def cca_layers(self) -> dict[int, ChunkedCrossAttention]:
        return {i: self.layers[i].cca for i in self.cfg.cca_layers}

    def _encoder_at(self, neighbours: Tensor | None, neighbour_mask: Tensor | None,
                    cache: "DecodeState | None" = None, row: int = 0):
        """The first CCA layer's `encode`: the encoder on the unshifted chunk states H_u of the
        complete chunks; a prefill also keeps what decoding needs in the cache."""
        m = self.cfg.chunk_size

        def encode(h: Tensor):
            chunks = h.shape[1] // m
            enc = mask = None
            if neighbours is not None:
                mask = None if neighbour_mask is None else neighbour_mask[:, :chunks]
                enc = self.encode(neighbours[:, :chunks], mask, h[:, : chunks * m].reshape(h.shape[0], chunks, m, -1))
            if cache is not None:
                cache.neighbours.keep(row, h[0], None if enc is None else enc[0], None if mask is None else mask[0])
            return enc, mask
        return encode

    def forward(self, tokens: Tensor, neighbours: Tensor | None = None, neighbour_mask: Tensor | None = None,
                cache: "DecodeState | None" = None, row: int = 0) -> Tensor:
        """tokens (B, n); neighbours (B, L, K, R) token ids of the k neighbours [chunk, continuation]
        of chunks 0 .. L-1 (L >= n // m), neighbour_mask (B, L, K, R) -> logits (B, n, vocab).
        cache, row: a prefill (B = 1) fills row `row` of the decoding caches."""
        if neighbours is not None and tokens.shape[1] // self.cfg.chunk_size == 0:
            neighbours = None  # no complete chunk yet: nothing to attend to
        x, enc, mask = self.embed(tokens), None, None
        for i, layer in enumerate(self.layers):
            encode = self._encoder_at(neighbours, neighbour_mask, cache, row) if i == self.first_cca else None
            kv = None if cache is None else cache.self_attn[i]
            if self.checkpointing and self.training:
                x, enc, mask = torch.utils.checkpoint.checkpoint(layer, x, enc, mask, encode, use_reentrant=False)
            else:
                x, enc, mask = layer(x, enc, mask, encode, kv, row)
        return F.linear(self.norm(x), self.embed.weight)  # tied output embedding

    # ---- incremental decoding ---------------------------------------------------------------------

    def new_state(self, batch: int, max_len: int, device=None, dtype=None, neighbours: int | None = None) -> "DecodeState":
        """Caches for decoding `batch` sequences of up to max_len tokens with `neighbours` per chunk
        (default: the configuration's k; any k works, the paper evaluates with more than it trains with)."""
        p = next(self.parameters())
        device, dtype = torch.device(device or p.device), dtype or p.dtype
        if self._compiled_step is None:
            return DecodeState(self, batch, max_len, device, dtype, neighbours)
        # Compiled: static caches, as CUDA graphs need. One set per shape, reset in place, so the
        # graphs recorded for it replay in every later generation of that shape.
        key = (batch, max_len, device, dtype, self.cfg.neighbours if neighbours is None else neighbours)
        state = self._static_states.get(key)
        if state is None:
            state = self._static_states[key] = DecodeState(self, batch, max_len, device, dtype, neighbours)
            if device.type == "cuda":
                state.mark_static()
        else:
            state.reset()
        state.ticket += 1
        return copy.copy(state)  # this generation's handle; an older one is refused by step()

    @torch.no_grad()
    def prefill(self, state: "DecodeState", row: int, tokens: Tensor, neighbours: Tensor | None = None,
                neighbour_mask: Tensor | None = None) -> Tensor:
        """Runs sequence `row`'s prompt tokens (n,) in one parallel pass, with the neighbours (L, K, R)
        of its complete chunks, filling its caches -> logits (vocab,) after the last prompt token."""
        logits = self.forward(tokens[None], None if neighbours is None else neighbours[None],
                              None if neighbour_mask is None else neighbour_mask[None], cache=state, row=row)
        state.pos[row] = tokens.shape[0]
        return logits[0, -1]

    @torch.no_grad()
    def step(self, state: "DecodeState", tokens: Tensor, new_neighbours: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
        """Feeds one token per sequence (tokens (B,), at positions state.pos) -> logits (B, vocab).
        new_neighbours maps a row whose token completes chunk u (pos % m == m - 1) to that chunk's
        retrieved neighbours (K, R) and mask (K, R); they are encoded once and cached.
        Two static-shape halves around the encoder (compile_decoding() compiles them). Compiled,
        the logits are a copy: CUDA graphs reuse their output memory at the next step."""
        compiled = self._compiled_step is not None
        if compiled:
            self._check_current(state)
            # One step = one CUDA-graph generation: without the mark, each compiled call would start
            # its own and free the previous one's outputs, x among them, before `above` reads it.
            torch.compiler.cudagraph_mark_step_begin()
        below, above = self._compiled_step or (self._step_below, self._step_above)
        x = below(state, tokens)
        if new_neighbours:  # the chunk just completed: encode its neighbours once, cache their keys/values
            state.neighbours.refresh(self.encode, new_neighbours)
        logits = above(state, x)
        return logits.clone() if compiled else logits

    def _check_current(self, state: "DecodeState") -> None:
        """Compiled decoding shares one set of caches per shape: a state handed out before the
        latest new_state() of its shape has been reset and must not step."""
        static = next((s for s in self._static_states.values() if s.pos is state.pos), None)
        if static is None or static.ticket != state.ticket:
            raise RetroError("this DecodeState is stale: compiled decoding keeps one set of caches per "
                             "(batch, max_len) and a later new_state() of its shape reset them "
                             "(or it was made before compile_decoding()); make a new one")

    def _step_below(self, state: "DecodeState", tokens: Tensor) -> Tensor:
        """The layers up to the first CCA layer's self-attention; keeps its states of the chunk in progress."""
        x = self.embed(tokens)[:, None]
        for i in range(self.first_cca):
            x = self.layers[i].step(x, state.pos, state.self_attn[i])
        x = self.layers[self.first_cca].step_attention(x, state.pos, state.self_attn[self.first_cca])
        state.neighbours.record(state.pos, x[:, 0])
        return x

    def _step_above(self, state: "DecodeState", x: Tensor) -> Tensor:
        """The rest: the first CCA layer's CCA and feed-forward, then the layers above it."""
        pos, p0 = state.pos, self.first_cca
        x = self.layers[p0].step_rest(x, pos, state.neighbours.read(p0))
        for i in range(p0 + 1, len(self.layers)):
            x = self.layers[i].step(x, pos, state.self_attn[i], state.neighbours.read(i))
        pos.add_(1)
        return F.linear(self.norm(x[:, 0]), self.embed.weight)

    def compile_decoding(self, mode: str | None = None, fullgraph: bool = True) -> "RetroModel":
        """Compiles the two halves of step() with torch.compile (mode "reduce-overhead": CUDA graphs
        on a GPU); retrieval and the encoder at chunk completions stay eager. Compiles once per
        mode: calling it again with the same mode keeps the compiled step.

        The caches become static, as gpt-fast's: new_state() hands out one preallocated set per
        (batch, max_len, device, dtype, k), reset in place, so the CUDA graphs recorded in the
        first generation of a shape are replayed by every later one (a state from before the
        latest new_state() of its shape is refused). Each step marks a new CUDA-graph generation
        (torch.compiler.cudagraph_mark_step_begin), so the two halves run as graphs of one step
        and the first half's output survives the eager encoder between them."""
        if self._compiled_step is None or self._compiled_mode != (mode, fullgraph):
            self._compiled_step = (torch.compile(self._step_below, mode=mode, fullgraph=fullgraph),
                                   torch.compile(self._step_above, mode=mode, fullgraph=fullgraph))
            self._compiled_mode = (mode, fullgraph)
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


class KVCache:
    """Self-attention keys/values (batch, heads, max_len, head_dim), preallocated, written in place."""

    def __init__(self, batch, heads, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len

    def fill(self, row: int, k: Tensor, v: Tensor) -> None:
        """A prefill: k, v (heads, n, head_dim) of positions 0 .. n-1 of sequence `row`."""
        n = k.shape[1]
        self.k[row, :, :n], self.v[row, :, :n] = k, v

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """One step: k, v (batch, heads, head_dim) of each sequence's token at its position pos (batch,)."""
        rows = torch.arange(len(pos), device=pos.device)
        self.k[rows, :, pos], self.v[rows, :, pos] = k, v


class NeighbourCache:
    """What CCA reads while decoding, preallocated for `batch` sequences and updated in place: the
    first CCA layer's states of each sequence's chunk in progress, and each CCA layer's keys/values
    of the neighbours its next positions attend (mask all False before the first chunk completes).
    It owns their life: keep (after a prefill), record (each step), refresh (a chunk completes)."""

    def __init__(self, cca_layers: dict[int, ChunkedCrossAttention], batch: int, hidden: int, device, dtype,
                 neighbours: int, neighbour_len: int):
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours <= 1024:
            raise ValueError(f"neighbours must be an int in [1, 1024], got {neighbours!r}")
        self.cca = cca_layers
        first = next(iter(cca_layers.values()))
        self.chunk_size = first.chunk_size
        self.chunk_states = torch.zeros(batch, self.chunk_size, hidden, device=device, dtype=dtype)
        self.kv = {}
        for i, layer in cca_layers.items():
            shape = (batch, neighbours, neighbour_len, layer.heads, layer.head_dim)
            self.kv[i] = (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self.mask = torch.zeros((batch, neighbours, neighbour_len), dtype=torch.bool, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.chunk_states, self.mask] + [t for kv in self.kv.values() for t in kv]

    def read(self, i: int, rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        """CCA layer i's cached keys, values and mask (of `rows`, default all); None for a layer without CCA."""
        if i not in self.kv:
            return None
        rows = slice(None) if rows is None else rows
        return self.kv[i][0][rows], self.kv[i][1][rows], self.mask[rows]

    def store(self, rows: Tensor, enc: Tensor, mask: Tensor) -> None:
        """Caches, for `rows`, every CCA layer's (rotated) keys/values of encoded neighbours enc
        (b, K, R, enc_dim) and their mask (b, K, R)."""
        for i, layer in self.cca.items():
            k, v = layer.project_neighbours(enc)
            self.kv[i][0].index_copy_(0, rows, k.to(self.kv[i][0].dtype))
            self.kv[i][1].index_copy_(0, rows, v.to(self.kv[i][1].dtype))
        self.mask.index_copy_(0, rows, mask)

    def keep(self, row: int, h: Tensor, enc: Tensor | None, mask: Tensor | None) -> None:
        """After a prefill of n tokens: h (n, hidden), the first CCA layer's states after its
        self-attention; enc (L, K, R, enc_dim) the encoded neighbours of its complete chunks (None
        without), mask (L, K, R) or None. Keeps the states of the chunk in progress and the
        keys/values of the chunk that position n (the next) attends, unless position n itself
        completes a chunk (then its step retrieves and refreshes)."""
        n, m = h.shape[0], self.chunk_size
        start = (n // m) * m
        self.chunk_states[row, : n - start] = h[start:n].to(self.chunk_states.dtype)
        self.mask[row] = False
        if enc is None or n % m == m - 1:
            return
        last = (n + 1) // m - 1
        chunk_mask = mask[last] if mask is not None else torch.ones(enc.shape[1:3], dtype=torch.bool, device=enc.device)
        self.store(torch.tensor([row], device=enc.device), enc[last][None], chunk_mask[None])

    def record(self, pos: Tensor, h: Tensor, rows: Tensor | None = None) -> None:
        """One step: h (b, hidden), the first CCA layer's states after its self-attention of the
        tokens at positions pos (b,) of `rows` (default all), into their chunk in progress."""
        rows = torch.arange(len(pos), device=pos.device) if rows is None else rows
        self.chunk_states[rows, pos % self.chunk_size] = h.to(self.chunk_states.dtype)

    def refresh(self, encode, new: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Chunks just completed: new maps a row to its chunk's retrieved neighbours (K, R) and mask
        (K, R). encode(neighbours, mask, chunk_states) is the model's encoder; it runs once on them
        with the rows' recorded chunk states, and every CCA layer caches their keys/values."""
        order = sorted(new)
        rows = torch.tensor(order, device=self.mask.device)
        nb = torch.stack([new[r][0] for r in order])[:, None]      # (b, 1, K, R)
        mask = torch.stack([new[r][1] for r in order])[:, None]
        enc = encode(nb, mask, self.chunk_states[rows][:, None])   # (b, 1, K, R, enc_dim)
        self.store(rows, enc[:, 0], mask[:, 0])


class DecodeState:
    """Caches of a batch being decoded, all preallocated for `batch` sequences of max_len tokens:
    per-sequence positions, self-attention keys/values per layer, the neighbour cache."""

    def __init__(self, model: RetroModel, batch: int, max_len: int, device, dtype, neighbours: int | None = None):
        cfg = model.cfg
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.self_attn = [KVCache(batch, cfg.heads, max_len, cfg.head_dim, device, dtype) for _ in range(cfg.depth)]
        self.neighbours = NeighbourCache(model.cca_layers(), batch, cfg.dim, device, dtype,
                                         cfg.neighbours if neighbours is None else neighbours, cfg.neighbour_len)
        self.ticket = 0  # compiled decoding: which new_state() handed this set of caches out last

    def tensors(self) -> list[Tensor]:
        """Every cache tensor (positions, self-attention keys/values, the neighbour cache)."""
        return [self.pos] + [t for kv in self.self_attn for t in (kv.k, kv.v)] + self.neighbours.tensors()

    def reset(self) -> None:
        """Empties the caches in place (their addresses stay): as a new state of the same shapes."""
        for t in self.tensors():
            t.zero_()

    def mark_static(self) -> None:
        """Tells torch.compile these tensors keep their addresses, so CUDA graphs may write them in
        place (unguarded: never a recompile; compiled decoding reuses this state per shape, so the
        graphs are recorded once)."""
        for t in self.tensors():
            torch._dynamo.mark_static_address(t, guard=False)
