"""What a newcomer meets on the command line's quick start: build-db holds documents out by
default, evaluate scores any text given with --text, --overwrite replaces a database whose folder
also holds the files the pipeline wrote into it (neighbours), --help shows every default, and
train, generate and evaluate say what happened where a newcomer would otherwise be left guessing."""
import json

import numpy as np
import pytest

from tests.helpers.retrieval_helpers import quick_database, write_corpus
from retro.app.cli import build_parser, commands, main
from retro.evaluation.evaluate import evaluate, prepare
from retro.retrieval import BuildOptions, ChunkDatabase, Retriever, build_database
from retro.training.train import TrainOptions, load_model, train

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A database of 10 documents (2 held out, chunks of 16 tokens, k=2 neighbours precomputed)
    and a run trained on it for 2 steps: (root, db, run, lines the training logged)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("quickstart")
    db = quick_database(root, mp)
    lines = []
    run = train(TrainOptions(db=str(db), out=str(root / "run"), steps=2, batch_size=2, seq_chunks=2, warmup=5,
                             overrides=dict(SMALL), progress=False, device="cpu"), log=lines.append)
    yield root, db, run, lines
    mp.undo()


# ---- build-db: a held-out part by default; --overwrite -----------------------------------------------


def test_build_db_holds_out_documents_by_default(tmp_path, monkeypatch):
    import retro.retrieval.embedder
    from tests.helpers.retrieval_helpers import HashingEmbedder

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)
    corpus = write_corpus(tmp_path / "corpus", docs=30, words=60)
    common = dict(vocab_size=300, chunk_size=16, block_size=256, progress=False, embedder="hashing-test-embedder")
    build_database(BuildOptions(corpus=str(corpus), out=str(tmp_path / "db"), **common), log=quiet)
    counts = ChunkDatabase(tmp_path / "db").manifest["counts"]
    assert counts["valid_documents"] == 2 and counts["train_documents"] == 28  # 5% of 30, rounded
    build_database(BuildOptions(corpus=str(corpus), out=str(tmp_path / "none"), valid_fraction=0.0, **common),
                   log=quiet)
    assert ChunkDatabase(tmp_path / "none").manifest["counts"]["valid_documents"] == 0
    # a single text file is one document: nothing to hold out, and no error
    lines = []
    build_database(BuildOptions(corpus=str(corpus / "doc000.txt"), out=str(tmp_path / "one"), **common),
                   log=lines.append)
    assert ChunkDatabase(tmp_path / "one").manifest["counts"]["valid_documents"] == 0
    assert any("--text" in line for line in lines)  # and where to evaluate instead


def test_overwrite_replaces_a_database_holding_its_own_neighbours(trained, tmp_path):
    import shutil

    root, db, _, _ = trained
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    assert sorted(p.name for p in copy.glob("neighbours-*")) == ["neighbours-8.json", "neighbours-8.npy"]
    (copy / "neighbours-4-parts").mkdir()  # an interrupted `retro neighbours -k 2 --extra 2`
    (copy / "neighbours-4-parts" / "part-000000.npy").write_bytes(b"x")
    opts = dict(corpus=str(root / "corpus"), out=str(copy), vocab_size=300, chunk_size=16, block_size=256,
                progress=False, embedder="hashing-test-embedder", overwrite=True)
    build_database(BuildOptions(**opts), log=quiet)
    assert not list(copy.glob("neighbours-*"))  # derived from the old database: gone with it
    assert ChunkDatabase(copy).manifest["counts"]["documents"] == 10
    (copy / "notes.txt").write_text("mine")  # a file the pipeline never writes is still protected
    assert main(["build-db", opts["corpus"], "--out", str(copy), "--overwrite"]) == 2
    assert (copy / "notes.txt").read_text() == "mine"


# ---- evaluate --text, -k ------------------------------------------------------------------------------


