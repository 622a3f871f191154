"""The one way pelab writes a file: a temp file per writer beside the target, fsync, then `os.replace`
(and a folder, `atomic_dir`: written under a temp name beside the target, then renamed).

A reader never sees half a file, a crash leaves the previous version, and several writers of the same
file (ranks writing config.yaml, processes building the sample corpus) never share a temp file: the
temp name carries the process id and a random suffix. On failure the temp file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def temp_path(path: Path) -> Path:
    """A unique hidden temp name in `path`'s directory (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """`open(path, mode)` whose content replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, *chunks: bytes | np.ndarray) -> None:
    """Write the chunks (bytes or contiguous arrays) as the new content of `path`."""
    with atomic_open(path) as f:
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, text.encode())


def atomic_write_json(path: str | os.PathLike, data: Any, **dump_kwargs) -> None:
    dump_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A folder to fill (yielded, a unique temp folder beside `path`) that becomes `path` only when the block
    finishes without error, replacing what was there; on failure it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_path(path), temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            os.replace(path, old)  # out of the way first, so `path` is missing only between two renames
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
