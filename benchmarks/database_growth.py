"""The paper's claim, measured: a RETRO model gains from documents added to its database after training,
without retraining. Does the strict split move towards the single-file split?

    python -m benchmarks.database_growth [--seeds 0 1 2] [--steps 300] [--out runs/database_growth] [--quick]

1. The demo's database (`retro demo`'s CPU settings: its corpus sample, tokenizer, chunk size 64, static
   keys, both hold-outs): whole model folders held out (the strict split: none of their files is in the
   database), and single files whose folder stays in the database (the file split).
2. In each held-out folder of at least two files, a seeded half of its files (at least one) are the
   evaluated files; the folder's other files are the ones added later. Folders of a single file are left out.
3. RETRO (the demo's CPU model: tiny decoder, encoder 1 x 64, k = 1) trains once per seed for a fixed
   number of steps on that database (steps, not a time: a loaded machine then gives the same models).
4. Bits per byte of RETRO[ON] and RETRO[OFF] on the evaluated files ("strict, before"); then a copy of the
   database grows by the other files of those folders (`retro.add_documents`; the evaluated files are never
   added, which is asserted) and the same models are evaluated again ("strict, after"), no retraining; and
   the file split's held-out files on the database as built ("file split", the reference).

The figure of merit is how far RETRO[ON] is below RETRO[OFF] in % (the same model, with and without its
neighbours, on the same tokens): the file sets differ, so their absolute bits per byte do not compare;
"gap closed" = (after - before) / (file split - before) of that percentage. Every stage is cached in
--out (corpus sample, database, grown copy, each seed's run and figures), so a killed run resumes.
Writes benchmarks/results/<name>-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import machine_name, mean_range, pyplot, save_figure, write_results
from retro.app.demo.recipes import RECIPES

SETTINGS = {"strict_before": "strict, before: held-out folders, database as built",
            "strict_after": "strict, after: + the folders' other files (no retraining)",
            "file_split": "file split: single files held out (reference)"}
CPU = RECIPES["scratch-cpu"]  # the CPU demo's recipe
K = CPU.k  # its neighbours per chunk
SEQ_CHUNKS = 8  # the CPU demo's sequences: 8 chunks of 64 tokens
QUICK = {"max_documents": 40, "steps": 6, "eval_tokens": 128, "valid_fraction": 0.3}


def parse_args(argv=None) -> argparse.Namespace:
    from retro.app.demo import DemoOptions

    demo = DemoOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (one database for all)")
    p.add_argument("--steps", type=int, default=300, help="RETRO's training steps per seed")
    p.add_argument("--corpus", default=None, help="a corpus folder of your own (default: the demo's, sampled)")
    p.add_argument("--max-documents", type=int, default=demo.max_documents,
                   help="files sampled from the demo's corpus, whole folders (default: all, as the demo)")
    p.add_argument("--valid-fraction", type=float, default=demo.valid_fraction)
    p.add_argument("--eval-tokens", type=int, default=CPU.eval_tokens, help="tokens scored per evaluated file")
    p.add_argument("--embedder", default=None, help="the database's keys (default: the CPU demo's)")
    p.add_argument("--data-seed", type=int, default=demo.seed, help="seed of the sample, the hold-out and the "
                                                                     "evaluated files")
    p.add_argument("--out", default="runs/database_growth")
    p.add_argument("--name", default=None, help="the results file's name (default: database_growth, "
                                                "database_growth_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a rehearsal in about a minute: " +
                   ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (figures mean nothing)")
    p.add_argument("--note", action="append", default=[], help="a note for the results file (repeatable)")
    a = p.parse_args(argv)
    if a.quick:
        for key, value in QUICK.items():
            setattr(a, key, value)
    a.name = a.name or ("database_growth_quick" if a.quick else "database_growth")
    return a


def build(a, out: Path, log) -> Path:
    """The demo's database in out/db (resumed where a build was cut), its training neighbours computed."""
    from retro import BuildOptions, build_database, compute_neighbours
    from retro.app.demo.corpus import sample_corpus
    from retro.app.default_corpus import default_corpus
    from retro.retrieval import DEFAULT_EMBEDDER, STATIC_PREFIX

    corpus = a.corpus
    if corpus is None:
        corpus = out / "corpus.jsonl"
        if not corpus.exists():
            sample_corpus(default_corpus(), a.max_documents, a.data_seed, corpus)
    db = out / "db"
    if not (db / "manifest.json").exists():
        build_database(BuildOptions(corpus=str(corpus), out=str(db), vocab_size=4000, chunk_size=64,
                                    valid_fraction=a.valid_fraction, holdout_by="both", seed=a.data_seed,
                                    embedder=a.embedder or STATIC_PREFIX + DEFAULT_EMBEDDER, device="cpu",
                                    resume=(db / "build_state.json").exists()), log=log)
    compute_neighbours(db, k=K, extra=6, device="cpu", progress=False, log=log)
    return db


