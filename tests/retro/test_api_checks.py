"""The Python API checks what the command line checks: evaluate, generate and encode_for_model
refuse a Retriever of another database than the model's (the run's, or a saved model's); generate
takes one prompt as a str; targets take the tokenizer's int32 ids and refuse floats; and the
docs' example of a model's tokens and neighbours in Python runs."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import retro
from tests.helpers.retrieval_helpers import quick_database
from retro import RetroError

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on database a; database b has another corpus, hence another tokenizer. The
    hashing embedder stays patched in for the module (the retrievers embed their queries)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("apichecks")
    db = quick_database(root / "a", mp)
    other = quick_database(root / "b", mp, docs=8)
    run = retro.train(retro.TrainOptions(db=str(db), out=str(root / "run"), steps=2, batch_size=2, seq_chunks=4,
                                         warmup=1, k=1, overrides=dict(SMALL), progress=False, device="cpu"),
                      log=lambda *_: None)
    yield db, other, run
    mp.undo()


def loaded_models(run, tmp_path):
    """The run's model as load_model gives it, and saved with save_pretrained and read back."""
    model, _ = retro.load_model(run, device="cpu")
    model.save_pretrained(tmp_path / "saved")
    return {"load_model": model, "from_pretrained": retro.from_pretrained(tmp_path / "saved", device="cpu")}


def test_another_database_is_refused_as_the_command_line_refuses_it(trained, tmp_path):
    db, other, run = trained
    theirs = retro.Retriever.load(other)
    for how, model in loaded_models(run, tmp_path).items():
        with pytest.raises(RetroError, match="another tokenizer.*pass the database it was trained on"):
            retro.evaluate(model, theirs, progress=False)
        with pytest.raises(RetroError, match="another tokenizer"):
            retro.generate(model, theirs, ["alpha beta"], max_new_tokens=2)
        with pytest.raises(RetroError, match="another tokenizer"):
            retro.encode_for_model(model, theirs, "alpha beta")
        mine = retro.Retriever.load(db)  # the run's own database passes
        assert retro.evaluate(model, mine, max_documents=1, progress=False).bpb_on > 0, how


def test_a_model_without_a_database_is_checked_for_chunk_size_and_vocabulary(trained):
    db, _, _ = trained
    retriever = retro.Retriever.load(db)
    vocab = retriever.db.tokenizer.vocab_size
    for fields, words in (({"chunk_size": 8}, "chunks of 8 tokens"),
                          ({"vocab_size": vocab - 1}, f"vocabulary of {vocab - 1} tokens")):
        cfg = retro.preset("tiny", **{**SMALL, "vocab_size": vocab, "chunk_size": 16, "max_seq_len": 64, **fields})
        with pytest.raises(RetroError, match=words):
            retro.evaluate(retro.RetroModel(cfg), retriever, progress=False)


def test_one_prompt_as_a_str_gives_a_list_of_one(trained):
    db, _, run = trained
    model, _ = retro.load_model(run, device="cpu")
    retriever = retro.Retriever.load(db)
    one = retro.generate(model, retriever, "alpha beta gamma", max_new_tokens=5, temperature=0)
    listed = retro.generate(model, retriever, ["alpha beta gamma"], max_new_tokens=5, temperature=0)
    assert len(one) == 1 and one[0].prompt == "alpha beta gamma" and one[0].tokens == listed[0].tokens
    for bad, what in ((42, "int"), (["alpha", 3], "a list holding int"), (b"alpha", "bytes")):
        with pytest.raises(TypeError, match=f"prompts must be a str or a list of str, got {what}"):
            retro.generate(model, retriever, bad, max_new_tokens=2)


def retrofitted():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)).eval()
    model = retro.retrofit(hf, chunk_size=4, encoder=dict(dim=16, head_dim=8), backend="reference").eval()
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_retro():
    torch.manual_seed(0)
    cfg = retro.preset("tiny", **{**SMALL, "vocab_size": 100, "chunk_size": 4, "max_seq_len": 32,
                                  "backend": "reference"})
    return retro.RetroModel(cfg).eval()


@pytest.mark.parametrize("make", [tiny_retro, retrofitted], ids=["retro", "retrofit"])
def test_targets_take_int32_ids_and_refuse_floats(make):
    model = make()
    g = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, 100, (2, 9), generator=g), torch.randint(0, 100, (2, 9), generator=g)
    nb, mask = torch.randint(0, 100, (2, 2, 2, 8), generator=g), torch.rand(2, 2, 2, 8, generator=g) > 0.3
    with torch.no_grad():
        want = model(tokens, nb, mask, targets=targets)
        for dtype in (torch.int32, torch.int16):  # the tokenizers' ids are int32
            assert torch.equal(model(tokens.int(), nb.int(), mask, targets=targets.to(dtype)), want)
        with pytest.raises(TypeError, match="targets must hold integer token ids.*float32"):
            model(tokens, nb, mask, targets=targets.float())


def test_encode_for_model_gives_the_tokens_and_neighbours_of_every_complete_chunk(trained):
    db, _, run = trained
    model, _ = retro.load_model(run, device="cpu")
    retriever = retro.Retriever.load(db)
    text = "alpha beta gamma delta river stone cloud forest engine planet signal " * 4
    inputs = retro.encode_for_model(model, retriever, text)
    ids = retriever.db.tokenizer.encode([text])[0]
    m, n = model.cfg.chunk_size, len(ids)
    assert n >= 2 * m and inputs.tokens.dtype == torch.long and inputs.tokens.tolist() == [ids.tolist()]
    found = retriever.search([ids[u * m:(u + 1) * m] for u in range(n // m)], model.cfg.num_neighbours)
    assert inputs.neighbour_tokens.shape == (1, n // m, model.cfg.num_neighbours, 2 * m)
    assert np.array_equal(inputs.neighbour_tokens[0].numpy(), found.tokens)
    assert np.array_equal(inputs.neighbour_mask[0].numpy(), found.mask)
    assert np.array_equal(inputs.neighbour_ids[0], found.ids) and inputs.lengths == [n]
    with torch.no_grad():
        logits = model(inputs.tokens, inputs.neighbour_tokens, inputs.neighbour_mask)
        assert logits.shape == (1, n, model.cfg.vocab_size)
        assert not torch.equal(logits, model(inputs.tokens))  # the neighbours reach the model
    two = retro.encode_for_model(model, retriever, [text, "alpha beta"])  # right-padded
    short = len(retriever.db.tokenizer.encode(["alpha beta"])[0])
    assert two.lengths == [n, short] and two.tokens.shape == (2, n) and torch.equal(two.tokens[0], inputs.tokens[0])
    assert torch.equal(two.neighbour_tokens[0], inputs.neighbour_tokens[0]) and len(two.neighbour_ids[1]) == short // m


def test_the_usage_docs_example_runs(trained, tmp_path, monkeypatch):
    """docs/usage.md's Python example of a model's tokens and neighbours, run as written in a folder
    holding `db` and `run`."""
    db, _, run = trained
    text = (ROOT / "docs" / "usage.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "encode_for_model" in b]
    assert len(blocks) == 1
    (tmp_path / "db").symlink_to(db)
    (tmp_path / "run").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "docs/usage.md", "exec"), scope)
    assert scope["logits"].shape[:2] == scope["inputs"].tokens.shape
