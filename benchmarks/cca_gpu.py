"""Chunked cross-attention on the GPU: our Triton kernels against the strongest PyTorch baselines
(benchmarks/cca_baselines.py), bfloat16, forward and forward+backward, layer level and bare
attention; and the CUDA decode kernel against SDPA on the same cached keys/values.

FLOPs (stated): forward = 4 * B * chunks * H * m * (k*r) * D; backward = 2.5 x forward.
Bytes (the floor): q, k, v and the mask read once, the output written once (backward: also the
output gradient read and q/k/v gradients written). The card's bf16 matmul rate (8192^3) and copy
bandwidth are measured in the same run.

--profile gpu|rehearsal runs the GPU check's part (benchmarks/gpu_check.sh, benchmarks/gpu_rows.py):
the profile's shapes, layer forward and forward+backward and bare forward, ours against SDPA and
FlexAttention, each row appended to $RETRO_GPU_ROWS as it is measured; "rehearsal" runs it on the
CPU (our CPU kernels, FlexAttention uncompiled).

    python -m benchmarks.cca_gpu [--quick] [--decode-only] [--profile gpu|rehearsal]
"""
from __future__ import annotations

import argparse
import traceback

import torch

from benchmarks import cca_baselines as base
from benchmarks import gpu_rows
from benchmarks.harness import (BASELINE_BACKEND, bar_plot, fused_backend, machine_name, peak_memory_bytes, time_fn,
                                write_results)
from retro_kernels import chunked_cross_attention, chunked_cross_attention_decode

# (label, batch, seq_len, heads, head_dim, neighbours, neighbour_len, chunk_size)
SHAPES = gpu_rows.PROFILES["gpu"].cca_shapes
DECODE_SHAPES = [(1, 16, 64), (64, 16, 64), (256, 16, 64), (64, 32, 128), (256, 32, 128)]
OURS, OURS_DECODE = "ours", "ours (cuda)"  # the rows of our kernels; every other row is a baseline
LEVELS = {"layer": "layer", "bare attention": "bare"}  # level -> its name in a gpu_rows variant
# (mode, level, impls): everything, and the GPU check's part (gpu_rows.CCA_LAYER / CCA_BARE)
FULL_PLAN = [(mode, level, None) for mode in ("forward", "forward+backward") for level in LEVELS]
CHECK_PLAN = [("forward", "layer", gpu_rows.CCA_LAYER), ("forward+backward", "layer", gpu_rows.CCA_LAYER),
              ("forward", "bare attention", gpu_rows.CCA_BARE)]


def row_backend(impl: str, op: str, q: torch.Tensor) -> str:
    """The "backend" of the row `impl`: for ours, the backend the op runs (raises unless it is the
    fused kernel of its label: triton for CCA on a GPU, the CPU kernel on the CPU, cuda for
    decode); BASELINE_BACKEND for the others."""
    if impl == OURS:
        if q.device.type == "cpu":
            return fused_backend(impl, op, "auto", q)
        return fused_backend(impl, op, "triton", q, expected=("triton",))
    if impl == OURS_DECODE:
        return fused_backend(impl, op, "cuda", q, expected=("cuda",))
    return BASELINE_BACKEND


def card_rates(device: str = "cuda") -> dict:
    """Measured matmul TFLOP/s (bf16 on a GPU, float32 on the CPU) and device-to-device copy GB/s
    (read + write). The CPU (a rehearsal) uses small sizes."""
    n, words, dtype = (8192, 256 * 2**20, torch.bfloat16) if device == "cuda" else (512, 2**22, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device=device, warmup=3, reps=10)["median_ms"]
    x = torch.randn(words, device=device)  # 1 GiB on a GPU
    y = torch.empty_like(x)
    c = time_fn(lambda: y.copy_(x), device=device, warmup=3, reps=10)["median_ms"]
    return {"matmul_tflops": 2 * n**3 / t / 1e9, "copy_gbs": 2 * x.numel() * 4 / c / 1e6}


def make_problem(B, N, H, D, K, R, m, dtype=torch.bfloat16, device="cuda") -> base.Problem:
    L = N // m
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, N, H, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, L, K, R, H, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, L, K, R, H, D, device=device, dtype=dtype, generator=g)
    mask = torch.rand(B, L, K, R, device=device, generator=g) > 0.1
    return base.Problem(q, k, v, mask, m)


