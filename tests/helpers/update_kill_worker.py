"""Changes a database as `retro add-documents` or `retro compact` does, and kills itself with SIGKILL
(as kill -9 would) right after the stage it is told, or with STAGE pause:NAME waits there until it is
killed: argv = add DB STAGE CORPUS (stages tokenise,
embed, index, manifest) or compact DB STAGE (arrays, index, manifest). Used by test_database_update.py;
the embedder is the tests' (wide) hashing one."""
import os
import signal
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]  # the repository root: tests.helpers

from tests.retro.retrieval.test_database_update import WideHashingEmbedder  # noqa: E402

import retro.retrieval.embedder as embedder  # noqa: E402
from retro import add_documents, compact  # noqa: E402
from retro.base import hooks  # noqa: E402

embedder.BertEmbedder = WideHashingEmbedder


def main(action: str, db: str, stage: str, corpus: str | None = None) -> None:
    def reached(name: str, index: int = 0) -> None:
        if name == stage:
            os.kill(os.getpid(), signal.SIGKILL)
        if f"pause:{name}" == stage:  # holds the change open (and its writer lock) until killed
            print("paused", flush=True)
            time.sleep(600)

    hooks.reached = reached
    if action == "add":
        add_documents(db, corpus, log=lambda *_: None)
    else:
        compact(db, log=lambda *_: None)


if __name__ == "__main__":
    main(*sys.argv[1:])
