"""`python -m train [overrides]`: pretrain one (model, PE, data) cell; `-m` for a Hydra multirun.

The run directory (`runs/<model>-<pe>-<data>-s<seed>` by default) holds config.yaml, metrics.csv,
checkpoints/, loss.png and summary.json. Rerunning the same command continues from
checkpoints/last.ckpt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (set before torch loads libgomp). libgomp's default spin
# at every barrier made a gpt_tiny CPU step 12x slower when other processes share the cores (8.3 s vs
# 0.67 s on 2 cores, bench/RESULTS.md); on idle cores steps take about a third longer, which
# OMP_WAIT_POLICY=ACTIVE wins back on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
import pelab.train.config  # noqa: E402, F401  (registers resolvers before Hydra composes)
from omegaconf import DictConfig, OmegaConf  # noqa: E402

log = logging.getLogger("pelab")


class ConfigError(ValueError):
    """A config problem found before any heavy work; the message names the fix."""


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_lightning_logging() -> None:
    """Lightning's own console handler on the `lightning` logger repeats every line that Hydra's root
    handlers print (as "INFO: ..."), and it advertises litlogger on every run: print each line once."""
    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger_tip)


def _resolve_auto(value, gpu_value, cpu_value, has_gpu: bool):
    return (gpu_value if has_gpu else cpu_value) if value == "auto" else value


def plan(cfg: DictConfig) -> dict:
    """Derived sizes, checked before any model or data work."""
    from pelab.train.strategy import world_size

    t = cfg.trainer
    world = world_size(t)  # devices x num_nodes, "auto"/-1 = all GPUs; torchrun's / srun's world when launched so
    per_micro = int(t.micro_batch_size) * int(t.seq_len) * world
    if t.seq_len <= 0 or t.micro_batch_size <= 0:
        raise ConfigError(
            f"trainer.seq_len ({t.seq_len}) and trainer.micro_batch_size ({t.micro_batch_size}) must be positive"
        )
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"trainer.seq_len={t.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}; "
            f"lower trainer.seq_len or set model.max_seq_len={t.seq_len}"
        )
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} is not a multiple of micro_batch_size x seq_len x "
            f"devices = {t.micro_batch_size} x {t.seq_len} x {world} = {per_micro}; choose e.g. "
            f"trainer.global_batch_tokens={max(1, round(t.global_batch_tokens / per_micro)) * per_micro}"
        )
    if cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps must be positive, got {cfg.trainer.max_steps}")
    return {"world": world, "accum": t.global_batch_tokens // per_micro, "tokens_per_step": int(t.global_batch_tokens)}


def _same_experiment(saved: DictConfig, cfg: DictConfig) -> list[str]:
    keys = ["model", "pe", "kv_shift", "data.name", "seed", "trainer.seq_len", "trainer.global_batch_tokens"]
    return [k for k in keys if OmegaConf.select(saved, k) != OmegaConf.select(cfg, k)]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    mode = str(cfg.resume).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"resume must be auto, true or false, got {cfg.resume!r}")
    if mode == "true" and not last.exists():
        raise ConfigError(f"resume=true but {last} does not exist; run without resume=true to start fresh")
    if not last.exists():
        return None
    if mode == "false":
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints/last.ckpt); use resume=auto to continue it, "
            f"another run_name=..., or delete the directory"
        )
    saved_cfg = run_dir / "config.yaml"
    if saved_cfg.exists():
        diff = _same_experiment(OmegaConf.load(saved_cfg), cfg)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with different {', '.join(diff)}; continue it with the same "
                f"settings, or choose another run_name=..."
            )
    return last


def run(cfg: DictConfig, run_dir: Path | str | None = None) -> dict:
    """Train one cell; returns the summary dict (also written to <run_dir>/summary.json)."""
    import lightning as L
    import torch
    from pelab.data.datamodule import TokenDataModule
    from pelab.data.shards import atomic_write
    from pelab.models.inspect import describe
    from pelab.train.callbacks import AtomicCheckpointIO, LoggerBridge, MetricsCSV, PeriodicCheckpoint, write_summary
    from pelab.train.config import model_config
    from pelab.train.eval.callback import periodic_eval_callbacks
    from pelab.train.loggers import build_loggers, finish_wandb
    from pelab.train.module import LMModule
    from pelab.train.report import plot_runs
    from pelab.train.slurm import RequeueOnSignal, apply_slurm_world, cluster_plugins, preemption_signals
    from pelab.train.stability import monitor_callbacks
    from pelab.train.strategy import build as build_strategy
    from pelab.train.strategy import resume_format_problem

    quiet_lightning_logging()
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
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
    # Every rank writes the same file while the others may read it in resume_checkpoint: atomically
    # (a half-written file read as "different settings"), with a temp file per writer.
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
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
        OmegaConf.to_container(cfg.optim, resolve=True),
        max_steps=cfg.trainer.max_steps,
        tokens_per_step=sizes["tokens_per_step"],
        flops_per_token=cell["flops_per_token"],
        compile=compile_model,
        log_every=cfg.trainer.log_every,
        stop_on_nonfinite=cfg.trainer.stop_on_nonfinite,
        monitor=OmegaConf.to_container(cfg.monitor, resolve=True) if "monitor" in cfg else None,
    )
    if ckpt is None and cfg.get("init_from"):  # continued training from another run's weights
        from pelab.train.eval.checkpoint import init_from

        for note in init_from(module.model, cfg.init_from, OmegaConf.to_container(cfg.pe, resolve=True)):
            log.info("init_from %s: %s", cfg.init_from, note)
    metrics_csv = MetricsCSV(run_dir / "metrics.csv")
    periodic = PeriodicCheckpoint(run_dir / "checkpoints", cfg.trainer.ckpt_every, cfg.trainer.keep_checkpoints)
    # SLURM pre-timeout / preemption signal: last.ckpt at the step boundary, then Preempted (main() requeues).
    requeue = RequeueOnSignal(
        preemption_signals(cfg.get("preemption", {}).get("signal", "SIGUSR1")),
        periodic.save,
        run_dir,
        already_saved=lambda tr, step: periodic.every > 0 and (step % periodic.every == 0 or step >= tr.max_steps),
    )
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
        callbacks=[
            metrics_csv,
            LoggerBridge(),
            periodic,
            requeue,
            *monitor_callbacks(cfg, run_dir),
            *periodic_eval_callbacks(cfg),
        ],
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
    last_val_step = max((s for s, r in metrics_csv.rows.items() if "val/loss" in r), default=-1)
    if last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    from pelab.models.kernels import kernels_used

    rows = [metrics_csv.rows[s] for s in sorted(metrics_csv.rows)]
    last_train = next((r for r in reversed(rows) if "train/loss" in r), {})
    tps = [float(r["tokens_per_s"]) for r in rows if "tokens_per_s" in r]
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
        "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
        "tokens_per_s_per_gpu": sorted(tps)[len(tps) // 2] / sizes["world"] if tps else None,
        "world_size": sizes["world"],
        "strategy": strategy_name,
        "accumulation": sizes["accum"],
        "attention_kernels": kernels_used(),
        "precision": precision,
        "compile": compile_model,
        "spikes": module.step_stats.spikes if module.step_stats is not None else None,
    }
    if trainer.global_rank == 0:
        write_summary(run_dir / "summary.json", summary)
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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from pelab.train.slurm import Preempted, requeue_after
    from pelab.train.sweep import in_multirun, record_cell

    multirun = in_multirun()
    try:
        summary = run(cfg)
    except Preempted as p:  # checkpoint written at a step boundary: requeue the SLURM job (bounded)
        requeued, why = requeue_after(p, int(cfg.get("preemption", {}).get("max_requeues", 0)))
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


if __name__ == "__main__":
    main()
