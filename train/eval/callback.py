"""Periodic evaluation during training: every `eval.every` steps run one `train.eval` suite on the live
model and send its scalars through the run's metric sink (metrics.csv and W&B), like `val/loss`.

Configured in the training config (`eval.*`, pelab.train.schema.PeriodicEvalConfig; off by default).
Metric names: the suites' `metrics` (pelab.train.eval.suites) under eval/: eval/<task>/acc,
eval/<task>/acc_norm, eval/zeroshot_avg/acc, eval/ppl/<m>x, eval/loss/<m>x, eval/retrieval/<task>.
Rank 0 evaluates; the other ranks wait.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig
from pelab.data.tokenizer import tokenizer_from_cfg
from pelab.train.config import compose
from pelab.train.eval.suites import flat_metrics, run_suites
from pelab.train.eval.zeroshot import GPTModel
from pelab.train.metrics import MetricSink

log = logging.getLogger("pelab.eval")


class PeriodicEval(L.Callback):
    def __init__(self, every: int, eval_cfg: DictConfig, train_cfg: DictConfig, tokenizer, sink: MetricSink):
        self.every = int(every)
        self.eval_cfg = eval_cfg
        self.train_cfg = train_cfg
        self.train_len = int(train_cfg.trainer.seq_len)
        self.tokenizer = tokenizer
        self.sink = sink
        self.disabled: str | None = None
        self.history: dict[int, dict[str, float]] = {}

    def evaluate(self, model, device: torch.device, autocast_dtype) -> dict[str, float]:
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
            self.sink.record(trainer, step, metrics)
            log.info("step %d eval: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        trainer.strategy.barrier()


def periodic_eval_callbacks(cfg: DictConfig, sink: MetricSink) -> list[L.Callback]:
    """[PeriodicEval] when the training config's `eval.every` > 0, else []."""
    ev = cfg.eval
    if not ev.every:
        return []
    eval_cfg = compose([f"suite={ev.suite}", *ev.overrides], config_name="eval")
    eval_cfg.eval.limit = ev.limit
    if ev.data_dir:
        eval_cfg.eval.data_dir = str(ev.data_dir)
    return [PeriodicEval(ev.every, eval_cfg, cfg, tokenizer_from_cfg(cfg.data.tokenizer), sink)]