def documents(db) -> list[dict]:
    """{"text", "path"} of each of db's documents in its ids' order, read again from the corpus it was
    built from (the build numbers them in the corpus's order); checked against db's byte counts."""
    from retro.retrieval.corpus import iter_documents

    from itertools import islice

    o = db.manifest["options"]
    corpus = o["corpus"]
    found = iter_documents(corpus, o["text_field"], None, o["include"], o["exclude"], with_source=True)
    docs = [{"text": t, "path": s} for t, _, s in islice(found, o["max_documents"])]
    sizes = np.array([len(d["text"].encode("utf-8")) for d in docs])
    if len(docs) != len(db.doc_split) or not np.array_equal(sizes, np.asarray(db.doc_bytes)):
        raise RuntimeError(f"the corpus {corpus!r} no longer gives the documents {db.path} was built from")
    return docs


def plan(db, seed: int) -> dict:
    """Document ids: "evaluated" (a seeded half, at least one, of each held-out folder of >= 2 files),
    "added" (those folders' other files), "file_split" (the single files held out), "single_file_folders"
    (held-out folders of one file: left out)."""
    from retro.app.demo.corpus import held_out_by_split

    held = held_out_by_split(db)
    folder_of = np.asarray(db.doc_folder)
    rng = np.random.default_rng(seed)
    evaluated, added, lone = [], [], []
    for folder in np.unique(folder_of[held["folder"]]):
        files = held["folder"][folder_of[held["folder"]] == folder]
        if len(files) < 2:
            lone += files.tolist()
            continue
        files = rng.permutation(files)
        cut = max(1, len(files) // 2)
        evaluated += files[:cut].tolist()
        added += files[cut:].tolist()
    return {"evaluated": sorted(int(d) for d in evaluated), "added": sorted(int(d) for d in added),
            "file_split": [int(d) for d in held["file"]], "single_file_folders": sorted(int(d) for d in lone)}


def check_plan(p: dict, docs: list[dict]) -> None:
    """AssertionError unless no evaluated file is among the added ones, by id, by path or by text."""
    evaluated, added = set(p["evaluated"]), set(p["added"])
    assert evaluated and added, p
    assert not evaluated & added, sorted(evaluated & added)
    for key in ("path", "text"):
        clash = {docs[d][key] for d in evaluated} & {docs[d][key] for d in added}
        assert not clash, f"an evaluated file's {key} is among the added files: {sorted(clash)[:3]}"


def grow(db: Path, p: dict, docs: list[dict], out: Path, log) -> Path:
    """out/grown: a copy of db to which the held-out folders' other files were added; made in a temporary
    folder and renamed when complete (a killed add leaves no grown database)."""
    from retro import add_documents
    from retro.base.atomic import write_bytes

    grown = out / "grown"
    if (grown / "manifest.json").exists():
        return grown
    check_plan(p, docs)
    additions = out / "added.jsonl"
    write_bytes(additions, "".join(json.dumps(docs[d]) + "\n" for d in p["added"]).encode())
    tmp = Path(tempfile.mkdtemp(prefix=".grown.", dir=out))
    try:
        shutil.copytree(db, tmp / "db")
        add_documents(tmp / "db", additions, device="cpu", log=log)
        os.replace(tmp / "db", grown)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return grown


def added_texts(grown) -> set[str]:
    """The texts of the documents added to the grown database (the segment after its build)."""
    first, last = grown.manifest["updates"][-1]["documents"]
    return {grown.tokenizer.decode(grown.document_tokens(d)) for d in range(first, last)}


def train_seed(db: Path, run: Path, seed: int, steps: int, log) -> None:
    """RETRO with the CPU demo's recipe for `steps` steps (resumed if a checkpoint is there)."""
    from retro import TrainOptions, train

    state = run / "checkpoint" / "state.json"
    if state.exists() and json.loads(state.read_text())["step"] >= steps:
        return
    train(TrainOptions(db=str(db), out=str(run), config=CPU.config, overrides=dict(CPU.encoder),
                       batch_size=CPU.batch_size, seq_chunks=SEQ_CHUNKS, lr=CPU.lr, warmup=CPU.warmup, k=K,
                       save_every=CPU.save_every, seed=seed, steps=steps,
                       device="cpu", progress=False, resume=state.exists()), log=log)


def eval_sets(dbs: dict, p: dict, seq_len: int, span: int) -> dict:
    """The evaluation set of each setting: (retriever, EvalSet), the same seeded spans in every setting
    that reads the same files, so before and after score the same tokens."""
    from retro import Retriever
    from retro.evaluation.evaluate import prepare

    retrievers = {name: Retriever.load(path, device="cpu") for name, path in dbs.items()}
    which = {"strict_before": ("db", "evaluated"), "strict_after": ("grown", "evaluated"),
             "file_split": ("db", "file_split")}
    return {s: (retrievers[d], prepare(retrievers[d], K, documents=p[docs], seq_len=seq_len, span_tokens=span))
            for s, (d, docs) in which.items()}


def evaluate_seed(run: Path, sets: dict) -> dict:
    from retro import evaluate, load_model

    model, state = load_model(run, device="cpu")
    assert model.cfg.max_seq_len == SEQ_CHUNKS * model.cfg.chunk_size, model.cfg  # the windows eval_sets cut
    out = {"steps": state["step"]}
    for setting, (retriever, es) in sets.items():
        r = evaluate(model, retriever, K, eval_set=es, progress=False)
        out[setting] = {"documents": r.documents, "tokens": r.tokens, "bytes": r.bytes, "on": r.bpb_on,
                        "off": r.bpb_off, "below_off": 100 * (r.bpb_off - r.bpb_on) / r.bpb_off}
    return out


def gap_closed(s: dict) -> float:
    """% of the gap (in "ON below OFF %") between the strict split and the file split closed by the add."""
    before = s["strict_before"]["below_off"]
    return 100 * (s["strict_after"]["below_off"] - before) / (s["file_split"]["below_off"] - before)


def table(results: dict) -> list[dict]:
    rows = []
    for seed, s in results.items():
        for setting, words in SETTINGS.items():
            r = s[setting]
            rows.append({"seed": seed, "setting": words, "documents": r["documents"], "tokens": r["tokens"],
                         "on": r["on"], "off": r["off"], "below_off": r["below_off"],
                         "gap_closed": gap_closed(s) if setting == "strict_after" else "",
                         **({"steps": s["steps"], "train_min": s["train_wall_seconds"] / 60}
                            if setting == "strict_before" else {})})
    for setting, words in SETTINGS.items():
        sel = [s[setting] for s in results.values()]
        rows.append({"seed": "mean (min-max)", "setting": words,
                     **{key: mean_range([r[key] for r in sel], 3 if key != "below_off" else 1)
                        for key in ("on", "off", "below_off")},
                     "gap_closed": (mean_range([gap_closed(s) for s in results.values()], 0)
                                    if setting == "strict_after" else "")})
    return rows


def conclusion(results: dict) -> str:
    """One line: did the strict split move towards the file split, by how much, with the spread."""
    g = {k: np.array([s[k]["below_off"] for s in results.values()]) for k in SETTINGS}
    closed = np.array([gap_closed(s) for s in results.values()])
    moved = g["strict_after"] - g["strict_before"]
    verdict = ("moved towards the file split" if (moved > 0).all() else
               "did not move towards the file split" if (moved <= 0).all() else
               "moved towards the file split for some seeds only")
    return (f"Conclusion: adding the held-out folders' other files without retraining, the strict split {verdict}: "
            f"RETRO[ON] below RETRO[OFF] went from {g['strict_before'].mean():.1f}% "
            f"({g['strict_before'].min():.1f}-{g['strict_before'].max():.1f}) to {g['strict_after'].mean():.1f}% "
            f"({g['strict_after'].min():.1f}-{g['strict_after'].max():.1f}), file split "
            f"{g['file_split'].mean():.1f}% ({g['file_split'].min():.1f}-{g['file_split'].max():.1f}); a change of "
            f"{moved.mean():+.1f} points ({moved.min():+.1f} to {moved.max():+.1f}), "
            f"{closed.mean():.0f}% ({closed.min():.0f}-{closed.max():.0f}) of the gap closed, over "
            f"{len(results)} training seed(s)")


PANELS = (("below_off", "RETRO[ON] below RETRO[OFF], %", "the gain of retrieval"),
          ("on", "RETRO[ON] bits per byte", "bits per byte (the file sets differ)"))


def plot(results: dict):
    def draw(path: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4))
        seeds = list(results)
        x = np.arange(len(seeds))
        width = 0.8 / len(SETTINGS)
        for ax, (key, ylabel, title) in zip(axes, PANELS):
            for i, (setting, words) in enumerate(SETTINGS.items()):
                ax.bar(x + (i - 1) * width, [results[s][setting][key] for s in seeds], width, label=words.split(":")[0])
            top = max(results[s][setting][key] for s in seeds for setting in SETTINGS)
            ax.set(xticks=x, xticklabels=[f"seed {s}" for s in seeds], ylabel=ylabel, title=title, ylim=(0, 1.3 * top))
            ax.legend(fontsize=8, loc="upper left", ncol=3)
        save_figure(fig, path)

    return draw


