"""Sweeps (Hydra multirun): checks before anything runs, per-cell status, and a summary of all cells.

- `SweepCallback` (registered in conf/config.yaml `hydra.callbacks`):
  * `on_multirun_start`: expands the sweep exactly as Hydra's basic sweeper will, composes every
    cell's config and runs the same checks as a single run's start (`plan()`), plus, for
    `hydra/launcher=slurm`, the resource request against `sinfo` (partition, GPUs per node, CPUs,
    memory). Any problem stops the sweep with one message before a job is submitted or a cell runs.
    Under the local launcher a cell with more than one process is refused: in-process DDP inside a
    multirun would relaunch the whole sweep in every rank; use hydra/launcher=slurm (srun ranks).
  * `on_multirun_end`: writes `<sweep dir>/summary.json` and `summary.csv` (one row per cell:
    overrides, status ok/failed/missing with the error, final val/train loss, tokens/s, steps, run
    dir, the cell's group over seeds with its mean and 95% interval) and prints the table; summary.json
    also holds the grouped table and the differences from RoPE (`train.report.sweep_groups`). If any
    cell did not finish, the multirun exits non-zero after that.
- `record_cell` (called by `train.__main__.main` in multirun jobs): writes `<cell dir>/status.json`,
  so a failed cell is recorded and the launcher goes on with the next cell (Hydra's local launcher
  would otherwise stop the sweep at the first exception). Single runs still raise and exit non-zero.
- `python -m train.sweep summarize <sweep dir>` rebuilds the summary at any time (e.g. while SLURM
  jobs of a detached sweep are still running).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from pelab.data.atomic import atomic_open, atomic_write_json
from pelab.data.ready import ensure_prepared
from pelab.train import slurm
from pelab.train.config import config_error_message
from pelab.train.plan import world_size
from pelab.train.report import SWEEP_COLUMNS, sweep_groups

log = logging.getLogger("pelab")

STATUS_FILE = "status.json"
SUMMARY_COLUMNS = [
    "cell",
    "status",
    "val_loss",
    "train_loss",
    "tokens_per_s",
    "steps",
    "tokens",
    "params",
    "model",
    "pe",
    "seed",
    "slurm_job_id",
    "error",
    "run_dir",
]


# ---- inside a cell ---------------------------------------------------------------------------------


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_cell(
    status: str,
    *,
    error: BaseException | str | None = None,
    summary: dict | None = None,
    run_dir: Path | str | None = None,
) -> None:
    """<cell dir>/status.json for this multirun job (global rank 0 only)."""
    if slurm.global_rank() != 0:
        return
    hc = HydraConfig.get()
    run_dir = Path(run_dir or hc.runtime.output_dir)
    if isinstance(error, BaseException):
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        log.error("cell %s failed:\n%s", hc.job.override_dirname, detail)
        error = f"{type(error).__name__}: {error}"
    record = {
        "status": status,
        "error": (str(error)[:4000] if error else None),
        "overrides": list(hc.overrides.task),
        "cell": hc.job.override_dirname,
        "run_dir": str(run_dir),
        "slurm_job_id": slurm.job_id(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if summary:
        record["summary"] = summary
    atomic_write_json(run_dir / STATUS_FILE, record, default=str)


# ---- expanding and checking a sweep ------------------------------------------------------------------


def expand(config: DictConfig) -> list[list[str]]:
    """The cells' override lists, as Hydra's basic sweeper builds them: hydra.sweeper.params first, then
    the command line's overrides (a key given in both takes the command line's values); `a=1,2` and
    `glob(...)` expand, the cells are their cartesian product."""
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    by_key: dict[str, list[str]] = {}
    for o in OverridesParser.create(config_loader=loader).parse_overrides(arguments):
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ValueError(f"{o.input_line}: Hydra's basic sweeper takes only lists, ranges and globs")
        values = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
        by_key[key] = [f"{key}={v}" for v in values]
    return [list(cell) for cell in itertools.product(*by_key.values())]


def compose_cell(config: DictConfig, overrides: list[str], num: int) -> DictConfig:
    """The config a cell's job will run with (same call as the launchers make)."""
    cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
    return cfg


def _launcher_kind(config: DictConfig) -> str:
    target = str(config.hydra.launcher.get("_target_", ""))
    if target.endswith("submitit_launcher.SlurmLauncher"):
        return "slurm"
    if target.endswith("BasicLauncher"):
        return "local"
    return "other"


def _label(overrides: list[str]) -> str:
    return " ".join(overrides) or "(defaults)"


def cell_labels(cells: list[list[str]]) -> list[str]:
    """Each cell named by the overrides that differ between cells (all of them for a single cell)."""
    if len(cells) < 2:
        return [_label(c) for c in cells]
    common = set(cells[0]).intersection(*map(set, cells[1:]))
    return [_label([o for o in c if o not in common]) for c in cells]


def check_sweep(config: DictConfig, cells: list[list[str]], cluster=None) -> tuple[list[str], list[str]]:
    """(problems, cell dirs). `cluster`: a train.slurm.ClusterInfo (queried with sinfo when None)."""
    kind = _launcher_kind(config)
    problems: list[str] = []
    world = None
    if kind == "slurm":
        lc = config.hydra.launcher
        try:
            cluster = cluster or slurm.query_cluster()
            problems += [f"hydra.launcher: {p}" for p in slurm.check_resources(lc, cluster)]
        except RuntimeError as e:
            problems.append(str(e))
        world = (int(lc.tasks_per_node or 1), int(lc.nodes or 1))
    composed, dirs = [], []
    for i, overrides in enumerate(cells):
        label = _label(overrides)
        try:
            cfg = compose_cell(config, overrides, i)
        except Exception as e:  # composition errors: unknown choice or key, bad value
            problems.append(f"cell {label}: {config_error_message(e) or e}")
            dirs.append("")
            continue
        dirs.append(str(cfg.hydra.sweep.subdir))
        if kind == "local":
            n = world_size(cfg.trainer)
            if n > 1:
                problems.append(
                    f"cell {label}: {n} processes (trainer.devices x trainer.num_nodes) in a local "
                    f"multirun: Lightning would relaunch the whole sweep in every rank. Submit the "
                    f"sweep with hydra/launcher=slurm (one job per cell, one srun task per GPU) or run "
                    f"the cells one at a time"
                )
                continue
        composed.append((f"cell {label}", cfg))
    problems += slurm.check_cells(composed, world)
    if kind == "slurm" and not problems:
        problems += check_data(composed)
    return problems, dirs


