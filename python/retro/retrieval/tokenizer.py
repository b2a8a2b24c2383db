"""The language model's tokenizer: SentencePiece (docs/semantics.md), trained on the corpus or loaded from a
file; or a Hugging Face tokenizer (name or path) for retrofitting a pretrained model."""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..base.errors import RetroError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece drops a training sentence longer than its max_sentence_length (bytes), and fails
# with `[!sentences_.empty()]` when that leaves none (minified text: one long line per file):
# longer lines are split into pieces of at most this many bytes for training
MAX_LINE_BYTES = 4096


def split_long_lines(lines: Iterable[str], max_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The lines, each longer than max_bytes UTF-8 bytes cut into pieces of at most max_bytes: at
    the last space of the second half of a piece if there is one, never inside a character."""
    for line in lines:
        data = line.encode("utf-8")
        start = 0
        while len(data) - start > max_bytes:
            end = start + max_bytes
            while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to the character's start
                end -= 1
            space = data.rfind(b" ", start + max_bytes // 2, end)
            end = space + 1 if space >= 0 else end
            yield data[start:end].decode("utf-8")
            start = end
        yield data[start:].decode("utf-8") if start else line



def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() counts the host's in
    some containers and VMs, and SentencePiece then starts that many threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1

class SentencePieceTokenizer:
    """SentencePiece model; pad = 0, unk = 1, bos = 2, eos = 3; newlines are pieces of their own."""

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, source: str = ""):
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else PAD_ID
        self.eos_id = self.sp.eos_id()

    @classmethod
    def load(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RetroError(f"cannot read tokenizer file {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            return cls(data, source=str(path))
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise RetroError(f"{str(path)!r} is not a SentencePiece model ({exc})") from exc

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int, max_sentences: int = 2_000_000,
              log=print) -> "SentencePieceTokenizer":
        """Trains a unigram model on the lines of `documents`. A vocabulary larger than the corpus
        supports is reduced to the largest size SentencePiece accepts (one smaller than its byte
        pieces and characters need is raised to the smallest), and the change is reported."""
        lines = [line for doc in documents for line in doc.splitlines() if line.strip()]
        if len(lines) > max_sentences:
            rng = np.random.default_rng(0)
            lines = [lines[i] for i in sorted(rng.choice(len(lines), max_sentences, replace=False))]
        return cls.train_on_lines(lines, vocab_size, log=log)

    @classmethod
    def train_on_lines(cls, lines: list[str], vocab_size: int, log=print) -> "SentencePieceTokenizer":
        """Trains a unigram model on these non-empty lines (the vocabulary adjusted as `train` says;
        lines over MAX_LINE_BYTES split)."""
        import sentencepiece as spm

        if not lines:
            raise RetroError("cannot train a tokenizer: the corpus has no non-empty line")
        lines = list(split_long_lines(lines))
        size = vocab_size
        for _ in range(3):
            buf = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(lines), model_writer=buf, vocab_size=size, model_type="unigram",
                    character_coverage=0.9995, byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID,
                    bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=["\n", "\t"],
                    remove_extra_whitespaces=False, normalization_rule_name="identity",
                    allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
                    num_threads=usable_cpus(), minloglevel=2,
                    shuffle_input_sentence=False)
                break
            except RuntimeError as exc:
                high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(exc))
                low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(exc))
                if high:
                    log(f"[tokenizer] vocab_size {size} is too large for this corpus; reduced to {high.group(2)}")
                    size = int(high.group(2))
                elif low:  # byte fallback needs 256 byte pieces plus the corpus's characters
                    log(f"[tokenizer] vocab_size {size} is too small for this corpus (256 byte pieces and "
                        f"its characters); raised to {low.group(2)}")
                    size = int(low.group(2))
                else:
                    raise RetroError(f"SentencePiece training failed: {exc}") from exc
        else:
            raise RetroError(f"SentencePiece training failed for vocab_size {vocab_size}")
        return cls(buf.getvalue(), source="trained")

    def save(self, path: str | Path) -> None:
        from ..base.atomic import write_bytes

        write_bytes(path, self.model_bytes)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.sp.encode(texts, out_type=int, num_threads=usable_cpus())
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def decode_batch(self, seqs: list[np.ndarray]) -> list[str]:
        """[decode(ids) for ids in seqs], in one call to SentencePiece (1-d integer arrays)."""
        return self.sp.decode([np.asarray(ids)[np.asarray(ids) != self.pad_id].tolist() for ids in seqs])

    def _piece_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(UTF-8 bytes each piece adds to a decoded text, whether it is a byte piece): byte pieces
        1, control pieces and padding 0, others their text with the word-boundary mark as a space."""
        if getattr(self, "_tables", None) is None:
            sp, n = self.sp, self.sp.get_piece_size()
            is_byte = np.array([sp.is_byte(i) for i in range(n)])
            size = np.array([1 if is_byte[i] else 0 if (sp.is_control(i) or i == self.pad_id) else
                             len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")) for i in range(n)],
                            dtype=np.int64)
            self._tables = (size, is_byte)
        return self._tables

    def prefix_bytes(self, ids, cuts) -> list[int]:
        """UTF-8 bytes of decode(ids[:c]) for each c in cuts (sorted). Sums the pieces' lengths, less
        the leading space that decoding drops; decodes the prefixes instead where byte pieces occur
        (a character split across them decodes differently in part)."""
        ids = np.asarray(ids, dtype=np.int64)
        cuts = [int(c) for c in cuts]
        if not len(ids) or not cuts:
            return [0] * len(cuts)
        size, is_byte = self._piece_tables()
        if is_byte[ids[:cuts[-1]]].any():
            return [len(self.decode(ids[:c]).encode("utf-8")) for c in cuts]
        cum = np.concatenate([[0], np.cumsum(size[ids])])
        lead = 1 if self.sp.id_to_piece(int(ids[0])).startswith("\u2581") else 0
        return [int(cum[c]) - lead if c > 0 else 0 for c in cuts]

    def describe(self) -> dict:
        return {"kind": self.kind, "file": "tokenizer.model", "sha256": self.sha256, "vocab_size": self.vocab_size}


def hf_source(spec: str | Path) -> tuple[str, dict]:
    """A Hugging Face name, a local folder or a .gguf file -> the first argument and the keywords
    of `from_pretrained` (a GGUF file: its folder and gguf_file=its name)."""
    path = Path(spec)
    if path.suffix.lower() != ".gguf":
        return str(spec), {}
    if not path.is_file():
        raise RetroError(f"the GGUF file {str(spec)!r} does not exist")
    return str(path.parent), {"gguf_file": path.name}


class HFTokenizer:
    """A Hugging Face tokenizer (name, local folder or .gguf file), e.g. the tokenizer of a model
    to retrofit."""

    kind = "huggingface"

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        source, kwargs = hf_source(name_or_path)
        try:
            self.tok = AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, ... from transformers
            raise RetroError(f"cannot load the Hugging Face tokenizer {name_or_path!r}: {exc}") from exc
        self.name = name_or_path
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.tok.eos_token_id or 0)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else -1

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def sha256(self) -> str:
        vocab = sorted(self.tok.get_vocab().items())
        return hashlib.sha256(repr(vocab).encode()).hexdigest()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in out]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, seqs: list[np.ndarray]) -> list[str]:
        return self.tok.batch_decode([np.asarray(ids).tolist() for ids in seqs], skip_special_tokens=False)

    def prefix_bytes(self, ids, cuts) -> list[int]:
        """UTF-8 bytes of decode(ids[:c]) for each c in cuts."""
        return [len(self.decode(ids[:c]).encode("utf-8")) for c in cuts]

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size}


def load_tokenizer(spec: str | Path) -> SentencePieceTokenizer | HFTokenizer:
    """A SentencePiece model file, or else a Hugging Face tokenizer name, folder or .gguf file."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() != ".gguf":
        return SentencePieceTokenizer.load(path)
    return HFTokenizer(str(spec))


def tokenizer_from_manifest(db_dir: Path, info: dict):
    if info["kind"] == "sentencepiece":
        tok = SentencePieceTokenizer.load(db_dir / info["file"])
    else:
        tok = HFTokenizer(info["name"])
    if tok.sha256 != info["sha256"]:
        raise RetroError(f"the tokenizer of {str(db_dir)!r} does not match its manifest (sha256 {tok.sha256[:12]} != "
                         f"{info['sha256'][:12]}); the database was built with another tokenizer")
    return tok
