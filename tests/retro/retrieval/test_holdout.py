"""The held-out split: single documents, whole folders (no file of a held-out folder is in the
database), or both; and the folder each document comes from."""
import json

import numpy as np
import pytest

from retro import RetroError
from retro.retrieval.build import split_documents, split_folders
from retro.retrieval.corpus import iter_documents


def test_documents_know_their_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / "a" / "one.txt").write_text("one")
    (tmp_path / "a" / "b" / "two.txt").write_text("two")
    lines = [json.dumps({"text": "x", "path": "pkg/m/x.py"}), json.dumps({"text": "y"}),
             json.dumps({"text": "z", "path": "z.py"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    got = list(iter_documents(tmp_path, with_folder=True))
    assert got == [("two", "a/b"), ("one", "a"), ("x", "pkg/m"), ("y", "c.jsonl#2"), ("z", ""), ("top", "")]
    assert [t for t, _ in got] == list(iter_documents(tmp_path))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folder_holdout_leaves_no_sibling_in_the_database(seed):
    rng = np.random.default_rng(seed)
    doc_folder = np.repeat(np.arange(40), rng.integers(1, 9, size=40)).astype(np.int32)
    split = split_folders(doc_folder, 0.15, seed)
    held, kept = set(doc_folder[split == 1]), set(doc_folder[split == 0])
    assert held and not held & kept
    assert abs(split.sum() - 0.15 * len(doc_folder)) <= 0.5 * 0.15 * len(doc_folder) + 1
    assert not np.array_equal(split, split_folders(doc_folder, 0.15, seed + 10))  # seeded, not fixed


@pytest.mark.parametrize("seed", [0, 1])
def test_both_holds_out_whole_folders_and_single_files(seed):
    rng = np.random.default_rng(seed)
    doc_folder = np.repeat(np.arange(60), rng.integers(2, 9, size=60)).astype(np.int32)
    split = split_folders(doc_folder, 0.2, seed, share=0.5)
    assert split.sum() == round(0.2 * len(doc_folder))
    whole = [f for f in np.unique(doc_folder[split == 1]) if split[doc_folder == f].all()]
    single = [d for d in np.flatnonzero(split) if not split[doc_folder == doc_folder[d]].all()]
    assert whole and single
    # a single held-out file's folder stays in the database
    assert all((split[doc_folder == doc_folder[d]] == 0).any() for d in single)


def test_splits_refuse_to_hold_out_everything():
    with pytest.raises(RetroError, match="leaves no training document"):
        split_folders(np.zeros(5, np.int32), 0.5, 0)
    with pytest.raises(RetroError, match="leaves no training document"):
        split_documents(4, 0.9, 0)


def test_a_single_document_is_never_held_out():
    # a corpus of one text file builds with the default --valid-fraction: evaluate --text scores other text
    assert not split_documents(1, 0.5, 0).any() and not split_folders(np.zeros(1, np.int32), 0.5, 0).any()
    assert split_documents(2, 0.05, 0).sum() == 1  # at least one of two or more
