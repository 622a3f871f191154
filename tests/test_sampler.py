"""Stateless samplers: determinism, world-size independence, windows inside shards, coverage, val windows."""

import pickle

import numpy as np
import pytest
from pelab.data.sampler import TrainWindows, ValWindows, seq_ids_for, splitmix64
from pelab.data.shards import read_shard, shard_name, write_shard

SEQ_LEN = 16
SIZES = (1000, 2000, 4000)


@pytest.fixture(scope="module")
def train_paths(tmp_path_factory):
    """Three train shards of different sizes; token value = position + 10,000 * shard, so a window
    tells where it came from."""
    root = tmp_path_factory.mktemp("shards")
    paths = []
    for i, n in enumerate(SIZES, start=1):
        paths.append(root / shard_name("t", i))
        write_shard(paths[-1], np.arange(n) + 10_000 * i)
    return paths


def test_splitmix64_known_answer():
    # First output of the reference SplitMix64 generator seeded with 0.
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_seq_ids_tile_the_global_batch_for_any_world_size():
    for world, accum, mbs in [(1, 8, 3), (2, 4, 3), (4, 2, 3), (8, 1, 3), (3, 1, 8)]:
        ids = np.concatenate([seq_ids_for(r, world, m, mbs) for r in range(world) for m in range(accum)])
        assert sorted(ids.tolist()) == list(range(world * accum * mbs))
    assert seq_ids_for(1, 2, 1, 4).tolist() == [12, 13, 14, 15]


def test_windows_are_deterministic_and_vary(train_paths):
    a, b = TrainWindows(train_paths, SEQ_LEN, seed=0), TrainWindows(train_paths, SEQ_LEN, seed=0)
    ids = np.arange(32)
    w = a.windows(5, ids)
    assert w.shape == (32, SEQ_LEN + 1) and w.dtype == np.int64
    assert np.array_equal(w, b.windows(5, ids))
    assert np.array_equal(w[7:9], a.windows(5, np.array([7, 8])))  # a window depends on its id only
    assert len({tuple(row) for row in w}) == 32
    assert not np.array_equal(w, a.windows(6, ids))
    assert not np.array_equal(w, a.windows(5, ids + 32))
    assert not np.array_equal(w, TrainWindows(train_paths, SEQ_LEN, seed=1).windows(5, ids))


def test_step_is_the_same_for_every_world_size_and_accumulation(train_paths):
    sampler = TrainWindows(train_paths, SEQ_LEN, seed=3)

    def step_windows(world, accum, mbs, step=11):
        by_id = {}
        for rank in range(world):
            for micro in range(accum):
                ids = seq_ids_for(rank, world, micro, mbs)
                by_id.update(zip(ids.tolist(), map(tuple, sampler.windows(step, ids)), strict=True))
        return by_id

    reference = step_windows(1, 4, 6)
    assert sorted(reference) == list(range(24))
    for world, accum, mbs in [(2, 2, 6), (4, 1, 6), (8, 1, 3), (3, 4, 2)]:
        assert step_windows(world, accum, mbs) == reference


def test_windows_lie_inside_shards_and_match_their_tokens(train_paths):
    sampler = TrainWindows(train_paths, SEQ_LEN, seed=0)
    ids = np.arange(2000)
    shard, offset = sampler.starts(2, ids)
    limits = np.array(SIZES)[shard] - (SEQ_LEN + 1)
    assert (offset >= 0).all() and (offset <= limits).all()
    windows = sampler.windows(2, ids)
    tokens = [read_shard(p) for p in train_paths]
    for row in range(0, 2000, 97):
        assert windows[row].tolist() == tokens[shard[row]][offset[row] : offset[row] + SEQ_LEN + 1].tolist()
    assert (np.diff(windows, axis=1) == 1).all()  # consecutive tokens, never across a shard boundary


def test_shards_are_drawn_in_proportion_to_their_windows(train_paths):
    sampler = TrainWindows(train_paths, SEQ_LEN, seed=0)
    shard, offset = zip(*(sampler.starts(step, np.arange(1000)) for step in range(30)), strict=True)
    shard, offset = np.concatenate(shard), np.concatenate(offset)
    expected = (np.array(SIZES) - SEQ_LEN) / sum(n - SEQ_LEN for n in SIZES)
    assert np.allclose(np.bincount(shard, minlength=3) / len(shard), expected, atol=0.01)
    big = offset[shard == 2]  # offsets cover the whole shard uniformly
    assert big.min() < 20 and big.max() > SIZES[2] - SEQ_LEN - 20
    assert abs(big.mean() - (SIZES[2] - SEQ_LEN - 1) / 2) < 60


def test_too_short_shards_are_skipped_or_refused(tmp_path, train_paths):
    tiny = tmp_path / shard_name("t", 9)
    write_shard(tiny, np.arange(SEQ_LEN))  # one token short of a window
    sampler = TrainWindows([tiny, *train_paths], SEQ_LEN, seed=0)
    assert 0 not in sampler.starts(0, np.arange(500))[0]
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 17"):
        TrainWindows([tiny], SEQ_LEN, seed=0)


def test_pickled_sampler_reopens_shards(train_paths):
    sampler = TrainWindows(train_paths, SEQ_LEN, seed=0)
    expected = sampler.windows(1, np.arange(4))  # opens the memmaps
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone._shards is None and len(pickle.dumps(sampler)) < 2000
    assert np.array_equal(clone.windows(1, np.arange(4)), expected)


def test_val_windows_are_fixed_contiguous_and_checked(tmp_path):
    path = tmp_path / shard_name("v", 0)
    write_shard(path, np.arange(1000))
    val = ValWindows(path, SEQ_LEN, val_tokens=100)
    assert len(val) == 6  # 100 // 16
    w = val.windows(np.arange(6))
    assert w[:, 0].tolist() == list(range(0, 96, 16))
    assert (w[:-1, -1] == w[1:, 0]).all()  # a window's last target is the next window's first input
    assert w.max() == 96  # only the first val_tokens (+1 target) tokens are used
    assert pickle.loads(pickle.dumps(val)).windows(np.array([5])).tolist() == w[5:].tolist()
    with pytest.raises(ValueError, match=r"val_tokens=2000 with seq_len=16 needs 2001 tokens .* holds 1000"):
        ValWindows(path, SEQ_LEN, val_tokens=2000)
    with pytest.raises(ValueError, match="less than one window"):
        ValWindows(path, SEQ_LEN, val_tokens=8)
