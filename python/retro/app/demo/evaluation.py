"""The demo's figures on one held-out split: bits per byte of the compared models (from scratch:
RETRO[ON], RETRO[OFF] and the baseline, with the overlap table and the figures without near-duplicates;
a retrofit: RETRO[ON] against its base model, which RETRO[OFF] equals exactly)."""
from __future__ import annotations

import numpy as np
import torch

from retro.base.errors import RetroError

from .corpus import SPLIT_WORDS
from .recipes import Recipe


def pct_below(a: float, b: float) -> float:
    return 100.0 * (b - a) / b


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


def evaluate_split(name: str, docs: np.ndarray, models: dict, retriever, recipe: Recipe, k: int, window: int,
                   span: int | None, seed: int, duplicated: set[int], log) -> dict:
    """The figures of one split (SPLIT_WORDS) on these held-out documents: span tokens of each (a
    chunk-aligned span drawn with seed, see evaluate.prepare; None: whole) in windows of `window`
    tokens. models: "retro" (and from scratch "baseline"); duplicated: near_duplicated's documents."""
    from retro.evaluation.evaluate import prepare, score, summarise

    es = prepare(retriever, k, documents=docs, seq_len=window, span_tokens=span, seed=seed)
    retro = models["retro"]
    if recipe.retrofit:
        check_off_is_base(retro, es, log)
        compared = {"RETRO[ON]": (retro, True), "base": (retro, False)}
    else:
        compared = {"RETRO[ON]": (retro, True), "RETRO[OFF]": (retro, False), "baseline": (models["baseline"], False)}
    nll = {key: score(model, es, retrieval, batch_size=recipe.eval_batch_size)
           for key, (model, retrieval) in compared.items()}
    bpb = {key: summarise(es, None, v).bpb_off for key, v in nll.items()}
    res = summarise(es, *list(nll.values())[:2])
    log(f"[demo]    {SPLIT_WORDS[name]}: {res.documents} documents, {res.bytes} bytes, {res.tokens} tokens scored")
    if recipe.retrofit:
        bpb["RETRO[OFF]"] = bpb["base"]
        below = pct_below(bpb["RETRO[ON]"], bpb["base"])
        log(f"[demo]    base model {bpb['base']:.4f} bits/byte = RETRO[OFF]; RETRO[ON] {bpb['RETRO[ON]']:.4f}: "
            f"{below:.1f}% below the base model")
        return {"bits_per_byte": bpb, "below_base_pct": below, "eval": res.as_dict()}
    return {"bits_per_byte": bpb, **_against_baseline(es, nll, bpb, duplicated, log), "eval": res.as_dict()}


def _against_baseline(es, nll: dict, bpb: dict, duplicated: set[int], log) -> dict:
    """From scratch: RETRO[ON] against RETRO[OFF] and the baseline, by overlap, and without the
    documents that have a near-duplicate in the database."""
    from retro.evaluation.evaluate import summarise
    from retro.evaluation.overlap import format_overlap, group_overlaps, overlap_rows

    for key, words in (("RETRO[ON]", ""), ("RETRO[OFF]", "  (the same model, no neighbours)"),
                       ("baseline", "  (the same decoder trained without retrieval)")):
        log(f"[demo]    {key:<10} {bpb[key]:.4f} bits/byte{words}")
    log(f"[demo]    RETRO[ON] is {pct_below(bpb['RETRO[ON]'], bpb['RETRO[OFF]']):.1f}% below RETRO[OFF] and "
        f"{pct_below(bpb['RETRO[ON]'], bpb['baseline']):.1f}% below the baseline")
    rows = overlap_rows(es, group_overlaps(es), nll)
    log("[demo]    bits per byte of the scored tokens whose overlap with the neighbours they attended is <= alpha "
        "(the longest run of their tokens found in those neighbours / 64; 0 where none was attended):")
    for line in format_overlap(rows, nll):
        log("[demo]      " + line)
    dup = [int(d) for d in es.documents if int(d) in duplicated]
    keep = np.array([d for d in es.documents if int(d) not in duplicated])
    dedup = {}
    if len(keep):
        sel = np.isin(es.group_doc, keep)
        dedup = {key: summarise(es, None, v, sel).bpb_off for key, v in nll.items()}
        log(f"[demo]    without the {len(dup)} that have a near-duplicate in the database (13-gram Jaccard >= 0.8): "
            f"RETRO[ON] {dedup['RETRO[ON]']:.4f}, {pct_below(dedup['RETRO[ON]'], dedup['RETRO[OFF]']):.1f}% below "
            f"RETRO[OFF], {pct_below(dedup['RETRO[ON]'], dedup['baseline']):.1f}% below the baseline")
    else:
        log(f"[demo]    every one of the {len(dup)} documents has a near-duplicate in the database")
    return {"below_off_pct": pct_below(bpb["RETRO[ON]"], bpb["RETRO[OFF]"]),
            "below_baseline_pct": pct_below(bpb["RETRO[ON]"], bpb["baseline"]), "overlap": rows,
            "near_duplicate_documents": len(dup), "without_near_duplicates": dedup}
