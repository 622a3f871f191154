"""Train one (model, PE, data) cell: `run(cfg, run_dir)`, and `train_job(cfg)`, the Hydra task of
`python -m train` (SLURM requeue after preemption, per-cell status in multiruns, one-line config errors).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pelab.data.atomic import atomic_write_json
from pelab.data.datamodule import TokenDataModule
from pelab.models.inspect import describe
from pelab.models.kernels import kernels_used
from pelab.train.checkpoints import AtomicCheckpointIO, PeriodicCheckpoint, resume_format_problem
from pelab.train.config import ConfigError, model_config
from pelab.train.eval.callback import periodic_eval_callbacks
from pelab.train.eval.checkpoint import init_from
from pelab.train.loggers import WandbRun, build_loggers, finish_wandb
from pelab.train.metrics import MetricSink
from pelab.train.module import LMModule
from pelab.train.plan import plan
from pelab.train.report import plot_runs
from pelab.train.rundir import resume_checkpoint, save_config
from pelab.train.slurm import (
    Preempted,
    RequeueOnSignal,
    apply_slurm_world,
    cluster_plugins,
    preemption_signals,
    requeue_after,
)
from pelab.train.stability import StabilityMonitor
from pelab.train.strategy import build as build_strategy
from pelab.train.sweep import in_multirun, record_cell

log = logging.getLogger("pelab")


def _resolve_auto(value, gpu_value, cpu_value, has_gpu: bool):
    return (gpu_value if has_gpu else cpu_value) if value == "auto" else value


def run(cfg: DictConfig, run_dir: Path | str | None = None) -> dict:
    """Train one cell; returns the summary dict (also written to <run_dir>/summary.json)."""
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    apply_slurm_world(cfg)  # under srun: trainer.devices / num_nodes = the job's tasks per node / nodes
    sizes = plan(cfg)
    ckpt = resume_checkpoint(cfg, run_dir)
    model_cfg = model_config(cfg)
    has_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    precision = _resolve_auto(cfg.trainer.precision, "bf16-mixed", "32-true", has_gpu)
    compile_model = bool(_resolve_auto(cfg.trainer.compile, True, False, has_gpu))
    if has_gpu:
        torch.set_float32_matmul_precision("high")

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cell = describe(model_cfg, int(cfg.trainer.seq_len))
    strategy, strategy_name = build_strategy(cfg, sizes["world"], cell["total_params"], precision)
    if ckpt is not None and resume_format_problem(ckpt, strategy_name):
        raise ConfigError(resume_format_problem(ckpt, strategy_name))
    datamodule = TokenDataModule(
        cfg.data,
        seq_len=cfg.trainer.seq_len,
        micro_batch_size=cfg.trainer.micro_batch_size,
        accum_steps=sizes["accum"],
        seed=cfg.seed,
    )
    module = LMModule(
        model_cfg,
        cfg.optim,
        max_steps=cfg.trainer.max_steps,
        tokens_per_step=sizes["tokens_per_step"],
        flops_per_token=cell["flops_per_token"],
        compile=compile_model,
        log_every=cfg.trainer.log_every,
        stop_on_nonfinite=cfg.trainer.stop_on_nonfinite,
        monitor=cfg.monitor,
    )
    if ckpt is None and cfg.init_from:  # continued training from another run's weights
        for note in init_from(module.model, cfg.init_from, OmegaConf.to_container(cfg.pe, resolve=True)):
            log.info("init_from %s: %s", cfg.init_from, note)
    sink = MetricSink(run_dir, sizes["tokens_per_step"])
    periodic = PeriodicCheckpoint(run_dir / "checkpoints", cfg.trainer.ckpt_every, cfg.trainer.keep_checkpoints)
    # SLURM pre-timeout / preemption signal: last.ckpt at the step boundary, then Preempted (train_job requeues).
    requeue = RequeueOnSignal(preemption_signals(cfg.preemption.signal), periodic.save, run_dir, periodic.saved)
    callbacks = [sink, periodic, requeue, *periodic_eval_callbacks(cfg, sink)]
    if cfg.monitor.enabled:
        callbacks.append(StabilityMonitor(run_dir, cfg.monitor, sink))
    if cfg.logger.name == "wandb":
        callbacks.append(WandbRun())
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every,
        enable_checkpointing=False,
        logger=build_loggers(cfg, run_dir) or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    log.info(
        "%s | %s params | %d tokens/step (accumulation %d) | precision %s | compile %s | %d process(es), %s",
        cfg.run_name,
        f"{cell['total_params']:,}",
        sizes["tokens_per_step"],
        sizes["accum"],
        precision,
        compile_model,
        sizes["world"],
        strategy_name,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    rows = sink.rows("metrics")
    last_val_step = max((s for s, r in rows.items() if "val/loss" in r), default=-1)
    if last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    rows = [rows[s] for s in sorted(rows)]
    last_train = next((r for r in reversed(rows) if "train/loss" in r), {})
    tps = sorted(float(r["tokens_per_s"]) for r in rows if "tokens_per_s" in r)
    summary = {
        "run_name": cfg.run_name,
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "pe": cfg.pe.name,
        "kv_shift": bool(cfg.kv_shift),
        "data": cfg.data.name,
        "seed": cfg.seed,
        "params": cell["total_params"],
        "steps": trainer.global_step,
        "tokens": trainer.global_step * sizes["tokens_per_step"],
        "train_loss": float(last_train["train/loss"]) if last_train else None,
        "val_loss": module.val_loss,
        "tokens_per_s": tps[len(tps) // 2] if tps else None,
        "tokens_per_s_per_gpu": tps[len(tps) // 2] / sizes["world"] if tps else None,
        "world_size": sizes["world"],
        "strategy": strategy_name,
        "accumulation": sizes["accum"],
        "attention_kernels": kernels_used(),
        "precision": precision,
        "compile": compile_model,
        "spikes": module.step_stats.spikes if module.step_stats is not None else None,
    }
    if trainer.global_rank == 0:
        atomic_write_json(run_dir / "summary.json", summary)
        plot_runs([run_dir], run_dir / "loss.png")
        print(
            f"\nrun dir   {run_dir}\n"
            f"metrics   {run_dir / 'metrics.csv'}\nplot      {run_dir / 'loss.png'}\n"
            f"checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}\nsummary   {run_dir / 'summary.json'}\n"
            f"final     train/loss {summary['train_loss']:.4f}  val/loss {summary['val_loss']:.4f}  "
            f"({summary['steps']} steps, {summary['tokens']:,} tokens)"
        )
    finish_wandb(trainer, summary)  # one W&B run per job: close it (a multirun's next cell opens its own)
    return summary


def train_job(cfg: DictConfig) -> float | None:
    """`python -m train`'s Hydra task: run the cell; requeue the SLURM job after a checkpointed preemption;
    in a multirun, record the cell's status (a failed cell does not stop the sweep). Returns val/loss."""
    multirun = in_multirun()
    try:
        summary = run(cfg)
    except Preempted as p:  # checkpoint written at a step boundary: requeue the SLURM job (bounded)
        requeued, why = requeue_after(p, int(cfg.preemption.max_requeues))
        if requeued:
            log.warning("%s; %s", p, why)
            raise SystemExit(0) from None  # not an error; submitit writes no result, the requeued job will
        log.error("%s; not requeued: %s", p, why)
        if multirun:
            record_cell("failed", error=f"{p}; not requeued: {why}")
            return None
        raise SystemExit(3) from None
    except Exception as e:
        if multirun:  # a failed cell is recorded and the sweep goes on (summary.json marks it)
            record_cell("failed", error=e)
            return None
        if isinstance(e, ConfigError):
            log.error("%s", e)
            raise SystemExit(2) from None
        raise
    if multirun:
        record_cell("ok", summary=summary)
    return summary["val_loss"]
