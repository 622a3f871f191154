"""Data pipeline: offline tokenizers, nanoGPT-format token shards, stateless samplers, Lightning wiring.

    from pelab.data import TokenDataModule, ensure_prepared, load_tokenizer

Names are imported from their submodules on first use, so that `import pelab.data.tokenizer` does not
pull in Lightning.
"""

import importlib

_EXPORTS = {
    "DataConfig": "pelab.data.config",
    "TokenDataModule": "pelab.data.datamodule",
    "ensure_prepared": "pelab.data.ready",
    "HubUnreachable": "pelab.data.hub",
    "prepare": "pelab.data.prepare",
    "TrainWindows": "pelab.data.sampler",
    "ValWindows": "pelab.data.sampler",
    "seq_ids_for": "pelab.data.sampler",
    "ShardError": "pelab.data.shards",
    "find_shards": "pelab.data.shards",
    "load_manifest": "pelab.data.shards",
    "read_shard": "pelab.data.shards",
    "write_shard": "pelab.data.shards",
    "Tokenizer": "pelab.data.tokenizer",
    "load_tokenizer": "pelab.data.tokenizer",
    "tokenizer_from_cfg": "pelab.data.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pelab.data' has no attribute {name!r}")
