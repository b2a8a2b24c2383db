"""What makes a large build fast changes nothing it writes: chunk texts decoded in one batch equal
those decoded one by one (padding dropped as decode drops it)."""
import numpy as np

from tests.helpers.retrieval_helpers import write_corpus
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


def test_the_tokenizer_sample_is_seeded_uniform_and_in_corpus_order(tmp_path):
    from retro.retrieval.build import BuildOptions, _training_lines

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(40):  # 40 documents of 250 numbered lines, blank lines between some
        (corpus / f"doc{d:02d}.txt").write_text("".join(f"line {d * 250 + i}\n" + "\n" * (i % 3 == 0)
                                                        for i in range(250)))
    split = np.zeros(40, dtype=np.uint8)
    split[[3, 17]] = 1  # held out: none of their lines

    def sample(cap, seed=0):
        opts = BuildOptions(corpus=str(corpus), out=str(tmp_path / "db"), tokenizer_lines=cap, seed=seed)
        return [int(line.split()[1]) for line in _training_lines(opts, split)]

    every = sample(10_000)
    assert len(every) == 38 * 250 and every == sorted(every)  # fewer lines than asked: all, in order
    assert not {n // 250 for n in every} & {3, 17}
    picked = sample(1000)
    assert len(picked) == len(set(picked)) == 1000 and picked == sorted(picked) and set(picked) <= set(every)
    assert picked == sample(1000) and picked != sample(1000, seed=1)
    # uniform: each tenth of the lines holds about a tenth of the sample (binomial sd 9.5)
    tenths = np.bincount(np.searchsorted(every, picked) * 10 // len(every), minlength=10)
    assert tenths.min() > 60 and tenths.max() < 140, tenths
