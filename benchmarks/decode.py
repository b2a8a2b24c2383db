"""Decoding throughput: tokens/s of RetroModel.step (one token per sequence per step, the
neighbours of every completed chunk encoded once) at batch 1 and 32, eager against the step
compiled by compile_decoding() (torch.compile; mode "reduce-overhead", i.e. CUDA graphs, on a
GPU). Synthetic tokens and neighbours: retrieval's own cost is in benchmarks/retrieval.py.
tokens/s = batch * steps / seconds, timed after a warm-up generation of the same shapes: the
compiled runs compile and record their CUDA graphs there, and the timed generation replays them
(it refuses to report a run that recorded graphs). The backend column is what the decode op and the
encoder's ops ran (a fallback is never labelled as the fused kernel).

    python -m benchmarks.decode [--device cuda] [--config 172M] [--steps 256] [--batches 1,32]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import (bar_plot, backend_column, machine_name, model_backends, require_fused,
                                write_results)
from retro.model import RetroModel, preset, recorded_cuda_graphs


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


def decode_backend(model, batch: int, dtype) -> str:
    """The backends a decoding step of this model runs at `batch` (the CCA decode op and the
    encoder's ops, each op's own resolution); refuses a fallback: the rows measure fused kernels."""
    cfg = model.cfg
    ran = model_backends(model, batch, 1, cfg.num_neighbours, cfg.neighbour_len, dtype, decode=True)
    return backend_column(require_fused(f"decode batch {batch}", ran))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="default: tiny on the CPU, 172M on a GPU")
    p.add_argument("--steps", type=int, default=None, help="default: 256 on a GPU, 64 on the CPU")
    p.add_argument("--batches", default="1,32")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    name = a.config or ("172M" if gpu else "tiny")
    steps = a.steps or (256 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=32000, max_seq_len=max(2048, steps + 1))
    model = RetroModel(cfg).to(device=device, dtype=dtype).eval()
    m, K, R = cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        L = steps // m + 1
        nb = torch.randint(0, cfg.vocab_size, (batch, L, K, R), device=device)
        mask = torch.rand(batch, L, K, R, device=device) > 0.05
        for compiled in (False, True):
            model.eager_decoding()
            if compiled:
                torch._dynamo.reset()
                model.compile_decoding(mode="reduce-overhead" if gpu else None)
            graphs = compiled and gpu
            t0 = time.perf_counter()
            decode_run(model, batch, steps, nb, mask, device)  # warm-up (compilation, graph recording)
            warm = time.perf_counter() - t0
            recorded = recorded_cuda_graphs() if graphs else 0
            seconds = decode_run(model, batch, steps, nb, mask, device)
            if graphs and recorded_cuda_graphs() != recorded:
                raise RuntimeError(f"batch {batch}: the timed generation recorded CUDA graphs "
                                   f"({recorded} -> {recorded_cuda_graphs()}); it would time recordings, not replays")
            rows.append({"step": "compiled" if compiled else "eager", "batch": batch, "steps": steps,
                         "backend": decode_backend(model, batch, dtype),
                         "ms_per_step": seconds / steps * 1e3, "tokens_per_s": batch * steps / seconds,
                         "cuda_graphs": recorded, "warmup_s": warm})
            print(rows[-1], flush=True)
    for r in rows:
        eager = next(e for e in rows if e["batch"] == r["batch"] and e["step"] == "eager")
        r["vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"]
    machine = machine_name(device.type)
    notes = [f"config {name} ({dtype}), {steps} steps from position 0 with k = {K} neighbours of {R} tokens "
             f"encoded at every {m}-token chunk; greedy; synthetic neighbours (no retrieval I/O)",
             "tokens/s = batch * steps / seconds of a generation after a warm-up generation of the same shapes "
             "(warm-up s: compilation and CUDA-graph recording included; CUDA graphs: how many the warm-up "
             "recorded, the timed generation replays them and records none)",
             "compiled: RetroModel.compile_decoding(), torch.compile of the step's two halves around the encoder"
             + (" (mode reduce-overhead: CUDA graphs)" if gpu else " (default mode)")]
    cols = [("step", "step"), ("batch", "batch"), ("steps", "steps"), ("backend", "backend (CCA decode, encoder)"),
            ("ms_per_step", "ms/step"), ("tokens_per_s", "tokens/s"), ("vs_eager", "vs eager"),
            ("cuda_graphs", "CUDA graphs"), ("warmup_s", "warm-up s")]
    batches = sorted({r["batch"] for r in rows})
    write_results(f"decode_{'gpu' if gpu else 'cpu'}", machine, rows, cols, notes,
                  lambda path: bar_plot(path, [f"batch {b}" for b in batches],
                                        {s: [next(r["tokens_per_s"] for r in rows if r["batch"] == b and r["step"] == s)
                                             for b in batches] for s in ("eager", "compiled")},
                                        "tokens/s", f"RETRO {name} decoding, {machine}"))


if __name__ == "__main__":
    main()
