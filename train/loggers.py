"""Lightning loggers from the `logger` config group. metrics.csv is written in every case (train/metrics.py).

`logger=wandb`: one W&B run per training job, created on global rank 0 only. Project/entity from
the config; group = the sweep (`logger.group`, else `experiment_name`, else $PELAB_SWEEP_ID, else
the Hydra `experiment=` choice, else the Hydra multirun directory name); job_type
`{model}-{pe}[-kvshift]-{hash}`, shared by runs that differ only in seed (train.groups); name
`{model}-{pe}[-kvshift]-s{seed}`; tags model/pe/data; the full resolved config. The run id lives in
`<run_dir>/wandb_id.txt` (the group in `wandb_group.txt`), so a resumed or requeued job continues the
same run (`resume="allow"`).
Without an API key it logs offline to `<run_dir>/wandb/offline-run-*` (upload with `wandb sync`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import struct
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from pelab.data.atomic import atomic_write_text
from pelab.train.groups import job_type
from pelab.train.metrics import SECTIONS

log = logging.getLogger("pelab")


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_lightning_logging() -> None:
    """Lightning's own console handlers repeat every line that Hydra's root handlers print (as "INFO: ..."),
    and it advertises litlogger on every run: print each line once, through the root handlers (console and
    the run's log file). Imported before logging was configured (a submitit job), Lightning also stops its
    records from propagating to the root; they must reach it, or the log file loses them."""
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger_tip)


def wandb_mode(requested: str) -> str:
    """online when an API key is configured (env or ~/.netrc), offline otherwise."""
    if requested in ("online", "offline", "disabled"):
        return requested
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _global_rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def sweep_group(cfg: DictConfig) -> str | None:
    """The W&B group of this run: the sweep it belongs to (None for a lone run)."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    if os.environ.get("PELAB_SWEEP_ID"):
        return os.environ["PELAB_SWEEP_ID"]
    if HydraConfig.initialized():  # else no Hydra runtime: tests, scripts
        hc = HydraConfig.get()
        experiment = hc.runtime.choices.get("experiment")
        if experiment and experiment != "null":
            return str(experiment)
        if hc.mode == RunMode.MULTIRUN:
            return f"multirun-{Path(hc.sweep.dir).name}"
    return None


def run_display_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{cfg.pe.name}{'-kvshift' if cfg.kv_shift else ''}-s{cfg.seed}"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    if cfg.logger.name == "csv":
        return []
    if cfg.logger.name != "wandb":
        raise ValueError(f"unknown logger {cfg.logger.name!r}; choose logger=csv or logger=wandb")
    if _global_rank() != 0:  # one W&B run per job: only global rank 0 logs (and owns wandb_id.txt)
        return []
    mode = wandb_mode(cfg.logger.mode)
    if mode == "offline":
        log.warning(
            "W&B: no API key found, logging offline to %s/wandb; upload later with `wandb sync %s/wandb/offline-run-*`",
            run_dir,
            run_dir,
        )
    # The run id lives in the run dir so a resumed or requeued job continues the same W&B run.
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id format
        atomic_write_text(id_file, run_id + "\n")
    # The group too: a run resumed outside its sweep (a plain `python -m train` in the cell's dir) stays in it.
    group_file = run_dir / "wandb_group.txt"
    group = sweep_group(cfg)
    if group is None and group_file.exists():
        group = group_file.read_text().strip() or None
    elif group is not None and not group_file.exists():
        atomic_write_text(group_file, group + "\n")
    return [
        WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=group,
            job_type=job_type(OmegaConf.to_container(cfg, resolve=True)),  # runs differing only in seed share it
            name=run_display_name(cfg),
            tags=[f"model:{cfg.model.name}", f"pe:{cfg.pe.name}", f"data:{cfg.data.name}", *cfg.logger.tags],
            id=run_id,
            resume="allow",
            save_dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    ]


def _wandb_loggers(loggers) -> list:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


class WandbRun(L.Callback):
    """Declares the metric sections (x-axis = tokens) when the run starts, and closes the W&B run if
    training dies, so the next run in the same process (a Hydra multirun) gets its own."""

    def on_fit_start(self, trainer, pl_module):
        for lg in _wandb_loggers(trainer.loggers):
            exp = lg.experiment
            if not hasattr(exp, "define_metric"):
                continue
            exp.define_metric("tokens")
            for section in SECTIONS:
                exp.define_metric(f"{section}/*", step_metric="tokens", step_sync=True)

    def on_exception(self, trainer, pl_module, exception):
        for lg in _wandb_loggers(trainer.loggers):
            if lg._experiment is not None:
                lg.experiment.finish(exit_code=1)
                lg._experiment = None


def finish_wandb(trainer, summary: dict | None = None) -> None:
    """Write the run's summary (final/best numbers) into the W&B run and close it."""
    for lg in _wandb_loggers(trainer.loggers):
        if lg._experiment is None:
            continue
        exp = lg.experiment
        if summary:
            keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and v is not None}
            exp.summary.update({f"final/{k}": v for k, v in keep.items()})
        exp.finish()
        lg._experiment = None


