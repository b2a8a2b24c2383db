"""Shared benchmark harness: timing (median of many runs), peak memory, machine name, the backend
each row measured (and the refusal to label a fallback as a fused kernel), and the results as
JSON, a Markdown table and a plot under benchmarks/results/; append_row writes one row at a time
(JSON Lines) for runs that may be cut (benchmarks/gpu_rows.py)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

# where write_results writes; RETRO_RESULTS_DIR moves it (gpu_check.sh: into the run's own folder)
RESULTS = Path(os.environ.get("RETRO_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def cpu_isa_label() -> str:
    """The vector instruction set the CPU kernels run with: 'AVX-512', 'AVX2' or 'baseline ISA'
    (SSE2 / NEON): retro_kernels' C++ kernels' choice when the extension is built, else torch's."""
    try:
        from retro_kernels import cpu_kernel_isa

        isa = cpu_kernel_isa()
    except ImportError:
        isa = None
    if isa is None:
        isa = torch.backends.cpu.get_cpu_capability().lower()
    return {"avx512": "AVX-512", "avx2": "AVX2"}.get(isa, "baseline ISA")


def machine_name(device: str = "cpu") -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU; 'AMD EPYC, AVX2, 2 threads' on the CPU (the instruction
    set is part of the name: the same CPU model may be an AVX-512 or an AVX2 machine).
    Results measured before the instruction set was named carry 'AMD EPYC, 2 threads' (an
    AVX-512 machine)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {cpu_isa_label()}, {torch.get_num_threads()} threads"


# ---- the backend a row measured --------------------------------------------------------------

FUSED_BACKENDS = ("cpu", "triton", "cuda")  # retro_kernels' fused kernels
BASELINE_BACKEND = "torch"                  # the "backend" of a row that runs no retro_kernels op
NO_RETRIEVAL = "none (no retrieval)"        # a model row whose retrieval ops do not run


class FallbackLabelError(RuntimeError):
    """A row labelled as a fused kernel would record the time of another backend (a fallback)."""


def ran_backend(op: str, backend: str, q: torch.Tensor) -> str:
    """The backend retro_kernels op `op` runs when called with backend=`backend` and queries like
    q: retro_kernels.ops.resolved_backend, the op's own resolution (an explicit backend that
    cannot run raises, as the op would)."""
    from retro_kernels.ops import resolved_backend

    return resolved_backend(op, backend, q)


def require_fused(label: str, ran: str | Mapping[str, str],
                  expected: tuple[str, ...] = FUSED_BACKENDS) -> str | Mapping[str, str]:
    """`ran` (a backend, or op -> backend for a row running several ops), after checking that the
    row labelled `label`, which claims a fused kernel, measures one of `expected`; raises
    FallbackLabelError otherwise (a fallback's time must not be recorded as the fused kernel's)."""
    for op, name in (ran.items() if isinstance(ran, Mapping) else [("its op", ran)]):
        if name not in expected:
            raise FallbackLabelError(
                f"row {label!r} is labelled as a fused kernel, but {op} runs backend {name!r} there, "
                f"expected one of {expected}: refusing to record a fallback's time as the fused kernel's "
                "(build the extension with CUDA / install triton, or choose a supported shape)")
    return ran


def fused_backend(label: str, op: str, backend: str, q: torch.Tensor,
                  expected: tuple[str, ...] = FUSED_BACKENDS) -> str:
    """ran_backend(op, backend, q) for the row `label` that claims a fused kernel: raises
    FallbackLabelError where it is not one of `expected`."""
    return require_fused(label, ran_backend(op, backend, q), expected)


def labelled_backend(op: str, backend: str, q: torch.Tensor) -> str:
    """For a row labelled by the backend it asks `op` for (e.g. "reference", "cpu"): the backend
    that runs; raises FallbackLabelError where a row labelled with a fused backend would run another."""
    ran = ran_backend(op, backend, q)
    return require_fused(backend, ran, (backend,)) if backend in FUSED_BACKENDS else ran


