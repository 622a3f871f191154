"""The embedded default dataset (`data=sample`): Python's own documentation, built at run time.

Nothing is downloaded or committed: the text is what every CPython install ships, namely the
reference-manual topics of `pydoc_data.topics` and the docstrings of standard-library
modules, classes and functions (both under the PSF licence). On CPython 3.11 that is about
1,600 documents and 390k GPT-2 tokens, identical for a given Python version: enough for smoke
tests and CPU debugging runs; `pelab.data.ready.ensure_prepared` builds it on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

from pelab.data.config import as_data_config
from pelab.data.tokenizer import tokenizer_from_cfg
from pelab.data.writer import write_shards

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding the `data` package
MIN_DOC_CHARS = 200
VAL_FRACTION = 0.05
SKIP_MODULES = {
    "antigravity",
    "this",  # side effects on import: opens a web browser, prints the Zen of Python
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",  # GUI
    "lib2to3",
    "distutils",  # lib2to3 may write grammar caches; setuptools replaces distutils
    "test",
    "tests",
    "idle_test",  # CPython's own test suites
    "encodings",  # a hundred near-identical codec docstrings
    "readline",
    "rlcompleter",  # change the interactive terminal
    "msilib",
    "msvcrt",
    "nt",
    "winreg",
    "winsound",  # Windows only
    "posix",
    "pwd",
    "grp",
    "fcntl",
    "termios",
    "tty",
    "pty",
    "resource",
    "syslog",
    "spwd",
    "crypt",
    "nis",
    "ossaudiodev",
    "curses",  # Unix only
}


def sample_documents() -> list[str]:
    """The corpus, collected in a fresh interpreter.

    In-process collection would depend on the caller: pytest, wandb and others replace stdlib
    attributes such as `sys.unraisablehook`, which changes the docstrings found. A subprocess also
    keeps the ~350 stdlib imports out of the trainer.
    """
    code = (
        "import json, sys; from pelab.data.sample import collect_documents; json.dump(collect_documents(), sys.stdout)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"Collecting the sample corpus failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def collect_documents() -> list[str]:
    """Distinct texts of at least MIN_DOC_CHARS characters, in a fixed pseudo-random order.

    Ordering by content hash (not by name) mixes topics and modules, so the val shard is not
    all one subject.
    """
    from pydoc_data.topics import topics  # imported in the collecting interpreter only (sample_documents)

    texts = {*topics.values()}
    for module in _stdlib_modules():
        texts.update(_docstrings(module))
    docs = [t for t in texts if t and len(t) >= MIN_DOC_CHARS]
    return sorted(docs, key=lambda t: hashlib.sha256(t.encode()).hexdigest())


def _stdlib_modules() -> list[ModuleType]:
    return [m for name in sorted(sys.stdlib_module_names) if _wanted(name) for m in _import_tree(name)]


def _wanted(name: str) -> bool:
    return not name.startswith("_") and name not in SKIP_MODULES


def _import_tree(name: str) -> list[ModuleType]:
    """A module and, for a package, its public submodules; modules that fail to import are skipped."""
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:
        return []
    subs = sorted(info.name for info in pkgutil.iter_modules(getattr(module, "__path__", [])))
    return [module, *(m for sub in subs if _wanted(sub) for m in _import_tree(f"{name}.{sub}"))]


def _docstrings(module: ModuleType) -> list[str]:
    """Docstrings of a module and of the public classes, functions and methods it defines."""
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs += [
                inspect.getdoc(member)
                for attr, member in sorted(vars(obj).items())
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property))
            ]
    return docs


def build_sample(data_cfg) -> Path:
    """Write the sample corpus as shards into `data_cfg.dir`: a val shard of about 5% (at least
    `val_tokens` + 1 tokens) and train shards of `shard_tokens` tokens."""
    data_cfg = as_data_config(data_cfg)
    tokenizer = tokenizer_from_cfg(data_cfg.tokenizer)
    docs = sample_documents()
    num_tokens = sum(1 + len(ids) for ids in tokenizer.encode_batch(docs))
    val_shard_tokens = max(round(VAL_FRACTION * num_tokens), int(data_cfg.val_tokens) + 1)
    print(
        f"sample corpus: {len(docs):,} documents, {num_tokens:,} {tokenizer.name} tokens "
        f"(val shard {val_shard_tokens:,}) -> {data_cfg.dir}"
    )
    source = {"corpus": "pydoc_data.topics + standard-library docstrings", "python": platform.python_version()}
    write_shards(
        docs,
        data_cfg.dir,
        tokenizer,
        prefix=data_cfg.shard_prefix,
        shard_tokens=int(data_cfg.shard_tokens),
        val_shard_tokens=val_shard_tokens,
        settings={"source": source},
        total_docs=len(docs),
    )
    return Path(data_cfg.dir)