def test_evaluate_text_scores_a_given_file_as_the_held_out_document_itself(trained, tmp_path, capsys):
    root, db, run, _ = trained
    d = ChunkDatabase(db)
    held = int(d.documents("valid")[0])
    # the held-out document's file, copied elsewhere: --text scores exactly what evaluate scores for it
    text = sorted((root / "corpus").iterdir())[held].read_text()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(text)
    model, _ = load_model(run)
    retriever = Retriever.load(db)
    es = prepare(retriever, 2, documents=[held], seq_len=model.cfg.max_seq_len)
    want = evaluate(model, retriever, k=2, eval_set=es, progress=False)
    assert main(["evaluate", str(run), "--db", str(db), "--text", str(tmp_path / "texts")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["documents"] == 1 and got["bytes"] == want.bytes and got["tokens"] == want.tokens
    assert got["bpb_on"] == pytest.approx(want.bpb_on, rel=1e-12) and got["bpb_off"] == pytest.approx(want.bpb_off,
                                                                                                       rel=1e-12)
    # a database with nothing held out can still be evaluated on text given
    (tmp_path / "texts" / "b.txt").write_text("alpha beta gamma delta " * 30)
    assert main(["evaluate", str(run), "--db", str(db), "--text", str(tmp_path / "texts"), "--max-documents",
                 "1"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 1


def test_evaluate_text_errors_are_one_line(trained, tmp_path, capsys):
    _, db, run, _ = trained
    assert main(["evaluate", str(run), "--db", str(db), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.txt" in err
    assert main(["evaluate", str(run), "--db", str(db), "--text", str(tmp_path), "--overlap"]) == 2
    assert "--overlap" in capsys.readouterr().err


def test_evaluate_without_held_out_documents_names_text(tmp_path, trained):
    from retro import RetroError

    _, db, _, _ = trained
    retriever = Retriever.load(db)
    with pytest.raises(RetroError, match="--text"):
        prepare(retriever, 2, documents=np.zeros(0, dtype=np.int64))


def test_evaluate_and_generate_note_a_k_other_than_the_trained_one(trained, capsys):
    _, db, run, _ = trained
    assert main(["evaluate", str(run), "--db", str(db), "-k", "3", "--max-documents", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["k"] == 3
    assert "-k 3" in err and "trained with 2" in err
    assert main(["evaluate", str(run), "--db", str(db), "--max-documents", "1"]) == 0
    assert "trained with" not in capsys.readouterr().err
    assert main(["generate", str(run), "alpha", "--db", str(db), "-k", "3", "--max-new-tokens", "2"]) == 0
    assert "trained with 2" in capsys.readouterr().err


# ---- generate: a prompt shorter than a chunk ------------------------------------------------------------


def test_generate_says_why_a_short_prompt_shows_no_neighbours(trained, capsys):
    _, db, run, _ = trained
    args = ["generate", str(run), "alpha", "--db", str(db), "--show-neighbours", "--temperature", "0"]
    assert main(args + ["--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "neighbour 0" not in out and "no neighbours" in out and "16 tokens" in out
    # a continuation that completes a chunk shows its neighbours, and when they came
    assert main(args + ["--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "neighbour 0" in out and "no neighbours" not in out and "shorter than one chunk" in out


# ---- train: where the checkpoint went, warm-up, resuming a finished run ---------------------------------


def test_train_names_its_checkpoint_and_warns_of_a_short_warm_up(trained):
    _, _, run, lines = trained
    text = "\n".join(lines)
    assert "--steps 2 is below --warmup 5" in text
    assert str(run / "checkpoint") in lines[-1]


def test_resume_of_a_finished_run_says_so(trained, tmp_path):
    import shutil

    _, db, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "checkpoint" / "model.safetensors").read_bytes()
    lines = []
    train(TrainOptions(db=str(db), out=str(copy), steps=2, batch_size=2, seq_chunks=2, warmup=5,
                       overrides=dict(SMALL), progress=False, device="cpu", resume=True), log=lines.append)
    assert any("already finished" in line and "2 of 2" in line for line in lines)
    assert (copy / "checkpoint" / "model.safetensors").read_bytes() == before


# ---- --help -------------------------------------------------------------------------------------------


def test_help_shows_every_options_default():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name in commands():
        parser = sub.choices[name]
        for action in parser._actions:
            if not action.option_strings or action.required or action.default == argparse.SUPPRESS:
                continue  # positionals, required flags, --help
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            if "default" not in shown:
                missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, f"--help gives no default for: {', '.join(missing)}"
