"""Peak memory of the loss with a large vocabulary: a retrofitted, randomly initialised Llama-
architecture model (4 blocks of width 512, tied embeddings) with a 128,256-token (Llama 3) and a
262,144-token (Gemma 3) vocabulary (and 1,024 tokens: the same pass without a large vocabulary), in
  evaluate  one batch of `retro evaluate`'s scoring (evaluate.score: 16 windows of 256 tokens, the
            sequence length of a run trained with the defaults, retrieval on), under no_grad;
  train     one training step (train_step: loss, backward, clipping, AdamW) on a batch of the
            `retro train` defaults (8 sequences of 4 chunks of 64 tokens, 2 neighbours), float32,
and two ways of computing the loss:
  whole logits  the code before sliced_loss.py: forward -> logits (B, n, V), then cross_entropy
  sliced        forward(..., targets=...) (what evaluate.score and train_step.sequence_loss run now):
                the NLL a slice of the sequence at a time (sliced_loss.py)

Each case runs in a fresh child process: the model and inputs are built, then the peak resident
memory is reset (/proc/self/clear_refs, 5) and read back after the pass (VmHWM); "RSS before" is the
resident memory just before the pass (the weights, Python, torch and the inputs).

    OMP_NUM_THREADS=1 python -m benchmarks.large_vocab_memory [--vocabs 1024 128256 262144]

Writes benchmarks/results/large_vocab_memory-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import RESULTS, bar_plot, machine_name, slug, write_results

VOCABS = (1024, 128256, 262144)  # 1,024: the reference, what the pass takes without a large vocabulary
MODES = ("evaluate", "train")
LOSSES = ("whole logits", "sliced")
WIDTH, DEPTH, FF, HEADS = 512, 4, 1536, 8
CHUNK, K = 64, 2  # `retro build-db`'s default chunk size, `retro train`'s default k
GB = 1e9


def defaults() -> dict:
    """The batch and sequence length of `retro train` and `retro evaluate` with their defaults."""
    from retro.evaluation.evaluate import score
    from retro.training.train import TrainOptions

    fields = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    n = fields["seq_chunks"] * CHUNK  # a run's max_seq_len: evaluate's window
    windows = inspect.signature(score).parameters["batch_size"].default
    return {"train": (fields["batch_size"], n), "evaluate": (windows, n)}


def _status(key: str) -> int:
    """A /proc/self/status memory line (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def build(vocab: int, n: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro.retrofitting.wrapper import retrofit

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=FF,
                                      num_hidden_layers=DEPTH, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0))
    model = retrofit(hf, k=K, chunk_size=CHUNK, max_seq_len=n, base_name="random-llama")
    with torch.no_grad():  # CCA reads the neighbours (zero-initialised, it would leave the base's states as they are)
        for layer in model.cca.values():
            layer.to_out.weight.normal_(0, 0.02)
    return model


