"""The shard directory a config names, ready to read: checked against its manifest and tokenizer.

The embedded sample corpus (`data=sample`) is (re)built here on demand; any other dataset must have
been prepared with `python -m data.prepare data=<name>`, and the error says so.
"""

from __future__ import annotations

from pathlib import Path

from pelab.data.config import as_data_config
from pelab.data.sample import build_sample
from pelab.data.shards import MANIFEST, ShardError, verify_manifest
from pelab.data.tokenizer import Tokenizer, tokenizer_from_cfg


def ensure_prepared(data_cfg) -> Path:
    """The shard directory of `data_cfg` (the `data` config node or a dict), checked (see the module doc)."""
    data_cfg = as_data_config(data_cfg)
    out_dir = Path(data_cfg.dir)
    try:
        manifest = verify_manifest(out_dir, data_cfg.name)
    except ShardError:
        if data_cfg.name != "sample":
            raise
        (out_dir / MANIFEST).unlink(missing_ok=True)  # rebuild an incomplete or damaged sample from scratch
        build_sample(data_cfg)
        manifest = verify_manifest(out_dir, data_cfg.name)
    check_tokenizer(manifest, tokenizer_from_cfg(data_cfg.tokenizer), out_dir)
    return out_dir


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, shard_dir: Path) -> None:
    """Refuse shards made with another tokenizer: their ids would mean different tokens."""
    made = manifest["tokenizer"]
    wanted = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
    if made != wanted:
        raise ShardError(
            f"{shard_dir} was tokenized with {made}, but the config asks for {wanted}. Prepare the data "
            "again with this tokenizer into another data.dir, or set data.tokenizer to match."
        )
