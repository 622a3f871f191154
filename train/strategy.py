"""The Lightning strategy from the trainer config: one device, DDP, or FSDP (and the `auto` rule).

`trainer.strategy`:
- `auto`: one process -> no strategy (Lightning's single device). Several processes -> the rule
  below picks `ddp` or `fsdp`.
- `ddp`: `lightning.pytorch.strategies.DDPStrategy` with the options in `trainer.ddp`.
- `fsdp`: `FSDPStrategy` (FSDP1 through Lightning) with the options in `trainer.fsdp`: full or
  hybrid sharding, one FSDP unit per transformer `Block`, bf16 parameters with fp32 gradient
  reduction, optional activation checkpointing per `Block`, sharded (distributed) checkpoints.
- any other string (`ddp_spawn`, `deepspeed_stage_2`, ...) goes to Lightning unchanged.

The auto rule (`trainer.auto`): FSDP when the training state of the model -- fp32 parameters,
fp32 gradients and the optimizer's state (AdamW: two fp32 moments), 16 bytes per parameter with
AdamW (`bytes_per_param`, null: derived from the optimizer) -- would take more than
`fsdp_above_memory_fraction` (0.4) of one GPU's memory, else DDP (replicating is faster while it
fits: no parameter all-gathers). On an H200 (141 GB) that is FSDP above ~3.5B parameters, on an
80 GB GPU above ~2B; every pelab preset (<= 776M) runs DDP. Without a GPU the rule picks DDP.

Lightning's private API: `PelabFSDPStrategy` overrides `FSDPStrategy._setup_model` and uses
`_setup_activation_checkpointing`, `_update_properties`, `_get_full_state_dict_context`,
`_state_dict_type` and `_activation_checkpointing_kwargs`; pyproject.toml pins lightning to the
minor version they were written against.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _get_full_state_dict_context, _setup_activation_checkpointing
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from pelab.models.gpt import Block
from pelab.train import optim
from pelab.train.checkpoints import replace_dir
from pelab.train.plan import uses_gpu
from torch.distributed.fsdp import BackwardPrefetch, MixedPrecision
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

log = logging.getLogger("pelab")
# FSDP1's sharded state dict still uses ShardedTensor; the warning repeats for every tensor of every save.
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def gpu_memory_bytes(t) -> int | None:
    if not uses_gpu(t):
        return None
    return torch.cuda.get_device_properties(0).total_memory


def bytes_per_param(cfg) -> int:
    """Training-state bytes per parameter for the auto rule: `trainer.auto.bytes_per_param`, or fp32
    weights and gradients (8) plus the optimizer's state."""
    given = cfg.trainer.auto.bytes_per_param
    return int(given) if given else 8 + optim.optimizer(cfg.optim.name).state_bytes_per_param


def choose(t, world: int, n_params: int, gpu_memory: int | None, bytes_per_param: int) -> tuple[str, str]:
    """(strategy name, reason): `single`, `ddp`, `fsdp` or a Lightning strategy string."""
    name = str(t.strategy)
    if name != "auto":
        return name, "set in trainer.strategy"
    if world == 1:
        return "single", "one process"
    if gpu_memory is None:
        return "ddp", "no GPU"
    state = bytes_per_param * n_params
    fraction = t.auto.fsdp_above_memory_fraction
    pick = "fsdp" if state > fraction * gpu_memory else "ddp"
    return pick, (
        f"training state {state / 1e9:.1f} GB ({bytes_per_param} B/param x {n_params / 1e6:.0f}M) "
        f"{'>' if pick == 'fsdp' else '<='} {fraction:.0%} of {gpu_memory / 1e9:.0f} GB GPU memory"
    )


