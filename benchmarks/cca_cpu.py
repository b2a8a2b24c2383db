"""Chunked cross-attention on the CPU: the fused C++ kernel (backend="cpu") against the plain
PyTorch reference (backend="reference"), forward and forward+backward, at RETRO shapes.

FLOPs (stated, as in the paper's attention count): forward = 4 * B * chunks * H * m * (k*r) * D
(two matrix products of 2 flops per multiply-add); backward = 2.5 x forward.

    python -m benchmarks.cca_cpu [--quick]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import bar_plot, labelled_backend, machine_name, peak_memory_bytes, time_fn, write_results
from retro_kernels import chunked_cross_attention

# (label, batch, seq_len, heads, head_dim, neighbours, neighbour_len, chunk_size)
SHAPES = [
    ("RETRO m64 k2 r128 H8 D64 n2048", 1, 2048, 8, 64, 2, 128, 64),
    ("RETRO m64 k2 r128 H4 D64 n1024 B2", 2, 1024, 4, 64, 2, 128, 64),
    ("small m16 k2 r32 H4 D32 n512", 2, 512, 4, 32, 2, 32, 16),
    ("m64 k4 r128 H4 D128 n1024", 1, 1024, 4, 128, 4, 128, 64),
]


def flops_forward(B, N, H, D, K, R, m) -> float:
    return 4.0 * B * (N // m) * H * m * K * R * D


def run_case(label, B, N, H, D, K, R, m, dtype, reps):
    L = N // m
    torch.manual_seed(0)
    q = torch.randn(B, N, H, D, dtype=dtype)
    k = torch.randn(B, L, K, R, H, D, dtype=dtype)
    v = torch.randn(B, L, K, R, H, D, dtype=dtype)
    mask = torch.rand(B, L, K, R) > 0.1
    grad = torch.randn_like(q)
    # before timing: a row labelled "cpu" that would run the reference is refused
    ran = {backend: labelled_backend("chunked_cross_attention", backend, q) for backend in ("reference", "cpu")}
    rows = []
    for mode in ("forward", "forward+backward"):
        times, mems = {}, {}
        for backend in ("reference", "cpu"):
            if mode == "forward":
                def fn(backend=backend):
                    with torch.no_grad():
                        return chunked_cross_attention(q, k, v, chunk_size=m, neighbour_mask=mask, backend=backend)
            else:
                leaves = [x.clone().requires_grad_() for x in (q, k, v)]

                def fn(backend=backend, leaves=leaves):
                    for x in leaves:
                        x.grad = None
                    chunked_cross_attention(*leaves, chunk_size=m, neighbour_mask=mask, backend=backend).backward(grad)
            times[backend] = time_fn(fn, reps=reps, warmup=2)
            mems[backend] = peak_memory_bytes(fn)
        flops = flops_forward(B, N, H, D, K, R, m) * (1.0 if mode == "forward" else 3.5)
        for backend in ("reference", "cpu"):
            t = times[backend]["median_ms"]
            rows.append({
                "shape": label, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "backend": ran[backend],
                "median_ms": t, "p10_ms": times[backend]["p10_ms"], "p90_ms": times[backend]["p90_ms"],
                "runs": times[backend]["runs"], "gflops": flops / t / 1e6,
                "speedup_vs_reference": times["reference"]["median_ms"] / t,
                "peak_mib": mems[backend] / 2**20,
                "memory_vs_reference": mems[backend] / max(1, mems["reference"]),
            })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs and only the first shape")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    reps = 5 if args.quick else 25
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for shape in shapes:
            rows += run_case(*shape, dtype=dtype, reps=reps)
    machine = machine_name("cpu")
    columns = [("shape", "shape"), ("dtype", "dtype"), ("mode", "mode"), ("backend", "backend"),
               ("median_ms", "median ms"), ("gflops", "GFLOP/s"), ("speedup_vs_reference", "speed-up"),
               ("peak_mib", "peak MiB"), ("memory_vs_reference", "memory / ref"), ("runs", "runs")]
    notes = ["forward FLOPs = 4*B*chunks*H*m*k*r*D; forward+backward = 3.5x forward",
             "time: median of the runs; memory: peak bytes of tensors allocated by one call (profiler timeline)",
             "10% of neighbour tokens masked at random"]

    def plot(path):
        fused = [r for r in rows if r["backend"] == "cpu"]  # checked: "cpu" rows ran the C++ kernel
        labels = [f"{r['shape'].split(' n')[0]} {r['dtype']} {r['mode']}" for r in fused]
        bar_plot(path, labels, {"speed-up vs reference": [r["speedup_vs_reference"] for r in fused],
                                "memory / reference": [r["memory_vs_reference"] for r in fused]},
                 "ratio", f"CCA C++ CPU kernel vs PyTorch reference ({machine})")

    name = "cca_cpu_quick" if args.quick else "cca_cpu"
    write_results(name, machine, rows, columns, notes, plot)


if __name__ == "__main__":
    main()
