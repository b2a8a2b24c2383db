"""Run by tests/retro/retrieval/test_sharded_retrieval.py under torchrun: each rank loads only its shards of the
database DB, searches QUERIES.npy (k = K) with distributed_search and rank 0 saves the merged
result to OUT.npz."""
import sys

import numpy as np
import torch.distributed as tdist

from retro.retrieval import ChunkDatabase
from retro.retrieval.sharded import distributed_search, load_sharded_index, rank_shards


def main(db_dir: str, queries: str, k: int, out: str) -> None:
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    db = ChunkDatabase(db_dir)
    extra = db.manifest["index"]["extra"]
    mine = rank_shards(extra["shards"], rank, world)
    index = load_sharded_index(db.path, db, extra, db.manifest["index"]["kind"], shards=mine, device="cpu")
    assert index.shards == mine and len(index.shards) < extra["shards"]  # this rank holds part of the keys
    d, i = distributed_search(index, np.load(queries), k)
    if rank == 0:
        np.savez(out, distances=d, ids=i)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
