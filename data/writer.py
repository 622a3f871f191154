"""Tokenise documents into nanoGPT-format shards, resumably (`data.prepare` and the sample corpus).

Each document becomes `[eot] + encode(text)`; documents are concatenated into shards of `shard_tokens`
tokens (a document that does not fit continues in the next shard, as in nanoGPT); shard 0 is the
validation shard. After every shard a small state file records how far it got, so a killed run
continues without duplicating or losing documents. `manifest.json` is written last and marks the
directory as complete.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from pelab.data.atomic import atomic_write_json
from pelab.data.shards import MANIFEST, ShardError, load_manifest, shard_name, token_dtype, write_manifest, write_shard
from pelab.data.tokenizer import Tokenizer
from tqdm import tqdm

STATE = "prepare_state.json"


@dataclass
class ResumeState:
    """Where a preparation stands after its last completed shard."""

    docs_done: int = 0  # documents whose tokens are all in written shards
    next_shard: int = 0  # index of the shard being filled
    doc_offset: int = 0  # tokens of document `docs_done` already in written shards


class ShardPacker:
    """Concatenate documents into fixed-size shards and save a resume point after each one."""

    def __init__(
        self,
        out_dir: Path,
        prefix: str,
        dtype,
        shard_tokens: int,
        val_shard_tokens: int,
        start: ResumeState,
        settings: dict,
    ):
        self.out_dir, self.prefix, self.settings = out_dir, prefix, settings
        self.sizes = (val_shard_tokens, shard_tokens)
        self.docs_done = start.docs_done
        self.next_shard = start.next_shard
        self.skip_tokens = start.doc_offset  # of the first document, already in earlier shards
        self.buf = np.empty(self._size(self.next_shard), dtype=dtype)
        self.fill = 0
        self.shards_written = 0

    def _size(self, idx: int) -> int:
        return self.sizes[0] if idx == 0 else self.sizes[1]

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's tokens."""
        already, self.skip_tokens = self.skip_tokens, 0
        tokens = tokens[already:]
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                done = pos == len(tokens)
                self._flush(ResumeState(self.docs_done + done, self.next_shard + 1, 0 if done else already + pos))
        self.docs_done += 1

    def finish(self) -> None:
        """Write the last, partial shard."""
        if self.fill:
            self._flush(ResumeState(self.docs_done, self.next_shard + 1, 0))

    def _flush(self, resume_point: ResumeState) -> None:
        write_shard(
            self.out_dir / shard_name(self.prefix, self.next_shard), self.buf[: self.fill], dtype=self.buf.dtype
        )
        atomic_write_json(self.out_dir / STATE, {"settings": self.settings, **asdict(resume_point)})
        self.next_shard += 1
        self.shards_written += 1
        self.buf = np.empty(self._size(self.next_shard), dtype=self.buf.dtype)
        self.fill = 0


def write_shards(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    prefix: str,
    shard_tokens: int,
    val_shard_tokens: int | None = None,
    num_proc: int = 1,
    settings: dict,
    total_docs: int | None = None,
    stop_after_shards: int | None = None,
) -> dict | None:
    """Tokenise `texts` into shards in `out_dir`, resuming a previous run with the same settings.

    `settings` (JSON-able) identifies the run: a state file or manifest made with other settings
    is refused rather than mixed in. `stop_after_shards` stops (as a kill would) once that many
    shards were written by this call and returns None; otherwise the manifest is returned.
    """
    out_dir = Path(out_dir)
    settings = {
        **settings,
        "prefix": prefix,
        "shard_tokens": shard_tokens,
        "val_shard_tokens": val_shard_tokens or shard_tokens,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
    }
    settings = json.loads(json.dumps(settings))  # compare like with like after a JSON round trip
    start = _start_or_resume(out_dir, settings)
    if start is None:
        return load_manifest(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    packer = ShardPacker(out_dir, prefix, dtype, shard_tokens, val_shard_tokens or shard_tokens, start, settings)
    texts = islice(texts, start.docs_done, None)
    with _encoded_docs(texts, tokenizer, dtype, num_proc) as docs:
        for tokens in tqdm(docs, initial=start.docs_done, total=total_docs, unit="docs", desc=f"tokenizing {out_dir}"):
            packer.add(tokens)
            if stop_after_shards is not None and packer.shards_written >= stop_after_shards:
                return None
        packer.finish()
    if packer.next_shard < 2:
        raise ValueError(
            f"{out_dir}: the data fills only the val shard ({settings['val_shard_tokens']} tokens), "
            "so there is no train shard. Lower data.shard_tokens or use more documents."
        )
    manifest = write_manifest(
        out_dir, tokenizer, num_docs=packer.docs_done, source=settings["source"], settings=settings
    )
    (out_dir / STATE).unlink()
    return manifest


def _start_or_resume(out_dir: Path, settings: dict) -> ResumeState | None:
    """Where to start: None if already complete, the saved resume point, or a clean start."""
    if (out_dir / MANIFEST).is_file():
        _check_same_settings(out_dir / MANIFEST, load_manifest(out_dir).get("settings"), settings)
        print(f"{out_dir} is already prepared ({MANIFEST} present); nothing to do.")
        return None
    for tmp in out_dir.glob(".*.tmp"):  # left by a killed atomic write
        tmp.unlink()
    if (out_dir / STATE).is_file():
        saved = json.loads((out_dir / STATE).read_text())
        _check_same_settings(out_dir / STATE, saved.pop("settings"), settings)
        print(f"Resuming {out_dir}: {saved['docs_done']} documents done, next shard {saved['next_shard']}.")
        return ResumeState(**saved)
    for stale in [*out_dir.glob("*_val_*.bin"), *out_dir.glob("*_train_*.bin")]:  # an unfinished first shard
        stale.unlink()
    return ResumeState()


def _check_same_settings(path: Path, saved: dict | None, settings: dict) -> None:
    if saved != settings:
        raise ShardError(
            f"{path} was made with other settings:\n  saved: {saved}\n  now:   {settings}\n"
            f"Delete {path.parent} to rebuild it, or choose another data.dir."
        )


# ---- tokenising

_worker: dict = {}


def _init_worker(tokenizer: Tokenizer, dtype) -> None:
    _worker.update(tokenizer=tokenizer, dtype=np.dtype(dtype))


def _encode_doc(text: str) -> np.ndarray:
    """[eot] + tokens of one document, in the shard dtype."""
    tokenizer = _worker["tokenizer"]
    return np.array([tokenizer.eot_id, *tokenizer.encode(text)], dtype=_worker["dtype"])


@contextlib.contextmanager
def _encoded_docs(texts: Iterable[str], tokenizer: Tokenizer, dtype, num_proc: int) -> Iterator[Iterator[np.ndarray]]:
    """Encoded documents in input order, from a process pool when num_proc > 1.

    Workers are spawned, not forked: the parent already runs `datasets`/pyarrow threads, and
    forking a threaded process can deadlock. The tokenizer pickles as its file paths.
    """
    if num_proc <= 1:
        _init_worker(tokenizer, dtype)
        yield map(_encode_doc, texts)
        return
    with mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, dtype)) as pool:
        yield pool.imap(_encode_doc, texts, chunksize=16)