def ours(p: base.Problem):
    """Our op on p: the Triton kernel on a GPU (an explicit backend: no silent fallback), the
    best available on the CPU (its CPU kernel; row_backend records which)."""
    backend = "triton" if p.q.is_cuda else "auto"
    return chunked_cross_attention(p.q, p.k, p.v, chunk_size=p.chunk_size, neighbour_mask=p.mask, backend=backend)


def layer_impls(p: base.Problem) -> dict:
    """impl -> (fn(p), torch.compile's part: "inductor" or "none")."""
    from torch.nn.attention import SDPBackend

    compiled = p.q.is_cuda  # FlexAttention uncompiled on the CPU (a rehearsal)
    impls = {OURS: (ours, "none"), "eager reshape": (base.eager_layer, "none"), "SDPA": (base.sdpa_layer, "none")}
    if p.q.is_cuda:
        impls["SDPA cuDNN"] = (lambda p: base.sdpa_layer(p, SDPBackend.CUDNN_ATTENTION), "none")
    try:
        block_mask = base.flex_mask(p)
        impls["FlexAttention"] = (lambda p: base.flex_layer(p, block_mask, compiled), compile_label(compiled))
    except Exception as exc:  # noqa: BLE001 - record, do not fail the run
        print(f"FlexAttention unavailable: {exc}")
    return impls


def compile_label(compiled: bool) -> str:
    return "inductor" if compiled else "none"


def bare_impls(p: base.Problem, grad: bool) -> dict:
    """impl -> (fn(), its leaf inputs, torch.compile's part)."""
    from torch.nn.attention import SDPBackend

    prep = base.prepared_sdpa_inputs(p, grad)
    impls = {OURS: (lambda: ours(p), (p.q, p.k, p.v), "none"),
             "eager reshape": (base.bare_eager(prep), prep[:3], "none"),
             "SDPA": (base.bare_sdpa(prep), prep[:3], "none")}
    if p.q.is_cuda:
        impls["SDPA cuDNN"] = (base.bare_sdpa(prep, SDPBackend.CUDNN_ATTENTION), prep[:3], "none")
    try:
        flex_prep = base.prepared_flex_inputs(p, grad)
        impls["FlexAttention"] = (base.bare_flex(flex_prep, base.flex_mask(p), p.q.is_cuda), flex_prep,
                                  compile_label(p.q.is_cuda))
    except Exception as exc:  # noqa: BLE001 - record, do not fail the run
        print(f"FlexAttention unavailable: {exc}")
    return impls


