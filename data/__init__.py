"""Data pipeline: offline tokenizers, nanoGPT-format token shards, stateless samplers, Lightning wiring.

    from data import TokenDataModule, ensure_prepared, load_tokenizer

Names are imported from their submodules on first use, so that `import data.tokenizer` does not
pull in Lightning and `python -m data.prepare` does not import itself twice.
"""

import importlib

_EXPORTS = {
    "TokenDataModule": "data.datamodule",
    "ensure_prepared": "data.sample",
    "HubUnreachableError": "data.prepare", "prepare": "data.prepare",
    "TrainWindows": "data.sampler", "ValWindows": "data.sampler", "seq_ids_for": "data.sampler",
    "ShardError": "data.shards", "find_shards": "data.shards", "load_manifest": "data.shards",
    "read_shard": "data.shards", "write_shard": "data.shards",
    "Tokenizer": "data.tokenizer", "load_tokenizer": "data.tokenizer", "tokenizer_from_cfg": "data.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
