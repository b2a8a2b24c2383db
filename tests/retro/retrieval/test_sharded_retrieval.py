"""The sharded exact index (`build-db --shards N`, retrieval/sharded.py): in one process and
across 2 processes (gloo, each holding its shards), the same neighbours as one flat index over all
keys, ties broken by distance, then by chunk id."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.retrieval_helpers import ROOT, free_port, quick_database
from retro.base.errors import RetroError
from retro.retrieval import BuildOptions, Retriever
from retro.retrieval.neighbours import load_neighbours
from retro.retrieval.sharded import (ShardedIndex, build_shards, exact_search, merge_topk, shard_bounds,
                                     shard_path)

TORCHRUN_TIMEOUT = 150  # seconds: a hung rendezvous fails the test instead of hanging it


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64, sorted by (distance, id)."""
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.broadcast_to(np.arange(len(keys)), d.shape)
    order = np.lexsort((ids, d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_shard_bounds_and_errors(tmp_path, capsys):
    from retro.app.cli import main

    assert main(["build-db", str(ROOT / "README.md"), "--out", str(tmp_path / "db"), "--shards", "0"]) == 2
    assert "retro build-db: error: --shards must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
    assert shard_bounds(10, 3).tolist() == [0, 3, 6, 10]
    assert shard_bounds(5, 5).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(RetroError, match="--shards must be an integer >= 1, got 0"):
        shard_bounds(10, 0)
    with pytest.raises(RetroError, match=r"--shards must be at most the number of chunks \(4\), got 5"):
        shard_bounds(4, 5)
    with pytest.raises(RetroError, match="--shards 2 needs an exact index .* got --index ivf-pq"):
        BuildOptions(corpus=str(ROOT / "README.md"), out="x", shards=2, index="ivf-pq").validate()
    with pytest.raises(RetroError, match=r"shards must be in \[0, 3\), got \[3\]"):
        ShardedIndex(np.zeros((9, 2), np.float32), shard_bounds(9, 3), shards=[3])
    index = ShardedIndex(np.zeros((9, 2), np.float32), shard_bounds(9, 3), device="cpu")
    with pytest.raises(RetroError, match="k must be an integer >= 1, got 0"):
        index.search(np.zeros((1, 2)), 0)
    with pytest.raises(RetroError, match=r"queries must be \(Q, 2\) vectors, got shape \(1, 3\)"):
        index.search(np.zeros((1, 3)), 1)
    d, i = ShardedIndex(np.zeros((9, 2), np.float32), shard_bounds(9, 3), shards=[]).search(np.zeros((2, 2)), 3)
    assert (i == -1).all() and np.isinf(d).all() and i.shape == (2, 3)  # a rank without a shard


def test_ties_broken_by_distance_then_id(tmp_path):
    """Small integer keys with many duplicates: every distance is exact, ties abound, and every
    way of searching returns the (distance, id) order of the brute-force reference."""
    rng = np.random.default_rng(0)
    keys = rng.integers(-2, 3, size=(200, 4)).astype(np.float32)  # 5^4 = 625 points: many repeats
    queries = np.concatenate([keys[:10], rng.integers(-2, 3, size=(20, 4)).astype(np.float32)])
    for k in (1, 7, 40):
        want_d, want_i = reference(keys, queries, k)
        d, i = exact_search(torch.from_numpy(keys), torch.from_numpy(queries), k, block=64)
        assert np.array_equal(i, want_i) and np.array_equal(d, want_d.astype(np.float32))
        for shards in (1, 3, 7):
            bounds = build_shards(keys, shards, tmp_path / f"s{shards}", "flat")
            files = [shard_path(tmp_path / f"s{shards}", s) for s in range(shards)]
            for index in (ShardedIndex(keys, bounds, device="cpu"),
                          ShardedIndex(keys, bounds, shard_files=files),  # faiss.IndexShards
                          ShardedIndex(keys, bounds, shards=[0], shard_files=files)):  # faiss shard by shard
                d, i = index.search(queries, k)
                if index.shards != list(range(shards)):  # one shard: the merge of the rest is the reference's
                    sub = slice(int(bounds[0]), int(bounds[1]))
                    want_sd, want_si = reference(keys[sub], queries, min(k, sub.stop))
                    assert np.array_equal(i[:, :want_si.shape[1]], want_si), (shards, k)
                    continue
                assert np.array_equal(i, want_i), (shards, k, type(index))
                assert np.array_equal(d, want_d.astype(np.float32))
    # merging: missing neighbours (-1) come last, and k beyond all keys pads
    d, i = merge_topk([np.array([[1.0, np.inf]]), np.array([[1.0]])], [np.array([[5, -1]]), np.array([[2]])], 4)
    assert i.tolist() == [[2, 5, -1, -1]] and d[0, :2].tolist() == [1.0, 1.0] and np.isinf(d[0, 2:]).all()


def test_random_keys_match_one_flat_index():
    import faiss

    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    flat = faiss.IndexFlatL2(16)
    flat.add(keys)
    want_d, want_i = flat.search(queries, 10)
    for shards in (2, 7):
        d, i = ShardedIndex(keys, shard_bounds(1000, shards), device="cpu").search(queries, 10)
        assert np.array_equal(i, want_i)
        np.testing.assert_allclose(d, want_d, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        plain = quick_database(tmp_path_factory.mktemp("plain"), mp)
        sharded = quick_database(tmp_path_factory.mktemp("sharded"), mp, shards=3)
    return plain, sharded


def one_index(db_dir) -> Retriever:
    """The database's retriever searching one exact index over all keys (a ShardedIndex of one
    shard: the reference the sharded searches must equal, ties included)."""
    r = Retriever.load(db_dir)
    r.index = ShardedIndex(r.db.embeddings, [0, r.db.num_chunks], device="cpu")
    return r


@pytest.mark.slow
def test_build_db_shards_gives_the_same_neighbours(dbs):
    plain, sharded = dbs
    assert not (sharded / "index.faiss").exists() and len(list((sharded / "index-shards").iterdir())) == 3
    ref = one_index(plain)
    chunk_doc = ref.db.chunk_doc
    want, _ = ref.search_embeddings(ref.db.embeddings, 8, exclude_doc_ids=chunk_doc)
    assert np.array_equal(load_neighbours(sharded, 8), want)  # `retro neighbours` searched the shards
    # the hashing embedder gives many equal distances: the tie-breaking decides most of these lists
    d, _ = ref.index.search(ref.db.embeddings, 8)
    assert (d[:, 1:] == d[:, :-1]).any(1).mean() > 0.2
    emb = np.asarray(ref.db.embeddings[::3])
    ia, da = ref.search_embeddings(emb, 6)
    for index in (None, "torch"):  # faiss shards, torch shards
        b = Retriever.load(sharded, index=index)
        ib, db_ = b.search_embeddings(emb, 6)
        assert np.array_equal(ia, ib) and np.array_equal(da, db_)
    # faiss's own flat index agrees wherever no two distances are within float32 rounding
    fa, _ = Retriever.load(plain).search_embeddings(emb, 6)
    distinct = (np.diff(da, axis=1) > 1e-5 * da[:, 1:]).all(1) & (da[:, 0] < da[:, 1])
    assert distinct.sum() >= 5 and np.array_equal(fa[distinct], ia[distinct])


@pytest.mark.slow
def test_two_processes_search_their_shards(dbs, tmp_path):
    plain, sharded = dbs
    a = one_index(plain)
    rng = np.random.default_rng(2)
    queries = np.concatenate([np.asarray(a.db.embeddings[::7]),
                              rng.standard_normal((8, a.db.embeddings.shape[1])).astype(np.float32)])
    np.save(tmp_path / "queries.npy", queries)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(ROOT / "tests" / "helpers" / "sharded_search_worker.py"), str(sharded),
                           str(tmp_path / "queries.npy"), "5", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    got = np.load(tmp_path / "out.npz")
    want_d, want_i = a.index.search(queries, 5)
    assert np.array_equal(got["ids"], want_i) and np.array_equal(got["distances"], want_d)
