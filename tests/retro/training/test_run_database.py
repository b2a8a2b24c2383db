"""A run is tied to its database: train, evaluate and generate refuse a database that differs from
the one the run was trained on (tokenizer, chunk size, keys, held-out documents) with one line, and
evaluate's -k defaults to the model's."""
import json

import pytest

from tests.helpers.retrieval_helpers import quick_database
from retro import RetroError
from retro.app.cli import main
from retro.retrieval import ChunkDatabase
from retro.training.train import TrainOptions, load_model, train

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("rundb")
    db = quick_database(root / "a", mp)
    # the same corpus and tokenizer, other held-out documents
    other = quick_database(root / "b", mp, seed=3, tokenizer=str(db / "tokenizer.model"))
    run = train(TrainOptions(db=str(db), out=str(root / "run"), steps=2, batch_size=2, seq_chunks=4, warmup=1,
                             k=1, overrides=dict(SMALL), progress=False, device="cpu"), log=lambda *_: None)
    yield db, other, run
    mp.undo()


def test_the_run_records_its_database_and_accepts_it(trained):
    db, _, run = trained
    model, state = load_model(run, db=ChunkDatabase(db))
    assert state["database"] == ChunkDatabase(db).identity()


def test_a_database_with_other_held_out_documents_is_refused(trained, capsys):
    db, other, run = trained
    mine, theirs = ChunkDatabase(db).identity(), ChunkDatabase(other).identity()
    assert {k for k in mine if mine[k] != theirs[k]} == {"split_sha256"}  # the split alone differs
    with pytest.raises(RetroError, match="other held-out documents"):
        load_model(run, db=ChunkDatabase(other))
    assert main(["evaluate", str(run), "--db", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass the database it was trained on" in err
    assert main(["generate", str(run), "x", "--db", str(other), "--max-new-tokens", "2"]) == 2
    assert "pass the database it was trained on" in capsys.readouterr().err


def test_evaluate_k_defaults_to_the_models(trained, capsys):
    db, _, run = trained
    assert main(["evaluate", str(run), "--db", str(db), "--max-documents", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["k"] == 1  # trained with k=1; the old default was 2


def test_a_run_folder_loads_as_a_saved_model(trained, tmp_path):
    import torch

    from retro.model.saved import save_pretrained
    from retro.retrofitting.load import from_pretrained

    _, _, run = trained
    model, _ = load_model(run, device="cpu")
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12))
    save_pretrained(model, tmp_path / "saved")
    with torch.no_grad():
        want = model(tokens)
        assert torch.equal(from_pretrained(run, device="cpu")(tokens), want)
        assert torch.equal(from_pretrained(tmp_path / "saved", device="cpu")(tokens), want)