def build(cfg, world: int, n_params: int, precision: str):
    """(the `strategy=` argument for `lightning.Trainer`, its short name)."""
    t = cfg.trainer
    name, reason = choose(t, world, n_params, gpu_memory_bytes(t), bytes_per_param(cfg))
    if str(t.strategy) == "auto" and world > 1:
        log.info("trainer.strategy=auto -> %s (%s)", name, reason)
    if name == "single":
        return "auto", name
    if name == "ddp":
        return build_ddp(t.ddp), name
    if name == "fsdp":
        return build_fsdp(t.fsdp, precision, int(t.num_nodes), world), name
    return name, name


def build_ddp(o):
    """Lightning's DDPStrategy from the `trainer.ddp` options."""
    kw = {k: getattr(o, k) for k in ("gradient_as_bucket_view", "static_graph", "find_unused_parameters")}
    if o.bucket_cap_mb:
        kw["bucket_cap_mb"] = o.bucket_cap_mb
    return DDPStrategy(process_group_backend=o.process_group_backend, timeout=timedelta(minutes=o.timeout_min), **kw)


def mixed_precision(o, precision: str) -> MixedPrecision | None:
    """FSDP's MixedPrecision for a bf16/fp16 run (params gathered in param_dtype, gradients
    reduced in reduce_dtype, buffers such as RoPE tables kept in buffer_dtype); None in fp32."""
    if precision.startswith("32") or precision.startswith("64"):
        return None
    return MixedPrecision(
        param_dtype=_DTYPES[o.param_dtype], reduce_dtype=_DTYPES[o.reduce_dtype], buffer_dtype=_DTYPES[o.buffer_dtype]
    )


