"""`retro demo` as a new user runs it, once per seed, each from scratch: the figures of every seed and
their spread, on both held-out splits.

    python -m benchmarks.demo_seeds [--seeds 0 1 2] [--out runs/demo-seeds] [-- extra demo flags]

Each seed is `python -m retro demo --seed S --out OUT/seed-S` in a fresh process (the database, the
held-out choice and the training all depend on the seed). Reads each run's summary.json and writes
benchmarks/results/demo-<machine>.{json,md,png}: per seed and split, bits per byte of RETRO[ON],
RETRO[OFF] and the baseline, how far RETRO[ON] is below each, the steps, the training seconds and
the demo's wall time; then the mean and the range over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import machine_name, mean_range, pyplot, save_figure, write_results

SPLITS = {"folder": "whole folders held out", "file": "single files held out"}


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    folder = out / f"seed-{seed}"
    summary = folder / "summary.json"
    if not summary.exists():
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(out / f"seed-{seed}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "retro", "demo", "--seed", str(seed), "--out", str(folder), *extra],
                           check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        (folder / "wall_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    result = json.loads(summary.read_text())
    wall = folder / "wall_seconds.json"
    result["wall_seconds"] = json.loads(wall.read_text())["seconds"] if wall.exists() else None
    return result


def rows_of(seed: int, s: dict) -> list[dict]:
    rows = []
    for split, words in SPLITS.items():
        if split not in s["splits"]:
            continue
        sp = s["splits"][split]
        bpb = sp["bits_per_byte"]
        dedup = sp.get("without_near_duplicates") or {}
        rows.append({"seed": seed, "split": words, "documents": sp["eval"]["documents"],
                     "on": bpb["RETRO[ON]"], "off": bpb["RETRO[OFF]"], "baseline": bpb["baseline"],
                     "below_off": sp["below_off_pct"], "below_baseline": sp["below_baseline_pct"],
                     "dedup_below_baseline": (100 * (dedup["baseline"] - dedup["RETRO[ON]"]) / dedup["baseline"]
                                              if dedup else float("nan")),
                     "near_dups": sp["near_duplicate_documents"],
                     "steps": f"{s['steps']['retro']} / {s['steps']['baseline']}",
                     "train_s": f"{s['train_seconds']['retro']:.0f} / {s['train_seconds']['baseline']:.0f}",
                     "wall_min": (s["wall_seconds"] or s["seconds"]) / 60})
    return rows


def spread(rows: list[dict]) -> list[dict]:
    out = []
    for words in SPLITS.values():
        sel = [r for r in rows if r["split"] == words]
        if not sel:
            continue
        row = {"seed": "mean (min-max)", "split": words}
        for key in ("on", "off", "baseline", "below_off", "below_baseline", "dedup_below_baseline", "wall_min"):
            row[key] = mean_range([r[key] for r in sel], 3 if key in ("on", "off", "baseline") else 1)
        out.append(row)
    return out


def plot(rows: list[dict]):
    def draw(path: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(SPLITS), figsize=(11, 4), sharey=True)
        for ax, words in zip(np.atleast_1d(axes), SPLITS.values()):
            sel = [r for r in rows if r["split"] == words]
            x = np.arange(len(sel))
            for i, (key, label) in enumerate((("on", "RETRO[ON]"), ("off", "RETRO[OFF]"), ("baseline", "baseline"))):
                ax.bar(x + (i - 1) * 0.27, [r[key] for r in sel], 0.27, label=label)
            ax.set_xticks(x)
            ax.set_xticklabels([f"seed {r['seed']}" for r in sel])
            ax.set_title(words)
            ax.set_ylabel("held-out bits per byte")
            ax.legend(fontsize=8)
        save_figure(fig, path)

    return draw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/demo-seeds")
    p.add_argument("--name", default="demo", help="the results file's name")
    p.add_argument("--note", action="append", default=[], help="a note for the results file (repeatable)")
    a, extra = p.parse_known_args()
    extra = [e for e in extra if e != "--"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {seed: run_seed(seed, out, extra) for seed in a.seeds}
    rows = [r for seed, s in summaries.items() for r in rows_of(seed, s)]
    first = next(iter(summaries.values()))
    import transformers

    notes = [f"`python -m retro demo --seed S` {' '.join(extra)}, each seed from scratch in a fresh process; "
             f"transformers {transformers.__version__} installed (the corpus is 5.24.0's, pinned)",
             f"database: {first['database']['chunks']} chunks, keys by {first['database']['embedder']}; k = "
             f"{first['k']} neighbour per chunk",
             "RETRO trains for the demo's training time (--train-minutes, 3 on the CPU) or --steps; the baseline for "
             "RETRO's measured training time (each schedule's length estimated from its own step times as it "
             "trains); train s = the sum of the step times",
             "below off / below baseline: how far RETRO[ON] is below each, in % of bits per byte; without "
             "near-duplicates: the same against the baseline without the held-out files that have a 13-gram "
             "Jaccard >= 0.8 near-duplicate among the training files",
             "evaluated: " + (f"a {first['eval_tokens_per_document']}-token span of each held-out file (its start "
                              "drawn with the seed)" if first.get("eval_tokens_per_document") else "whole files"),
             "wall min: the whole demo, database build and evaluation included", *a.note]
    columns = [("seed", "seed"), ("split", "split"), ("documents", "documents"), ("on", "RETRO[ON]"),
               ("off", "RETRO[OFF]"), ("baseline", "baseline"), ("below_off", "ON below OFF %"),
               ("below_baseline", "ON below baseline %"), ("dedup_below_baseline", "same, no near-dups %"),
               ("near_dups", "near-dup files"), ("steps", "steps RETRO / baseline"),
               ("train_s", "train s RETRO / baseline"), ("wall_min", "wall min")]
    write_results(a.name, machine_name(), rows + spread(rows), columns, notes, plot=plot(rows))


if __name__ == "__main__":
    main()
