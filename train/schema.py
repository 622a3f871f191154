"""The config schema of `python -m train` and `python -m train.eval`: every key, its type and its default.

conf/config.yaml and the group files in conf/ only choose and override; the defaults live here, and
Hydra checks every composed config against these types (train/config.py registers them), so an
unknown key or a value of the wrong type fails before anything runs. Two groups take their keys from
the code they configure: `pe` from the PE's constructor (pelab.models.pe.options) and `optim` from
the optimizer's function (pelab.train.optim); `model` from `GPTConfig`; the option block of each eval
suite from its `Options` (pelab.train.eval.suites).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from pelab.data.config import DataConfig
from pelab.models.config import GPTConfig

# GPTConfig fields that other config groups fill: the PE (`pe`), `kv_shift` and the attention kernel
# (`trainer.attention_backend`).
MODEL_KEYS_FROM_ELSEWHERE = ("pe", "kv_shift", "attention_backend")


def options_dataclass(name: str, options: list[tuple[str, Any, Any]], bases: tuple[type, ...] = ()) -> type:
    """A dataclass with fields (key, type, default), as Hydra's ConfigStore takes it."""
    fields = []
    for key, type_, default in options:
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
            default = field(default_factory=lambda d=default: copy.deepcopy(d))
        fields.append((key, type_, default))
    return dataclasses.make_dataclass(name, fields, bases=bases)


def _model_options() -> list[tuple[str, Any, Any]]:
    types = typing.get_type_hints(GPTConfig)
    out = []
    for f in dataclasses.fields(GPTConfig):
        if f.name in MODEL_KEYS_FROM_ELSEWHERE:
            continue
        # null: the tokenizer's vocabulary (padded to a multiple of pad_vocab_to in the embedding).
        type_, default = (int | None, None) if f.name == "vocab_size" else (types[f.name], f.default)
        out.append((f.name, type_, default))
    return out


# The `model` group: the backbone (models/config.py documents each key).
ModelConfig = options_dataclass("ModelConfig", _model_options())


@dataclass
class DDPOptions:
    # Gradients share memory with the all-reduce buckets (saves one gradient-sized copy).
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    # null: PyTorch's default bucket size (25 MB).
    bucket_cap_mb: int | None = None
    find_unused_parameters: bool = False
    # null: nccl on GPU, gloo on CPU.
    process_group_backend: str | None = None
    timeout_min: int = 30


@dataclass
class FSDPOptions:
    # full: shard over all GPUs (FULL_SHARD) | hybrid: shard within a group, replicate across groups
    # (HYBRID_SHARD) | shard_grad_op: keep parameters whole between forward and backward (ZeRO-2) | no_shard
    sharding: str = "full"
    # hybrid only: GPUs per shard group (null: the GPUs of one node, i.e. world / num_nodes).
    hybrid_shard_size: int | None = None
    # Mixed precision (used when trainer.precision is bf16): parameters are gathered and computed in
    # param_dtype, gradients reduced in reduce_dtype, buffers (RoPE tables, ...) kept in buffer_dtype.
    # The sharded master weights and optimizer states stay fp32. In fp32 (CPU) no mixed precision is used.
    param_dtype: str = "bf16"
    reduce_dtype: str = "fp32"
    buffer_dtype: str = "fp32"
    # Recompute each Block's activations in backward (less memory, ~1/3 more compute).
    activation_checkpointing: bool = False
    # sharded: one DCP shard per rank (fast, reshardable on load) | full: one file gathered on rank 0.
    state_dict_type: str = "sharded"
    limit_all_gathers: bool = True
    forward_prefetch: bool = False
    # BACKWARD_PRE | BACKWARD_POST | null
    backward_prefetch: str | None = "BACKWARD_PRE"
    cpu_offload: bool = False
    # true: skip the reduce-scatter on all but the last micro-batch (less communication; full unsharded
    # gradients in param_dtype are kept on every GPU between micro-batches). false: reduce-scatter every
    # micro-batch in reduce_dtype and accumulate the fp32 shard, as one GPU accumulates in fp32.
    no_sync_accumulation: bool = False
    process_group_backend: str | None = None
    timeout_min: int = 30


