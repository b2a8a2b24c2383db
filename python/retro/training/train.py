"""Training (`retro train --db DIR --config tiny --out RUN`): AdamW, linear warm-up then cosine
decay, gradient clipping, bfloat16 autocast on a GPU, optional activation checkpointing and
torch.compile, atomic checkpoints (one saved on Ctrl-C or SIGTERM before it stops), exact resume,
and data parallelism under torchrun (DDP, or sharded with --fsdp: fsdp.py)."""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import distributed as dist
from . import fsdp
from ..base.files import load_state_dict
from .checkpoint import REMEDY, checkpoint_dir, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..base.checks import check_float, check_int, check_neighbours
from .compile import COMPILE_BACKENDS, compile_for_training, set_fused, use_fused_adamw
from ..base import hooks
from .data import Sampler, TrainSequences
from ..base.defaults import EXTRA_NEIGHBOURS, NEIGHBOURS
from ..base.errors import RetroError
from ..base.interrupt import Interrupted, StopSignals
from ..model.protocol import RetrievalLM
from ..model.config import RetroConfig, check_config_fields, check_preset, preset
from ..model.model import RetroModel
from ..base.options import option
from ..retrieval.database import ChunkDatabase
from ..retrieval.neighbours import compute_neighbours, load_neighbours
from .step import train_step


# What a resumed run must share with the run it continues (TrainOptions fields): the model, the
# schedule (its length, learning rates, warm-up, clipping) and the data (batch shape, neighbours,
# seed). --resume continues a run exactly; it does not re-plan one: a longer cosine would jump the
# decayed learning rate back up mid-run, giving a run that is neither the short nor the long one.
RESUME_FIXED = ("config", "steps", "time_budget", "batch_size", "seq_chunks", "lr", "min_lr_ratio", "warmup",
                "weight_decay", "grad_clip", "k", "retrieval", "retrieval_lr_scale", "extra", "seed")


@dataclass
class TrainOptions:
    db: str = option(help="the database folder (build-db, then neighbours)")
    out: str = option(help="the run folder (checkpoints, log.jsonl)")
    config: str = option("tiny", "model preset: tiny, 172M, 425M, 1.5B or 7.5B")
    steps: int = option(1000, "optimizer steps (with --time-budget: re-estimated from the measured speed)")
    batch_size: int = option(8, "sequences per step, all processes together")
    seq_chunks: int = option(4, "sequence length in chunks: n = seq_chunks * chunk_size")
    lr: float = option(1e-3, "peak learning rate (linear warm-up, cosine decay)")
    min_lr_ratio: float = option(0.1, "the final learning rate, relative to --lr")
    warmup: int = option(50, "warm-up steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clip")
    k: int = option(NEIGHBOURS, "neighbours per chunk", short="-k")
    retrieval: bool = option(True, "--no-retrieval: the same decoder trained without neighbours (the baseline)")
    retrieval_lr_scale: float = option(1.0, "learning rate of the encoder and CCA blocks, relative to --lr")
    extra: int = option(EXTRA_NEIGHBOURS, "extra neighbour candidates, for dropping the sequence's own documents")
    seed: int = option(0, "seed of the initialisation and the data order")
    save_every: int = option(200, "steps between checkpoints")
    log_every: int = option(10, "steps between progress lines")
    resume: bool = option(False, "continue a killed run exactly as it was planned: a changed --steps is refused, "
                                 "not re-planned (as is any other of " + ", ".join(
                                     "--" + n.replace("_", "-") for n in RESUME_FIXED if n != "steps") +
                          "); to train longer, start a new run (another --out)")
    device: str | None = option(None, "default: cuda if there is one")
    bf16: bool | None = option(None, "bf16 autocast (default: on GPUs)")
    compile: bool = option(False, "torch.compile the model as one graph (fullgraph); fused AdamW on CUDA")
    compile_backend: str = option("inductor", cli=False)  # tests: a tracing-only backend (COMPILE_BACKENDS)
    checkpointing: bool = option(False, "activation checkpointing")
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and optimizer states (FSDP2); sharded "
                               "checkpoints in RUN/checkpoints")
    backend: str = option("auto", "retro_kernels backend: auto, reference, cpu, triton or cuda")
    time_budget: float | None = option(None, "seconds of training: --steps re-estimated from the measured speed "
                                                 "(default: none, --steps alone)")
    overrides: dict = option(cli=False, default_factory=dict)  # RetroConfig fields (--set FIELD=VALUE)
    progress: bool = option(True, "a progress bar")

    def validate(self) -> None:
        """RetroError for an option out of range, an unknown --config or a bad --set, before any
        work starts; the overrides are converted to the fields' types."""
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--seq-chunks", self.seq_chunks), ("--save-every", self.save_every),
                            ("log_every", self.log_every)):
            check_int(name, value, 1)
        for name, value in (("--warmup", self.warmup), ("extra", self.extra), ("--seed", self.seed)):
            check_int(name, value, 0)
        check_neighbours("-k", self.k)
        for name, value in (("--lr", self.lr), ("--grad-clip", self.grad_clip)):
            check_float(name, value, 0, low_open=True)
        check_float("--time-budget", self.time_budget, 0, low_open=True, optional=True)
        check_float("--weight-decay", self.weight_decay, 0)
        check_float("retrieval_lr_scale", self.retrieval_lr_scale, 0)
        check_float("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_preset(self.config)
        if self.compile_backend not in COMPILE_BACKENDS:
            raise RetroError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                             f"got {self.compile_backend!r}")
        self.overrides = check_config_fields(self.overrides)


