"""Checkpoint files: atomic writes, the periodic checkpoints and `last.ckpt`, and their two formats.

A checkpoint is one file (`torch.save` of Lightning's checkpoint dict: one process, DDP, or
`python -m train.consolidate`) or, with FSDP's sharded state dicts, a directory of DCP shards plus
Lightning's `meta.pt`. Either is written under a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from pelab.data.atomic import atomic_open, temp_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints through the one atomic writer (temp file beside the target, fsync, rename)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


class PeriodicCheckpoint(L.Callback):
    """checkpoints/step-XXXXXXXX.ckpt every `every` steps and at the end, `last.ckpt` always
    pointing at the newest (a hard link when possible), and only the newest `keep` step files.

    With FSDP's sharded checkpoints each step-XXXXXXXX.ckpt is a directory (one shard file per
    rank + meta.pt, written to a .tmp directory and renamed by the strategy) and last.ckpt is a
    relative symbolic link to the newest one; the same retention applies.

    `every` <= 0 writes no checkpoint at all (benchmarks)."""

    def __init__(self, dirpath: Path, every: int, keep: int):
        self.dir = Path(dirpath)
        self.every = every
        self.keep = keep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every <= 0:
            return
        if step % self.every == 0 or step >= trainer.max_steps:
            self.save(trainer, step)

    def saved(self, trainer, step: int) -> bool:
        """Whether `on_train_batch_end` has just written this step."""
        return self.every > 0 and (step % self.every == 0 or step >= trainer.max_steps)

    def save(self, trainer, step: int) -> None:
        last = self.dir / "last.ckpt"
        if self.keep <= 0:
            trainer.save_checkpoint(last)
            return
        path = self.dir / f"step-{step:08d}.ckpt"
        trainer.save_checkpoint(path)
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            point_last(path, last)
            for old in sorted(self.dir.glob("step-*.ckpt"))[: -self.keep]:
                remove(old)
        trainer.strategy.barrier()


def point_last(path: Path, last: Path) -> None:
    """Make `last` name checkpoint `path`: a hard link (a copy where links are impossible) to a file, a
    relative symbolic link to a sharded directory (it survives moving the run dir)."""
    tmp = temp_path(last)
    if path.is_dir():
        os.symlink(path.name, tmp)
        replace_dir(tmp, last)
        return
    try:
        os.link(path, tmp)
    except OSError:  # no hard links (some network filesystems)
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory (or file) `src` to `dst`, replacing what is there. The old `dst` is renamed
    aside first and deleted last, so at every moment a complete checkpoint exists under one name."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(dst.name + ".old")
    if old.exists() or old.is_symlink():
        remove(old)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists() or old.is_symlink():
        remove(old)


def remove(p: Path) -> None:
    """Delete a checkpoint file, link or sharded directory."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def is_sharded_checkpoint(path: Path) -> bool:
    """A distributed (FSDP sharded) checkpoint: a directory with Lightning's `meta.pt` and DCP shards."""
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file()


def resume_format_problem(ckpt: Path, strategy_name: str) -> str | None:
    """Why `ckpt` cannot be resumed with this strategy (None when it can)."""
    if is_sharded_checkpoint(ckpt) and strategy_name != "fsdp":
        how = "one process" if strategy_name == "single" else f"strategy {strategy_name}"
        return (
            f"{ckpt} is a sharded FSDP checkpoint, which only trainer.strategy=fsdp can resume (on any number of "
            f"GPUs). To resume it with {how}, first turn it into one file in place: "
            f"python -m train.consolidate {ckpt} {ckpt}"
        )
    return None