def probe(shape: tuple[int, ...], device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` on `device` holding one element (expanded): what backend resolution
    reads (device, dtype, shape) without the memory of a real input."""
    return torch.empty((), device=device, dtype=dtype).expand(shape)


def _layer_op(layer: torch.nn.Module, batch: int, chunks: int, neighbours: int, neighbour_len: int,
              decode: bool) -> tuple[str, str, tuple[int, ...]] | None:
    """(op, backend, shape of its queries) of a retro_kernels layer of a model; None for others."""
    from retro_kernels.nn import ChunkedCrossAttention, NeighbourCrossAttention, NeighbourSelfAttention

    if isinstance(layer, ChunkedCrossAttention):
        if decode:
            return "chunked_cross_attention_decode", layer.decode_backend, (batch, layer.heads, layer.head_dim)
        return ("chunked_cross_attention", layer.backend,
                (batch, chunks * layer.chunk_size, layer.heads, layer.head_dim))
    ops = {NeighbourSelfAttention: "neighbour_self_attention", NeighbourCrossAttention: "neighbour_cross_attention"}
    op = next((name for cls, name in ops.items() if isinstance(layer, cls)), None)
    if op is None:
        return None
    L = 1 if decode else chunks  # decoding encodes one chunk of neighbours per sequence
    return op, layer.backend, (batch, L, neighbours, neighbour_len, layer.heads, layer.head_dim)


def model_backends(model: torch.nn.Module, batch: int, chunks: int, neighbours: int, neighbour_len: int,
                   dtype: torch.dtype, decode: bool = False) -> dict[str, str]:
    """op -> the backend each retro_kernels op inside `model` runs (its ChunkedCrossAttention and
    neighbour-encoder layers, each with its own `backend`), for training on `batch` sequences of
    `chunks` chunks with queries in `dtype` (the autocast dtype under autocast), or with
    decode=True for decoding `batch` sequences (the decode op, and the encoder on one chunk of
    neighbours per sequence). An op whose layers resolve differently reads e.g. "reference/triton"."""
    device = next(model.parameters()).device
    found: dict[str, set[str]] = {}
    for layer in model.modules():
        described = _layer_op(layer, batch, chunks, neighbours, neighbour_len, decode)
        if described is not None:
            op, backend, shape = described
            found.setdefault(op, set()).add(ran_backend(op, backend, probe(shape, device, dtype)))
    return {op: "/".join(sorted(names)) for op, names in sorted(found.items())}


def backend_column(backends: Mapping[str, str]) -> str:
    """The "backend" cell of a row running several ops: the one backend they all run, else
    "op=backend, ..."; NO_RETRIEVAL for none."""
    names = set(backends.values())
    if not names:
        return NO_RETRIEVAL
    if len(names) == 1:
        return names.pop()
    return ", ".join(f"{op}={name}" for op, name in backends.items())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = "cpu", warmup: int = 3, reps: int = 25,
            min_seconds: float = 0.0) -> dict:
    """Runs fn warmup times, then at least `reps` times (and at least min_seconds); returns the
    median, 10th and 90th percentile in milliseconds. CUDA runs are timed with events."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_seconds:
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(times)}


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensors allocated by one run of fn beyond what was live before it.
    CUDA: the caching allocator's peak. CPU: the profiler's allocation timeline (every tensor the
    run creates, autograd's saved tensors included; a kernel's non-tensor scratch is not seen)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def code_version() -> str:
    """The commit the benchmark ran from, with "+ uncommitted changes" when the working tree differs
    from it (tracked or untracked files git does not ignore, benchmarks/results/ left out: results are
    not code); "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def append_row(path: Path, row: dict) -> None:
    """Appends row as one JSON line to path (JSON Lines) and flushes it to disk at once: a run
    killed after this call keeps the row. The line is written by one write() call in append mode,
    so rows of concurrent writers do not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def mean_range(values, digits: int = 3) -> str:
    """"mean (min-max)" of values, for a row summarising several seeds."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f} ({v.min():.{digits}f}-{v.max():.{digits}f})"


def write_results(name: str, machine: str, rows: list[dict], columns: list[tuple[str, str]],
                  notes: list[str], plot: Callable[[Path], None] | None = None, echo: bool = True) -> Path:
    """Writes results/<name>-<machine>.{json,md} (and .png through `plot`); prints the table
    (unless echo is False). columns: (key in row, header)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}-{slug(machine)}"
    meta = {"benchmark": name, "machine": machine, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "code": code_version(), "notes": notes}
    if hasattr(os, "getloadavg"):  # other jobs on the machine skew CPU timings: say so
        load = os.getloadavg()
        meta["loadavg"] = load
        notes = [*notes, f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                         f"on {os.cpu_count()} CPUs"]
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown_table(rows, columns)
    head = f"torch {torch.__version__}, {meta['date']}, code {meta['code']}"
    text = "\n".join([f"# {name} on {machine}", "", head, "", *[f"- {n}" for n in notes], "", table, ""])
    stem.with_suffix(".md").write_text(text)
    if plot is not None:
        plot(stem.with_suffix(".png"))
    if echo:
        print(text)
    return stem


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per label, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the file-only backend (benchmarks run without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lays out, writes (120 dpi) and closes a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
