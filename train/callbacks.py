"""Callbacks: metrics.csv, periodic atomic checkpoints, and the end-of-run summary."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

CSV_FIRST_COLUMNS = ["step", "tokens", "train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s"]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file in the same directory, fsync, then rename, so a crash
    mid-write never leaves a corrupt checkpoint behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        _atomic_save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class MetricsCSV(L.Callback):
    """One row per logged step in <run_dir>/metrics.csv (validation loss joins its step's row).

    The file is rewritten atomically at every logging step, so its columns can grow; on resume the
    rows after the checkpoint's step are dropped so the file never holds a step twice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[int, dict] = {}

    def on_train_start(self, trainer, pl_module):  # not on_fit_start: global_step is restored only after it
        self.rows = {}
        if self.path.exists():
            with open(self.path, newline="") as f:
                for r in csv.DictReader(f):
                    step = int(r["step"])
                    if step <= trainer.global_step:
                        self.rows[step] = {k: v for k, v in r.items() if v != ""}

    def _row(self, step: int) -> dict:
        return self.rows.setdefault(step, {"step": step})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_metrics is not None:
            self._row(trainer.global_step).update(pl_module.last_metrics)
            self.flush(trainer)

    def on_validation_end(self, trainer, pl_module):
        if pl_module.val_loss is not None and not trainer.sanity_checking:
            row = self._row(trainer.global_step)
            row["val/loss"] = pl_module.val_loss
            row.setdefault("tokens", trainer.global_step * pl_module.tokens_per_step)
            self.flush(trainer)

    def flush(self, trainer) -> None:
        if trainer.global_rank == 0:
            write_step_csv(self.path, self.rows, CSV_FIRST_COLUMNS)


def write_step_csv(path: Path, rows: dict[int, dict], first_columns: list[str]) -> None:
    """Rewrite `path` atomically with one row per step (sorted); columns are the union of the rows'
    keys after `first_columns`, so new metrics can appear at any step."""
    columns = list(first_columns)
    for row in rows.values():
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for step in sorted(rows):
            w.writerow(rows[step])
    os.replace(tmp, path)


class LoggerBridge(L.Callback):
    """Send the module's logging-step metrics (and val loss) to the Lightning loggers (W&B)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_metrics is not None:
            from pelab.train.stability import grouped  # W&B gets the grouped names only (lr -> train/lr, ...)

            for logger in trainer.loggers:
                logger.log_metrics(grouped(pl_module.last_metrics), step=trainer.global_step)

    def on_validation_end(self, trainer, pl_module):
        if pl_module.val_loss is not None and not trainer.sanity_checking:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"val/loss": pl_module.val_loss, "tokens": trainer.global_step * pl_module.tokens_per_step},
                    step=trainer.global_step,
                )


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

    def save(self, trainer, step: int) -> None:
        last = self.dir / "last.ckpt"
        if self.keep <= 0:
            trainer.save_checkpoint(last)
            return
        path = self.dir / f"step-{step:08d}.ckpt"
        trainer.save_checkpoint(path)
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            self._point_last(path, last)
            for old in sorted(self.dir.glob("step-*.ckpt"))[: -self.keep]:
                if old.is_dir() and not old.is_symlink():
                    import shutil

                    shutil.rmtree(old)
                else:
                    old.unlink()
        trainer.strategy.barrier()

    @staticmethod
    def _point_last(path: Path, last: Path) -> None:
        tmp = last.with_name("last.ckpt.tmp")
        tmp.unlink(missing_ok=True)
        if path.is_dir():  # sharded checkpoint directory: a relative link (survives moving the run dir)
            from pelab.train.strategy import replace_dir

            os.symlink(path.name, tmp)
            replace_dir(tmp, last)
            return
        try:
            os.link(path, tmp)
        except OSError:  # no hard links (some network filesystems): copy
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, last)


@rank_zero_only
def write_summary(path: Path, summary: dict) -> None:
    atomic_write_text(Path(path), json.dumps(summary, indent=2) + "\n")
