"""Training throughput and model FLOP utilisation (MFU), eager against `retro train --compile`,
for RETRO with retrieval and the same decoder without it (RETRO[OFF]).

Each step is the training loop's own retro.training.step.train_step: the loss under bfloat16
autocast (on CUDA), backward, gradient clipping, AdamW (train.make_optimizer; compiled: the model through
compile_training.compile_for_training, fullgraph, and AdamW's fused kernel on CUDA). Synthetic tokens and
neighbours (no retrieval I/O). The first step, which compiles, is timed apart ("first step s")
and its loss is shown: eager and compiled start from the same weights and batch, so it must agree
to bfloat16 rounding.

MFU = tokens/s * training FLOPs per token / the card's dense bf16 peak (retro.model.flops: the PaLM
count of matrix products, 3x the forward; decoder N(8da + 4df) + 4Nna + 2dV per token, CCA
c(4da + 4kra + 2k 4ea), encoder 2k((2de) + D_e(8eb + 4rb + 16e^2) + 4eb + 4mb) + 4db; peak
989.4 TFLOP/s for H100 SXM and H200, NVIDIA's datasheet figure with sparsity halved).

ddp / fsdp: eager, in a world of one process, wrapped in DistributedDataParallel or sharded with
`retro train --fsdp`'s fully_shard (bf16 gathers on a GPU): what one card holds and runs under
each before scaling out (the memory of FSDP over N cards: docs/scale.md).

--profile gpu|rehearsal runs the GPU check's part (benchmarks/gpu_check.sh): the profile's device,
config, batch, steps and compile backend, retrieval on, each row appended to $RETRO_GPU_ROWS
(benchmarks/gpu_rows.py; ddp and fsdp rows in section "fsdp") as it is measured. The rehearsal (CPU)
has no datasheet peak: its MFU is against the CPU's float32 matmul rate measured in the run.

    python -m benchmarks.training [--device cuda] [--configs 172M,425M] [--modes eager,compile,ddp,fsdp]
                                  [--profile gpu|rehearsal]
"""
from __future__ import annotations

import argparse
import gc
import time
from types import SimpleNamespace

import torch

from benchmarks import gpu_rows
from benchmarks.harness import (NO_RETRIEVAL, backend_column, machine_name, markdown_table, model_backends, time_fn,
                                write_results)
from retro.training.compile import COMPILE_BACKENDS, compile_for_training, use_fused_adamw
from retro.model.flops import PEAK_BF16_FLOPS, mfu, peak_flops, training_flops_per_token
from retro.model.model import PRESETS, RetroModel, preset
from retro.training.train import TrainOptions, make_optimizer
from retro.training.step import train_step

MODES = ("eager", "compile", "ddp", "fsdp")


