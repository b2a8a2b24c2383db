"""The RETRO model end to end: training tokens/s (forward, backward, AdamW step) and decoding
tokens/s (incremental, one token per sequence per step, neighbours encoded at each chunk
boundary), for RETRO with the fused backends ("auto"), RETRO with backend="reference", and the
same decoder without retrieval (RETRO[OFF]: the cost of retrieval is the difference).
Synthetic tokens and neighbours: retrieval's own cost is measured in benchmarks/retrieval.py.

    python -m benchmarks.model [--device cuda] [--config 172M]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import (NO_RETRIEVAL, backend_column, bar_plot, machine_name, model_backends, require_fused,
                                time_fn, write_results)
from retro.model.model import RetroModel, preset

FUSED_VARIANT = "RETRO (fused kernels)"  # backend "auto": must resolve to fused kernels, or the run is refused


def train_step_fn(model, opt, tokens, nb, mask, use_neighbours: bool, bf16: bool):
    """One call of the step `retro train` runs (retro.training.step: loss, backward, clipping at
    retro train's default 1.0, AdamW) on synthetic tokens (B, n), their own ids as targets, and
    neighbours nb / mask (B, L, K, R), or none for the decoder without retrieval."""
    from retro.training.data import Batch
    from retro.training.step import train_step

    batch = Batch(tokens, tokens, nb if use_neighbours else None, mask if use_neighbours else None)
    return lambda: train_step(model, opt, batch, grad_clip=1.0, bf16=bf16)


def decode_tokens_per_s(model, batch: int, steps: int, nb, mask, use_neighbours: bool, device,
                        warmup: bool = True) -> float:
    """Tokens/s of `steps` greedy decoding steps (benchmarks.decode.decode_run), timed once after
    an untimed warm-up pass (first calls set up kernels)."""
    from benchmarks.decode import decode_run

    if warmup:
        decode_run(model, batch, min(steps, 2 * model.cfg.chunk_size), nb, mask, device, use_neighbours)
    return batch * steps / decode_run(model, batch, steps, nb, mask, device, use_neighbours)


def variant_backends(label: str, model, fused: bool, use_neighbours: bool, batch: int, chunks: int,
                     dtype: torch.dtype, decode: bool) -> str:
    """The "backend" cell of a row: what each retrieval op of `model` runs for that row's inputs
    (harness.model_backends); raises where a variant labelled fused (`fused`) would time a fallback."""
    if not use_neighbours:
        return NO_RETRIEVAL
    cfg = model.cfg
    ran = model_backends(model, batch, chunks, cfg.num_neighbours, cfg.neighbour_len, dtype, decode=decode)
    return backend_column(require_fused(label, ran) if fused else ran)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="default: tiny on the CPU, 172M on a GPU")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    name = a.config or ("172M" if gpu else "tiny")
    B, L = (8, 32) if gpu else (4, 4)
    decode_batch, decode_steps = (32, 256) if gpu else (4, 128)
    if a.quick:
        decode_steps = 64
    rows = []
    variants = [(FUSED_VARIANT, "auto", True), ("RETRO (reference backend)", "reference", True),
                ("decoder without retrieval", "auto", False)]
    dtype = torch.bfloat16 if gpu else torch.float32  # training: autocast's; decoding: the weights'
    for label, backend, use_nb in variants:
        fused = label == FUSED_VARIANT
        torch.manual_seed(0)
        cfg = preset(name, vocab_size=32000, backend=backend, max_seq_len=L * 64)
        model = RetroModel(cfg).to(device)
        m, K, R = cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
        tokens = torch.randint(0, cfg.vocab_size, (B, L * m), device=device)
        nb = torch.randint(0, cfg.vocab_size, (B, L, K, R), device=device)
        mask = torch.rand(B, L, K, R, device=device) > 0.05
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ran = {decode: variant_backends(label, model, fused, use_nb, decode_batch if decode else B, L, dtype, decode)
               for decode in (False, True)}  # before timing: a fallback labelled fused is refused
        t = time_fn(train_step_fn(model, opt, tokens, nb, mask, use_nb, gpu), device=device.type, warmup=2,
                    reps=5 if a.quick else 10)
        rows.append({"mode": "train", "variant": label, "backend": ran[False], "config": name, "batch": B,
                     "seq_len": L * m,
                     "median_ms": t["median_ms"], "tokens_per_s": B * L * m / t["median_ms"] * 1e3})
        model.eval()
        dmodel = model.to(torch.bfloat16) if gpu else model
        with torch.no_grad():
            tps = decode_tokens_per_s(dmodel, decode_batch, decode_steps, nb[:1].expand(decode_batch, -1, -1, -1),
                                      mask[:1].expand(decode_batch, -1, -1, -1), use_nb, device)
        rows.append({"mode": "decode", "variant": label, "backend": ran[True], "config": name, "batch": decode_batch,
                     "seq_len": decode_steps, "tokens_per_s": tps})
        print(rows[-2], rows[-1], flush=True)
        del model, dmodel, opt
    for mode in ("train", "decode"):
        base = next(r for r in rows if r["mode"] == mode and r["variant"].startswith("decoder"))
        for r in rows:
            if r["mode"] == mode:
                r["vs_no_retrieval"] = r["tokens_per_s"] / base["tokens_per_s"]
    machine = machine_name(device.type)
    notes = [f"config {name}: training batch {B} x {L * 64} tokens ({'bf16 autocast' if gpu else 'float32'}), "
             f"decoding batch {decode_batch} x {decode_steps} steps ({'bf16' if gpu else 'float32'})",
             "k = 2 neighbours of 128 tokens per 64-token chunk; synthetic tokens and neighbours (no retrieval I/O)",
             "vs_no_retrieval: tokens/s relative to the same decoder run without neighbours"]
    cols = [("mode", "mode"), ("variant", "variant"), ("backend", "backend"), ("config", "config"), ("batch", "batch"),
            ("seq_len", "tokens/seq or steps"), ("median_ms", "step ms"), ("tokens_per_s", "tokens/s"),
            ("vs_no_retrieval", "vs no retrieval")]
    write_results(f"model_{'gpu' if gpu else 'cpu'}", machine, rows, cols, notes,
                  lambda path: bar_plot(path, ["train", "decode"],
                                        {v: [next(r["tokens_per_s"] for r in rows
                                                  if r["mode"] == mo and r["variant"] == v)
                                             for mo in ("train", "decode")] for v, _, _ in variants},
                                        "tokens/s", f"RETRO {name}, {machine}"))


if __name__ == "__main__":
    main()
