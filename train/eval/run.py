"""`python -m train.eval`: evaluate a checkpoint on the configured suites and write eval[-tag].json/.md.

Writes, next to the checkpoint (its run directory) or to `eval.out_dir`:
  eval.json                 every suite evaluated so far for this checkpoint (a later run of another
                            suite is merged in; a newer checkpoint replaces the file);
  eval.md                   the same as tables;
  eval_<suite>.png          the suites' plots (ppl_vs_length, retrieval).
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


def write_outputs(out_dir: Path, stem: str, header: dict, results: dict) -> dict:
    """Merge `results` into <out_dir>/<stem>.json (same checkpoint and step) and rewrite <stem>.md."""
    path = out_dir / f"{stem}.json"
    doc = {"header": header, "suites": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if {k: old["header"].get(k) for k in ("checkpoint", "step", "pe")} == {
                k: header.get(k) for k in ("checkpoint", "step", "pe")
            }:
                doc["suites"] = old.get("suites", {})
        except (ValueError, KeyError):
            pass
    doc["suites"].update(results)
    doc["suites"] = {k: doc["suites"][k] for k in SUITES if k in doc["suites"]}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False, allow_nan=True) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", render_markdown(doc))
    return doc


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate `cfg.checkpoint` on `cfg.suites`; returns the written eval document."""
    if not cfg.checkpoint:
        raise EvalError("checkpoint=<run dir or .ckpt file> is required")
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
    results = run_suites(lm, loaded.tokenizer, loaded.train_cfg, loaded.train_len, cfg, out_dir, stem, title)
    doc = write_outputs(out_dir, stem, loaded.describe(), results)
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
    except (EvalError, CheckpointError, HubUnreachable) as err:
        log.error("%s", err)
        raise SystemExit(2) from None