def build_fsdp(o, precision: str, num_nodes: int, world: int):
    """PelabFSDPStrategy from the `trainer.fsdp` options."""
    sharding = {
        "full": "FULL_SHARD",
        "hybrid": "HYBRID_SHARD",
        "shard_grad_op": "SHARD_GRAD_OP",
        "no_shard": "NO_SHARD",
    }.get(str(o.sharding).lower())
    if sharding is None:
        raise ValueError(f"trainer.fsdp.sharding={o.sharding!r}: choose full, hybrid, shard_grad_op or no_shard")
    kw: dict[str, Any] = {}
    if sharding == "HYBRID_SHARD":
        shard = int(o.hybrid_shard_size or max(world // max(num_nodes, 1), 1))
        if world % shard:
            raise ValueError(f"trainer.fsdp.hybrid_shard_size={shard} does not divide the world size {world}")
        kw["device_mesh"] = (world // shard, shard)  # (replicas, shard group size)
    if o.backward_prefetch:
        kw["backward_prefetch"] = BackwardPrefetch[str(o.backward_prefetch).upper()]
    strategy = PelabFSDPStrategy(
        sharding_strategy=sharding,
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if o.activation_checkpointing else None,
        mixed_precision=mixed_precision(o, precision),
        state_dict_type=o.state_dict_type,
        limit_all_gathers=o.limit_all_gathers,
        forward_prefetch=o.forward_prefetch,
        cpu_offload=bool(o.cpu_offload),
        process_group_backend=o.process_group_backend,
        timeout=timedelta(minutes=o.timeout_min),
        **kw,
    )
    strategy.no_sync_accumulation = bool(o.no_sync_accumulation)
    return strategy


class PelabFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, adapted to pelab's manual-optimization module:

    - the GPT, not the LightningModule, is the FSDP root (backward runs outside its forward);
    - runs on CPU processes too (gloo), which the CPU tests use (Lightning's accelerator check
      refuses only the exact FSDPStrategy class; torch needs `device_id` to name the CPU);
    - optional `no_sync` during accumulation (`trainer.fsdp.no_sync_accumulation`);
    - sharded saves go to a temporary directory that is renamed into place (atomic);
    - single-file checkpoints (1 GPU, DDP, `train.consolidate`) load on any number of ranks, also
      when their optimizer state is keyed by position (Lightning would map positions to
      `model.parameters()` order, which is not the order of pelab's decay/no-decay groups)."""

    no_sync_accumulation = False

    def _setup_model(self, model):
        """Make the GPT (`model.model`) the FSDP root instead of the LightningModule.

        Lightning wraps the whole LightningModule and runs `training_step` inside the root's
        forward. With manual optimization the backward then runs inside that forward, which FSDP1
        rejects (the root's handle is still in FORWARD state). Wrapping the GPT -- whose forward
        returns the loss -- keeps the usual FSDP pattern: loss = root(x, y); loss.backward().
        Parameter names (state dicts, optimizer states) are the same as without FSDP."""
        inner = getattr(model, "model", None)
        if isinstance(inner, FSDP):  # set up again (trainer.validate after fit)
            return model
        if not isinstance(inner, torch.nn.Module):
            return super()._setup_model(model)
        # torch's FSDP accepts CPU (gloo; the CPU tests) only when device_id names it.
        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        model.model = FSDP(
            module=inner,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device_id,
            **self.kwargs,
        )
        _setup_activation_checkpointing(model.model, self._activation_checkpointing_kwargs)
        # FSDP moved the parameters itself; tell the LightningModule (`self.device`) without moving anything.
        _update_properties(model, device=self.root_device)
        return model

    def fsdp_roots(self) -> list:
        return FSDP.fsdp_modules(self.model, root_only=True) if self.model is not None else []

    @contextmanager
    def block_backward_sync(self):
        """Used by the module around all but the last micro-batch's backward. With
        `no_sync_accumulation` FSDP skips the reduce-scatter there and accumulates full unsharded
        gradients (in param_dtype) on every rank; without it (default) every micro-batch's
        gradient is reduce-scattered in reduce_dtype (fp32) and accumulated in the fp32 shard,
        as a single GPU accumulates in fp32."""
        roots = self.fsdp_roots() if self.no_sync_accumulation else []
        with ExitStack() as stack:
            for root in roots:
                stack.enter_context(root.no_sync())
            yield

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Every rank writes its shard into <path>.tmp/, then rank 0 renames it into place.
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_file():
            return self._load_full_file(path, weights_only)
        return super().load_checkpoint(path, weights_only)

    def _load_full_file(self, path: Path, weights_only):
        # A full (single-file) checkpoint from any run: every rank reads it and keeps its shard.
        checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only), mmap=True)
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            self.model.load_state_dict(checkpoint.pop("state_dict"), strict=self.lightning_module.strict_loading)
        states = checkpoint.get("optimizer_states")
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(states):
            raise RuntimeError(f"{path} holds {len(states)} optimizer states for {len(self.optimizers)} optimizers")
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            for optimizer, state in zip(self.optimizers, states):
                state = keys_to_names(state, optimizer, self.model)
                optimizer.load_state_dict(
                    FSDP.optim_state_dict_to_load(model=self.model, optim=optimizer, optim_state_dict=state)
                )
        return checkpoint


def keys_to_names(state: dict, optimizer, model) -> dict:
    """Re-key a position-keyed optimizer state dict (torch's `Optimizer.state_dict()`: parameter i
    of the concatenated param groups) by parameter name, which FSDP's loader needs.

    The saved groups are matched position by position with the live optimizer's groups, exactly
    as `Optimizer.load_state_dict` does; a name-keyed state is returned unchanged."""
    saved_ids = [p for g in state["param_groups"] for p in g["params"]]
    if not saved_ids or not all(isinstance(p, int) for p in saved_ids):
        return state
    live = [p for g in optimizer.param_groups for p in g["params"]]
    if len(live) != len(saved_ids):
        raise ValueError(f"checkpoint optimizer has {len(saved_ids)} parameters, the model {len(live)}")
    names = {id(p): clean_tensor_name(n) for n, p in model.named_parameters()}
    to_name = {i: names[id(p)] for i, p in zip(saved_ids, live)}
    return {
        "state": {to_name[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def clean_tensor_name(name: str) -> str:
    """A parameter name without the FSDP and activation-checkpointing wrapper prefixes."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