def lr_at(step: int, opts: TrainOptions, total: int) -> float:
    """Linear warm-up over opts.warmup steps, then cosine decay to min_lr_ratio * lr at `total`."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = min(1.0, (step - opts.warmup) / max(1, total - opts.warmup))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def budget_steps(step: int, elapsed: float, step_times: list[float], budget: float, cap: int) -> int:
    """The schedule's length for a time budget: the steps done plus those the remaining seconds
    allow at the median speed of the last 20 steps (the first step, which warms up, left out).
    Re-estimated at steps 5, 10, 20, ... while less than 60% of the budget is spent, so a slow
    start (a busy machine, a cold cache) does not fix the length for good; at most `cap`."""
    recent = step_times[1:][-20:] or step_times
    per_step = float(np.median(recent))
    return max(step + 1, min(cap, step + int(max(0.0, budget - elapsed) / per_step)))


RETRIEVAL_MODULES = ("encoder", "to_encoder", "encoder_in_norm", "cca", "cca_norm")


def is_retrieval_parameter(name: str) -> bool:
    """Whether the parameter `name` (a named_parameters() name) is on the retrieval path, which
    only runs with neighbours: the encoder, its input projection and input norm, the CCA blocks
    and their norms (RETRIEVAL_MODULES, as a dotted part of the name)."""
    return any(part in name.split(".") for part in RETRIEVAL_MODULES)


def make_optimizer(model: torch.nn.Module, opts: TrainOptions, fused: bool = False) -> torch.optim.AdamW:
    """AdamW (its fused CUDA kernel with fused=True); weight decay on matrices other than
    embeddings; the retrieval parameters at lr * retrieval_lr_scale (each group's "lr_scale" is
    applied by lr_at's caller)."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and "embed" not in n
        scale = opts.retrieval_lr_scale if is_retrieval_parameter(n) else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": opts.weight_decay if decay else 0.0, "lr_scale": scale}
                              for (decay, scale), ps in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))],
                             lr=opts.lr, betas=(0.9, 0.95), fused=fused or None)


def prepare_neighbours(db_dir: str, k: int, extra: int, device, log) -> np.ndarray:
    try:
        return load_neighbours(db_dir, k + extra)
    except RetroError:
        if dist.is_main():
            log(f"[train] precomputing {k + extra} neighbour candidates per chunk (once)")
            compute_neighbours(db_dir, k=k, extra=extra, device=device, log=log)
        dist.barrier()
        return load_neighbours(db_dir, k + extra)


def start_from_copy_prior(model, cfg: RetroConfig, opts: TrainOptions, seqs: TrainSequences, ck, device, log) -> None:
    """The model contract's copy-prior hook, before the first step, on a few training sequences (4,
    drawn with a generator of their own, so the training order stays the seed's): a retrofitted
    model fits its prior to its base and records what it chose in its extra_config; a RetroModel's
    prior was set at construction (the hook does nothing). A resumed run keeps the record."""
    if not cfg.copy_prior or not opts.retrieval:
        return
    if ck is not None:  # the record of the run's start, kept
        for key, record in model.extra_config.items():
            if "copy_prior" in ck["config"].get(key, {}):
                record["copy_prior"] = ck["config"][key]["copy_prior"]
        return
    pick = np.random.default_rng((opts.seed, 1)).choice(len(seqs), size=min(4, len(seqs)), replace=False)
    model.fit_copy_prior(seqs.batch(pick).to(device), log=log if dist.is_main() else lambda *_: None)