def log_offset_curves(loggers, doc: dict) -> None:
    """The Behind-RoPE per-offset mean-score curves (one line per layer) and NR table to W&B."""
    wl = _wandb_loggers(loggers)
    if not wl:
        return
    import wandb  # heavy (~1 s); only with logger=wandb

    offsets = doc["offsets"]
    layers = doc["layers"]
    plot = wandb.plot.line_series(
        xs=offsets,
        ys=[layer["offset_mean"] for layer in layers],
        keys=[f"L{i}" for i in range(len(layers))],
        xname="offset i-j",
        title=f"mean pre-softmax score by offset (step {doc['step']})",
    )
    table = wandb.Table(columns=["layer", "nr"], data=[[i, layer["nr"]] for i, layer in enumerate(layers)])
    for lg in wl:
        lg.experiment.log(
            {
                "attn/offset_curve": plot,
                "attn/nr_table": table,
                "tokens": doc["tokens"],
                "trainer/global_step": doc["step"],
            }
        )


# ---- reading an offline run back (tests, and `train.report` on runs that were never synced) --------


def read_wandb_records(path: Path) -> list:
    """Protobuf records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-style 32 KiB blocks of records (crc32 4, length 2, type 1: full/first/middle/last)."""
    # wandb's own record format (its internal protobuf module): offline runs read back by tests and reports.
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
        else:  # zero padding at the end of a block
            pos += block - pos % block if pos % block else 0
    return [pb.Record.FromString(c) for c in out]


def read_wandb_offline(run_dir: Path) -> dict:
    """{"id", "group", "name", "tags", "config", "history": [row dicts]} of the newest offline run
    under <run_dir>/wandb (history rows of every offline-run-* with the same id, in order)."""
    dirs = sorted(Path(run_dir).glob("wandb/offline-run-*"))
    if not dirs:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}/wandb")
    info: dict = {"history": [], "config": {}, "metrics": []}
    for d in dirs:
        for f in sorted(d.glob("run-*.wandb")):
            for r in read_wandb_records(f):
                kind = r.WhichOneof("record_type")
                if kind == "run":
                    info.update(
                        id=r.run.run_id,
                        group=r.run.run_group,
                        name=r.run.display_name,
                        project=r.run.project,
                        tags=list(r.run.tags),
                    )
                    for item in r.run.config.update:
                        info["config"][item.key] = json.loads(item.value_json)
                elif kind == "history":
                    info["history"].append(
                        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                    )
                elif kind == "metric":
                    info["metrics"].append(
                        {"name": r.metric.name, "glob": r.metric.glob_name, "step_metric": r.metric.step_metric}
                    )
    return info
