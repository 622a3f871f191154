"""Periodic evaluation during training: every `eval.every` steps run one `train.eval` suite on the live
model and send its scalars to metrics.csv and the Lightning loggers (W&B), like `val/loss`.

Configured in the training config (off by default):
    eval:
      every: 0            # optimizer steps between evaluations; 0 = off
      suite: zeroshot     # zeroshot | ppl_vs_length | retrieval | all (conf/suite/*.yaml)
      limit: 100          # items per task / windows per length / samples per cell
      data_dir: null      # local zero-shot data (default: env PELAB_EVAL_DATA, else the hub)
      overrides: []       # further train.eval overrides, e.g. ["zeroshot.tasks=[arc_easy,piqa]"]
Metric names: eval/<task>/acc, eval/<task>/acc_norm, eval/zeroshot_avg/acc, eval/ppl/<m>x,
eval/loss/<m>x, eval/retrieval/<task>. Rank 0 evaluates; the other ranks wait.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig

log = logging.getLogger("pelab.eval")


def compose_eval_config(overrides: list[str]) -> DictConfig:
    """The `train.eval` config for these overrides, also from inside a running Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from pelab.train.config import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        # Inside `python -m train` (same config directory): compose without disturbing the app's state.
        return compose(config_name="eval", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


class PeriodicEval(L.Callback):
    def __init__(self, every: int, eval_cfg: DictConfig, train_cfg: DictConfig, train_len: int, tokenizer):
        self.every = int(every)
        self.eval_cfg = eval_cfg
        self.train_cfg = train_cfg
        self.train_len = int(train_len)
        self.tokenizer = tokenizer
        self.disabled: str | None = None
        self.history: dict[int, dict[str, float]] = {}

    def evaluate(self, model, device: torch.device, autocast_dtype) -> dict[str, float]:
        from pelab.train.eval.__main__ import flat_metrics, run_suites
        from pelab.train.eval.zeroshot import GPTModel

        was_training = model.training
        model.eval()
        try:
            lm = GPTModel(model, device, autocast_dtype)
            results = run_suites(lm, self.tokenizer, self.train_cfg, self.train_len, self.eval_cfg)
        finally:
            model.train(was_training)
        return flat_metrics(results)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or step in self.history:
            return
        metrics: dict[str, float] = {}
        if not self.disabled and "fsdp" in type(trainer.strategy).__name__.lower():
            self.disabled = "the model is sharded (FSDP); evaluate the checkpoints with python -m train.eval instead"
            log.warning("periodic evaluation disabled: %s", self.disabled)
        if trainer.global_rank == 0 and not self.disabled:
            bf16 = "bf16" in str(trainer.precision) and pl_module.device.type == "cuda"
            try:
                metrics = self.evaluate(pl_module.model, pl_module.device, torch.bfloat16 if bf16 else None)
            except Exception as e:  # noqa: BLE001  (never kill a training run for its side evaluation)
                self.disabled = f"{e.__class__.__name__}: {e}"
                log.warning("periodic evaluation disabled: %s", self.disabled)
        self.history[step] = metrics
        if metrics:
            from pelab.train.callbacks import MetricsCSV

            for cb in trainer.callbacks:
                if isinstance(cb, MetricsCSV):
                    row = cb._row(step)
                    row.update(metrics)
                    row.setdefault("tokens", step * getattr(pl_module, "tokens_per_step", 0))
                    cb.flush(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            log.info("step %d eval: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        trainer.strategy.barrier()


def periodic_eval_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """[PeriodicEval] when the training config's `eval.every` > 0, else []."""
    ev = cfg.get("eval") if hasattr(cfg, "get") else None
    if not ev or not int(ev.get("every") or 0):
        return []
    from pelab.data.tokenizer import tokenizer_from_cfg

    eval_cfg = compose_eval_config([f"suite={ev.get('suite', 'zeroshot')}", *list(ev.get("overrides") or [])])
    eval_cfg.eval.limit = ev.get("limit")
    if ev.get("data_dir"):
        eval_cfg.eval.data_dir = str(ev.data_dir)
    tokenizer = tokenizer_from_cfg(cfg.data.tokenizer)
    return [PeriodicEval(int(ev.every), eval_cfg, cfg, int(cfg.trainer.seq_len), tokenizer)]
