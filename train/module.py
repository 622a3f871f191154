"""LightningModule: one optimizer step per batch (the batch holds all accumulation micro-batches).

Manual optimization keeps the step explicit: micro-batch losses are divided by the accumulation
count (the GRAPE/T6 trainers forget this), the pre-clip global grad norm stays on the device, and
host syncs happen only at logging steps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from contextlib import nullcontext

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT
from pelab.train import optim
from pelab.train.metrics import peak_flops
from pelab.train.schema import MonitorConfig
from pelab.train.stability import StepStats
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def _numpy_state_to_list() -> list:
    # Plain Python types only, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


class NonFiniteLoss(RuntimeError):
    pass


class TrainGPT(GPT):
    """The GPT whose forward returns the loss dict when given targets (same parameters and state
    dict keys as `GPT`). Data-parallel wrappers hook `forward`: FSDP's root unit must see the
    whole loss computation (embedding, blocks, tied head) as one forward call, followed by the
    backward outside it."""

    def forward(self, idx, targets=None, z_loss: float = 0.0, positions=None):
        if targets is None:
            return super().forward(idx, positions)
        return self.loss(idx, targets, z_loss=z_loss)


class LMModule(L.LightningModule):
    """`optim_cfg`: the `optim` config node (or a dict checked against its optimizer's schema); `monitor`:
    the `monitor` node, None for no monitoring (optim.skip_spikes then uses the default spike rule)."""

    def __init__(
        self,
        model_cfg: GPTConfig,
        optim_cfg: Mapping | DictConfig,
        *,
        max_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        compile: bool = False,
        log_every: int = 10,
        stop_on_nonfinite: bool = True,
        monitor: MonitorConfig | DictConfig | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg = model_cfg
        self.optim_cfg = optim.optim_config(optim_cfg)
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.compile_model = compile
        self.log_every = log_every
        self.stop_on_nonfinite = stop_on_nonfinite
        self.model = TrainGPT(model_cfg)
        self.last_metrics: dict[str, float] | None = None  # set at logging steps, read by callbacks
        self.val_loss: float | None = None
        self._nonfinite = None
        self._val_sum = None
        self._t_last = None
        self._step_last = 0
        # Stability monitoring (train/stability.py): per-step device stats, spike rule, optim.skip_spikes.
        mon = monitor if monitor is not None else MonitorConfig(enabled=False)
        self.skip_spikes = bool(self.optim_cfg.skip_spikes)
        self.step_stats = (
            StepStats(mon.spike_window, mon.spike_sigma, mon.spike_score_window)
            if mon.enabled or self.skip_spikes
            else None
        )
        self._t_batch_end, self._data_wait = None, 0.0  # host time waiting for the next batch

    # ---- setup ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.compile_model and not getattr(self, "_compiled", False):
            for block in self.model.blocks:
                block.compile()
            self._compiled = True

    def configure_optimizers(self):
        opt, sched = optim.build(self.model, self.optim_cfg, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- training -----------------------------------------------------------------------------

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        self.last_metrics = None
        opt = self.optimizers()
        sched = self.lr_schedulers()
        accum = batch.shape[0]
        z = float(self.optim_cfg.z_loss)
        loss_sum = torch.zeros((), device=self.device)
        lse_sum = torch.zeros((), device=self.device)
        lse_sq_sum = torch.zeros((), device=self.device)
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        for m in range(accum):
            x, y = batch[m, :, :-1], batch[m, :, 1:]
            with no_sync() if m < accum - 1 else nullcontext():
                out = self.model(x, y, z_loss=z)
                self.manual_backward(out["loss"] / accum)
            loss_sum += out["loss"].detach()
            lse_sum += out["lse"].detach()
            lse_sq_sum += out["lse_sq"].detach()
        clip = self.optim_cfg.grad_clip or float("inf")
        grad_norm = self.clip_grad_norm(clip)
        loss, lse, lse_sq = loss_sum / accum, lse_sum / accum, lse_sq_sum / accum
        if self.trainer.world_size > 1:  # the global batch's means (no host sync): every rank's spike rule,
            # NaN check and logged values see what one process with accumulation would
            loss, lse, lse_sq = self.trainer.strategy.reduce(torch.stack([loss, lse, lse_sq]), reduce_op="mean")
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        spike = None if self.step_stats is None else self.step_stats.record(loss, lse, lse_sq, grad_norm, clip)
        # optim.skip_spikes: a host sync per step, only when asked for.
        skip = self.skip_spikes and self.step_stats.should_skip(spike, self.trainer.strategy)
        if self.stop_on_nonfinite:
            self._nonfinite = ~finite if self._nonfinite is None else self._nonfinite | ~finite
            self.skip_update(opt) if skip else opt.step()
        elif bool(finite) and not skip:  # skip mode: the only per-step host sync, and only when asked for
            opt.step()
        else:
            self.skip_update(opt)
        opt.zero_grad(set_to_none=True)
        sched.step()
        step = self.global_step  # already counts this update
        if step % self.log_every == 0 or step == self.max_steps:
            self._log_step(step, loss, lse, grad_norm, clip, sched.get_last_lr()[0])

    def clip_grad_norm(self, clip: float) -> torch.Tensor:
        """Clip to `clip` and return the pre-clip norm of the whole (global) gradient. Under FSDP each
        rank holds a shard of every gradient, so the norm is FSDP's (an all-reduce over shards);
        under DDP every rank holds the full all-reduced gradient, so the local norm is global."""
        if isinstance(self.model, FSDP):  # the root unit (see train.strategy.PelabFSDPStrategy)
            return self.model.clip_grad_norm_(clip)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)

    def skip_update(self, opt) -> None:
        """Take the optimizer step with zero gradients at lr 0: parameters stay as they are, the step
        still counts (so the data order is unchanged); Adam's moments decay by one step."""
        for p in self.model.parameters():
            p.grad = None if p.grad is None else torch.zeros_like(p.grad)
        lrs = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 0.0
        opt.step()
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr

    def _log_step(self, step, loss, lse, grad_norm, clip, lr) -> None:
        self.check_finite()
        now = time.perf_counter()
        tps, timing = None, {}
        if self._t_last is not None and step > self._step_last:
            tps = (step - self._step_last) * self.tokens_per_step / (now - self._t_last)
            timing = {
                "throughput/step_time_s": (now - self._t_last) / (step - self._step_last),
                "throughput/data_wait": self._data_wait / (now - self._t_last),
            }
        self._t_last, self._step_last, self._data_wait = now, step, 0.0
        world = self.trainer.world_size
        gn = float(grad_norm)
        m = {
            "train/loss": float(loss),
            "train/lse": float(lse),
            "lr": lr,
            "grad_norm": gn,
            "grad_clipped": float(gn > clip),
            "tokens": step * self.tokens_per_step,
        }
        if tps is not None:
            # tokens_per_s: all GPUs together; mfu: model FLOPs / (peak x GPUs), i.e. the mean per GPU.
            m["tokens_per_s"] = tps
            m["tokens_per_s_per_gpu"] = tps / world
            peak = peak_flops(self.device)
            if peak:
                m["mfu"] = tps * self.flops_per_token / (peak * world)
                m["tflops_per_gpu"] = tps * self.flops_per_token / world / 1e12
        if self.device.type == "cuda":
            m["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9  # this rank (rank 0)
        m.update(timing)
        if self.step_stats is not None:
            m.update(self.step_stats.flush(step))  # interval stats: z-loss, clip rate, spikes (one host copy)
        self.last_metrics = m
        self.log_dict({"loss": m["train/loss"], "tok/s": tps or 0.0}, prog_bar=True, logger=False, rank_zero_only=True)

    def check_finite(self) -> None:
        if self._nonfinite is not None and bool(self._nonfinite):
            raise NonFiniteLoss(
                f"non-finite loss or gradient at or before step {self.global_step}. The last good checkpoint "
                f"is kept in checkpoints/. Fixes: lower optim.lr, raise optim.warmup_steps, set optim.z_loss, "
                f"or trainer.stop_on_nonfinite=false to skip such steps."
            )

    def on_train_batch_start(self, batch, batch_idx):
        now = time.perf_counter()
        if self._t_last is None:
            self._t_last, self._step_last, self._data_wait = now, self.global_step, 0.0
        elif self._t_batch_end is not None:  # since the last step ended (after all callbacks): the data fetch
            self._data_wait += now - self._t_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._t_batch_end = time.perf_counter()

    # ---- validation ---------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(2, device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = self.model(batch[:, :-1], batch[:, 1:])
        self._val_sum += torch.stack(
            [
                out["loss"].detach() * batch.shape[0],
                torch.tensor(batch.shape[0], device=self.device, dtype=torch.float32),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        self.val_loss = float(total[0] / total[1].clamp(min=1))
        self.log("val/loss", self.val_loss, prog_bar=True, logger=False, rank_zero_only=True)
        self._t_last = None  # do not count validation time as training throughput
        self._t_batch_end = None

    # ---- checkpoint extras ---------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write a checkpoint of a diverged model
        checkpoint["pelab"] = {
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state_to_list(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "model_cfg": self.model_cfg.__dict__.copy(),
            "tokens_per_step": self.tokens_per_step,
        }
        if self.step_stats is not None:
            checkpoint["pelab"]["step_stats"] = self.step_stats.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.step_stats is not None and "step_stats" in checkpoint.get("pelab", {}):
            self.step_stats.load_state_dict(checkpoint["pelab"]["step_stats"])
        rng = checkpoint.get("pelab", {}).get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
