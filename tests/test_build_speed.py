"""What makes a large build fast changes nothing it writes: chunk texts decoded in one batch equal
those decoded one by one (padding dropped as decode drops it)."""
import numpy as np

from retrieval_helpers import write_corpus
from retro.retrieval import SentencePieceTokenizer, iter_documents
from retro.retrieval.database import chunk_texts


def test_chunk_texts_decoded_in_one_batch_equal_one_by_one(tmp_path):
    docs = list(iter_documents(write_corpus(tmp_path / "c", docs=3)))
    tok = SentencePieceTokenizer.train(docs + ["café → ü\n\tx"], vocab_size=300, log=lambda *_: None)
    tokens = np.concatenate(tok.encode(docs + ["café → ü\n\tx"]))
    tokens[5] = tok.pad_id  # padding in a chunk is dropped, as decode drops it
    rng = np.random.default_rng(0)
    starts = np.sort(rng.integers(0, len(tokens) - 16, 40))
    lens = rng.integers(0, 17, 40)
    starts[0], lens[0] = 0, 16
    expected = [tok.decode(tokens[s:s + n]) for s, n in zip(starts, lens)]
    assert chunk_texts(tok, tokens, starts, lens) == expected
    assert any("\ufffd" not in t and len(t) > 10 for t in expected) and "" in expected
