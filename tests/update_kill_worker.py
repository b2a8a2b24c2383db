"""Adds a corpus to a database as `retro add-documents` does, and kills itself with SIGKILL (as kill -9
would) right after the stage it is told (tokenise, embed, index, manifest): argv = db, corpus, stage.
Used by test_database_update.py; the embedder is the tests' (wide) hashing one."""
import os
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

from test_database_update import WideHashingEmbedder  # noqa: E402

import retro.retrieval.embedder as embedder  # noqa: E402
from retro.retrieval.update import add_documents  # noqa: E402

embedder.BertEmbedder = WideHashingEmbedder


def main(db: str, corpus: str, stage: str) -> None:
    def on_stage(name: str) -> None:
        if name == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    add_documents(db, corpus, log=lambda *_: None, on_stage=on_stage)


if __name__ == "__main__":
    main(*sys.argv[1:])
