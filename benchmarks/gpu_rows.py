"""The one schema of every row the GPU check (benchmarks/gpu_check.sh) writes, the two profiles it
runs (the GPU run and its CPU rehearsal) and the figures each must produce.

A row is one JSON object on one line of rows.jsonl, appended (harness.append_row) by the benchmark
that measured it as soon as it is measured, so a section cut at its time box keeps its finished
rows. benchmarks/README.md describes the keys; `validate_row` checks them and `missing_figures` the
declared list of figures (REQUIRED). As a command:

    python -m benchmarks.gpu_rows check rows.jsonl|run.tar.gz --profile gpu|rehearsal
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# ---- the schema -------------------------------------------------------------------------------

# key -> type: every row has each of them
KEYS: dict[str, type] = {
    "machine": str,     # torch.cuda.get_device_name() or the CPU (harness.machine_name)
    "torch": str,       # torch.__version__
    "triton": str,      # triton.__version__, "none" where it is not installed
    "commit": str,      # RETRO_COMMIT, else harness.code_version()
    "profile": str,     # "gpu" or "rehearsal" (a rehearsal row is never a GPU figure)
    "section": str,     # one of SECTIONS
    "mode": str,        # what is timed: forward, forward+backward, eager, compiled, ddp, fsdp
    "variant": str,     # which implementation or model variant
    "config": str,      # the problem: a model preset or a CCA shape
    "batch": int,       # sequences (or problems) per call
    "dtype": str,       # "bfloat16", "float32"
    "backend": str,     # what retro_kernels ran (harness: never a fallback under a fused label), "torch" else
    "compile": str,     # what torch.compile ran: "none", or its backend and mode
}
# figure -> what it is: a row has at least one (a finite number >= 0), or an "error" string
METRICS = {
    "ms": "median milliseconds of one call (one training or decoding step)",
    "tokens_per_s": "tokens per second",
    "tflop_s": "TFLOP/s by the stated FLOP count",
    "pct_bandwidth_floor": "% of the bandwidth floor: minimal bytes / time / the measured copy bandwidth",
    "mfu_pct": "model FLOP utilisation in %, retro/model/flops.py's count over the card's dense bf16 peak",
}
SECTIONS = ("cca", "decode", "training", "fsdp")
ROWS_ENV = "RETRO_GPU_ROWS"      # where emit() appends rows (unset: rows are checked, not written)
PROFILE_ENV = "RETRO_GPU_PROFILE"
COMMIT_ENV = "RETRO_COMMIT"


class RowError(ValueError):
    """A row that does not follow the schema."""


def validate_row(row) -> dict:
    """row, after checking it against KEYS and METRICS; RowError naming the key otherwise."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    for key, kind in KEYS.items():
        value = row.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
            raise RowError(f"row key {key!r} must be a non-empty {kind.__name__}, got {value!r}")
    if row["section"] not in SECTIONS:
        raise RowError(f"row key 'section' must be one of {SECTIONS}, got {row['section']!r}")
    if row["profile"] not in PROFILES:
        raise RowError(f"row key 'profile' must be one of {tuple(PROFILES)}, got {row['profile']!r}")
    if row["batch"] < 1:
        raise RowError(f"row key 'batch' must be >= 1, got {row['batch']}")
    figures = [m for m in METRICS if m in row]
    for m in figures:
        v = row[m]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise RowError(f"row figure {m!r} must be a finite number >= 0, got {v!r}")
    if not figures and not (isinstance(row.get("error"), str) and row["error"]):
        raise RowError(f"a row needs one of the figures {tuple(METRICS)} or an 'error'; got keys {sorted(row)}")
    return row


