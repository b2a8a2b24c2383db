"""Inputs a newcomer's first build meets: a corpus of minified text (lines far longer than
SentencePiece takes as one sentence) trains a tokenizer; an embedder name that does not exist is
refused before any stage runs, leaving no unfinished build behind."""
import numpy as np

from tests.helpers.retrieval_helpers import WORDS, write_corpus
from retro.app.cli import main
from retro.retrieval.tokenizer import SentencePieceTokenizer


def minified(lines: int, chars: int, seed: int = 0) -> list[str]:
    """Lines of `chars` characters with no line break (as minified JS or CSS): words joined by
    punctuation, a multi-byte character now and then."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(lines):
        text = ""
        while len(text) < chars:
            text += str(rng.choice(WORDS)) + str(rng.choice([";", "{", "}", "(", ")", ",", "é", "→", " "]))
        out.append(text[:chars])
    return out


def test_a_tokenizer_trains_on_lines_longer_than_sentencepiece_takes():
    """Every line is 20,000 characters (over 16 KB): SentencePiece alone drops them all and fails
    with `[!sentences_.empty()]`; they are split for training instead."""
    lines = minified(6, 20_000)
    assert min(len(line.encode()) for line in lines) > 16_384
    tok = SentencePieceTokenizer.train_on_lines(lines, 800, log=lambda *_: None)
    assert tok.vocab_size == 800
    text = lines[0][:500]
    assert tok.decode(tok.encode([text])[0]) == text
    assert len(tok.encode([text])[0]) < len(text) / 2  # real pieces were learnt, not single characters


def test_build_db_on_a_minified_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, line in enumerate(minified(4, 18_000, seed=1)):
        (corpus / f"bundle{i}.min.js").write_text(line)
    status = main(["build-db", str(corpus), "--out", str(tmp_path / "db"), "--vocab-size", "300",
                   "--chunk-size", "16", "--embedder", "bm25"])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "db" / "manifest.json").exists()


def test_an_unknown_embedder_is_refused_before_any_work(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", docs=4, words=100)
    status = main(["build-db", str(corpus), "--out", str(tmp_path / "db"), "--vocab-size", "300",
                   "--embedder", "no-such-embedder-name"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "'no-such-embedder-name'" in err, err
    assert not (tmp_path / "db").exists()  # no unfinished build left to --resume or --overwrite
