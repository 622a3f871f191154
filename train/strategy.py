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
fp32 gradients and AdamW's two fp32 moments, `bytes_per_param` = 16 bytes per parameter -- would
take more than `fsdp_above_memory_fraction` (0.4) of one GPU's memory, else DDP (replicating is
faster while it fits: no parameter all-gathers). On an H200 (141 GB) that is FSDP above ~3.5B
parameters, on an 80 GB GPU above ~2B; every pelab preset (<= 776M) runs DDP. Without a GPU the
rule picks DDP.

Ranks and world size: `world_size()` mirrors what Lightning will use (torchrun's WORLD_SIZE,
SLURM's SLURM_NTASKS under `srun`, else devices x num_nodes), so `plan()` derives the gradient
accumulation from the same number the trainer runs with.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy

log = logging.getLogger("pelab")
# FSDP1's sharded state dict still uses ShardedTensor; the warning repeats for every tensor of every save.
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)

# Defaults for the option blocks (conf/trainer/{ddp,fsdp,auto}.yaml carry the same values with
# comments); a trainer config without the block (e.g. `trainer.strategy=fsdp` on the default
# trainer) gets these.
DDP_DEFAULTS: dict[str, Any] = {
    "gradient_as_bucket_view": True,
    "static_graph": False,
    "bucket_cap_mb": None,
    "find_unused_parameters": False,
    "process_group_backend": None,
    "timeout_min": 30,
}
FSDP_DEFAULTS: dict[str, Any] = {
    "sharding": "full",  # full | hybrid | shard_grad_op | no_shard
    "hybrid_shard_size": None,  # hybrid: GPUs per shard group (null: the GPUs of one node)
    "param_dtype": "bf16",
    "reduce_dtype": "fp32",
    "buffer_dtype": "fp32",
    "activation_checkpointing": False,
    "state_dict_type": "sharded",
    "limit_all_gathers": True,
    "forward_prefetch": False,
    "backward_prefetch": "BACKWARD_PRE",
    "cpu_offload": False,
    "no_sync_accumulation": False,
    "process_group_backend": None,
    "timeout_min": 30,
}
AUTO_DEFAULTS: dict[str, Any] = {"bytes_per_param": 16, "fsdp_above_memory_fraction": 0.4}

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _opts(t, key: str, defaults: dict) -> dict:
    from omegaconf import DictConfig, OmegaConf

    node = t.get(key) if hasattr(t, "get") else None
    given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"unknown trainer.{key} option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _uses_gpu(t) -> bool:
    return str(t.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def devices_per_node(t) -> int:
    """Processes per node for `trainer.devices` (an int, "auto"/-1, a list or "0,1" of device ids)."""
    d = t.devices
    if isinstance(d, (list, tuple)) or type(d).__name__ == "ListConfig":
        return len(d)
    s = str(d).strip()
    if s in ("auto", "-1"):
        return max(torch.cuda.device_count(), 1) if _uses_gpu(t) else 1
    if "," in s:
        return len([x for x in s.split(",") if x.strip()])
    n = int(s)
    if n <= 0:
        raise ValueError(f"trainer.devices must be a positive number, auto, -1 or a list of ids; got {d!r}")
    return n


def world_size(t) -> int:
    """Number of training processes the trainer will run with."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:  # torchrun
        return int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # srun
        return int(env["SLURM_NTASKS"])
    return devices_per_node(t) * int(t.num_nodes)


def gpu_memory_bytes(t) -> int | None:
    if not _uses_gpu(t):
        return None
    return torch.cuda.get_device_properties(0).total_memory


def choose(t, world: int, n_params: int, gpu_memory: int | None) -> tuple[str, str]:
    """(strategy name, reason): `single`, `ddp`, `fsdp` or a Lightning strategy string."""
    name = str(t.strategy)
    if name != "auto":
        return name, "set in trainer.strategy"
    if world == 1:
        return "single", "one process"
    rule = _opts(t, "auto", AUTO_DEFAULTS)
    state = rule["bytes_per_param"] * n_params
    if gpu_memory is None:
        return "ddp", "no GPU"
    limit = rule["fsdp_above_memory_fraction"] * gpu_memory
    pick = "fsdp" if state > limit else "ddp"
    return pick, (
        f"training state {state / 1e9:.1f} GB ({rule['bytes_per_param']} B/param x {n_params / 1e6:.0f}M) "
        f"{'>' if pick == 'fsdp' else '<='} {rule['fsdp_above_memory_fraction']:.0%} of "
        f"{gpu_memory / 1e9:.0f} GB GPU memory"
    )


def build(cfg, world: int, n_params: int, precision: str):
    """(the `strategy=` argument for `lightning.Trainer`, its short name)."""
    t = cfg.trainer
    name, reason = choose(t, world, n_params, gpu_memory_bytes(t))
    if str(t.strategy) == "auto" and world > 1:
        log.info("trainer.strategy=auto -> %s (%s)", name, reason)
    if name == "single":
        return "auto", name
    if name == "ddp":
        return build_ddp(_opts(t, "ddp", DDP_DEFAULTS)), name
    if name == "fsdp":
        return build_fsdp(_opts(t, "fsdp", FSDP_DEFAULTS), precision, int(t.num_nodes), world), name
    return name, name


def build_ddp(o: dict):
    from lightning.pytorch.strategies import DDPStrategy

    kw = {k: o[k] for k in ("gradient_as_bucket_view", "static_graph", "find_unused_parameters")}
    if o["bucket_cap_mb"]:
        kw["bucket_cap_mb"] = o["bucket_cap_mb"]
    return DDPStrategy(
        process_group_backend=o["process_group_backend"], timeout=timedelta(minutes=o["timeout_min"]), **kw
    )


def mixed_precision(o: dict, precision: str):
    """FSDP's MixedPrecision for a bf16/fp16 run (params gathered in param_dtype, gradients
    reduced in reduce_dtype, buffers such as RoPE tables kept in buffer_dtype); None in fp32."""
    from torch.distributed.fsdp import MixedPrecision

    if precision.startswith("32") or precision.startswith("64"):
        return None
    return MixedPrecision(
        param_dtype=_DTYPES[o["param_dtype"]],
        reduce_dtype=_DTYPES[o["reduce_dtype"]],
        buffer_dtype=_DTYPES[o["buffer_dtype"]],
    )


def build_fsdp(o: dict, precision: str, num_nodes: int, world: int):
    from pelab.models.gpt import Block
    from torch.distributed.fsdp import BackwardPrefetch

    sharding = {
        "full": "FULL_SHARD",
        "hybrid": "HYBRID_SHARD",
        "shard_grad_op": "SHARD_GRAD_OP",
        "no_shard": "NO_SHARD",
    }.get(str(o["sharding"]).lower())
    if sharding is None:
        raise ValueError(f"trainer.fsdp.sharding={o['sharding']!r}: choose full, hybrid, shard_grad_op or no_shard")
    kw: dict[str, Any] = {}
    if sharding == "HYBRID_SHARD":
        shard = int(o["hybrid_shard_size"] or max(world // max(num_nodes, 1), 1))
        if world % shard:
            raise ValueError(f"trainer.fsdp.hybrid_shard_size={shard} does not divide the world size {world}")
        kw["device_mesh"] = (world // shard, shard)  # (replicas, shard group size)
    if o["backward_prefetch"]:
        kw["backward_prefetch"] = BackwardPrefetch[str(o["backward_prefetch"]).upper()]
    strategy = PelabFSDPStrategy(
        sharding_strategy=sharding,
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if o["activation_checkpointing"] else None,
        mixed_precision=mixed_precision(o, precision),
        state_dict_type=o["state_dict_type"],
        limit_all_gathers=o["limit_all_gathers"],
        forward_prefetch=o["forward_prefetch"],
        cpu_offload=bool(o["cpu_offload"]),
        process_group_backend=o["process_group_backend"],
        timeout=timedelta(minutes=o["timeout_min"]),
        **kw,
    )
    strategy.no_sync_accumulation = bool(o["no_sync_accumulation"])
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
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

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
        from lightning.fabric.utilities.device_dtype_mixin import _update_properties

        _update_properties(model, device=self.root_device)
        return model

    def fsdp_roots(self) -> list:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

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
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

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
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    names = {id(p): clean_tensor_name(n) for n, p in model.named_parameters()}
    to_name = {i: names[id(p)] for i, p in zip(saved_ids, live)}
    return {
        "state": {to_name[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory (or file) `src` to `dst`, replacing what is there. The old `dst` is renamed
    aside first and deleted last, so at every moment a complete checkpoint exists under one name."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(dst.name + ".old")
    if old.exists() or old.is_symlink():
        _remove(old)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists() or old.is_symlink():
        _remove(old)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def is_sharded_checkpoint(path: Path) -> bool:
    """A distributed (FSDP sharded) checkpoint: a directory with Lightning's `meta.pt` and DCP shards."""
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file()


def resume_format_problem(ckpt: Path, strategy_name: str) -> str | None:
    """Why `ckpt` cannot be resumed with this strategy (None when it can)."""
    if is_sharded_checkpoint(ckpt) and strategy_name != "fsdp":
        how = "one process" if strategy_name == "single" else f"strategy {strategy_name}"
        return (
            f"{ckpt} is a sharded FSDP checkpoint, which only trainer.strategy=fsdp can resume (on any number of "
            f"GPUs). To resume it with {how}, first turn it into one file in place: "
            f"python -m train.consolidate {ckpt} {ckpt}"
        )
    return None
