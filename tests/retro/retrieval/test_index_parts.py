"""build-db's faiss index in parts (index_parts.py), in one process: two ranks' parts, one rank
stopped part way and resumed, merge into the index one add of all the keys gives, of every kind:
byte for byte, but for the padding faiss leaves uninitialised in merged ivf-fastscan lists."""
import shutil

import numpy as np
import pytest

import retro.retrieval.index_parts as index_parts
from retro.base import hooks
from retro.retrieval.index import build_faiss
from retro.retrieval.index_parts import build_faiss_in_parts, index_part_size

faiss = pytest.importorskip("faiss")


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16)).astype(np.float32) * 4
    return (centres[rng.integers(0, 20, 2500)] + rng.normal(size=(2500, 16))).astype(np.float32)


def test_part_size_depends_on_the_keys_and_block_only():
    assert index_part_size(10, 100) == 100 * index_parts.INDEX_PART_BLOCKS
    many = 100 * index_parts.INDEX_PART_BLOCKS * index_parts.MAX_INDEX_PARTS * 3
    size = index_part_size(many, 100)
    assert size % 100 == 0 and -(-many // size) <= index_parts.MAX_INDEX_PARTS


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-fastscan", pytest.param("ivf-pq", marks=pytest.mark.slow)])
def test_two_ranks_parts_merge_into_the_one_add_index(tmp_path, vectors, monkeypatch, kind):
    monkeypatch.setattr(index_parts, "INDEX_PART_BLOCKS", 1)  # 300 keys a part: 9 parts

    def stop_after_part_2(stage, p):
        if p == 2:
            raise Stop

    monkeypatch.setattr(hooks, "reached", stop_after_part_2)
    with pytest.raises(Stop):  # one process stopped after its third part: trained index, parts 0-2
        build_faiss_in_parts(kind, vectors, tmp_path, 300, rank=0, world=1)
    added = []
    monkeypatch.setattr(hooks, "reached", lambda _, p: added.append(p))
    assert build_faiss_in_parts(kind, vectors, tmp_path, 300, rank=1, world=2) == (None, None)
    assert added == [3, 5, 7]  # rank 1's parts, part 1 kept
    index, settings = build_faiss_in_parts(kind, vectors, tmp_path, 300, rank=0, world=2)
    assert added == [3, 5, 7, 4, 6, 8]
    whole, want = build_faiss(kind, vectors)
    assert settings == want and index.ntotal == whole.ntotal == len(vectors)
    (tmp_path / "one").mkdir()
    for name in ("index-trained.json", "index-trained.faiss"):  # the training is the same (and slow for ivf-pq)
        shutil.copy(tmp_path / name, tmp_path / "one" / name)
    again, _ = build_faiss_in_parts(kind, vectors, tmp_path / "one", 300)  # one process, every part
    if kind == "ivf-fastscan":  # faiss leaves the padding of merged fast-scan lists uninitialised: the rest
        for ix in (index, again):
            refine = faiss.downcast_index(ix)
            assert np.array_equal(faiss.serialize_index(refine.refine_index),
                                  faiss.serialize_index(faiss.downcast_index(whole).refine_index))
            lists = faiss.extract_index_ivf(refine.base_index).invlists
            assert [lists.list_size(c) for c in range(lists.nlist)] == [
                faiss.extract_index_ivf(whole).invlists.list_size(c) for c in range(lists.nlist)]
    else:
        assert np.array_equal(faiss.serialize_index(index), faiss.serialize_index(whole))
        assert np.array_equal(faiss.serialize_index(again), faiss.serialize_index(whole))
    q = vectors[::50] + 0.1
    for ix in (index, again, whole):
        if kind != "flat":
            faiss.extract_index_ivf(ix).nprobe = 4
    (d1, i1), (d2, i2), (d3, i3) = index.search(q, 10), again.search(q, 10), whole.search(q, 10)
    assert np.array_equal(i1, i3) and np.array_equal(d1, d3) and np.array_equal(i2, i3) and np.array_equal(d2, d3)


def test_released_pages_leave_the_process_and_read_back_the_same(tmp_path):
    """release_pages: a memory map's touched pages no longer count in the RSS; the values do not change."""
    from retro.retrieval.index_parts import release_pages

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    keys = np.random.default_rng(0).normal(size=(500_000, 64)).astype(np.float32)  # 128 MB
    np.save(tmp_path / "keys.npy", keys)
    mapped = np.load(tmp_path / "keys.npy", mmap_mode="r")
    total = float(mapped.sum(dtype=np.float64))
    touched = rss_mb()
    release_pages(mapped)
    assert touched - rss_mb() > 100
    assert float(mapped.sum(dtype=np.float64)) == total and np.array_equal(mapped[::997], keys[::997])
    release_pages(keys)  # not a memory map: nothing happens