@dataclass
class AutoStrategyOptions:
    # trainer.strategy=auto with several processes: FSDP when bytes_per_param x parameters is more than
    # fsdp_above_memory_fraction x one GPU's memory, else DDP (train/strategy.py).
    # null: fp32 weights (4) + fp32 gradients (4) + the optimizer's state (AdamW: two fp32 moments, 8).
    bytes_per_param: int | None = None
    fsdp_above_memory_fraction: float = 0.4


@dataclass
class TrainerConfig:
    """The `trainer` group. default: one device (GPU if present, else CPU), sizes for gpt_tiny on a CPU
    (`make train`: ~100k tokens, loss ~10.8 -> ~6.3 in about 2 minutes on 2 cores);
    ddp / fsdp / auto: all GPUs of the node with that strategy (the options blocks below)."""

    name: str = "default"
    accelerator: str = "auto"
    # A number, auto / -1 (all GPUs), a list or "0,1" of device ids. Under srun or torchrun: the launcher's.
    devices: Any = 1
    num_nodes: int = 1
    # auto: one process -> no strategy, several -> ddp or fsdp (the `auto` rule) | ddp | fsdp | any
    # other Lightning strategy name.
    strategy: str = "auto"
    # auto: bf16-mixed on GPU, 32-true on CPU.
    precision: str = "auto"
    # auto: torch.compile on GPU, off on CPU.
    compile: Any = "auto"
    # auto | fa4 | cudnn | sdpa_flash | sdpa | flex | flex_const | triton | chunked | eager | sdpa_dense_bias
    # (| flash_attn if installed): the kernels registered in pelab.models.kernels; train.config checks it.
    attention_backend: str = "auto"
    seq_len: int = 128
    micro_batch_size: int = 4
    # Tokens per optimizer step over all devices; accumulation = global / (micro_batch * seq_len * world).
    global_batch_tokens: int = 512
    max_steps: int = 200
    val_every: int = 25
    log_every: int = 5
    ckpt_every: int = 100
    # Periodic checkpoints kept besides last.ckpt (0: last.ckpt only).
    keep_checkpoints: int = 2
    # Stop with a clear message on a non-finite loss (false: skip that step's update instead).
    stop_on_nonfinite: bool = True
    ddp: DDPOptions = field(default_factory=DDPOptions)
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)
    auto: AutoStrategyOptions = field(default_factory=AutoStrategyOptions)


@dataclass
class LoggerConfig:
    """The `logger` group. metrics.csv is written in every case; `wandb` adds one W&B run per job."""

    name: str = "csv"
    # W&B only (offline, synced later with `wandb sync`, when no API key is configured):
    project: str = "pelab"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # auto | online | offline | disabled
    mode: str = "auto"


@dataclass
class MonitorConfig:
    """The `monitor` group: stability monitoring (train/stability.py; every metric is listed in the README)."""

    name: str = "default"
    # false: only the basic per-step metrics (loss, lr, grad_norm, tokens/s); use it to measure overhead.
    enabled: bool = True
    # Probe pass on a fixed batch of val windows every N steps (and at the last step): per-layer attention
    # max logit / entropy, output logits, param / grad / update RMS, residual RMS, PE stats. 0: off.
    probe_every: int = 200
    probe_batch: int = 4  # sequences
    probe_seq_len: int = 1024  # capped at trainer.seq_len
    # Behind-RoPE diagnostic (non-relative score fraction + per-offset mean score) every M steps and at the end.
    nr_every: int = 1000
    # Residual-stream RMS after these blocks (null: first, middle, last; the embedding output always).
    resid_layers: list[int] | None = None
    # Query rows per chunk when the probe recomputes attention scores.
    chunk: int = 256
    # Spike rule (OLMo-core): loss or grad norm > mean + sigma * std of the previous spike_window steps.
    spike_window: int = 128
    spike_sigma: float = 6.0
    # stability/spike_score: percent of spiking steps among the last N steps.
    spike_score_window: int = 10000


@dataclass
class PathsConfig:
    runs: str = "${oc.env:PELAB_RUNS,runs}"
    data: str = "${oc.env:PELAB_DATA,data_cache}"