def main(argv=None) -> Path:
    a = parse_args(argv)
    command = describe_command(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    log = lambda *m: print(*m, flush=True)  # noqa: E731
    t0 = time.time()
    from retro import ChunkDatabase

    db = build(a, out, log)
    base = ChunkDatabase(db)
    docs = documents(base)
    p = plan(base, a.data_seed)
    check_plan(p, docs)
    write_json_plan(out, p, docs)
    grown = grow(db, p, docs, out, log)
    grown_db = ChunkDatabase(grown)
    assert not added_texts(grown_db) & {base.tokenizer.decode(base.document_tokens(d)) for d in p["evaluated"]}
    log(f"[growth] {len(p['evaluated'])} evaluated files, {len(p['added'])} added ({base.num_chunks} -> "
        f"{grown_db.num_chunks} chunks), {len(p['file_split'])} file-split files ({time.time() - t0:.0f} s)")
    sets = eval_sets({"db": db, "grown": grown}, p, SEQ_CHUNKS * base.chunk_size, a.eval_tokens)
    share = 100 * float(np.mean(sets["strict_after"][1].neighbour_ids >= base.num_chunks))
    log(f"[growth] after the add, {share:.0f}% of the evaluated files' chunks retrieve an added file's chunk")
    results = {}
    for seed in a.seeds:
        cached = out / f"seed-{seed}.json"
        if not cached.exists():
            run_seed(db, out, seed, a, sets, log)
        results[seed] = json.loads(cached.read_text())
        log(f"[growth] seed {seed}: " + ", ".join(f"{k} {results[seed][k]['below_off']:.1f}%" for k in SETTINGS)
            + f" below OFF ({time.time() - t0:.0f} s)")
    load = os.getloadavg()
    trained = "".join(f"; after seed {seed}'s training {r['loadavg_after_training'][0]:.1f}"
                      for seed, r in results.items() if "loadavg_after_training" in r)
    notes = [conclusion(results),
             f"command: `{command}`",
             f"database: {describe_corpus(a)}, holdout both (valid fraction {a.valid_fraction}, seed {a.data_seed}), "
             f"{base.num_chunks} chunks, keys {base.manifest['embedder']['name']}; grown copy "
             f"{grown_db.num_chunks} chunks (+{grown_db.num_chunks - base.num_chunks} from {len(p['added'])} files)",
             f"evaluated files: in each held-out folder of >= 2 files a seeded half (at least one), "
             f"{len(p['evaluated'])} files; added: those folders' other {len(p['added'])} files (never an evaluated "
             f"one: checked by id, path and text); {len(p['single_file_folders'])} held-out folder(s) of one file "
             f"left out; file split: the {len(p['file_split'])} single files held out; after the add, {share:.0f}% "
             "of the evaluated files' chunks retrieve a chunk of an added file (k = 1)",
             f"RETRO: the CPU demo's model (tiny, encoder 1 x 64, k = {K}, batch 4 x 512 tokens, lr 3e-3), "
             f"{'/'.join(sorted({str(s['steps']) for s in results.values()}))} steps per seed (fixed steps, not a "
             "time); one database for every seed, so the spread is the training seed's only",
             f"scored: a {a.eval_tokens}-token span of each file (the same spans before and after); ON below OFF "
             "% = 100 (OFF - ON) / OFF; gap closed = (after - before) / (file split - before) of that %",
             f"busy machine: shared by about 7 engineers' jobs; load average at the start {load_start[0]:.1f} / "
             f"{load_start[1]:.1f} / {load_start[2]:.1f}, at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
             f"on {os.cpu_count()} CPUs{trained} (fixed steps: the load changes the time, not the figures); "
             f"{(time.time() - t0) / 60:.1f} min this invocation", *a.note]
    columns = [("seed", "seed"), ("setting", "setting"), ("documents", "files"), ("tokens", "tokens scored"),
               ("on", "RETRO[ON]"), ("off", "RETRO[OFF]"), ("below_off", "ON below OFF %"),
               ("gap_closed", "gap to file split closed %"), ("steps", "steps"), ("train_min", "train min (wall)")]
    return write_results(a.name, machine_name(), table(results), columns, notes, plot=plot(results))


def run_seed(db: Path, out: Path, seed: int, a, sets: dict, log) -> None:
    """Trains seed's model, evaluates it in every setting (eval_sets) and writes out/seed-S.json."""
    from retro.base.atomic import write_json

    t = time.time()
    train_seed(db, out / f"run-{seed}", seed, a.steps, log)
    trained = time.time() - t
    s = evaluate_seed(out / f"run-{seed}", sets)
    write_json(out / f"seed-{seed}.json", {**s, "train_wall_seconds": trained,
                                           "loadavg_after_training": os.getloadavg()})


def describe_command(argv: list[str]) -> str:
    """The command line that measured (--note, an annotation, left out), with the thread count's variable."""
    kept = [x for i, x in enumerate(argv) if x != "--note" and (i == 0 or argv[i - 1] != "--note")]
    env = "".join(f"{v}={os.environ[v]} " for v in ("OMP_NUM_THREADS",) if v in os.environ)
    return f"{env}python -m benchmarks.database_growth {' '.join(kept)}".strip()


def describe_corpus(a) -> str:
    if a.corpus:
        return f"corpus {a.corpus}"
    from retro.app.default_corpus import describe

    return f"{a.max_documents or 'all'} files of {describe()} (the demo's sample)"


def write_json_plan(out: Path, p: dict, docs: list[dict]) -> None:
    """out/plan.json: the paths of the evaluated, added and file-split files (what was measured)."""
    from retro.base.atomic import write_json

    if not (out / "plan.json").exists():
        write_json(out / "plan.json", {k: [docs[d]["path"] for d in v] for k, v in p.items()})


if __name__ == "__main__":
    main()
