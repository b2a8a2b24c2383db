"""Small corpora and database builds shared by the retrieval tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud forest "
         "engine planet signal vector matrix kernel tensor chunk query neighbour memory").split()


def write_corpus(folder: Path, docs: int = 12, words: int = 220, seed: int = 0, topic_words: bool = True) -> Path:
    """A folder of .txt documents of random words; each document repeats its own topic words, so
    neighbours within a document are genuinely similar."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        topic = [f"topic{d}word{i}" for i in range(5)] if topic_words else []
        pool = WORDS + topic * 3
        lines = [" ".join(rng.choice(pool, size=11)) for _ in range(words // 11)]
        (folder / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def build_args(corpus, out, *extra) -> list[str]:
    return ["build-db", str(corpus), "--out", str(out), "--vocab-size", "300", "--chunk-size", "16",
            "--block-size", "64", "--valid-fraction", "0.2", *extra]


# Every subprocess a test starts is killed (and the test fails) after this many seconds, so a hung
# child (a stuck rendezvous, a deadlock) cannot hang the suite.
SUBPROCESS_TIMEOUT = 600


def free_port() -> int:
    """A TCP port that is free now (the OS picks it), for a torchrun rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, env=None, check=True, timeout=SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m retro ...` in a fresh process (as a user would run it)."""
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "retro", *args], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"retro {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def database_files(path: Path) -> dict[str, bytes]:
    """Every file of a database folder, those in its subfolders (bm25/, index-shards/) included, by
    relative path."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def database_contents(path: Path) -> dict[str, bytes]:
    """database_files, the manifest without the build's stage timings (which differ run to run)."""
    import json

    files = database_files(path)
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("build_seconds")
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


class HashingEmbedder:
    """A stand-in for BertEmbedder in tests that need a database but not BERT: a text's vector is
    its bag of words hashed into `dim` buckets, normalised (deterministic, instant; similar texts
    get near vectors)."""

    dim = 32

    def __init__(self, name: str = "hashing-test-embedder", device=None, batch_size=None):
        self.name = name

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim}

    def embed(self, texts: list[str]) -> np.ndarray:
        import zlib

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def quick_database(root: Path, monkeypatch, docs: int = 10, words: int = 330, **build) -> Path:
    """A small database built with HashingEmbedder instead of BERT, its neighbours (k=2, extra=6)
    precomputed: ROOT/db."""
    import retro.retrieval.embedder
    from retro.retrieval import BuildOptions, build_database, compute_neighbours

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)
    corpus = write_corpus(root / "corpus", docs=docs, words=words)
    opts = dict(corpus=str(corpus), out=str(root / "db"), vocab_size=300, chunk_size=16, block_size=256,
                valid_fraction=0.2, progress=False, embedder="hashing-test-embedder", **build)
    build_database(BuildOptions(**opts), log=lambda *_: None)
    compute_neighbours(root / "db", k=2, extra=6, progress=False, log=lambda *_: None)
    return root / "db"
