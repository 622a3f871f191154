"""Lightning wiring for the token shards.

One training item is a whole optimizer step for this rank: an int64 tensor
(accum_steps, micro_batch_size, seq_len + 1); the model slices inputs [..., :-1] and targets
[..., 1:]. The stream starts at the trainer's `global_step`, and every window is a pure function
of (seed, step, sequence id) (see `data.sampler`), so resuming from a checkpoint continues with
exactly the batches an uninterrupted run would have seen, on any number of GPUs.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from pelab.data.config import as_data_config
from pelab.data.ready import ensure_prepared
from pelab.data.sampler import TrainWindows, ValWindows, seq_ids_for
from pelab.data.shards import find_shards
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainSteps(IterableDataset):
    """Infinite stream whose item i holds this rank's micro-batches of step `start_step + i`.

    DataLoader workers take turns (item i comes from worker i % num_workers), so worker w
    yields steps start_step + w, start_step + w + num_workers, ...
    """

    def __init__(
        self,
        windows: TrainWindows,
        start_step: int,
        rank: int,
        world_size: int,
        accum_steps: int,
        micro_batch_size: int,
    ):
        self.windows, self.start_step = windows, start_step
        self.rank, self.world_size = rank, world_size
        self.accum_steps, self.micro_batch_size = accum_steps, micro_batch_size

    def step_batch(self, step: int) -> torch.Tensor:
        ids = [seq_ids_for(self.rank, self.world_size, m, self.micro_batch_size) for m in range(self.accum_steps)]
        return torch.stack([torch.from_numpy(self.windows.windows(step, i)) for i in ids])

    def __iter__(self):
        worker, num_workers = _worker_slot()
        for step in itertools.count(self.start_step + worker, num_workers):
            yield self.step_batch(step)


class ValBatches(IterableDataset):
    """This rank's batches (micro_batch_size, seq_len + 1) of the fixed val windows.

    Batch b of rank r holds window block b * world_size + r, so ranks see disjoint windows and
    the same number of batches (the remainder that does not fill a batch on every rank is dropped).
    """

    def __init__(self, windows: ValWindows, rank: int, world_size: int, micro_batch_size: int):
        if len(windows) < world_size:
            raise ValueError(
                f"{len(windows)} val windows cannot give one to each of {world_size} ranks; raise data.val_tokens."
            )
        # Few windows (a small val range on many ranks): smaller val batches rather than none.
        micro_batch_size = min(micro_batch_size, len(windows) // world_size)
        self.windows, self.rank, self.world_size, self.micro_batch_size = windows, rank, world_size, micro_batch_size
        self.num_batches = len(windows) // (world_size * micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        worker, num_workers = _worker_slot()
        for b in range(worker, self.num_batches, num_workers):
            ids = seq_ids_for(self.rank, self.world_size, b, self.micro_batch_size)
            yield torch.from_numpy(self.windows.windows(ids))


class TokenDataModule(L.LightningDataModule):
    """Train/val dataloaders over prepared shards (`data_cfg` is the `data` config node or a dict)."""

    def __init__(self, data_cfg, seq_len: int, micro_batch_size: int, accum_steps: int, seed: int):
        super().__init__()
        self.data_cfg = as_data_config(data_cfg)
        self.seq_len, self.micro_batch_size, self.accum_steps, self.seed = seq_len, micro_batch_size, accum_steps, seed
        self.train_windows: TrainWindows | None = None
        self.val_windows: ValWindows | None = None

    def _rank_world(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed per optimizer step over all ranks (inputs only)."""
        return self._rank_world()[1] * self.accum_steps * self.micro_batch_size * self.seq_len

    @property
    def val_batches(self) -> int:
        """Validation batches per rank; needs `setup()`."""
        return len(self.val_windows) // (self._rank_world()[1] * self.micro_batch_size)

    def prepare_data(self) -> None:
        # Lightning calls this on one process before `setup` on all, so the sample is built once.
        ensure_prepared(self.data_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        val_paths, train_paths = find_shards(ensure_prepared(self.data_cfg), self.data_cfg.name)
        self.train_windows = TrainWindows(train_paths, self.seq_len, self.seed)
        self.val_windows = ValWindows(val_paths[0], self.seq_len, int(self.data_cfg.val_tokens))

    def train_dataloader(self) -> DataLoader:
        # Lightning restores global_step from a checkpoint before it builds the dataloaders.
        start_step = 0 if self.trainer is None else self.trainer.global_step
        rank, world = self._rank_world()
        steps = TrainSteps(self.train_windows, start_step, rank, world, self.accum_steps, self.micro_batch_size)
        return self._loader(steps)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        return self._loader(ValBatches(self.val_windows, rank, world, self.micro_batch_size))

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        workers = int(self.data_cfg.num_workers)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
