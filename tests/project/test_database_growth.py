"""benchmarks/database_growth.py --quick end to end on a small corpus of model-like folders: the evaluated
files are never added to the database, the same models score the same tokens before and after the add,
and the results files have their schema; a second run reuses every cached stage."""
import json

import pytest

from benchmarks import database_growth, harness
from tests.retro.app.test_demo import write_family_corpus


@pytest.mark.slow
def test_quick_run_never_adds_an_evaluated_file_and_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    corpus = write_family_corpus(tmp_path / "corpus", folders=10, files=4, lines=40)
    args = ["--quick", "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--seeds", "0", "1"]
    stem = database_growth.main(args)
    out = tmp_path / "out"

    plan = json.loads((out / "plan.json").read_text())
    added = [json.loads(line) for line in (out / "added.jsonl").read_text().splitlines()]
    assert plan["evaluated"] and added
    assert [a["path"] for a in added] == plan["added"]
    assert not set(plan["evaluated"]) & {a["path"] for a in added}
    # held-out folders only: every added file shares its folder with an evaluated one
    folder = lambda path: path.rsplit("/", 1)[0]  # noqa: E731
    assert {folder(p) for p in plan["added"]} <= {folder(p) for p in plan["evaluated"]}
    assert not {folder(p) for p in plan["evaluated"]} & {folder(p) for p in plan["file_split"]}

    from retro import ChunkDatabase

    base, grown = ChunkDatabase(out / "db"), ChunkDatabase(out / "grown")
    assert len(grown.doc_split) == len(base.doc_split) + len(added) and grown.num_chunks > base.num_chunks
    assert base.generation == 0  # the database as built stays as it was: the add went into a copy
    ids = database_growth.plan(base, 0)["evaluated"]
    evaluated_texts = {base.tokenizer.decode(base.document_tokens(d)) for d in ids}
    assert len(evaluated_texts) == len(plan["evaluated"])
    assert not database_growth.added_texts(grown) & evaluated_texts

    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["meta"]["benchmark"] == "database_growth_quick" and result["meta"]["machine"]
    assert result["meta"]["notes"][0].startswith("Conclusion:")
    assert any(n.startswith("command: `") and "python -m benchmarks.database_growth --quick" in n
               for n in result["meta"]["notes"])
    rows = result["rows"]
    assert len(rows) == 2 * 3 + 3  # two seeds x three settings, then the mean of each
    assert {r["setting"] for r in rows} == set(database_growth.SETTINGS.values())
    for seed in (0, 1):
        mine = {r["setting"].split(":")[0]: r for r in rows if r["seed"] == seed}
        before, after = mine["strict, before"], mine["strict, after"]
        assert before["off"] == after["off"] and before["tokens"] == after["tokens"]  # same model, same tokens
        for r in mine.values():
            assert 0 < r["on"] < 20 and 0 < r["off"] < 20, r
        assert isinstance(after["gap_closed"], float)
    assert stem.with_suffix(".md").read_text().count("| mean (min-max) |") == 3
    assert stem.with_suffix(".png").stat().st_size > 0

    cached = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    database_growth.main(args)  # resumes: nothing is built, added or trained again
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == cached


def test_a_plan_that_adds_an_evaluated_file_is_refused():
    docs = [{"text": f"text {i}", "path": f"m/{i}.py"} for i in range(4)]
    database_growth.check_plan({"evaluated": [0, 1], "added": [2, 3]}, docs)
    with pytest.raises(AssertionError):
        database_growth.check_plan({"evaluated": [0, 1], "added": [1, 3]}, docs)
    docs[3]["text"] = docs[0]["text"]  # the same file under another path
    with pytest.raises(AssertionError, match="text"):
        database_growth.check_plan({"evaluated": [0, 1], "added": [2, 3]}, docs)