def bytes_floor(p: base.Problem, mode: str) -> int:
    B, N, H, D, L, K, R, m = p.dims
    e = p.q.element_size()
    qo = B * N * H * D * e
    kv = B * (N // m) * K * R * H * D * e
    fwd = 2 * qo + 2 * kv + p.mask.numel()
    return fwd if mode == "forward" else fwd + 2 * qo + 2 * kv + qo  # + dO, dq, dk, dv, re-read o


def measure(fn, inputs, mode: str, reps: int, device: str = "cuda"):
    """fn() -> output; in forward+backward mode also backpropagates a fixed gradient. Returns the
    timing and the peak memory (None on the CPU: the profiler's count takes long)."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn()
    else:
        out = fn()
        grad = torch.randn_like(out)
        del out

        def run():
            for x in inputs:
                x.grad = None
            fn().backward(grad)
    t = time_fn(run, device=device, warmup=3, reps=reps)
    return t, peak_memory_bytes(run, device=device) if device == "cuda" else None


def run_shape(label, B, N, H, D, K, R, m, rates, reps, dtype=torch.bfloat16, device="cuda", plan=FULL_PLAN,
              on_row=None):
    """Rows of one shape for each (mode, level, impls) of plan (impls None: all); on_row(row, mode)
    is called as each row is measured."""
    rows = []
    p = make_problem(B, N, H, D, K, R, m, dtype, device)
    flops_fwd = 4.0 * B * (N // m) * H * m * K * R * D
    with torch.no_grad():
        reference = chunked_cross_attention(p.q.float(), p.k.float(), p.v.float(), chunk_size=m,
                                            neighbour_mask=p.mask, backend="reference")
    for mode, level, wanted in plan:
        flops = flops_fwd * (1.0 if mode == "forward" else 3.5)
        pg = base.Problem(*(x.detach().requires_grad_(mode != "forward") for x in (p.q, p.k, p.v)), p.mask, m)
        if level == "layer":
            impls = {n: (lambda f=f: f(pg), (pg.q, pg.k, pg.v), c) for n, (f, c) in layer_impls(pg).items()}
        else:
            impls = bare_impls(pg, mode != "forward")
        for name, (fn, inputs, compiled) in impls.items():
            if wanted is not None and name not in wanted:
                continue
            row = {"shape": label, "batch": B, "mode": mode, "level": level, "impl": name,
                   "backend": row_backend(name, "chunked_cross_attention", pg.q),  # raises, not recorded
                   "compile": compiled}
            try:
                if level == "layer" and mode == "forward":
                    with torch.no_grad():
                        err = (fn().float() - reference).abs().max().item()
                    row["max_abs_err_vs_fp32"] = err
                t, mem = measure(fn, inputs, mode, reps, device)
                row.update(median_ms=t["median_ms"], p10_ms=t["p10_ms"], p90_ms=t["p90_ms"],
                           runs=t["runs"], tflops=flops / t["median_ms"] / 1e9,
                           pct_matmul=100 * flops / t["median_ms"] / 1e9 / rates["matmul_tflops"],
                           pct_bandwidth=100 * bytes_floor(p, mode) / t["median_ms"] / 1e6 / rates["copy_gbs"])
                if mem is not None:
                    row["peak_mib"] = mem / 2**20
            except Exception as exc:  # noqa: BLE001 - an unsupported baseline is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                traceback.print_exc(limit=1)
            rows.append(row)
            if on_row is not None:
                on_row(row, (N, H, D, K, R, m))
            if device == "cuda":
                torch.cuda.empty_cache()
    # ratio of ours to the best baseline in the same (mode, level)
    for mode, level, _ in plan:
        group = [r for r in rows if r["mode"] == mode and r["level"] == level and "median_ms" in r]
        baselines = [r["median_ms"] for r in group if r["impl"] != OURS]
        for r in group:
            r["speedup_vs_best_baseline"] = min(baselines) / r["median_ms"] if baselines else float("nan")
    return rows


def emit_row(profile: str, device: str, dtype: torch.dtype):
    """on_row for run_shape: each row to gpu_rows.emit (schema keys, figures, the rest as extras)."""
    def on_row(row: dict, dims) -> None:
        figures = {"ms": "median_ms", "tflop_s": "tflops", "pct_bandwidth_floor": "pct_bandwidth"}
        extras = {k: row[k] for k in ("p10_ms", "p90_ms", "runs", "pct_matmul", "peak_mib", "max_abs_err_vs_fp32",
                                      "error") if k in row}
        variant = f"{LEVELS[row['level']]}: {row['impl']}"
        gpu_rows.emit(profile, device, section="cca", mode=row["mode"], variant=variant,
                      config=gpu_rows.cca_config(*dims), batch=row["batch"], dtype=str(dtype).removeprefix("torch."),
                      backend=row["backend"], compile=row["compile"],
                      **{k: row[v] for k, v in figures.items() if v in row}, **extras)
    return on_row


def run_decode(B, H, D, reps, K=2, R=128):
    """tokens/s of one decode step over a batch, ours (CUDA) vs SDPA on the same cached k/v;
    eager launches and CUDA-graph replays."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, K, R, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    mask = torch.rand(B, K, R, device="cuda", generator=g) > 0.1
    kt = k.view(B, K * R, H, D).transpose(1, 2)
    vt = v.view(B, K * R, H, D).transpose(1, 2)
    sdpa_mask = mask.view(B, 1, 1, K * R)
    impls = {
        OURS_DECODE: lambda: chunked_cross_attention_decode(q, k, v, mask, backend="cuda"),
        "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kt, vt, attn_mask=sdpa_mask),
    }
    backends = {name: row_backend(name, "chunked_cross_attention_decode", q) for name in impls}  # before timing
    rows = []
    for mode in ("eager", "cuda graph"):
        times = {}
        for name, fn in impls.items():
            run = fn
            if mode == "cuda graph":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        fn()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                run = graph.replay
            times[name] = time_fn(run, device="cuda", warmup=5, reps=reps)["median_ms"]
        for name, t in times.items():
            rows.append({"shape": f"B{B} H{H} D{D} k{K} r{R}", "mode": mode, "impl": name,
                         "backend": backends[name], "median_us": t * 1e3,
                         "tokens_per_s": B / t * 1e3, "speedup_vs_sdpa": times["SDPA"] / t})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="only the decode rows")
    parser.add_argument("--profile", choices=tuple(gpu_rows.PROFILES), default=None,
                        help="the GPU check's part only: the profile's shapes and impls, rows to $RETRO_GPU_ROWS")
    args = parser.parse_args(argv)
    profile = gpu_rows.PROFILES[args.profile] if args.profile else None
    device = profile.device if profile else "cuda"
    dtype = getattr(torch, profile.dtype) if profile else torch.bfloat16
    reps = 10 if args.quick or device == "cpu" else 30
    machine = machine_name(device)
    rates = card_rates(device)
    print(f"{machine}: {str(dtype).removeprefix('torch.')} matmul {rates['matmul_tflops']:.1f} TFLOP/s, "
          f"copy {rates['copy_gbs']:.0f} GB/s", flush=True)
    if profile is None:
        run_decode_rows(machine)
        if args.decode_only:
            return
    shapes = profile.cca_shapes if profile else SHAPES
    notes = [f"measured in this run: {dtype} matmul {rates['matmul_tflops']:.1f} TFLOP/s, "
             f"device copy {rates['copy_gbs']:.0f} GB/s (read + write)",
             f"forward FLOPs = 4*B*chunks*H*m*k*r*D; forward+backward = 3.5x forward; {dtype}; "
             "10% of neighbour tokens masked",
             "pct_bandwidth = minimal bytes (inputs read once, outputs written once) / time / copy bandwidth",
             "layer: from unshifted q/k/v to the unshifted output, all copies included; bare: attention only",
             "; ".join(f"{s[0]}: B {s[1]}, seq_len {s[2]}, chunk {s[7]}, {s[5]} neighbours of {s[6]} tokens"
                       for s in shapes)]
    columns = [("shape", "shape"), ("batch", "B"), ("mode", "mode"), ("level", "level"), ("impl", "impl"),
               ("backend", "backend"), ("compile", "compile"), ("median_ms", "median ms"), ("tflops", "TFLOP/s"),
               ("pct_matmul", "% matmul"), ("pct_bandwidth", "% bandwidth"), ("peak_mib", "peak MiB"),
               ("speedup_vs_best_baseline", "x best baseline"), ("max_abs_err_vs_fp32", "max err"), ("error", "error")]
    rows = []

    def plot(path):
        layer = [r for r in rows if r["level"] == "layer" and "median_ms" in r]
        labels = sorted({f"{r['shape']} {r['mode']}" for r in layer})
        impls = list(dict.fromkeys(r["impl"] for r in layer))
        series = {i: [next((r["tflops"] for r in layer if f"{r['shape']} {r['mode']}" == lab and r["impl"] == i), 0.0)
                      for lab in labels] for i in impls}
        bar_plot(path, labels, series, "TFLOP/s", f"CCA layer, {dtype}, {machine}")

    name = f"cca_{profile.name}_check" if profile else "cca_gpu"
    on_row = emit_row(profile.name, device, dtype) if profile else None
    for shape in shapes:  # results written after each shape
        rows += run_shape(*shape, rates=rates, reps=reps, dtype=dtype, device=device,
                          plan=CHECK_PLAN if profile else FULL_PLAN, on_row=on_row)
        write_results(name, machine, rows, columns, notes, plot)


def run_decode_rows(machine: str) -> None:
    """The decode kernel's rows (DECODE_SHAPES), written to cca_decode_gpu."""
    decode_rows = []
    for B, H, D in DECODE_SHAPES:
        decode_rows += run_decode(B, H, D, reps=50)
    write_results("cca_decode_gpu", machine, decode_rows,
                  [("shape", "shape"), ("mode", "mode"), ("impl", "impl"), ("backend", "backend"),
                   ("median_us", "median us"),
                   ("tokens_per_s", "tokens/s"), ("speedup_vs_sdpa", "x SDPA")],
                  ["one CCA decode step over a batch, bf16, 10% of neighbour tokens masked; tokens/s = batch / time",
                   "eager: each step launched from Python (validation and dispatch included); cuda graph: replays"],
                  lambda path: bar_plot(path, [f"{r['shape']} {r['mode']}" for r in decode_rows if r["impl"] == "SDPA"],
                                        {i: [r["tokens_per_s"] for r in decode_rows if r["impl"] == i]
                                         for i in (OURS_DECODE, "SDPA")}, "tokens/s", f"CCA decode, {machine}"))


if __name__ == "__main__":
    main()
