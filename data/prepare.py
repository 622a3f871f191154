"""Tokenise a text dataset into nanoGPT-format shards (the format and resume rules: pelab.data.writer).

python -m data.prepare data=fineweb_edu data.subset=sample-10BT
python -m data.prepare data=fineweb_edu data.local_files='/path/*.parquet'
python -m data.prepare data=sample
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from pelab.data.config import as_data_config
from pelab.data.hub import require_hub
from pelab.data.ready import ensure_prepared
from pelab.data.shards import load_manifest
from pelab.data.tokenizer import tokenizer_from_cfg
from pelab.data.writer import write_shards

LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json"}


# --------------------------------------------------------------------------- sources


def load_texts(data_cfg) -> tuple[Iterable[str], dict]:
    """Document texts of a hub or local dataset (`data.*` config), and a description of the source."""
    from datasets import load_dataset  # heavy (~2 s); only when shards are built

    if data_cfg.local_files:
        files = resolve_local_files(data_cfg.local_files)
        builder = _local_builder(files)
        for f in files:
            _check_text_column(f, builder)
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=data_cfg.streaming)
        source = {"local_files": [str(f) for f in files]}
    else:
        if not data_cfg.hf_repo:
            raise ValueError(
                f"data={data_cfg.name} names no source: set data.hf_repo=<hub dataset> or data.local_files=..."
            )
        require_hub(
            f"{data_cfg.hf_repo} cannot be downloaded",
            "To prepare from local files instead, download the dataset's parquet files elsewhere and run "
            f"`python -m data.prepare data={data_cfg.name} data.local_files='/path/*.parquet'` "
            "(parquet or jsonl files with a `text` column).",
        )
        ds = load_dataset(data_cfg.hf_repo, name=data_cfg.subset, split=data_cfg.split, streaming=data_cfg.streaming)
        source = {"hf_repo": data_cfg.hf_repo, "subset": data_cfg.subset, "split": data_cfg.split}
    if data_cfg.max_docs:
        ds = ds.take(int(data_cfg.max_docs))
        source["max_docs"] = int(data_cfg.max_docs)
    return (row["text"] for row in ds), source


def resolve_local_files(spec) -> list[Path]:
    """Expand `data.local_files` (a path, a glob, or a list of them) into sorted existing files."""
    patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            raise FileNotFoundError(f"data.local_files: nothing matches {pattern!r}.")
        files += [Path(m) for m in matches]
    return files


def _local_builder(files: list[Path]) -> str:
    """The `datasets` builder for the files' extension (all files must share it)."""
    builders = set()
    for f in files:
        ext = next((e for e in LOCAL_BUILDERS if f.name.endswith(e)), None)
        if ext is None:
            raise ValueError(f"data.local_files: unsupported file type {f.name}; use {', '.join(LOCAL_BUILDERS)}.")
        builders.add(LOCAL_BUILDERS[ext])
    if len(builders) > 1:
        raise ValueError(f"data.local_files mixes {sorted(builders)} files; use one format.")
    return builders.pop()


def _check_text_column(path: Path, builder: str) -> None:
    """Fail early, naming the columns found, if a local file has no `text` column."""
    if builder == "parquet":
        import pyarrow.parquet as pq  # heavy; only for parquet files

        columns = pq.read_schema(path).names
    else:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        columns = list(json.loads(first))
    if "text" not in columns:
        raise ValueError(
            f"{path} has no `text` column (columns found: {', '.join(columns) or 'none'}). "
            "data.local_files needs parquet or jsonl files with the document text in `text`, "
            "like FineWeb-Edu's."
        )


# --------------------------------------------------------------------------- entry points


def prepare(data_cfg, stop_after_shards: int | None = None) -> Path:
    """Build the shards of `data_cfg` (the `data` config node) into `data_cfg.dir`."""
    data_cfg = as_data_config(data_cfg)
    if data_cfg.name == "sample":
        return ensure_prepared(data_cfg)
    tokenizer = tokenizer_from_cfg(data_cfg.tokenizer)
    texts, source = load_texts(data_cfg)
    write_shards(
        texts,
        data_cfg.dir,
        tokenizer,
        prefix=data_cfg.shard_prefix,
        shard_tokens=int(data_cfg.shard_tokens),
        num_proc=data_cfg.num_proc,
        settings={"source": source},
        total_docs=data_cfg.max_docs,
        stop_after_shards=stop_after_shards,
    )
    return Path(data_cfg.dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m data.prepare data=<name> [data.key=value ...]` (Hydra override syntax)."""
    from pelab.train.config import (
        compose,  # the root config (paths.data); pelab.data never imports pelab.train at module level
    )

    cfg = compose(sys.argv[1:] if argv is None else argv)
    try:
        out_dir = prepare(cfg.data)
    except (ConnectionError, FileNotFoundError, ValueError) as e:  # user-facing: the message says what to do
        raise SystemExit(f"data.prepare: {e}") from None
    manifest = load_manifest(out_dir)
    print(
        f"{out_dir}: {len(manifest['shards'])} shards, {manifest['num_tokens']:,} tokens, "
        f"{manifest['num_docs']:,} documents."
    )


if __name__ == "__main__":
    main()