# ---- the two profiles and their figures ---------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """What one profile of the check runs. cca_shapes: (label, batch, seq_len, heads, head_dim,
    neighbours, neighbour_len, chunk_size)."""
    name: str
    device: str
    dtype: str
    cca_shapes: tuple
    decode_config: str
    decode_batches: tuple
    decode_steps: int
    train_config: str
    train_batch: int
    train_chunks: int
    train_steps: int
    train_warmup: int
    compile_backend: str      # torch.compile's backend for the compiled rows
    decode_compile_mode: str | None
    # (section, mode, variant) that cannot run in this profile: its rows must carry the "error" instead
    unsupported: tuple = ()


PROFILES = {
    # the paper's CCA shapes (172M: 16 heads of 64; 1.5B-like: 32 of 128), 2048 tokens, k = 2, r = 128
    "gpu": Profile("gpu", "cuda", "bfloat16",
                   (("H16 D64", 16, 2048, 16, 64, 2, 128, 64), ("H32 D128", 8, 2048, 32, 128, 2, 128, 64)),
                   "172M", (1, 32), 256, "172M", 8, 32, 10, 2, "inductor", "reduce-overhead"),
    # the same sections on the CPU with tiny shapes (66 decoding steps: one chunk completes); compiled
    # rows run dynamo's fullgraph trace without code generation (backend "eager": inductor's C++
    # code generation takes minutes on 2 cores), no CUDA graphs
    "rehearsal": Profile("rehearsal", "cpu", "float32", (("H2 D16", 2, 256, 2, 16, 2, 32, 16),),
                         "tiny", (1, 2), 66, "tiny", 2, 2, 2, 0, "eager", None,
                         # torch: "FlexAttention does not support backward on CPU"
                         (("cca", "forward+backward", "layer: FlexAttention"),)),
}

CCA_LAYER = ("ours", "SDPA", "FlexAttention")   # layer level, forward and forward+backward
CCA_BARE = ("ours", "SDPA", "FlexAttention")    # bare attention, forward
DECODE_VARIANT, TRAIN_VARIANT = "RETRO", "RETRO (retrieval on)"


def cca_config(seq_len: int, heads: int, head_dim: int, neighbours: int, neighbour_len: int, chunk: int) -> str:
    """The "config" of a CCA row: 'H16 D64 n2048 k2 r128 m64'."""
    return f"H{heads} D{head_dim} n{seq_len} k{neighbours} r{neighbour_len} m{chunk}"


def required_figures(profile: str | Profile) -> list[tuple]:
    """Every (section, mode, variant, config, batch, dtype, metric) a run of `profile` must produce."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    need = []
    for _, B, N, H, D, K, R, m in p.cca_shapes:
        config = cca_config(N, H, D, K, R, m)
        for mode in ("forward", "forward+backward"):
            for impl in CCA_LAYER:
                metrics = ("ms", "tflop_s", "pct_bandwidth_floor") if impl == "ours" else ("ms",)
                need += [("cca", mode, f"layer: {impl}", config, B, p.dtype, x) for x in metrics]
        need += [("cca", "forward", f"bare: {impl}", config, B, p.dtype, "ms") for impl in CCA_BARE]
    for batch in p.decode_batches:
        for mode in ("eager", "compiled"):
            need += [("decode", mode, DECODE_VARIANT, p.decode_config, batch, p.dtype, x)
                     for x in ("ms", "tokens_per_s")]
    for mode in ("eager", "compiled"):
        need += [("training", mode, TRAIN_VARIANT, p.train_config, p.train_batch, p.dtype, x)
                 for x in ("ms", "tokens_per_s", "mfu_pct")]
    return need


def missing_figures(rows: list[dict], profile: str) -> list[tuple]:
    """The required figures of `profile` that no row of that profile holds (a figure of the
    profile's `unsupported` variants is held by a row of its keys that carries an "error")."""
    mine = [r for r in rows if r.get("profile") == profile]
    keys = lambda r: (r["section"], r["mode"], r["variant"], r["config"], r["batch"], r["dtype"])  # noqa: E731
    have = {(*keys(r), m) for r in mine for m in METRICS if m in r}
    failed = {keys(r) for r in mine if r.get("error")}
    unsupported = set(PROFILES[profile].unsupported)
    return [f for f in required_figures(profile)
            if f not in have and not (f[:3] in unsupported and f[:6] in failed)]


# ---- writing rows -------------------------------------------------------------------------------


@functools.cache
def _context(device: str) -> dict:
    """The keys every row of this process on `device` shares (but the commit)."""
    import torch

    from benchmarks.harness import machine_name

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"machine": machine_name(device), "torch": torch.__version__, "triton": triton_version}


@functools.cache
def _code_version() -> str:
    from benchmarks.harness import code_version

    return code_version()


def commit() -> str:
    """$RETRO_COMMIT (gpu_check.sh's header passes it: the GPU machine's copy may have no .git), else
    the checkout's commit (harness.code_version)."""
    return os.environ.get(COMMIT_ENV) or _code_version()


def emit(profile: str, device: str, **row) -> dict:
    """The row (context keys filled in for `device`), checked against the schema and appended to
    $RETRO_GPU_ROWS at once when it is set."""
    from benchmarks.harness import append_row

    full = validate_row({**_context(device), "commit": commit(), "profile": profile, **row})
    path = os.environ.get(ROWS_ENV)
    if path:
        append_row(Path(path), full)
    return full


# ---- reading rows -------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a rows.jsonl file, or of every rows.jsonl inside a .tar.gz from gpu_check.sh."""
    path = Path(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        texts = []
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith("rows.jsonl"):
                    texts.append(tar.extractfile(member).read().decode())
        if not texts:
            raise RowError(f"{path} holds no rows.jsonl")
    else:
        texts = [path.read_text()]
    rows = []
    for text in texts:
        for n, line in enumerate(io.StringIO(text), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RowError(f"{path}: line {n} is not JSON: {exc}") from None
    return rows


def check(path: str | Path, profile: str) -> list[str]:
    """The problems of a run's rows: rows off the schema, then missing figures (empty: all good)."""
    problems = []
    rows = read_rows(path)
    for n, row in enumerate(rows, 1):
        try:
            validate_row(row)
        except RowError as exc:
            problems.append(f"row {n}: {exc}")
    problems += [f"missing figure: {f}" for f in missing_figures([r for r in rows if isinstance(r, dict)
                                                                 and "section" in r], profile)]
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="check a run's rows against the schema and the required figures")
    c.add_argument("path", help="rows.jsonl or the run's .tar.gz")
    c.add_argument("--profile", choices=tuple(PROFILES), default="gpu")
    r = sub.add_parser("required", help="list the figures a profile must produce")
    r.add_argument("--profile", choices=tuple(PROFILES), default="gpu")
    a = p.parse_args(argv)
    if a.command == "required":
        for figure in required_figures(a.profile):
            print(*figure, sep=" | ")
        return 0
    problems = check(a.path, a.profile)
    for line in problems:
        print(line, file=sys.stderr)
    n = len(required_figures(a.profile))
    print(f"{a.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}; {n} required figures ({a.profile})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
