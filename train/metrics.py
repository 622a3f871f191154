"""Where every metric goes: `MetricSink`, one CSV table per kind in the run directory plus the loggers.

Producers and their names (README "Metrics and comparing runs" lists every metric):
  - the training step (`LMModule._log_step`, with `StepStats` for the interval statistics): train/...,
    stability/..., throughput/... and the legacy names of CSV_ALIASES, every `trainer.log_every` steps;
  - validation: val/loss;
  - the stability probe (`StabilityMonitor`): attn/..., stability/..., pe/..., into probes.csv;
  - the periodic evaluation (`PeriodicEval`): eval/... (the suites' `metrics`).
Each calls `MetricSink.record(trainer, step, metrics, table)`: rank 0 rewrites the table's CSV atomically
(one row per step, columns may grow), and every Lightning logger (W&B) gets the grouped names.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from pelab.data.atomic import atomic_open

# W&B workspace sections (metric names are "<section>/...").
SECTIONS = ("train", "val", "stability", "attn", "pe", "throughput")
# metrics.csv keeps these ungrouped names (tests and older tools read them); W&B gets the grouped ones.
CSV_ALIASES = {
    "lr": "train/lr",
    "grad_norm": "stability/grad_norm",
    "grad_clipped": "stability/grad_clipped",
    "tokens_per_s": "throughput/tokens_per_s",
    "mfu": "throughput/mfu",
    "tokens_per_s_per_gpu": "throughput/tokens_per_s_per_gpu",
    "tflops_per_gpu": "throughput/tflops_per_gpu",
    "gpu_mem_peak_gb": "throughput/gpu_mem_peak_gb",
}
# The tables of a run directory and their leading columns.
TABLES = {
    "metrics": ("metrics.csv", ["step", "tokens", "train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s"]),
    "probes": ("probes.csv", ["step", "tokens"]),
}
# Dense bf16 peak FLOP/s by device name fragment: the MFU denominators (torchtitan's table).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def grouped(metrics: dict) -> dict:
    """The metrics under their grouped names only (what goes to W&B)."""
    out = {}
    for k, v in metrics.items():
        if k in CSV_ALIASES:
            out.setdefault(CSV_ALIASES[k], v)
        else:
            out[k] = v
    return out


def read_step_csv(path: Path, last_step: int | None = None) -> dict[int, dict]:
    """{step: row} of a step table (empty cells dropped), the rows after `last_step` left out."""
    rows: dict[int, dict] = {}
    if Path(path).exists():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                step = int(r["step"])
                if last_step is None or step <= last_step:
                    rows[step] = {k: v for k, v in r.items() if v != ""}
    return rows


def write_step_csv(path: Path, rows: dict[int, dict], first_columns: list[str]) -> None:
    """Rewrite `path` atomically with one row per step (sorted); columns are the union of the rows'
    keys after `first_columns`, so new metrics can appear at any step."""
    columns = list(first_columns)
    for row in rows.values():
        columns += [k for k in row if k not in columns]
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for step in sorted(rows):
            w.writerow(rows[step])


class MetricSink(L.Callback):
    """The run's metric tables (TABLES) and the loggers; see the module docstring. (Not `log`: Lightning
    replaces every callback's `log` with the LightningModule's.)

    On resume (`on_train_start`, after the checkpoint restored the step) the rows after the
    checkpoint's step are dropped, so a table never holds a step twice."""

    def __init__(self, run_dir: Path, tokens_per_step: int):
        self.run_dir = Path(run_dir)
        self.tokens_per_step = int(tokens_per_step)
        self.tables: dict[str, dict[int, dict]] = {name: {} for name in TABLES}

    def path(self, table: str) -> Path:
        return self.run_dir / TABLES[table][0]

    def rows(self, table: str = "metrics") -> dict[int, dict]:
        return self.tables[table]

    def on_train_start(self, trainer, pl_module):  # not on_fit_start: global_step is restored only after it
        self.tables = {name: read_step_csv(self.path(name), trainer.global_step) for name in TABLES}

    def record(self, trainer, step: int, metrics: dict, table: str = "metrics") -> None:
        """Record `metrics` of optimizer step `step` (with the tokens seen by then) and send them on."""
        metrics = {"tokens": step * self.tokens_per_step, **metrics}
        self.tables[table].setdefault(step, {"step": step}).update(metrics)
        if trainer.global_rank == 0:
            write_step_csv(self.path(table), self.tables[table], TABLES[table][1])
        for logger in trainer.loggers:
            logger.log_metrics(grouped(metrics), step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_metrics is not None:
            self.record(trainer, trainer.global_step, pl_module.last_metrics)

    def on_validation_end(self, trainer, pl_module):
        if pl_module.val_loss is not None and not trainer.sanity_checking:
            self.record(trainer, trainer.global_step, {"val/loss": pl_module.val_loss})
