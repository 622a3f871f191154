"""Checkpoint files: atomic writes with a checksum, the periodic checkpoints and `last.ckpt`, and their two formats.

A checkpoint is one file (`torch.save` of Lightning's checkpoint dict: one process, DDP, or
`python -m train.consolidate`) or, with FSDP's sharded state dicts, a directory of DCP shards plus
Lightning's `meta.pt`. Either is written under a temporary name beside the target and renamed into
place, so a crash never leaves a half-written checkpoint behind. A one-file checkpoint gets
`<name>.sha256` (its SHA-256, `sha256sum -c` format) computed while it is written; `verify()` checks it
before a run resumes from it, so a damaged checkpoint is never loaded.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from pelab.data.atomic import atomic_open, atomic_write_text, temp_path

log = logging.getLogger("pelab")

CHECKSUM_SUFFIX = ".sha256"


class DiskFull(OSError):
    """No space left for a checkpoint; the message says how much is needed where."""

    def __init__(self, needed_bytes: int, path: Path):
        free = shutil.disk_usage(Path(path).parent).free
        super().__init__(
            errno.ENOSPC,
            f"disk full: {needed_bytes / 2**20:.0f} MB needed at {Path(path).parent} ({free / 2**20:.0f} MB free) "
            f"to write {Path(path).name}; free space there (the previous checkpoints are intact) and rerun "
            f"the same command to continue",
        )

    def __str__(self) -> str:
        return self.strerror


class _HashingWriter:
    """A write-only file that hashes what passes through it (torch.save writes sequentially)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def recorded_sha256(path: Path) -> str | None:
    """The checksum written with checkpoint `path` (None: none recorded, e.g. an older pelab's file)."""
    try:
        return checksum_path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None


def checkpoint_identity(path: Path) -> str:
    """The content hash of a checkpoint: the recorded checksum, else computed (a sharded directory: its meta.pt's)."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
    return recorded_sha256(path) or file_sha256(path)


def verify(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (missing, empty, checksum mismatch, damaged archive), or
    None when it is intact. Files without a recorded checksum are checked by their zip CRCs."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return None
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    expected = recorded_sha256(path)
    if expected is not None:
        return None if file_sha256(path) == expected else f"checksum mismatch ({checksum_path(path).name})"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"damaged ({e})"
    return f"damaged (CRC error in {bad})" if bad else None


def newest_intact(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of a checkpoints/ directory (last.ckpt, then the step files, newest
    first) and what was wrong with the ones before it ("last.ckpt is missing", ...)."""
    ckpt_dir = Path(ckpt_dir)
    problems = []
    for c in [ckpt_dir / "last.ckpt", *sorted(ckpt_dir.glob("step-*.ckpt"), reverse=True)]:
        problem = verify(c)
        if problem is None:
            return c, problems
        problems.append(f"{c.name} is {problem}")
    return None, problems


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints through the one atomic writer (temp file beside the target, fsync, rename),
    with their checksum; on a full disk the temp file is removed and `DiskFull` says how much is needed."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        checksum_path(path).unlink(missing_ok=True)  # a crash before the new one is written: CRC-checked instead
        try:
            with atomic_open(path) as f:
                writer = _HashingWriter(f)
                torch.save(checkpoint, writer)
        except Exception as e:
            if _is_disk_full(e):
                raise DiskFull(_tensor_bytes(checkpoint), path) from None
            raise
        write_checksum(path, writer.sha256.hexdigest())


def write_checksum(path: Path, digest: str) -> None:
    atomic_write_text(checksum_path(path), f"{digest}  {Path(path).name}\n")


class PeriodicCheckpoint(L.Callback):
    """checkpoints/step-XXXXXXXX.ckpt every `every` steps and at the end, `last.ckpt` a copy of the
    newest verified one, and only the newest `keep` step files (pruned only after a newer one verified).

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
            problem = verify(path)  # read back: only a checkpoint verified on disk replaces last.ckpt or prunes
            if problem:
                log.error("checkpoint %s failed verification (%s); last.ckpt and older checkpoints kept", path, problem)
            else:
                point_last(path, last)
                for old in sorted(self.dir.glob("step-*.ckpt"))[: -self.keep]:
                    remove(old)
        trainer.strategy.barrier()


def point_last(path: Path, last: Path) -> None:
    """Make `last` hold checkpoint `path`: a copy of a file (never a hard link: damage to one would be
    damage to both), a relative symbolic link to a sharded directory (it survives moving the run dir)."""
    if path.is_dir():
        tmp = temp_path(last)
        os.symlink(path.name, tmp)
        replace_dir(tmp, last)
        return
    checksum_path(last).unlink(missing_ok=True)
    with open(path, "rb") as src, atomic_open(last) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    digest = recorded_sha256(path)
    if digest:
        write_checksum(last, digest)


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
    """Delete a checkpoint file (with its checksum), link or sharded directory."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
        checksum_path(p).unlink(missing_ok=True)


def remove_orphan_temp_files(ckpt_dir: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that never finished (killed writers). Only call it
    while holding the run directory's lock: then no other writer can own them."""
    orphans = [p for p in Path(ckpt_dir).glob(".*.tmp")] if Path(ckpt_dir).is_dir() else []
    for p in orphans:
        remove(p)
    return orphans


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
