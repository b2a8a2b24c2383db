"""The overlap report (paper section 2.6 and appendix; docs/semantics.md, "Evaluation"), beside
evaluate.py whose evaluation sets and scores it splits: r(C) = the longest common token substring
between the scored tokens of an evaluation chunk and the neighbours they attended / chunk size;
bits per byte with and without retrieval over the tokens with r(C) <= alpha, for a sweep of alpha,
as a table (overlap.md, overlap.json) and a plot (overlap.png). The 13-gram near-duplicate filter
that removes leaked documents before training is dedup.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.defaults import NEIGHBOURS
from .evaluate import bits_per_byte, prepare, score


def longest_common_substring(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest run of tokens that a and b share contiguously (dynamic programming
    over one row of the table at a time)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0 or len(b) == 0:
        return 0
    prev = np.zeros(len(b) + 1, dtype=np.int64)
    best = 0
    for x in a:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b == x, prev[:-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best


def chunk_overlap(chunk: np.ndarray, neighbour_tokens: list[np.ndarray], chunk_size: int) -> float:
    """r(C): the longest common token substring of C with any of its neighbours, / chunk size."""
    return max((longest_common_substring(chunk, n) for n in neighbour_tokens), default=0) / chunk_size


ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def group_overlaps(es) -> np.ndarray:
    """r for every group of scored tokens of an evaluation set (evaluate.EvalSet): the longest
    run of the group's tokens found in the neighbours they attended (those retrieved for the
    previous chunk), / chunk size; 0 for tokens that attended no neighbour."""
    out = np.zeros(len(es.group_doc))
    if es.neighbours is None:
        return out
    for g in range(len(out)):
        row = es.group_neighbour_row(g)
        if row >= 0:
            nb = [v[mk] for v, mk in zip(es.neighbours[row], es.neighbour_mask[row])]
            out[g] = chunk_overlap(es.group_targets[g], nb, es.chunk_size)
    return out


def overlap_rows(es, overlaps: np.ndarray, nlls: dict, alphas=ALPHAS, select: np.ndarray | None = None) -> list[dict]:
    """For each alpha: the scored tokens whose overlap r <= alpha (their share of the bytes) and
    the bits per byte of each model in `nlls` (name -> NLL per group) over them. The alpha = 1 row
    covers every scored token: its figures are evaluate's."""
    keep = np.ones(len(overlaps), dtype=bool) if select is None else np.asarray(select, dtype=bool)
    total = int(es.group_bytes[keep].sum())
    rows = []
    for alpha in alphas:
        sel = keep & (overlaps <= alpha + 1e-9)
        b = int(es.group_bytes[sel].sum())
        row = {"alpha": alpha, "tokens": int(es.group_tokens[sel].sum()), "bytes": b,
               "fraction": b / total if total else 0.0}
        for name, nll in nlls.items():
            row[name] = bits_per_byte(nll[sel], es.group_bytes[sel]) if b else None
        rows.append(row)
    return rows


def format_overlap(rows: list[dict], names) -> list[str]:
    """The overlap table as markdown lines."""
    names = list(names)
    lines = ["| alpha | tokens | share of bytes | " + " | ".join(f"bits/byte {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    lines += [f"| {r['alpha']} | {r['tokens']} | {r['fraction']:.3f} | " + " | ".join(_fmt(r[n]) for n in names) + " |"
              for r in rows]
    return lines


def overlap_report(model, retriever, k: int = NEIGHBOURS, max_documents: int | None = None, out: str | None = None,
                   alphas=ALPHAS, log=print, progress: bool = True) -> list[dict]:
    """Bits per byte with and without retrieval over the scored tokens with overlap r <= alpha."""
    es = prepare(retriever, k, max_documents=max_documents, seq_len=model.cfg.max_seq_len)
    nlls = {"RETRO[ON]": score(model, es, True, progress=progress),
            "RETRO[OFF]": score(model, es, False, progress=progress)}
    rows = overlap_rows(es, group_overlaps(es), nlls, alphas)
    _write_overlap(Path(out) if out else Path("."), rows, list(nlls), k)
    for line in format_overlap(rows, nlls):
        log(line)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _write_overlap(folder: Path, rows: list[dict], names: list[str], k: int) -> None:
    from ..base.atomic import atomic_path, write_bytes, write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "overlap.json", {"k": k, "rows": rows})
    write_bytes(folder / "overlap.md", ("\n".join(format_overlap(rows, names)) + "\n").encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    a = [r["alpha"] for r in rows]
    for name, style in zip(names, ("o-", "s--", "^:", "d-.")):
        ax.plot(a, [float("nan") if r[name] is None else r[name] for r in rows], style, label=name)
    ax.set_xlabel("max chunk overlap alpha (r(C) <= alpha)")
    ax.set_ylabel("bits per byte")
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "overlap.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
