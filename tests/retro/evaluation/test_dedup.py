"""The 13-gram near-duplicate filter: MinHash dedup catches planted near-duplicates at the 0.8
threshold (recall measured), the exact Jaccard decides, the command removes them; held-out
documents copied from training ones are found. The overlap report is tested in test_evaluate.py."""
import json

import numpy as np
import pytest

from tests.helpers.retrieval_helpers import run_cli
from retro.evaluation.dedup import (candidate_probability, duplicated_documents, find_duplicates, jaccard, ngrams,
                                   word_tokens)


def near_duplicate(words: list[str], target: float, rng) -> list[str]:
    """Edits a copy of `words` until its 13-gram Jaccard with the original is just above target."""
    copy = list(words)
    base = ngrams(words)
    while True:
        i = int(rng.integers(0, len(copy)))
        trial = copy[:i] + [f"edit{rng.integers(1e9)}"] + copy[i + 1:]
        if jaccard(ngrams(trial), base) < target:
            return copy
        copy = trial


def test_lsh_bands_catch_pairs_at_the_threshold():
    assert candidate_probability(0.8) > 0.9999
    assert candidate_probability(0.3) < 0.3


@pytest.mark.slow
def test_planted_near_duplicates_are_found(tmp_path):
    rng = np.random.default_rng(0)
    vocab = [f"t{i}" for i in range(2000)]
    eval_docs = [" ".join(rng.choice(vocab, 1000)) for _ in range(40)]
    planted, train_docs = {}, []
    for e, doc in enumerate(eval_docs):
        dup = near_duplicate(doc.split(), 0.8, rng)
        planted[len(train_docs)] = e
        train_docs.append(" ".join(dup))
        assert 0.8 <= jaccard(ngrams(dup), ngrams(doc.split())) < 0.83
        train_docs.append(" ".join(rng.choice(vocab, 1000)))  # unrelated
    found = find_duplicates(eval_docs, train_docs, 0.8, progress=False)
    hits = {d.train_index: d.eval_index for d in found}
    recall = sum(hits.get(t) == e for t, e in planted.items()) / len(planted)
    print(f"measured recall at 13-gram Jaccard 0.80-0.83: {recall:.3f} ({len(planted)} planted pairs)")
    assert recall >= 0.975  # measured: 1.000
    assert set(hits) <= set(planted)  # the exact check lets no unrelated document through

    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in eval_docs[:5]))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in train_docs[:10]))
    out = run_cli("dedup-against", str(tmp_path / "eval.jsonl"), str(tmp_path / "train.jsonl"),
                  "--out", str(tmp_path / "kept.jsonl")).stdout
    assert "5 of 10 training documents" in out
    kept = [json.loads(line)["text"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == train_docs[1:10:2]
    bad = run_cli("dedup-against", str(tmp_path / "eval.jsonl"), str(tmp_path / "train.jsonl"), "--threshold", "0",
                  check=False)
    assert bad.returncode == 2 and "--threshold must be a number in (0, 1], got 0.0" in bad.stderr


def test_word_ngrams():
    toks = word_tokens("def f(x):\n    return x+1")
    assert toks == ["def", "f", "(", "x", ")", ":", "return", "x", "+", "1"]
    assert ngrams(toks) == {tuple(toks)}  # shorter than 13: one n-gram
    assert len(ngrams(list(range(20)))) == 8


def test_duplicated_documents_finds_planted_copies():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(500)]
    train = [" ".join(rng.choice(vocab, 300)) for _ in range(6)]
    held = [train[2], " ".join(rng.choice(vocab, 300)), train[4].replace(train[4].split()[150], "edited", 1)]
    assert duplicated_documents(held, train, 0.8, progress=False) == {0, 2}
