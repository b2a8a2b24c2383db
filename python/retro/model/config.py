"""RetroConfig (the model's hyper-parameters), the presets (paper Table 2 sizes, "tiny") and the
checks of configuration overrides (`--set field=value`)."""
from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields

from ..base.defaults import CHUNK_SIZE, NEIGHBOURS
from ..base.checks import MAX_NEIGHBOURS, check_float, check_int
from ..base.errors import RetroError


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
    chunk_size: int = CHUNK_SIZE
    cca_layers: tuple[int, ...] = field(default_factory=lambda: paper_cca_layers(12))  # 0-based layer indices
    enc_dim: int = 896
    enc_depth: int = 2
    enc_heads: int = 14
    enc_head_dim: int = 64
    num_neighbours: int = NEIGHBOURS  # k, the neighbours per chunk
    dropout: float = 0.0
    max_seq_len: int = 2048
    rotary_base: float = 10000.0
    qk_norm: bool = True          # CCA: unit-length queries/keys times a learned gain (learns to read sooner)
    smear_keys: bool = True       # CCA: each neighbour key mixed with the previous token's (copying in one step)
    copy_prior: bool = True       # start the encoder and CCA blocks as a copying circuit (RetroModel.apply_copy_prior)
    encoder_input_norm: bool = True  # LayerNorm on the embedded neighbour tokens entering the encoder
    cca_rotary: bool = True       # CCA: rotary relative positions between queries and neighbour tokens
    backend: str = "auto"         # retro_kernels backend for CCA and the encoder

    @property
    def neighbour_len(self) -> int:  # r = 2m: [chunk, continuation]
        return 2 * self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)

    # fields renamed since a release: old name -> new name (saved configs use the old one)
    RENAMED = {"neighbours": "num_neighbours"}

    @classmethod
    def from_dict(cls, d: dict) -> "RetroConfig":
        """The inverse of to_dict (a checkpoint's config, the old names of RENAMED fields accepted);
        an unknown field is a RetroError naming it."""
        label = "the checkpoint's model config:"
        if not isinstance(d, dict):
            raise RetroError(f"{label} a JSON object of RetroConfig fields was expected, got {d!r:.100}")
        d = dict(d)
        for old, new in cls.RENAMED.items():
            if old in d:
                if new in d:
                    raise RetroError(f"{label} both {old!r} and its new name {new!r}; keep one")
                d[new] = d.pop(old)
        missing = [f.name for f in fields(cls) if f.name not in d and f.name != "backend"]
        if missing:  # a default would silently build another architecture than the one trained
            raise RetroError(f"{label} lacks {', '.join(missing)} (saved by an older version, whose defaults "
                             "differed); add them with the values it was trained with")
        return cls(**check_config_fields(d, label))


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
_FIELD_RANGE = {"num_neighbours": dict(low=1, high=MAX_NEIGHBOURS),
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
