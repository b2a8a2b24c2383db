"""Shared benchmark harness: timing (median of many runs), peak memory, machine name, and the
results as JSON, a Markdown table and a plot under benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_results(name: str, machine: str, rows: list[dict], columns: list[tuple[str, str]],
                  notes: list[str], plot: Callable[[Path], None] | None = None) -> Path:
    """Writes results/<name>-<machine>.{json,md} (and .png through `plot`); prints the table.
    columns: (key in row, header)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}-{slug(machine)}"
    meta = {"benchmark": name, "machine": machine, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "notes": notes}
    if hasattr(os, "getloadavg"):  # other jobs on the machine skew CPU timings: say so
        load = os.getloadavg()
        meta["loadavg"] = load
        notes = [*notes, f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                         f"on {os.cpu_count()} CPUs"]
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown_table(rows, columns)
    text = "\n".join([f"# {name} on {machine}", "", f"torch {torch.__version__}, {meta['date']}", "",
                      *[f"- {n}" for n in notes], "", table, ""])
    stem.with_suffix(".md").write_text(text)
    if plot is not None:
        plot(stem.with_suffix(".png"))
    print(text)
    return stem


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
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