def check_data(composed: list) -> list[str]:
    """Before fanning out to SLURM jobs: every cell's data is prepared (the embedded sample is built here,
    once, instead of by every job at the same time; FineWeb-Edu shards and manifest are checked)."""
    problems, seen = [], set()
    for label, cfg in composed:
        key = (cfg.data.name, str(cfg.data.dir))
        if key in seen:
            continue
        seen.add(key)
        try:
            ensure_prepared(cfg.data)
        except Exception as e:
            problems.append(f"{label}: data: {e}")
    return problems


# ---- the summary ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_row(cell_dir: Path, name: str) -> dict:
    status = _read_json(cell_dir / STATUS_FILE)
    summary = (status or {}).get("summary") or _read_json(cell_dir / "summary.json") or {}
    row: dict[str, Any] = {"cell": name, "run_dir": str(cell_dir)}
    if status:
        row.update(status=status["status"], error=status.get("error"), slurm_job_id=status.get("slurm_job_id"))
    elif summary:
        row.update(status="ok", error=None)
    elif (cell_dir / "checkpoints" / "last.ckpt").exists() or (cell_dir / "metrics.csv").exists():
        row.update(
            status="incomplete",
            error="started but never finished (still running, or killed: see the "
            "cell's log and the .submitit/ logs of the sweep dir)",
        )
    else:
        row.update(status="missing", error="no output: the cell never ran, or its job was lost before starting")
    for k in ("val_loss", "train_loss", "tokens_per_s", "steps", "tokens", "params", "model", "pe", "seed"):
        row[k] = summary.get(k)
    return row


def summarize(sweep_dir: Path, cells: list[tuple[str, str]] | None = None) -> list[dict]:
    """Rows for `cells` ([(name, subdir)]; every subdir with a .hydra/ or status.json when None), and
    summary.json + summary.csv in `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    if cells is None:
        found = sorted(
            {p.parent for p in sweep_dir.glob("*/.hydra")} | {p.parent for p in sweep_dir.glob(f"*/{STATUS_FILE}")}
        )
        cells = [(d.name, d.name) for d in found]
    rows = [cell_row(sweep_dir / sub, name) for name, sub in cells]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    # The finished cells grouped over seeds (as train.report does): summary.json's groups/differences, and
    # each row's group columns.
    grouped, group_columns = sweep_groups([r["run_dir"] for r in rows if r["status"] == "ok"])
    for r in rows:
        r.update(group_columns.get(r["run_dir"], {}))
    summary = {"sweep_dir": str(sweep_dir), "cells": len(rows), "counts": counts, "rows": rows, **grouped}
    atomic_write_json(sweep_dir / "summary.json", summary, default=str)
    with atomic_open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS + SWEEP_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    width = max([len(r["cell"]) for r in rows] + [4])
    lines = [f"{'cell':<{width}}  {'status':<10} {'val_loss':>9} {'tokens/s':>11}  error"]
    for r in rows:
        err = (r.get("error") or "").splitlines()[0][:100] if r.get("error") else ""
        lines.append(
            f"{r['cell']:<{width}}  {r['status']:<10} {f(r['val_loss'], '.4f'):>9} "
            f"{f(r['tokens_per_s'], ',.0f'):>11}  {err}"
        )
    return "\n".join(lines)


def _stop(message: str, code: int):
    log.error("%s", message)
    sys.stderr.flush()
    raise SystemExit(code)


class SweepCallback(Callback):
    """See the module docstring. Holds only plain data (submitit pickles it with the launcher)."""

    def __init__(self, check: bool = True) -> None:
        self.check = check
        self.cells: list[tuple[str, str]] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an exception in a callback into a warning; SystemExit stops the sweep for real.
        try:
            overrides = expand(config)
        except Exception as e:
            _stop(f"cannot expand the sweep: {e}", 2)
        problems, dirs = check_sweep(config, overrides) if self.check else ([], [""] * len(overrides))
        if problems:
            _stop(
                f"the sweep was not started ({len(overrides)} cell(s), {len(problems)} problem(s)):\n  "
                + "\n  ".join(problems),
                2,
            )
        self.cells = list(zip(cell_labels(overrides), dirs)) if self.check else None
        log.info("sweep: %d cell(s) checked, %s launcher", len(overrides), _launcher_kind(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = summarize(sweep_dir, self.cells)
        log.info("sweep summary (%s):\n%s", sweep_dir / "summary.json", format_table(rows))
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            _stop(
                f"{len(bad)} of {len(rows)} cell(s) did not finish: "
                + "; ".join(f"{r['cell']} ({r['status']}: {(r['error'] or '').splitlines()[0][:200]})" for r in bad)
                + f"\nsummary: {sweep_dir / 'summary.json'}",
                1,
            )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.sweep", description="Sweep summaries.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="(re)write summary.json/.csv of a multirun dir and print the table")
    s.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    rows = summarize(args.sweep_dir)
    print(format_table(rows))
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
