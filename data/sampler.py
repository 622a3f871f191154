"""Stateless window samplers over token shards.

Training: optimizer step `step` consumes a global batch of S sequences with ids 0..S-1, and the
window of sequence `s` is a pure function of (seed, step, s). Nothing needs checkpointing: a
resumed run, or the same run on a different number of GPUs, sees exactly the same windows.
A rank only decides which ids it computes (`seq_ids_for`).

Validation: fixed, contiguous, non-overlapping windows over the first `val_tokens` tokens of the
val shard (as modded-nanogpt does), so every evaluation scores the same tokens.
"""

from __future__ import annotations

import os

import numpy as np
from pelab.data.shards import read_header, read_shard

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays: a cheap, well-mixed bijective hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def window_hash(seed: int, step: int, seq_ids: np.ndarray) -> np.ndarray:
    """One 64-bit hash per sequence id, folding in seed and step one after the other."""
    key = splitmix64(np.uint64(seed % 2**64))
    key = splitmix64(key ^ np.uint64(step % 2**64))
    return splitmix64(key ^ np.asarray(seq_ids, dtype=np.uint64))


def seq_ids_for(rank: int, world_size: int, micro_step: int, micro_batch_size: int) -> np.ndarray:
    """The global sequence ids one rank computes in one micro-step.

    Micro-step m of rank r takes the block (m * world_size + r): over all ranks and micro-steps
    of a step the blocks tile 0..S-1 exactly, whatever the world size.
    """
    return np.arange(micro_batch_size, dtype=np.int64) + (micro_step * world_size + rank) * micro_batch_size


class TrainWindows:
    """Training windows of `seq_len + 1` tokens drawn uniformly over all train shards.

    A hash of (seed, step, id) picks one of all possible window starts, so shards are chosen
    in proportion to their number of windows and offsets are uniform within a shard.
    Shards are memory-mapped lazily, so the object is cheap to send to DataLoader workers.
    """

    def __init__(self, train_paths: list[str | os.PathLike], seq_len: int, seed: int):
        self.paths = [str(p) for p in train_paths]
        self.seq_len = seq_len
        self.seed = seed
        n_tokens = np.array([read_header(p)[1] for p in self.paths], dtype=np.int64)
        n_windows = np.maximum(n_tokens - seq_len, 0)  # starts in [0, n_tokens - (seq_len + 1)]
        if n_windows.sum() == 0:
            raise ValueError(
                f"No train shard holds seq_len + 1 = {seq_len + 1} tokens (largest: {n_tokens.max()}); "
                "lower model.seq_len or prepare more data."
            )
        self.window_ends = np.cumsum(n_windows)  # global window index -> shard via searchsorted
        self._shards = None

    def __getstate__(self):
        return {**self.__dict__, "_shards": None}

    @property
    def shards(self) -> list[np.memmap]:
        if self._shards is None:
            self._shards = [read_shard(p) for p in self.paths]
        return self._shards

    def starts(self, step: int, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start offset) of each sequence's window at this step."""
        total = np.uint64(self.window_ends[-1])
        index = (window_hash(self.seed, step, seq_ids) % total).astype(np.int64)
        shard = np.searchsorted(self.window_ends, index, side="right")
        offset = index - np.concatenate([[0], self.window_ends])[shard]
        return shard, offset

    def windows(self, step: int, seq_ids: np.ndarray) -> np.ndarray:
        """int64 array (len(seq_ids), seq_len + 1) of token windows."""
        shard, offset = self.starts(step, seq_ids)
        width = self.seq_len + 1
        out = np.empty((len(shard), width), dtype=np.int64)
        for row, (i, start) in enumerate(zip(shard, offset, strict=True)):
            out[row] = self.shards[i][start : start + width]
        return out


class ValWindows:
    """The first `val_tokens` tokens of the val shard as val_tokens // seq_len windows.

    Window i is tokens[i*seq_len : (i+1)*seq_len + 1]: inputs never overlap, and each window's
    last token is only a target.
    """

    def __init__(self, val_path: str | os.PathLike, seq_len: int, val_tokens: int):
        self.path = str(val_path)
        self.seq_len = seq_len
        self.num_windows = val_tokens // seq_len
        if self.num_windows == 0:
            raise ValueError(f"data.val_tokens={val_tokens} is less than one window of seq_len={seq_len} tokens.")
        n_tokens = read_header(self.path)[1]
        needed = self.num_windows * seq_len + 1
        if n_tokens < needed:
            raise ValueError(
                f"{self.path}: val_tokens={val_tokens} with seq_len={seq_len} needs {needed} tokens in "
                f"the val shard, which holds {n_tokens}. Set data.val_tokens={(n_tokens - 1) // seq_len * seq_len} "
                "(or less), or prepare a larger val shard."
            )
        self._tokens = None

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.num_windows

    def windows(self, idx: np.ndarray) -> np.ndarray:
        """int64 array (len(idx), seq_len + 1) of the val windows with these indices."""
        if self._tokens is None:
            self._tokens = read_shard(self.path)
        return np.stack([self._tokens[i * self.seq_len : (i + 1) * self.seq_len + 1] for i in idx]).astype(np.int64)