@dataclass
class PreemptionConfig:
    """SLURM time limits and preemption (train/slurm.py): on `signal` (sent before the limit) the run saves
    checkpoints/last.ckpt at the end of the current step and requeues its job, at most `max_requeues` times."""

    signal: Any = "SIGUSR1"  # a name or a list of names
    max_requeues: int = 20


@dataclass
class PeriodicEvalConfig:
    """Evaluation during training (train/eval/callback.py): every `every` steps run a `python -m train.eval`
    suite (conf/suite/<suite>.yaml) on the live model with `limit` items; metrics go to metrics.csv and W&B
    as eval/<task>/<metric>. 0 = off."""

    every: int = 0
    suite: str = "zeroshot"
    limit: int | None = 100
    data_dir: str | None = "${oc.env:PELAB_EVAL_DATA,null}"
    # Further train.eval overrides, e.g. ["zeroshot.tasks=[arc_easy,piqa]"].
    overrides: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The root of `python -m train` (conf/config.yaml picks the groups)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pe: Any = None  # the chosen PE's options (schema/pe/<name>)
    data: DataConfig = field(default_factory=DataConfig)
    optim: Any = None  # the chosen optimizer's options (schema/optim/<name>)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seed: int = 0
    # KV-shift add-on (the "w/ KV-shift" rows of the GRAPE tables), usable with every PE.
    kv_shift: bool = False
    # auto: continue from <run_dir>/checkpoints/last.ckpt when it exists; true: require it; false: refuse
    # to reuse a run dir.
    resume: str = "auto"
    run_name: str = "${model.name}-${pe.name}${pelab.if:${kv_shift},-kvshift,''}-${data.name}-s${seed}"
    # Set by the presets in conf/experiment/ (their W&B group and run names).
    experiment_name: str | None = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    # Continued training (e.g. context extension with pe.base=500000 trainer.seq_len=...): start from the
    # weights of this checkpoint or run dir (fresh optimizer and schedule); learned rotary frequencies
    # are adapted to pe.
    init_from: str | None = None
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)


@dataclass
class EvalOptions:
    """The `eval` block of `python -m train.eval` (conf/eval.yaml)."""

    # Local copies of the zero-shot sets (null: the Hugging Face hub). The offline bundle is ../shared/data/eval.
    data_dir: str | None = "${oc.env:PELAB_EVAL_DATA,null}"
    # Items per task (zeroshot), windows per length (ppl_vs_length), samples per cell (retrieval); null: all.
    limit: int | None = None
    batch_size: int = 16
    # Upper bound on tokens per forward batch (rows = min(batch_size, batch_tokens // length)).
    batch_tokens: int = 32768
    device: str = "auto"
    # auto: bf16 autocast on GPU, fp32 on CPU.
    precision: str = "auto"
    # null: the checkpoint's (auto); e.g. chunked for long contexts with an additive-bias PE on CPU.
    attention_backend: str | None = None
    # Training length when the checkpoint has no config.yaml next to it.
    train_len: int | None = None
    out_dir: str | None = None
    # Output name suffix: eval-<tag>.json; null derives one from the pe overrides (e.g. eval-base500000.json).
    tag: str | None = None
    seed: int = 1234
    # Seconds to wait for the Hugging Face hub before declaring it unreachable.
    hub_timeout: float = 5.0


@dataclass
class EvalRunConfig:
    """The root of `python -m train.eval` without the suites' option blocks (added from the suite registry)."""

    # A run directory (-> checkpoints/last.ckpt) or a .ckpt file.
    checkpoint: str | None = None
    # Context extension on top of the checkpoint's PE config (rotary PEs only: rope, ropepp_*, grape_m*);
    # null keeps the trained value. E.g. pe.base=500000 | pe.scaling=linear pe.factor=8 | pe.scaling=yarn
    # pe.factor=16 (original_max_len defaults to the training length when a scaling is set). The
    # checkpoint's PE checks the keys.
    pe: dict[str, Any] = field(
        default_factory=lambda: {"base": None, "scaling": None, "factor": None, "original_max_len": None}
    )
    eval: EvalOptions = field(default_factory=EvalOptions)
    # The suites to run (conf/suite/<name>.yaml chooses them).
    suites: list[str] = field(default_factory=list)