def check_resume_options(opts: TrainOptions, saved: dict, run: Path) -> None:
    """RetroError naming the first schedule option (RESUME_FIXED) whose value differs from the
    one the run at `run` was started with (`saved`: its checkpoint's options)."""
    for name in RESUME_FIXED:
        if name in saved and getattr(opts, name) != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise RetroError(f"--resume: {flag} {getattr(opts, name)} differs from the {saved[name]} that "
                             f"{str(run)!r} was started with; --resume continues a run as planned, it does not "
                             f"re-plan it: pass {flag} {saved[name]}, or train a new run with another --out")


def train(opts: TrainOptions, log=print, model_factory=None) -> Path:
    """Trains (or resumes) a model on the database; returns the run folder. `model_factory(cfg,
    db)` builds the model instead of RetroModel (retrofitting). hooks.reached("step", step) is
    called before each optimizer step with the number of steps done so far."""
    from ..base.progress import progress_bar

    opts.validate()
    rank, world = dist.init_from_env()
    if opts.batch_size % world:
        raise RetroError(f"--batch-size {opts.batch_size} must be a multiple of the {world} processes")
    device = torch.device(opts.device
                          or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"))
    bf16 = opts.bf16 if opts.bf16 is not None else device.type == "cuda"
    db = ChunkDatabase(opts.db)
    if len(db.removed):  # training packs the chunks in order: it would read the removed documents
        raise RetroError(f"{opts.db!r} has {len(db.removed)} removed documents: run `retro compact {opts.db}` "
                         "before training on it")
    run = Path(opts.out)
    ck = None
    if opts.resume:
        ck = fsdp.read_sharded_meta(fsdp.latest_step_dir(run)) if opts.fsdp else load_checkpoint(run)
        check_run_database(ck["state"], db, run)
        check_resume_options(opts, ck["state"].get("options", {}), run)
        done, planned = ck["state"]["step"], ck["state"]["total_steps"]
        if done >= planned:
            log(f"[train] {str(run)!r} already finished ({done} of {planned} steps): nothing to resume; to train "
                "longer, start a new run with another --out")
            return run
        cfg = RetroConfig.from_dict(ck["config"].get("model"))
    else:
        if (run / "checkpoint").exists() or fsdp.complete_steps(run):
            raise RetroError(f"{str(run)!r} already holds a run; pass --resume to continue it or choose another --out")
        overrides = {"vocab_size": db.tokenizer.vocab_size, "chunk_size": db.chunk_size, "num_neighbours": opts.k,
                     "max_seq_len": opts.seq_chunks * db.chunk_size, "backend": opts.backend, **opts.overrides}
        cfg = preset(opts.config, **overrides)
        if opts.steps < opts.warmup and dist.is_main():
            log(f"[train] warning: --steps {opts.steps} is below --warmup {opts.warmup}: the run ends still warming up "
                f"(at {opts.steps / opts.warmup:.0%} of --lr); pass a smaller --warmup")
    candidates = prepare_neighbours(opts.db, opts.k, opts.extra, device, log) if opts.retrieval else None
    seqs = TrainSequences(db, opts.seq_chunks, opts.k, candidates)
    sampler = Sampler(len(seqs), opts.seed)

    torch.manual_seed(opts.seed)
    model = (model_factory(cfg, db) if model_factory else RetroModel(cfg)).to(device)
    cfg = model.cfg  # a retrofitted model derives its configuration from the base model
    start_from_copy_prior(model, cfg, opts, seqs, ck, device, log)
    if opts.checkpointing and not model.supports_checkpointing:
        raise RetroError(f"--checkpointing is not supported for {type(model).__name__} (retrofitted models); "
                         "train without it")
    model.checkpointing = opts.checkpointing
    weights_to_save = model.trainable_state_dict  # retrofit: new weights only
    if opts.fsdp and world > 1:
        fsdp.shard_model(model, device, bf16)
    fused = use_fused_adamw(device, opts.compile)
    optimizer = make_optimizer(model, opts, fused)
    step, total = 0, opts.steps
    if ck is not None:
        if opts.fsdp:
            fsdp.load_sharded(ck["dir"], model, optimizer)
            rngs = ck["rng"]
        else:
            load_state_dict(model, ck["weights"], ck["dir"] / "model.safetensors", REMEDY,
                            strict=model_factory is None)
            optimizer.load_state_dict(ck["optimizer"]["optimizer"])
            rngs = ck["optimizer"]["rng"]
        set_fused(optimizer, fused)  # this run's choice, not the saved one
        set_rng_state(rngs[min(rank, len(rngs) - 1)])
        step, total = ck["state"]["step"], ck["state"]["total_steps"]
    if opts.compile:
        compile_for_training(model, opts.compile_backend)
    net = model
    if world > 1 and not opts.fsdp:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not opts.retrieval)

    log_path = run / "log.jsonl"
    if dist.is_main():
        run.mkdir(parents=True, exist_ok=True)
        lines = log_path.read_text().splitlines() if (opts.resume and log_path.exists()) else []
        log_path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))
    per_rank = opts.batch_size // world
    tokens_per_step = opts.batch_size * opts.seq_chunks * db.chunk_size
    bar = progress_bar(total=total, initial=step, desc="training", unit="step",
                       disable=not (opts.progress and dist.is_main()), dynamic_ncols=True)
    net.train()
    t_last, step_times = time.perf_counter(), []
    t_start, next_estimate = t_last, 5
    with StopSignals() as stop:  # Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved
        while step < total:
            hooks.reached("step", step)
            batch = seqs.batch(sampler.take(step * opts.batch_size + rank * per_rank, per_rank)).to(device)
            result = train_step(net, optimizer, batch, grad_clip=opts.grad_clip, lr=lr_at(step, opts, total),
                                world=world, bf16=bf16)
            step += 1
            # a stop asked for on any process (Ctrl-C, SIGTERM) travels with the loss: all stop together
            asked = torch.tensor(float(stop.requested), dtype=torch.float64, device=result.nll.device)
            stats = torch.stack([result.nll.double(), result.count.double(), asked])
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
            stopping = bool(stats[2] > 0)
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            if opts.time_budget and ck is None and next_estimate <= step < total:
                total = budget_steps(step, now - t_start, step_times, opts.time_budget, opts.steps)
                next_estimate = 2 * step if now - t_start < 0.6 * opts.time_budget else opts.steps + 1
                bar.total = total
            record = {"step": step, "loss": float(stats[0] / stats[1].clamp(min=1)),
                      "lr": lr_at(step - 1, opts, total), "tokens_per_s": tokens_per_step / step_times[-1],
                      "seconds": step_times[-1], "grad_norm": fsdp.full_value(result.grad_norm)}
            if dist.is_main():
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if step % opts.log_every == 0 and not opts.progress:
                    log(f"[train] step {step}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                        f"{record['tokens_per_s']:.0f} tokens/s")
            if step % opts.save_every == 0 or step == total or stopping:
                rngs = [rng_state()]
                if torch.distributed.is_initialized():
                    gathered = [None] * world
                    torch.distributed.all_gather_object(gathered, rngs[0])
                    rngs = gathered
                state = {"step": step, "total_steps": total, "samples_seen": step * opts.batch_size,
                         "tokenizer_sha256": db.manifest["tokenizer"]["sha256"],
                         "db": str(Path(opts.db).resolve()), "database": db.identity(),
                         "options": {k: v for k, v in asdict(opts).items() if k != "overrides"}}
                config = {"model": cfg.to_dict(), **model.extra_config}
                if opts.fsdp:  # every rank writes its shards
                    fsdp.save_sharded(run, step, model, optimizer, config, state, rngs)
                elif dist.is_main():
                    save_checkpoint(run, weights_to_save(), config, state,
                                    {"optimizer": optimizer.state_dict(), "rng": rngs})
                dist.barrier()
            if stopping and step < total:
                bar.close()
                raise Interrupted(stop.signum or signal.SIGINT, f"at step {step} of {total} (checkpoint saved)")
    bar.close()
    if dist.is_main():
        saved = fsdp.latest_step_dir(run) if opts.fsdp else run / "checkpoint"
        log(f"[train] {step} steps; checkpoint: {saved}")
    return run


def load_model(run: str | Path, device=None, backend: str | None = None, db=None) -> tuple[RetrievalLM, dict]:
    """The trained model of RUN (eval mode) and its checkpoint state, read as a saved model is
    (retrofitting/load.py's model_from_folder). With db (a ChunkDatabase), a RetroError unless it is the
    database the run was trained on (same tokenizer, chunk size, keys and held-out documents)."""
    from ..base.files import read_json_file
    from ..retrofitting.load import model_from_folder

    folder = checkpoint_dir(Path(run))
    state = read_json_file(folder / "state.json", REMEDY)
    if db is not None:
        check_run_database(state, db, run)
    model = model_from_folder(folder, device=device, backend=backend)
    model.source = str(run)  # errors name the run, as the command line's do
    return model, state


def check_run_database(state: dict, db, run) -> None:
    """RetroError (one line) unless db is the database a run (its checkpoint state) was trained on."""
    from ..model.saved import database_of

    db.check_identity(database_of(state), run)
