"""Decoding throughput: tokens/s of RetroModel.step (one token per sequence per step, the
neighbours of every completed chunk encoded once) at batch 1 and 32, eager against the step
compiled by compile_decoding() (torch.compile; mode "reduce-overhead", i.e. CUDA graphs, on a
GPU). Synthetic tokens and neighbours: retrieval's own cost is in benchmarks/retrieval.py.
tokens/s = batch * steps / seconds, timed after a warm-up generation of the same shapes: the
compiled runs compile and record their CUDA graphs there, and the timed generation replays them
(it refuses to report a run that recorded graphs). The backend column is what the decode op and the
encoder's ops ran (a fallback is never labelled as the fused kernel).

--profile gpu|rehearsal runs the GPU check's part (benchmarks/gpu_check.sh): the profile's shapes,
each row appended to $RETRO_GPU_ROWS (benchmarks/gpu_rows.py) as it is measured; every eager row
comes first (seconds), then the compiled ones (each compiles).

    python -m benchmarks.decode [--device cuda] [--config 172M] [--steps 256] [--batches 1,32]
                                [--profile gpu|rehearsal]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks import gpu_rows
from benchmarks.harness import (bar_plot, backend_column, machine_name, model_backends, require_fused,
                                write_results)
from retro.model.model import RetroModel, preset, recorded_cuda_graphs


@torch.no_grad()
def decode_run(model, batch: int, steps: int, nb, mask, device, use_neighbours: bool = True) -> float:
    """Seconds for `steps` greedy steps of `batch` sequences from position 0; at each completed
    chunk c the neighbours nb[:, c] (cycling through nb's chunks) are encoded, unless
    use_neighbours is False (RETRO[OFF])."""
    m = model.cfg.chunk_size
    state = model.new_state(batch, steps + 1)
    tok = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in range(steps):
        c = (t // m) % nb.shape[1]
        new = {r: (nb[r, c], mask[r, c]) for r in range(batch)} if use_neighbours and t % m == m - 1 else {}
        tok = model.step(state, tok, new).argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_backend(model, batch: int, dtype: torch.dtype) -> str:
    """The backends a decoding step of this model runs at `batch` (the CCA decode op and the
    encoder's ops, each op's own resolution); refuses a fallback: the rows measure fused kernels."""
    cfg = model.cfg
    ran = model_backends(model, batch, 1, cfg.num_neighbours, cfg.neighbour_len, dtype, decode=True)
    return backend_column(require_fused(f"decode batch {batch}", ran))


def compile_label(gpu: bool, backend: str, mode: str | None) -> str:
    """The "compile" of a compiled row: torch.compile's backend and mode."""
    graphs = " (CUDA graphs)" if gpu and mode == "reduce-overhead" else ""
    return backend + (f", {mode}" if mode else "") + graphs


def measure(model, batch: int, steps: int, nb, mask, device, compiled: bool, compile_backend: str,
            compile_mode: str | None) -> dict:
    """One row: a warm-up generation (compilation, graph recording), then the timed one."""
    gpu = device.type == "cuda"
    model.eager_decoding()
    if compiled:
        torch._dynamo.reset()
        model.compile_decoding(mode=compile_mode, backend=compile_backend)
    graphs = compiled and gpu and compile_mode == "reduce-overhead"
    t0 = time.perf_counter()
    decode_run(model, batch, steps, nb, mask, device)  # warm-up (compilation, graph recording)
    warm = time.perf_counter() - t0
    recorded = recorded_cuda_graphs() if graphs else 0
    seconds = decode_run(model, batch, steps, nb, mask, device)
    if graphs and recorded_cuda_graphs() != recorded:
        raise RuntimeError(f"batch {batch}: the timed generation recorded CUDA graphs "
                           f"({recorded} -> {recorded_cuda_graphs()}); it would time recordings, not replays")
    dtype = next(model.parameters()).dtype
    return {"step": "compiled" if compiled else "eager", "batch": batch, "steps": steps,
            "backend": decode_backend(model, batch, dtype),
            "compile": compile_label(gpu, compile_backend, compile_mode) if compiled else "none",
            "ms_per_step": seconds / steps * 1e3, "tokens_per_s": batch * steps / seconds,
            "cuda_graphs": recorded, "warmup_s": warm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="default: tiny on the CPU, 172M on a GPU")
    p.add_argument("--steps", type=int, default=None, help="default: 256 on a GPU, 64 on the CPU")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--profile", choices=tuple(gpu_rows.PROFILES), default=None,
                   help="the GPU check's part: the profile's device, config, batches, steps and compile backend; "
                        "each row appended to $RETRO_GPU_ROWS as it is measured")
    a = p.parse_args(argv)
    prof = gpu_rows.PROFILES[a.profile] if a.profile else None
    device = torch.device(prof.device if prof else a.device)
    gpu = device.type == "cuda"
    name = prof.decode_config if prof else a.config or ("172M" if gpu else "tiny")
    steps = prof.decode_steps if prof else a.steps or (256 if gpu else 64)
    batches = prof.decode_batches if prof else tuple(int(b) for b in a.batches.split(","))
    compile_backend = prof.compile_backend if prof else "inductor"
    compile_mode = prof.decode_compile_mode if prof else ("reduce-overhead" if gpu else None)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=32000, max_seq_len=max(2048, steps + 1))
    model = RetroModel(cfg).to(device=device, dtype=dtype).eval()
    m, K, R = cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
    machine = machine_name(device.type)
    notes = [f"config {name} ({dtype}), {steps} steps from position 0 with k = {K} neighbours of {R} tokens "
             f"encoded at every {m}-token chunk; greedy; synthetic neighbours (no retrieval I/O)",
             "tokens/s = batch * steps / seconds of a generation after a warm-up generation of the same shapes "
             "(warm-up s: compilation and CUDA-graph recording included; CUDA graphs: how many the warm-up "
             "recorded, the timed generation replays them and records none)",
             "compiled: RetroModel.compile_decoding(), torch.compile of the step's two halves around the encoder "
             f"({compile_label(gpu, compile_backend, compile_mode)})"]
    cols = [("step", "step"), ("batch", "batch"), ("steps", "steps"), ("backend", "backend (CCA decode, encoder)"),
            ("compile", "compile"), ("ms_per_step", "ms/step"), ("tokens_per_s", "tokens/s"), ("vs_eager", "vs eager"),
            ("cuda_graphs", "CUDA graphs"), ("warmup_s", "warm-up s")]
    stem = f"decode_{'gpu' if gpu else 'cpu'}" + (f"_{prof.name}_check" if prof else "")
    inputs = {}
    for batch in batches:
        L = steps // m + 1
        inputs[batch] = (torch.randint(0, cfg.vocab_size, (batch, L, K, R), device=device),
                         torch.rand(batch, L, K, R, device=device) > 0.05)
    rows = []
    for compiled in (False, True):  # every eager row first: they take seconds, the compiled ones compile
        for batch in batches:
            rows.append(measure(model, batch, steps, *inputs[batch], device, compiled, compile_backend, compile_mode))
            r = rows[-1]
            eager = next(e for e in rows if e["batch"] == batch and e["step"] == "eager")
            r["vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"]
            print(r, flush=True)
            if prof:
                gpu_rows.emit(prof.name, device.type, section="decode", mode=r["step"], variant=gpu_rows.DECODE_VARIANT,
                              config=name, batch=batch, dtype=str(dtype).removeprefix("torch."), backend=r["backend"],
                              compile=r["compile"], ms=r["ms_per_step"], tokens_per_s=r["tokens_per_s"],
                              steps=steps, cuda_graphs=r["cuda_graphs"], warmup_s=r["warmup_s"])
            write_results(stem, machine, rows, cols, notes, echo=False)  # a run cut short keeps what it measured
    write_results(stem, machine, rows, cols, notes,
                  lambda path: bar_plot(path, [f"batch {b}" for b in batches],
                                        {s: [next(r["tokens_per_s"] for r in rows if r["batch"] == b and r["step"] == s)
                                             for b in batches] for s in ("eager", "compiled")},
                                        "tokens/s", f"RETRO {name} decoding, {machine}"))


if __name__ == "__main__":
    main()
