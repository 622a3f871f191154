"""`python -m train.eval`: evaluate a checkpoint on the configured suites and write eval[-tag].json/.md.

Writes, next to the checkpoint (its run directory) or to `eval.out_dir`:
  eval.json                 every suite evaluated so far, per checkpoint (keyed by step + content hash:
                            a later run of another suite is merged in, every checkpoint's results are
                            kept; "header"/"suites" at the top are the newest step's);
  eval.md                   the same as tables;
  eval_<suite>.png          the suites' plots (ppl_vs_length, retrieval, babilong).
With PE overrides (context extension, e.g. `pe.base=500000`) the files are named eval-<tag>.* so
they sit beside the unmodified model's results. The numbers are deterministic: evaluating twice
gives the same file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pelab.data.atomic import atomic_write_text
from pelab.data.hub import HubUnreachable
from pelab.train.config import ConfigError, check_known_keys
from pelab.train.eval.checkpoint import CheckpointError, load
from pelab.train.eval.suites import SUITES, EvalError, render_markdown, run_suites
from pelab.train.eval.zeroshot import GPTModel

log = logging.getLogger("pelab.eval")


def auto_tag(pe_overrides: dict) -> str:
    """File-name tag of a set of PE overrides: base500000, linear8, yarn32-orig4096, ..."""
    o = dict(pe_overrides)
    parts = []
    if "base" in o:
        parts.append(f"base{float(o.pop('base')):.0f}")
    if o.get("scaling", "none") != "none":
        parts.append(f"{o.pop('scaling')}{float(o.pop('factor', 1.0)):g}")
    if "original_max_len" in o:
        parts.append(f"orig{int(o.pop('original_max_len'))}")
    parts += [f"{k}{v}" for k, v in sorted(o.items())]
    return "-".join(parts).replace("/", "_").replace(" ", "")


def checkpoint_key(header: dict) -> str:
    """A checkpoint's identity in eval.json: its step and content hash (the same file evaluated as a run
    dir, a step file or an absolute path is one entry; an older step file is another)."""
    return f"step-{int(header.get('step', 0)):08d}-{(header.get('sha256') or 'unknown')[:12]}"


def write_outputs(out_dir: Path, stem: str, header: dict, results: dict) -> dict:
    """Merge `results` into <out_dir>/<stem>.json and rewrite <stem>.md. The file keeps every checkpoint's
    results under "checkpoints" (keyed by `checkpoint_key`); "header"/"suites" are those of the newest
    step evaluated (what eval.md shows)."""
    path = out_dir / f"{stem}.json"
    entries: dict[str, dict] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            entries = old.get("checkpoints") or {
                checkpoint_key(old["header"]): {k: old[k] for k in ("header", "suites")}
            }
        except (ValueError, KeyError, TypeError):
            log.warning("%s is not an eval file of this version; rewriting it", path)
    key = checkpoint_key(header)
    suites = {**entries.get(key, {}).get("suites", {}), **results}
    entries[key] = {"header": header, "suites": {k: suites[k] for k in SUITES if k in suites}}
    newest = entries[max(entries, key=lambda k: (entries[k]["header"].get("step", 0), k == key))]
    doc = {**newest, "checkpoints": dict(sorted(entries.items()))}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False, allow_nan=True) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", render_markdown(doc))
    return doc


def check_request(cfg: DictConfig) -> None:
    """Values that cannot work, refused before the checkpoint is loaded (one line naming key and fix)."""
    try:
        check_known_keys(cfg)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    if not cfg.checkpoint:
        raise EvalError("checkpoint=<run dir or .ckpt file> is required")
    e = cfg.eval
    if e.limit is not None and e.limit <= 0:
        raise EvalError(f"eval.limit={e.limit} must be positive, or null for every item")
    for key in ("batch_size", "batch_tokens"):
        if e[key] <= 0:
            raise EvalError(f"eval.{key}={e[key]} must be positive")
    if e.data_dir and not Path(e.data_dir).expanduser().is_dir():
        raise EvalError(
            f"eval.data_dir={e.data_dir} is not a directory; pass the directory of the local task copies "
            f"(e.g. ../shared/data/eval), or leave it unset to use the Hugging Face hub"
        )
    multiples = OmegaConf.select(cfg, "ppl.multiples") or []
    if "ppl_vs_length" in cfg.suites and any(float(m) <= 0 for m in multiples):
        raise EvalError(f"ppl.multiples={list(multiples)} must all be positive multiples of the training length")


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate `cfg.checkpoint` on `cfg.suites`; returns the written eval document."""
    check_request(cfg)
    e = cfg.eval
    loaded = load(
        cfg.checkpoint,
        OmegaConf.to_container(cfg.pe, resolve=True),
        device=e.device,
        precision=e.precision,
        attention_backend=e.attention_backend,
        train_len=e.train_len,
    )
    out_dir = Path(e.out_dir) if e.out_dir else loaded.run_dir
    tag = e.tag or auto_tag(loaded.pe_overrides)
    stem = "eval" + (f"-{tag}" if tag else "")
    lm = GPTModel(loaded.model, loaded.device, loaded.autocast_dtype)
    title = f"{loaded.model_cfg.get('name')} {loaded.pe.get('name')} step {loaded.step}" + (f" ({tag})" if tag else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    header = loaded.describe()

    def save_partial(suite: str, result: dict) -> None:  # a stopped evaluation keeps its finished parts
        write_outputs(out_dir, stem, header, {suite: result})

    results = run_suites(
        lm, loaded.tokenizer, loaded.train_cfg, loaded.train_len, cfg, out_dir, stem, title, save_partial
    )
    doc = write_outputs(out_dir, stem, header, results)
    print(f"\neval      {out_dir / (stem + '.json')}\ntable     {out_dir / (stem + '.md')}")
    for suite in results:
        plot = results[suite].get("plot")
        if plot:
            print(f"plot      {out_dir / plot}")
    return doc


def eval_job(cfg: DictConfig) -> None:
    """The Hydra task of `python -m train.eval`: a bad request is one logged line and exit status 2."""
    try:
        run_eval(cfg)
    except (EvalError, CheckpointError, ConfigError, HubUnreachable) as err:
        log.error("%s", err)
        raise SystemExit(2) from None
