"""`python -m train.eval checkpoint=<run dir or .ckpt> suite=<zeroshot|ppl_vs_length|retrieval|babilong|all> [...]`.

Writes, next to the checkpoint (its run directory) or to `eval.out_dir`:
  eval.json                 every suite evaluated so far for this checkpoint (a later run of another
                            suite is merged in; a newer checkpoint replaces the file);
  eval.md                   the same as tables;
  eval_ppl_vs_length.png    perplexity vs length and per-position loss (suite ppl_vs_length);
  eval_retrieval.png        accuracy heat maps, depth x length (suite retrieval);
  eval_babilong.png         exact-match heat map, task x length (suite babilong).
With PE overrides (context extension, e.g. `pe.base=500000`) the files are named eval-<tag>.* so
they sit beside the unmodified model's results. The numbers are deterministic: evaluating twice
gives the same file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import pelab.train.config  # noqa: F401  (registers resolvers before Hydra composes)
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("pelab.eval")

SUITES = ("zeroshot", "ppl_vs_length", "retrieval", "babilong")


class EvalError(ValueError):
    """A problem with the evaluation request; the message names the fix."""


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


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


def run_suites(
    lm,
    tokenizer,
    train_cfg,
    train_len: int,
    cfg: DictConfig,
    out_dir: Path | None = None,
    stem: str = "eval",
    title: str = "",
) -> dict:
    """Run `cfg.suites` on a scorer model; returns {suite: results}. Plots go to `out_dir` when given."""
    from pelab.train.eval.zeroshot import Scorer

    e = cfg.eval
    limit = None if e.get("limit") is None else int(e.limit)
    unknown = [s for s in cfg.suites if s not in SUITES]
    if unknown:
        raise EvalError(f"unknown suite(s) {unknown}; choose from {list(SUITES)} or suite=all")
    results = {}
    for suite in cfg.suites:
        if suite == "zeroshot":
            from pelab.train.eval.zeroshot import run_zeroshot

            zs = cfg.zeroshot
            scorer = Scorer(
                lm,
                tokenizer,
                max_length=int(zs.get("max_length") or train_len),
                batch_size=int(e.batch_size),
                batch_tokens=e.get("batch_tokens"),
            )
            res = run_zeroshot(
                scorer, _plain(zs), data_dir=e.get("data_dir"), limit=limit, hub_timeout=float(e.get("hub_timeout", 5))
            )
            res["settings"] = {
                "max_length": scorer.max_length,
                "num_fewshot": 0,
                "limit": limit,
                "data_dir": e.get("data_dir"),
            }
        elif suite == "ppl_vs_length":
            from pelab.train.eval.ppl import heldout_tokens, plot_ppl, ppl_vs_length

            p = cfg.ppl
            tokens, source = heldout_tokens(train_cfg, tokenizer, p.get("text_file"))
            max_tokens = p.get("max_tokens")
            if max_tokens is None and not p.get("text_file") and train_cfg is not None:
                max_tokens = int(train_cfg.data.val_tokens)
            res = ppl_vs_length(
                lm,
                tokens,
                train_len,
                list(p.multiples),
                max_tokens=max_tokens,
                limit=limit,
                batch_tokens=int(e.batch_tokens),
                curve_points=int(p.curve_points),
            )
            res["source"] = source
            res["max_tokens"] = max_tokens
            if out_dir is not None:
                res["plot"] = plot_ppl(res, out_dir / f"{stem}_ppl_vs_length.png", title).name
        elif suite == "babilong":
            from pelab.train.eval.babilong import run_suite

            res = run_suite(lm, tokenizer, train_cfg, train_len, cfg, out_dir, stem, title, limit)
        else:
            from pelab.train.eval.ppl import heldout_tokens
            from pelab.train.eval.retrieval import plot_retrieval, run_retrieval

            r = cfg.retrieval
            tokens, source = heldout_tokens(train_cfg, tokenizer, r.get("text_file"))
            scorer = Scorer(
                lm, tokenizer, max_length=train_len, batch_size=int(e.batch_size), batch_tokens=e.get("batch_tokens")
            )
            res = run_retrieval(
                scorer,
                tokenizer,
                tokens,
                train_len,
                tasks=list(r.tasks),
                lengths=r.get("lengths"),
                multiples=list(r.multiples),
                depths=list(r.depths),
                samples=int(r.samples),
                seed=int(e.seed),
                limit=limit,
            )
            res["haystack"] = source
            if out_dir is not None:
                res["plot"] = plot_retrieval(res, out_dir / f"{stem}_retrieval.png", title).name
        results[suite] = res
    return results


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Scalars of suite results for loggers: eval/<task>/<metric>, eval/ppl/<m>x, eval/retrieval/<task>."""
    out = {}
    zs = results.get("zeroshot")
    if zs:
        for task, r in zs["tasks"].items():
            for k in ("acc", "acc_norm", "perplexity"):
                if k in r:
                    out[f"{prefix}/{task}/{k}"] = float(r[k])
        if "average" in zs:
            out[f"{prefix}/zeroshot_avg/acc"] = float(zs["average"]["acc"])
    pl = results.get("ppl_vs_length")
    if pl:
        for k, r in pl["lengths"].items():
            if "loss" in r:
                out[f"{prefix}/ppl/{k}"] = float(r["ppl"])
                out[f"{prefix}/loss/{k}"] = float(r["loss"])
    rt = results.get("retrieval")
    if rt:
        for task, r in rt["tasks"].items():
            if r.get("mean") is not None:
                out[f"{prefix}/retrieval/{task}"] = float(r["mean"])
    if results.get("babilong"):
        from pelab.train.eval.babilong import metrics

        out.update(metrics(results["babilong"], prefix))
    return out


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def render_markdown(doc: dict) -> str:
    h = doc["header"]
    lines = [
        f"# Evaluation of `{h['checkpoint']}`",
        "",
        f"step {h['step']} | model {h['model']} | pe `{json.dumps(h['pe'], sort_keys=True)}` | "
        f"training length {h['train_len']} | {h['device']} {h['precision']}",
        "",
    ]
    if h.get("pe_overrides"):
        lines += [f"PE overrides (context extension): `{json.dumps(h['pe_overrides'], sort_keys=True)}`", ""]
    for note in h.get("notes", []):
        lines += [f"- {note}"]
    s = doc["suites"]
    if "zeroshot" in s:
        z = s["zeroshot"]
        lines += [
            "## zeroshot (0-shot, lm-evaluation-harness prompts)",
            "",
            "| task | split | n | acc | acc_norm | perplexity | source |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, r in z["tasks"].items():
            if "skipped" in r:
                lines.append(f"| {task} | - | - | - | - | - | skipped: {r['skipped']} |")
                continue
            acc = f"{_fmt(r['acc'])} ± {_fmt(r['acc_stderr'])}"
            norm = f"{_fmt(r['acc_norm'])} ± {_fmt(r['acc_norm_stderr'])}" if "acc_norm" in r else "-"
            src = Path(r["source"]).name if not r["source"].startswith("hf:") else r["source"]
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(
                f"| {task} | {r['split']} | {r['n']} | {acc} | {norm} | {_fmt(r.get('perplexity'), 2)} | {src}{note} |"
            )
        if "average" in z:
            a = z["average"]
            lines += [
                "",
                f"Average acc over {len(a['tasks'])} GRAPE tasks ({', '.join(a['tasks'])}): "
                f"**{_fmt(a['acc'])}**" + ("" if a["complete"] else " (incomplete)"),
            ]
        lines.append("")
    if "ppl_vs_length" in s:
        p = s["ppl_vs_length"]
        lines += [
            f"## ppl_vs_length (held-out: {p['source']}; training length {p['train_len']})",
            "",
            "| length | x train | windows | loss | ppl | loss within train len | loss beyond |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, r in p["lengths"].items():
            if "skipped" in r:
                lines.append(f"| {r['length']} | {k} | - | - | - | - | skipped: {r['skipped']} |")
            else:
                lines.append(
                    f"| {r['length']} | {k} | {r['windows']} | {_fmt(r['loss'])} | {_fmt(r['ppl'], 2)} | "
                    f"{_fmt(r['loss_within_train_len'])} | {_fmt(r.get('loss_beyond_train_len'))} |"
                )
        if p.get("plot"):
            lines += ["", f"![ppl vs length]({p['plot']})"]
        lines.append("")
    if "retrieval" in s:
        r = s["retrieval"]
        L = r["lengths"]
        lines += [
            f"## retrieval ({r['samples']} samples per cell; {r['metric']})",
            "",
            "| task | mean | " + " | ".join(f"{x} tok" for x in L) + " |",
            "|---|---|" + "---|" * len(L),
        ]
        for task, t in r["tasks"].items():
            cols = " | ".join(_fmt(t["per_length"].get(str(x)), 3) for x in L)
            lines.append(f"| {task} | {_fmt(t['mean'], 3)} | {cols} |")
        if r.get("plot"):
            lines += ["", f"![retrieval]({r['plot']})"]
        lines.append("")
    if "babilong" in s:
        from pelab.train.eval.babilong import markdown

        lines += markdown(s["babilong"], _fmt)
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_outputs(out_dir: Path, stem: str, header: dict, results: dict) -> dict:
    """Merge `results` into <out_dir>/<stem>.json (same checkpoint and step) and rewrite <stem>.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
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
    _atomic_write(path, json.dumps(doc, indent=1, sort_keys=False, allow_nan=True) + "\n")
    _atomic_write(out_dir / f"{stem}.md", render_markdown(doc))
    return doc


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate `cfg.checkpoint` on `cfg.suites`; returns the written eval document."""
    from pelab.train.eval.checkpoint import load
    from pelab.train.eval.zeroshot import GPTModel

    if not cfg.get("checkpoint"):
        raise EvalError("checkpoint=<run dir or .ckpt file> is required")
    e = cfg.eval
    loaded = load(
        cfg.checkpoint,
        _plain(cfg.pe),
        device=e.device,
        precision=e.precision,
        attention_backend=e.get("attention_backend"),
        train_len=e.get("train_len"),
    )
    out_dir = Path(e.out_dir) if e.get("out_dir") else loaded.run_dir
    tag = e.get("tag") or auto_tag(loaded.pe_overrides)
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


@hydra.main(config_path="../../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pelab.train.eval.checkpoint import CheckpointError
    from pelab.train.eval.tasks import HubUnreachable

    try:
        run_eval(cfg)
    except (EvalError, CheckpointError, HubUnreachable) as err:
        log.error("%s", err)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
