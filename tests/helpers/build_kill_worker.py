"""Builds a database and its neighbours as `retro build-db` + `retro neighbours` do, and kills itself
with SIGKILL (as kill -9 would) right after the unit of work it is told: argv = corpus, out,
stage, index[, --resume][, --bm25]. Used by test_build_resume.py; with stage "none" it runs to the end.
Small parts and blocks make every stage several units long; the embedder is the tests' hashing one, or
BM25 with --bm25. Under torchrun (test_build_resume.py) only the rank in $KILL_RANK kills itself
(every rank where it is not set)."""
import os
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]  # the repository root: tests.helpers

from tests.helpers.retrieval_helpers import HashingEmbedder  # noqa: E402

import retro.retrieval.build as build  # noqa: E402
import retro.retrieval.embedder as embedder  # noqa: E402
import retro.retrieval.index_parts as index_parts  # noqa: E402
from retro.base import distributed as dist  # noqa: E402
from retro.base import hooks  # noqa: E402
from retro.retrieval import BuildOptions, build_database, compute_neighbours  # noqa: E402

embedder.BertEmbedder = HashingEmbedder
build.PART_DOCUMENTS = 3
index_parts.INDEX_PART_BLOCKS = 2


def main(corpus: str, out: str, stage: str, index: str, *flags: str) -> None:
    at = int(index)

    def reached(name: str, i: int = 0) -> None:
        if name == stage and i == at and str(dist.rank()) == os.environ.get("KILL_RANK", str(dist.rank())):
            os.kill(os.getpid(), signal.SIGKILL)

    opts = BuildOptions(corpus=corpus, out=out, vocab_size=300, chunk_size=16, block_size=16, valid_fraction=0.2,
                        holdout_by="both", progress=False,
                        embedder="bm25" if "--bm25" in flags else "hashing-test-embedder", resume="--resume" in flags)
    hooks.reached = reached
    build_database(opts, log=lambda *_: None)
    compute_neighbours(out, k=2, extra=2, block=64, progress=False, log=lambda *_: None)


if __name__ == "__main__":
    main(*sys.argv[1:])
