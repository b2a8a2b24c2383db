"""The attentions of a small RETRO model in CPU training, fused C++ kernel (backend="cpu") against
the PyTorch reference (backend="reference"), float32, forward and forward+backward: the neighbour
encoder's self-attention and cross-attention to the chunk states, and the decoder's chunked
cross-attention, at batch 8, 4 chunks of m = 64, k = 2 neighbours of r = 128 tokens, 4 heads of 32.

    python -m benchmarks.attention_cpu_small [--quick]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import bar_plot, labelled_backend, machine_name, time_fn, write_results
from retro_kernels import chunked_cross_attention, neighbour_cross_attention, neighbour_self_attention

B, L, K, R, H, D, M = 8, 4, 2, 128, 4, 32, 64


def problems():
    """(op, shape label, inputs, fn(q, k, v, mask, backend), FLOPs of the forward)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = rnd(B, L, K, R, H, D), rnd(B, L, K, R, H, D), rnd(B, L, K, R, H, D)
    nmask = torch.rand(B, L, K, R, generator=g) > 0.1
    kc, vc = rnd(B, L, M, H, D), rnd(B, L, M, H, D)
    cmask = torch.ones(B, L, M, dtype=torch.bool)
    qd = rnd(B, L * M, H, D)
    return [
        ("neighbour_self_attention", f"(B,L,K,R,H,D)=({B},{L},{K},{R},{H},{D})", (q, k, v, nmask),
         lambda q, k, v, m, b: neighbour_self_attention(q, k, v, m, backend=b), 4.0 * B * L * K * H * R * R * D),
        ("neighbour_cross_attention", f"q ({B},{L},{K},{R},{H},{D}), states ({B},{L},{M},{H},{D})",
         (q, kc, vc, cmask), lambda q, k, v, m, b: neighbour_cross_attention(q, k, v, m, backend=b),
         4.0 * B * L * K * H * R * M * D),
        ("chunked_cross_attention", f"B={B} N={L * M} H={H} D={D} m={M} k={K} r={R}", (qd, k, v, nmask),
         lambda q, k, v, m, b: chunked_cross_attention(q, k, v, chunk_size=M, neighbour_mask=m, backend=b),
         4.0 * B * L * H * M * K * R * D),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 runs per measurement")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else 25
    rows = []
    for op, shape, (a, b, c, m), fn, flops in problems():
        # before timing: a row labelled "cpu" that would run the reference is refused
        ran = {backend: labelled_backend(op, backend, a) for backend in ("reference", "cpu")}
        for mode in ("forward", "forward+backward"):
            times = {}
            for backend in ("reference", "cpu"):
                leaves = [x.clone().requires_grad_(mode != "forward") for x in (a, b, c)]
                if mode == "forward":
                    def run(backend=backend, leaves=leaves):
                        with torch.no_grad():
                            return fn(*leaves, m, backend)
                else:
                    grad = torch.randn_like(a)

                    def run(backend=backend, leaves=leaves, grad=grad):
                        for x in leaves:
                            x.grad = None
                        fn(*leaves, m, backend).backward(grad)
                times[backend] = time_fn(run, warmup=2, reps=reps)
            f = flops * (1.0 if mode == "forward" else 3.5)
            for backend in ("reference", "cpu"):
                t = times[backend]["median_ms"]
                rows.append({"op": op, "shape": shape, "mode": mode, "backend": ran[backend], "dtype": "float32",
                             "median_ms": t, "p10_ms": times[backend]["p10_ms"], "p90_ms": times[backend]["p90_ms"],
                             "runs": times[backend]["runs"], "gflops": f / t / 1e6,
                             "speedup_vs_reference": times["reference"]["median_ms"] / t})
    machine = machine_name("cpu")
    columns = [("op", "op"), ("shape", "shape"), ("mode", "mode"), ("backend", "backend"), ("median_ms", "median ms"),
               ("p10_ms", "p10 ms"), ("p90_ms", "p90 ms"), ("gflops", "GFLOP/s"),
               ("speedup_vs_reference", "speed-up"), ("runs", "runs")]
    notes = ["float32; 10% of neighbour tokens masked at random, every chunk state real",
             "FLOPs: self 4*B*L*k*H*r*r*D, cross 4*B*L*k*H*r*m*D, CCA 4*B*chunks*H*m*k*r*D; "
             "forward+backward = 3.5x forward",
             "time: median of the runs (p10 / p90 beside it)"]

    def plot(path):
        fused = [r for r in rows if r["backend"] == "cpu"]
        bar_plot(path, [f"{r['op'].replace('_attention', '')} {r['mode']}" for r in fused],
                 {"speed-up vs reference": [r["speedup_vs_reference"] for r in fused]},
                 "ratio", f"small-model attentions, C++ CPU kernel vs reference ({machine})")

    write_results("attention_cpu_small_quick" if args.quick else "attention_cpu_small", machine, rows, columns,
                  notes, plot)


if __name__ == "__main__":
    main()