def one_process_group(device: torch.device) -> None:
    """A world of one process (gloo on the CPU, nccl on a GPU), for the ddp and fsdp modes: their
    memory and speed on one card, the step before scaling out."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def synthetic_batch(cfg, batch: int, chunks: int, retrieval: bool, device) -> SimpleNamespace:
    """tokens, targets (batch, n = chunks * m); neighbours, neighbour_mask (batch, chunks, k, r),
    None without retrieval; 5% of the neighbour tokens are padding."""
    g = torch.Generator().manual_seed(0)
    n, K, R = chunks * cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, n + 1), generator=g)
    neighbours = torch.randint(0, cfg.vocab_size, (batch, chunks, K, R), generator=g) if retrieval else None
    mask = torch.rand(batch, chunks, K, R, generator=g) > 0.05 if retrieval else None
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return SimpleNamespace(tokens=move(tokens[:, :-1]), targets=move(tokens[:, 1:]), neighbours=move(neighbours),
                           neighbour_mask=move(mask))


def measure(name: str, retrieval: bool, mode: str, device: torch.device, batch: int, chunks: int, steps: int,
            warmup: int, compile_backend: str, bf16: bool, peak: float | None) -> dict:
    """One variant: a fresh model (seed 0), its first step timed alone, then the median of
    `steps` steps after `warmup` more."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = preset(name, vocab_size=32000, max_seq_len=chunks * PRESETS[name].get("chunk_size", 64))
    model = RetroModel(cfg).to(device).train()
    # what the retrieval ops run (backend "auto"; queries in bf16 under autocast): recorded, not assumed
    ran = backend_column(model_backends(model, batch, chunks, cfg.num_neighbours, cfg.neighbour_len,
                                        torch.bfloat16 if bf16 else torch.float32)) if retrieval else NO_RETRIEVAL
    compiled = mode == "compile"
    if compiled:
        compile_for_training(model, compile_backend)
    net = model
    if mode in ("ddp", "fsdp"):  # eager, world size 1
        one_process_group(device)
        if mode == "fsdp":
            from retro.training.fsdp import shard_model

            shard_model(model, device, bf16)
        else:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                find_unused_parameters=not retrieval)
    fused = use_fused_adamw(device, compiled)
    optimizer = make_optimizer(model, TrainOptions(db="", out="", lr=1e-4), fused)
    data = synthetic_batch(cfg, batch, chunks, retrieval, device)

    def step():
        result = train_step(net, optimizer, data, grad_clip=1.0, bf16=bf16)
        return result.nll / result.count

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = float(step())
    first_s = time.perf_counter() - t0
    t = time_fn(step, device=device.type, warmup=warmup, reps=steps)
    n = chunks * cfg.chunk_size
    tokens_per_s = batch * n / t["median_ms"] * 1e3
    flops = training_flops_per_token(cfg, n, retrieval)
    row = {"config": name, "retrieval": "on" if retrieval else "off", "mode": mode, "backend": ran,
           "compile": f"{compile_backend}, fullgraph" if compiled else "none",
           "optimizer": "AdamW fused" if fused else "AdamW", "batch": batch, "seq_len": n,
           "first_step_s": first_s, "first_loss": first_loss, "median_ms": t["median_ms"],
           "tokens_per_s": tokens_per_s, "gflop_per_token": flops / 1e9, "tflop_s": tokens_per_s * flops / 1e12}
    utilisation = mfu(tokens_per_s, flops, peak)
    if utilisation is not None:
        row["mfu_pct"] = 100 * utilisation
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    model = net = optimizer = data = None  # free them before the next configuration
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def emit_row(profile: str, device: str, row: dict, peak: float | None, peak_source: str) -> None:
    """A training row to gpu_rows.emit: mode eager/compiled (section "training") or ddp/fsdp ("fsdp")."""
    figures = {"ms": "median_ms", "tokens_per_s": "tokens_per_s", "mfu_pct": "mfu_pct"}
    extras = {k: row[k] for k in ("seq_len", "first_step_s", "first_loss", "gflop_per_token", "tflop_s", "peak_gib",
                                  "optimizer") if k in row}
    if "tokens_per_s" not in row:
        extras["error"] = row.get("optimizer", "not measured")
    mode = {"compile": "compiled"}.get(row["mode"], row["mode"])
    gpu_rows.emit(profile, device, section="fsdp" if mode in ("ddp", "fsdp") else "training", mode=mode,
                  variant=gpu_rows.TRAIN_VARIANT if row["retrieval"] == "on" else "RETRO[OFF] (retrieval off)",
                  config=row["config"], batch=row.get("batch", 1), dtype="bfloat16" if device == "cuda" else "float32",
                  backend=row.get("backend", "unknown"),
                  compile=row.get("compile", "none"), peak_tflop_s=(peak or 0) / 1e12, peak_source=peak_source,
                  **{k: row[v] for k, v in figures.items() if v in row}, **extras)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default=None,
                   help="comma-separated presets; default 172M,425M on a GPU, tiny on the CPU")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--retrieval", default="on,off", help="comma-separated: on, off")
    p.add_argument("--batch", type=int, default=None, help="sequences per step; default 8 on a GPU, 2 on the CPU")
    p.add_argument("--seq-chunks", type=int, default=None,
                   help="chunks per sequence; default 32 (2048 tokens) on a GPU, 4 on the CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--compile-backend", default="inductor", choices=COMPILE_BACKENDS)
    p.add_argument("--no-save", action="store_true", help="print the table only (smoke runs)")
    p.add_argument("--profile", choices=tuple(gpu_rows.PROFILES), default=None,
                   help="the GPU check's part: the profile's device, config, batch, steps, compile backend, "
                        "retrieval on; rows to $RETRO_GPU_ROWS")
    a = p.parse_args(argv)
    prof = gpu_rows.PROFILES[a.profile] if a.profile else None
    if prof:
        a.device, a.configs, a.retrieval, a.batch = prof.device, prof.train_config, "on", prof.train_batch
        a.seq_chunks, a.steps, a.warmup, a.compile_backend = (prof.train_chunks, prof.train_steps, prof.train_warmup,
                                                              prof.compile_backend)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    configs = (a.configs or ("172M,425M" if gpu else "tiny")).split(",")
    modes, switches = a.modes.split(","), a.retrieval.split(",")
    for label, values, allowed in (("--configs", configs, tuple(PRESETS)), ("--modes", modes, MODES),
                                   ("--retrieval", switches, ("on", "off"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{label} got {','.join(bad)!r}; expected a comma-separated subset of "
                             f"{', '.join(allowed)}")
    batch = a.batch if a.batch is not None else (8 if gpu else 2)
    chunks = a.seq_chunks if a.seq_chunks is not None else (32 if gpu else 4)
    for label, value, low in (("--batch", batch, 1), ("--seq-chunks", chunks, 1), ("--steps", a.steps, 1),
                              ("--warmup", a.warmup, 0)):
        if value < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    machine = machine_name(device.type)
    peak = peak_flops(machine) if gpu else None
    peak_source = "datasheet"
    if prof and peak is None:  # the rehearsal: MFU's code path against a stand-in peak
        from benchmarks.cca_gpu import card_rates

        peak, peak_source = card_rates(device.type)["matmul_tflops"] * 1e12, "measured matmul (rehearsal stand-in)"
    notes = [f"training step: batch {batch} x {chunks} chunks of 64 tokens, vocabulary 32000, "
             f"{'bf16 autocast' if gpu else 'float32'}, gradient clipping, AdamW; compile = `retro train --compile` "
             f"(fullgraph torch.compile, backend {a.compile_backend}, AdamW fused on CUDA); "
             "eager = AdamW's default (for-each on CUDA)",
             "k = 2 neighbours of 128 tokens per 64-token chunk, synthetic; retrieval off = the same decoder "
             "without neighbours (RETRO[OFF]: the CCA blocks and the encoder do not run)",
             "step ms: median of the timed steps; first step s: the first step alone (compilation included); "
             "first loss: that step's loss (eager and compiled start from the same weights and batch)",
             "model FLOPs (retro/model/flops.py, PaLM's count: matrix products only, attention over the full context, "
             "training = 3 x forward) per token: decoder N(8da + 4df) + 4Nna + 2dV; CCA c(4da + 4kra + 8kea); "
             "encoder 2k(2de [e != d] + D_e(8eb + 4rb + 16e^2) + 4eb + 4mb) + 4db",
             "MFU = tokens/s x FLOPs per token / peak; peak = dense bf16 tensor-core FLOP/s from NVIDIA's "
             "H100/H200 datasheets (the figure with sparsity halved): "
             + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in PEAK_BF16_FLOPS)
             + (f"; this card: {peak / 1e12:.1f}" if peak else "; no peak for this device: no MFU")]
    cols = [("config", "config"), ("retrieval", "retrieval"), ("mode", "mode"), ("backend", "backend"),
            ("compile", "compile"),
            ("optimizer", "optimizer"),
            ("seq_len", "tokens/seq"), ("first_step_s", "first step s"), ("first_loss", "first loss"),
            ("median_ms", "step ms"), ("tokens_per_s", "tokens/s"), ("gflop_per_token", "GFLOP/token"),
            ("tflop_s", "model TFLOP/s"), ("mfu_pct", "MFU %"), ("peak_gib", "peak GiB"),
            ("vs_eager", "vs eager")]
    rows = []
    for name in configs:
        for retrieval in (s == "on" for s in switches):
            for mode in modes:
                try:
                    row = measure(name, retrieval, mode, device, batch, chunks, a.steps, a.warmup,
                                  a.compile_backend, gpu, peak)
                except torch.OutOfMemoryError as e:
                    row = {"config": name, "retrieval": "on" if retrieval else "off", "mode": mode,
                           "optimizer": f"out of memory: {str(e).splitlines()[0][:80]}"}
                    gc.collect()
                    torch.cuda.empty_cache()
                eager = next((r for r in rows if r["config"] == name and r["retrieval"] == row["retrieval"]
                              and r["mode"] == "eager" and "tokens_per_s" in r), None)
                if eager is not None and "tokens_per_s" in row:
                    row["vs_eager"] = row["tokens_per_s"] / eager["tokens_per_s"]
                rows.append(row)
                print(row, flush=True)
                if prof:
                    emit_row(prof.name, device.type, row, peak, peak_source)
                if not a.no_save:  # after every variant: a run cut short keeps what it measured
                    stem = f"training_{'gpu' if gpu else 'cpu'}_{'_'.join(configs)}" + (f"_{prof.name}_check" if prof
                                                                                         else "")
                    write_results(stem, machine, rows, cols, notes, echo=False)
    print(markdown_table(rows, cols))
    return rows


if __name__ == "__main__":
    main()
