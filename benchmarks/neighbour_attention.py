"""The neighbour encoder's attentions: our fused backends against SDPA on reshaped tensors (with
the chunk states repeated k times for the cross-attention, as a user would write it) and the
eager reference, at the paper's encoder shapes (k = 2 neighbours of r = 128 tokens, width 896 =
14 heads x 64, chunks of m = 64 decoder states). Forward and forward+backward; median time,
ratio to SDPA, peak memory.

FLOPs (stated): self = 4 * B * L * k * H * r * r * D; cross = 4 * B * L * k * H * r * m * D;
forward+backward = 3.5 x forward.

    python -m benchmarks.neighbour_attention [--device cuda] [--quick]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import (BASELINE_BACKEND, bar_plot, fused_backend, machine_name, peak_memory_bytes, ran_backend,
                                time_fn, write_results)
from retro_kernels import neighbour_cross_attention, neighbour_self_attention

OPS = {"self": "neighbour_self_attention", "cross": "neighbour_cross_attention"}
REFERENCE = "eager reference"


def row_backend(impl: str, op: str, fused: str, q: torch.Tensor) -> str:
    """The "backend" of the row `impl` of `op` ("self" or "cross"): ours must run the fused
    backend `fused` (raises otherwise), the eager reference runs "reference", SDPA no op of ours."""
    if impl == f"ours ({fused})":
        return fused_backend(impl, OPS[op], fused, q, expected=(fused,))
    if impl == REFERENCE:
        return ran_backend(OPS[op], "reference", q)
    return BASELINE_BACKEND


def sdpa_self(q, k, v, mask):
    """SDPA over the B*L*K neighbours as a batch; fully masked neighbours set to 0 (SDPA gives NaN)."""
    B, L, K, R, H, D = q.shape
    t = lambda x: x.reshape(B * L * K, R, H, D).transpose(1, 2)  # noqa: E731
    m = mask.reshape(B * L * K, 1, 1, R)
    out = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=m)
    out = torch.where(m.any(-1, keepdim=True), out, 0.0)
    return out.transpose(1, 2).reshape(B, L, K, R, H, D)


def sdpa_cross_repeat(q, k, v, mask):
    """SDPA with the chunk states repeated for each of the K neighbours."""
    B, L, K, R, H, D = q.shape
    C = k.shape[2]
    rep = lambda x: x.repeat_interleave(K, dim=1).reshape(B * L * K, C, H, D).transpose(1, 2)  # noqa: E731
    m = mask.repeat_interleave(K, dim=1).reshape(B * L * K, 1, 1, C)
    out = F.scaled_dot_product_attention(q.reshape(B * L * K, R, H, D).transpose(1, 2), rep(k), rep(v), attn_mask=m)
    out = torch.where(m.any(-1, keepdim=True), out, 0.0)
    return out.transpose(1, 2).reshape(B, L, K, R, H, D)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    dev = args.device
    if dev == "cuda":
        B, L, dtype, fused, reps = 16, 32, torch.bfloat16, "triton", 30
    else:
        B, L, dtype, fused, reps = 1, 8, torch.float32, "cpu", 15
    if args.quick:
        reps = 5
    K, R, H, D, C = 2, 128, 14, 64, 64
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = rnd(B, L, K, R, H, D), rnd(B, L, K, R, H, D), rnd(B, L, K, R, H, D)
    kc, vc = rnd(B, L, C, H, D), rnd(B, L, C, H, D)
    nmask = torch.rand(B, L, K, R, device=dev, generator=g) > 0.1
    cmask = torch.ones(B, L, C, dtype=torch.bool, device=dev)
    problems = {
        "self": ((q, k, v, nmask), 4.0 * B * L * K * H * R * R * D, {
            f"ours ({fused})": lambda q, k, v, m: neighbour_self_attention(q, k, v, m, backend=fused),
            "SDPA (reshaped)": sdpa_self,
            REFERENCE: lambda q, k, v, m: neighbour_self_attention(q, k, v, m, backend="reference"),
        }),
        "cross": ((q, kc, vc, cmask), 4.0 * B * L * K * H * R * C * D, {
            f"ours ({fused})": lambda q, k, v, m: neighbour_cross_attention(q, k, v, m, backend=fused),
            "SDPA (states repeated k times)": sdpa_cross_repeat,
            REFERENCE: lambda q, k, v, m: neighbour_cross_attention(q, k, v, m, backend="reference"),
        }),
    }
    rows = []
    for op, ((a, b, c, m), flops, impls) in problems.items():
        for mode in ("forward", "forward+backward"):
            group = []
            for name, fn in impls.items():
                backend = row_backend(name, op, fused, a)  # before timing: a fallback is refused, not measured
                leaves = [x.detach().clone().requires_grad_(mode != "forward") for x in (a, b, c)]
                if mode == "forward":
                    def run(fn=fn, leaves=leaves):
                        with torch.no_grad():
                            return fn(*leaves, m)
                else:
                    grad = torch.randn_like(a)

                    def run(fn=fn, leaves=leaves, grad=grad):
                        for x in leaves:
                            x.grad = None
                        fn(*leaves, m).backward(grad)
                t = time_fn(run, device=dev, warmup=2, reps=reps)
                mem = peak_memory_bytes(run, device=dev)
                f = flops * (1.0 if mode == "forward" else 3.5)
                group.append({"op": op, "mode": mode, "impl": name, "backend": backend,
                              "dtype": str(dtype).replace("torch.", ""),
                              "median_ms": t["median_ms"], "runs": t["runs"], "tflops": f / t["median_ms"] / 1e9,
                              "peak_mib": mem / 2**20})
            sdpa = next(r for r in group if r["impl"].startswith("SDPA"))
            for r in group:
                r["speedup_vs_sdpa"] = sdpa["median_ms"] / r["median_ms"]
                r["memory_vs_sdpa"] = r["peak_mib"] / max(sdpa["peak_mib"], 1e-9)
            rows += group
    machine = machine_name(dev)
    notes = [f"B={B}, chunks={L}, k={K}, r={R}, heads={H}, head_dim={D}, chunk states m={C}, {dtype}",
             "FLOPs: self 4*B*L*k*H*r*r*D, cross 4*B*L*k*H*r*m*D; forward+backward = 3.5x forward",
             "10% of neighbour tokens masked; memory: peak bytes allocated by one call"]
    columns = [("op", "op"), ("mode", "mode"), ("impl", "impl"), ("backend", "backend"), ("dtype", "dtype"),
               ("median_ms", "median ms"),
               ("tflops", "TFLOP/s"), ("speedup_vs_sdpa", "x SDPA"), ("peak_mib", "peak MiB"),
               ("memory_vs_sdpa", "memory / SDPA"), ("runs", "runs")]

    def plot(path):
        labels = sorted({f"{r['op']} {r['mode']}" for r in rows})
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        bar_plot(path, labels, {i: [next((r["speedup_vs_sdpa"] for r in rows
                                          if f"{r['op']} {r['mode']}" == lab and r["impl"] == i), 0) for lab in labels]
                                for i in impls}, "speed-up vs SDPA", f"neighbour attention, {machine}")

    write_results(f"neighbour_attention_{'gpu' if dev == 'cuda' else 'cpu'}", machine, rows, columns, notes, plot)


if __name__ == "__main__":
    main()
