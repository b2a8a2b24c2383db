"""The C++ CPU kernels (backend="cpu") against the PyTorch reference on one thread, timed by the
process's CPU time rather than the wall clock: a comparison that stays meaningful on a machine
other jobs are loading (a descheduled process accrues no CPU time; cache and SMT sharing still
add noise, hence the median of many runs). float32, forward and forward+backward, at the shapes
of benchmarks.cca_cpu, benchmarks.neighbour_attention (CPU) and benchmarks.attention_cpu_small.

    python -m benchmarks.cpu_kernels_cputime [--quick] [--label TEXT]

--label is appended to the result file's name (e.g. to keep a run of an older build apart).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import labelled_backend, machine_name, write_results
from retro_kernels import chunked_cross_attention, neighbour_cross_attention, neighbour_self_attention


def cca(B, N, H, D, K, R, m):
    """(q, k, v, mask) and fn(q, k, v, mask, backend) of a chunked cross-attention problem."""
    L = N // m
    q, k, v = torch.randn(B, N, H, D), torch.randn(B, L, K, R, H, D), torch.randn(B, L, K, R, H, D)
    mask = torch.rand(B, L, K, R) > 0.1
    return (q, k, v, mask), lambda q, k, v, mk, b: chunked_cross_attention(q, k, v, chunk_size=m, neighbour_mask=mk,
                                                                           backend=b)


def self_attn(B, L, K, R, H, D):
    """(q, k, v, mask) and fn(q, k, v, mask, backend) of a neighbour self-attention problem."""
    q, k, v = (torch.randn(B, L, K, R, H, D) for _ in range(3))
    return (q, k, v, torch.rand(B, L, K, R) > 0.1), lambda q, k, v, mk, b: neighbour_self_attention(q, k, v, mk,
                                                                                                    backend=b)


def cross_attn(B, L, K, R, H, D, C):
    """(q, k, v, mask) and fn(q, k, v, mask, backend) of a neighbour cross-attention problem."""
    q = torch.randn(B, L, K, R, H, D)
    k, v = torch.randn(B, L, C, H, D), torch.randn(B, L, C, H, D)
    mask = torch.ones(B, L, C, dtype=torch.bool)
    return (q, k, v, mask), lambda q, k, v, mk, b: neighbour_cross_attention(q, k, v, mk, backend=b)


OPS = {cca: "chunked_cross_attention", self_attn: "neighbour_self_attention", cross_attn: "neighbour_cross_attention"}

SHAPES = [
    ("CCA B1 N2048 H8 D64 m64 k2 r128", cca, (1, 2048, 8, 64, 2, 128, 64)),
    ("CCA B2 N1024 H4 D64 m64 k2 r128", cca, (2, 1024, 4, 64, 2, 128, 64)),
    ("CCA B2 N512 H4 D32 m16 k2 r32", cca, (2, 512, 4, 32, 2, 32, 16)),
    ("CCA B1 N1024 H4 D128 m64 k4 r128", cca, (1, 1024, 4, 128, 4, 128, 64)),
    ("CCA B8 N256 H4 D32 m64 k2 r128 (small model)", cca, (8, 256, 4, 32, 2, 128, 64)),
    ("self B8 L4 k2 r128 H4 D32 (small model)", self_attn, (8, 4, 2, 128, 4, 32)),
    ("cross B8 L4 k2 r128 H4 D32 C64 (small model)", cross_attn, (8, 4, 2, 128, 4, 32, 64)),
    ("self B1 L8 k2 r128 H14 D64 (paper encoder)", self_attn, (1, 8, 2, 128, 14, 64)),
    ("cross B1 L8 k2 r128 H14 D64 C64 (paper encoder)", cross_attn, (1, 8, 2, 128, 14, 64, 64)),
]


def cpu_time_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 runs per measurement")
    parser.add_argument("--label", default="", help="appended to the result file's name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reps = 5 if args.quick else 15
    rows = []
    for label, make, shape in SHAPES:
        torch.manual_seed(0)
        (q, k, v, mask), fn = make(*shape)
        # before timing: the "cpu" column must time the C++ kernel, not a fallback
        ran = {backend: labelled_backend(OPS[make], backend, q) for backend in ("reference", "cpu")}
        for mode in ("forward", "forward+backward"):
            times = {}
            for backend in ("reference", "cpu"):
                leaves = [x.clone().requires_grad_(mode != "forward") for x in (q, k, v)]
                if mode == "forward":
                    def run(backend=backend, leaves=leaves):
                        with torch.no_grad():
                            fn(*leaves, mask, backend)
                else:
                    grad = torch.randn_like(q)

                    def run(backend=backend, leaves=leaves, grad=grad):
                        for x in leaves:
                            x.grad = None
                        fn(*leaves, mask, backend).backward(grad)
                times[backend] = cpu_time_ms(run, reps)
            rows.append({"shape": label, "mode": mode, "backend": f"{ran['reference']} / {ran['cpu']}",
                         "reference_ms": times["reference"], "cpu_ms": times["cpu"],
                         "speedup_vs_reference": times["reference"] / times["cpu"], "runs": reps})
            print(rows[-1], flush=True)
    machine = machine_name("cpu").replace(f"{torch.get_num_threads()} threads", "1 thread")
    columns = [("shape", "shape"), ("mode", "mode"), ("backend", "backends (reference ms / cpu ms)"),
               ("reference_ms", "reference ms"), ("cpu_ms", "cpu ms"),
               ("speedup_vs_reference", "cpu speed-up"), ("runs", "runs")]
    notes = ["float32, one thread (torch.set_num_threads(1)); time = median process CPU time per call",
             "10% of neighbour tokens masked at random (CCA, self); every chunk state real (cross)"]
    if args.label:
        notes.append(f"label: {args.label}")
    name = "cpu_kernels_cputime" + ("_quick" if args.quick else "") + (f"-{args.label}" if args.label else "")
    write_results(name, machine, rows, columns, notes)


if __name__ == "__main__":
    main()