def whole_logits_step(model, optimizer, batch, grad_clip: float, lr: float):
    """train_step before sliced_loss.py: the whole logits, then cross_entropy."""
    from retro.base.defaults import IGNORE
    from retro.training.step import set_learning_rate

    set_learning_rate(optimizer, lr)
    logits = model(batch.tokens, batch.neighbours, batch.neighbour_mask)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    count = (batch.targets != IGNORE).sum()
    (nll / count.clamp(min=1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return nll.detach(), count


def run_case(vocab: int, mode: str, loss: str) -> dict:
    """One case, in this process: build, reset the peak, run the pass, read the peak."""
    from retro.training.data import Batch
    from retro.training.step import train_step

    B, n = defaults()[mode]
    model = build(vocab, n)
    g = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, vocab, (B, n), generator=g) for _ in range(2))
    neighbours = torch.randint(0, vocab, (B, n // CHUNK, K, 2 * CHUNK), generator=g)
    batch = Batch(tokens, targets, neighbours, torch.ones(neighbours.shape, dtype=torch.bool))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.train(mode == "train")
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    t0 = time.perf_counter()
    if mode == "evaluate":
        with torch.no_grad():
            if loss == "sliced":  # evaluate.score's line
                token_nll = model(tokens, batch.neighbours, batch.neighbour_mask, targets=targets)
            else:  # evaluate.score's lines before sliced_loss.py
                logits = model(tokens, batch.neighbours, batch.neighbour_mask).float()
                token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nll, count = token_nll.double().sum(), targets.numel()
    elif loss == "sliced":
        result = train_step(model, optimizer, batch, grad_clip=1.0, lr=1e-4)
        nll, count = result.nll, result.count
    else:
        nll, count = whole_logits_step(model, optimizer, batch, grad_clip=1.0, lr=1e-4)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"vocab": vocab, "mode": mode, "loss": loss, "batch": B, "seq": n, "weights_gb": weights / GB,
            "rss_before_gb": before / GB, "peak_rss_gb": peak / GB, "above_weights_gb": (peak - weights) / GB,
            "pass_gb": (peak - before) / GB, "seconds": seconds, "nll_per_token": float(nll) / int(count),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def whole_logits_bytes(vocab: int, mode: str) -> int:
    """What the whole-logits case needs beyond the weights, roughly: float32 (B, n, V) tensors, 3
    in evaluation (logits, a contiguous copy of their transpose, log-softmax), 4 in training (and
    their gradients)."""
    B, n = defaults()[mode]
    return (3 if mode == "evaluate" else 4) * 4 * B * n * vocab


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the results file already written for this machine, replacing those run now "
                        "(to measure a case skipped for want of memory later)")
    p.add_argument("--case", nargs=3, metavar=("VOCAB", "MODE", "LOSS"), help=argparse.SUPPRESS)  # the child
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(int(a.case[0]), a.case[1], a.case[2])))
        return
    machine = machine_name("cpu").replace(f"{torch.get_num_threads()} threads", "1 thread") \
        if torch.get_num_threads() == 1 else machine_name("cpu")
    key = lambda r: (r["vocab"], MODES.index(r["mode"]), LOSSES.index(r["loss"]))  # noqa: E731
    old = RESULTS / f"large_vocab_memory-{slug(machine)}.json"
    kept = {}
    if a.merge and old.exists():
        saved = json.loads(old.read_text())
        kept = {key(r): {"date": saved["meta"]["date"], **r} for r in saved["rows"]}
    for vocab in a.vocabs:
        for mode in a.modes:
            for loss in a.losses:
                need = whole_logits_bytes(vocab, mode) if loss == "whole logits" else 0
                if _available() < 1.2 * need + 2 * GB:
                    print(f"skipped V={vocab} {mode} {loss}: needs about {need / GB:.1f} GB beyond the weights, "
                          f"{_available() / GB:.1f} GB available", file=sys.stderr)
                    continue
                out = subprocess.run([sys.executable, "-m", "benchmarks.large_vocab_memory", "--case", str(vocab), mode,
                                      loss], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(row, file=sys.stderr)
                kept[key(row)] = row
    rows = [kept[k] for k in sorted(kept)]
    vocabs = sorted({r["vocab"] for r in rows})
    for vocab in vocabs:  # the two losses agree
        for mode in MODES:
            pair = [r["nll_per_token"] for r in rows if r["vocab"] == vocab and r["mode"] == mode]
            if len(pair) == 2 and abs(pair[0] - pair[1]) > 1e-4 * abs(pair[0]):
                raise SystemExit(f"V={vocab} {mode}: the losses differ: {pair}")
    for r in rows:
        r["case"] = f"V={r['vocab']:,} {r['mode']} (B={r['batch']}, n={r['seq']})"
    columns = [("case", "case"), ("loss", "loss"), ("weights_gb", "weights GB"), ("rss_before_gb", "RSS before GB"),
               ("peak_rss_gb", "peak RSS GB"), ("above_weights_gb", "peak above weights GB"),
               ("pass_gb", "peak above RSS before GB"), ("seconds", "pass s"), ("nll_per_token", "NLL/token"),
               ("date", "date")]
    notes = [f"a retrofitted random Llama: {DEPTH} blocks of width {WIDTH} (feed-forward {FF}, {HEADS} heads), tied "
             f"embeddings, CCA after blocks 0 and 3 (to_out drawn N(0, 0.02), so CCA reads the neighbours), a 2-layer "
             f"encoder; chunks of {CHUNK}, k = {K}; float32 on the CPU (bf16 is `retro train`'s default on GPUs only)",
             "evaluate: one batch of evaluate.score (no_grad); train: one train_step (loss, backward, clipping, AdamW "
             "on the new weights)",
             "whole logits: the loss code before sliced_loss.py; sliced: forward(..., targets=...) (sliced_loss.py, "
             "LOGITS_BUDGET = 2**25 logits per slice; training recomputes each slice's logits in the backward pass)",
             "each case in a fresh process; peak = VmHWM after resetting it just before the pass (clear_refs 5); "
             "'RSS before' = VmRSS then (weights, Python, torch, inputs)",
             "V=1,024: the same passes with a small vocabulary, what the model's own activations (mostly the "
             "neighbour encoder on B x 4 chunks x 2 neighbours x 128 tokens) and the runtime take",
             "NLL/token: the mean loss of the pass (random model and tokens: about ln V); the two losses agree to 1e-4",
             "pass s: wall seconds of the pass, on a shared machine (indicative only); date: when the row was measured "
             "(a case skipped for want of memory is measured later and merged, --merge)"]

    def plot(path: Path) -> None:
        labels = sorted({r["case"] for r in rows}, key=lambda c: [r["case"] for r in rows].index(c))
        series = {loss: [next((r["pass_gb"] for r in rows if r["case"] == c and r["loss"] == loss), 0.0)
                         for c in labels] for loss in LOSSES}
        bar_plot(path, labels, series, "peak RSS above RSS before the pass (GB)",
                 "The loss of a retrofitted large-vocabulary model: whole logits vs sliced")

    write_results("large_vocab_memory", machine, rows, columns, notes, plot)


if __name__ == "__main__":
    main()
