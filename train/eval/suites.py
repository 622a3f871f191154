"""Every evaluation suite as one object: its options, how it runs, its scalars and its tables.

A suite is a `Suite` subclass registered with `@register`: `Options` is the schema of its block in the
eval config (`zeroshot.*`, `ppl.*`, `retrieval.*`, `babilong.*`; conf/suite/<name>.yaml selects the suite),
`run` computes its result (a JSON-able dict in eval.json), `metrics` gives the scalars loggers get
(eval/<...>, also during training) and `markdown` its section of eval.md. `run_suites`, `flat_metrics`
and `render_markdown` do the same for every suite of a config. Adding a suite: its computation in a
module of train/eval/, a `Suite` here, and conf/suite/<name>.yaml.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from pelab.train.eval import babilong, retrieval
from pelab.train.eval.ppl import heldout_tokens, plot_ppl, ppl_vs_length
from pelab.train.eval.tasks import TASKS as ZEROSHOT_TASKS
from pelab.train.eval.zeroshot import Scorer, run_zeroshot


class EvalError(ValueError):
    """A problem with the evaluation request; the message names the fix."""


@dataclass
class SuiteContext:
    """What every suite gets: the model (a scorer model, `GPTModel` or `FnModel`), its tokenizer and
    training config and length, the `eval` options block, and where plots go (None: no plots)."""

    lm: Any
    tokenizer: Any
    train_cfg: DictConfig | None
    train_len: int
    options: Any
    out_dir: Path | None = None
    stem: str = "eval"
    title: str = ""
    # save_partial(suite, result so far): a long suite saves each finished part (None: only the end result).
    save_partial: Any = None

    @property
    def limit(self) -> int | None:
        return None if self.options.limit is None else int(self.options.limit)

    def scorer(self, max_length: int) -> Scorer:
        o = self.options
        return Scorer(self.lm, self.tokenizer, max_length, batch_size=int(o.batch_size), batch_tokens=o.batch_tokens)


class Suite:
    name: ClassVar[str]  # suite=<name>; its key in eval.json
    options_key: ClassVar[str]  # its options block in the eval config
    Options: ClassVar[type]  # that block's schema

    def run(self, ctx: SuiteContext, opts) -> dict:
        raise NotImplementedError

    def metrics(self, result: dict) -> dict[str, float]:
        """Scalars of a result, named under eval/ without the prefix (e.g. "ppl/2x")."""
        return {}

    def markdown(self, result: dict) -> list[str]:
        return []


SUITES: dict[str, Suite] = {}


def register(cls: type[Suite]) -> type[Suite]:
    if cls.name in SUITES:
        raise ValueError(f"eval suite {cls.name!r} registered twice")
    SUITES[cls.name] = cls()
    return cls


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


# ---- the suites ----------------------------------------------------------------------------------------


@dataclass
class ZeroshotOptions:
    tasks: list[str] = field(default_factory=lambda: list(ZEROSHOT_TASKS))
    # Tokens the model sees per request (longer contexts are cut from the left); null: the training length.
    max_length: int | None = None
    # task -> local file (jsonl/json/parquet or a save_to_disk dir), overriding eval.data_dir and the hub.
    files: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(ZEROSHOT_TASKS))


@register
class Zeroshot(Suite):
    """Zero-shot multiple choice / LAMBADA with lm-evaluation-harness prompts and metrics (0-shot, as GRAPE)."""

    name, options_key, Options = "zeroshot", "zeroshot", ZeroshotOptions

    def run(self, ctx, opts):
        o = ctx.options
        scorer = ctx.scorer(int(opts.max_length or ctx.train_len))
        res = run_zeroshot(scorer, _plain(opts), data_dir=o.data_dir, limit=ctx.limit, hub_timeout=float(o.hub_timeout))
        res["settings"] = {
            "max_length": scorer.max_length,
            "num_fewshot": 0,
            "limit": ctx.limit,
            "data_dir": o.data_dir,
        }
        return res

    def metrics(self, result):
        out = {}
        for task, r in result["tasks"].items():
            out.update({f"{task}/{k}": float(r[k]) for k in ("acc", "acc_norm", "perplexity") if k in r})
        if "average" in result:
            out["zeroshot_avg/acc"] = float(result["average"]["acc"])
        return out

    def markdown(self, result):
        lines = [
            "## zeroshot (0-shot, lm-evaluation-harness prompts)",
            "",
            "| task | split | n | acc | acc_norm | perplexity | source |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, r in result["tasks"].items():
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
        if "average" in result:
            a = result["average"]
            lines += [
                "",
                f"Average acc over {len(a['tasks'])} GRAPE tasks ({', '.join(a['tasks'])}): "
                f"**{_fmt(a['acc'])}**" + ("" if a["complete"] else " (incomplete)"),
            ]
        return lines


@dataclass
class PplOptions:
    multiples: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    # Tokens scored per length (windows = max_tokens // length, at least one); null: the training config's
    # data.val_tokens, so that 1x scores exactly the trainer's validation windows.
    max_tokens: int | None = None
    # A text file instead of the training data's validation shard.
    text_file: str | None = None
    curve_points: int = 256


@register
class PplVsLength(Suite):
    """Perplexity at multiples of the training length on held-out text, with per-position loss curves."""

    name, options_key, Options = "ppl_vs_length", "ppl", PplOptions

    def run(self, ctx, opts):
        tokens, source = heldout_tokens(ctx.train_cfg, ctx.tokenizer, opts.text_file)
        max_tokens = opts.max_tokens
        if max_tokens is None and not opts.text_file and ctx.train_cfg is not None:
            max_tokens = int(ctx.train_cfg.data.val_tokens)
        res = ppl_vs_length(
            ctx.lm,
            tokens,
            ctx.train_len,
            list(opts.multiples),
            max_tokens=max_tokens,
            limit=ctx.limit,
            batch_tokens=int(ctx.options.batch_tokens),
            curve_points=int(opts.curve_points),
        )
        res["source"] = source
        res["max_tokens"] = max_tokens
        if ctx.out_dir is not None:
            res["plot"] = plot_ppl(res, ctx.out_dir / f"{ctx.stem}_ppl_vs_length.png", ctx.title).name
        return res

    def metrics(self, result):
        out = {}
        for k, r in result["lengths"].items():
            if "loss" in r:
                out[f"ppl/{k}"] = float(r["ppl"])
                out[f"loss/{k}"] = float(r["loss"])
        return out

    def markdown(self, result):
        lines = [
            f"## ppl_vs_length (held-out: {result['source']}; training length {result['train_len']})",
            "",
            "| length | x train | windows | loss | ppl | loss within train len | loss beyond |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, r in result["lengths"].items():
            if "skipped" in r:
                lines.append(f"| {r['length']} | {k} | - | - | - | - | skipped: {r['skipped']} |")
            else:
                lines.append(
                    f"| {r['length']} | {k} | {r['windows']} | {_fmt(r['loss'])} | {_fmt(r['ppl'], 2)} | "
                    f"{_fmt(r['loss_within_train_len'])} | {_fmt(r.get('loss_beyond_train_len'))} |"
                )
        if result.get("plot"):
            lines += ["", f"![ppl vs length]({result['plot']})"]
        return lines


@dataclass
class RetrievalOptions:
    tasks: list[str] = field(default_factory=lambda: list(retrieval.TASKS))
    # Prompt lengths as multiples of the training length, or absolute token counts in `lengths`.
    multiples: list[float] = field(default_factory=lambda: [1, 2, 4])
    lengths: list[int] | None = None
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 10
    text_file: str | None = None


@register
class Retrieval(Suite):
    """Passkey, needle-in-a-haystack and RULER-style synthetic retrieval over held-out text; greedy decoding."""

    name, options_key, Options = "retrieval", "retrieval", RetrievalOptions

    def run(self, ctx, opts):
        tokens, source = heldout_tokens(ctx.train_cfg, ctx.tokenizer, opts.text_file)
        res = retrieval.run_retrieval(
            ctx.scorer(ctx.train_len),
            ctx.tokenizer,
            tokens,
            ctx.train_len,
            tasks=list(opts.tasks),
            lengths=opts.lengths,
            multiples=list(opts.multiples),
            depths=list(opts.depths),
            samples=int(opts.samples),
            seed=int(ctx.options.seed),
            limit=ctx.limit,
            on_cell=(lambda partial: ctx.save_partial(self.name, {**partial, "partial": True}))
            if ctx.save_partial
            else None,
        )
        res["haystack"] = source
        if ctx.out_dir is not None:
            res["plot"] = retrieval.plot_retrieval(res, ctx.out_dir / f"{ctx.stem}_retrieval.png", ctx.title).name
        return res

    def metrics(self, result):
        return {
            f"retrieval/{task}": float(r["mean"]) for task, r in result["tasks"].items() if r.get("mean") is not None
        }

    def markdown(self, result):
        lengths = result["lengths"]
        lines = [
            f"## retrieval ({result['samples']} samples per cell; {result['metric']})",
            "",
            "| task | mean | " + " | ".join(f"{x} tok" for x in lengths) + " |",
            "|---|---|" + "---|" * len(lengths),
        ]
        for task, t in result["tasks"].items():
            cols = " | ".join(_fmt(t["per_length"].get(str(x)), 3) for x in lengths)
            lines.append(f"| {task} | {_fmt(t['mean'], 3)} | {cols} |")
        if result.get("plot"):
            lines += ["", f"![retrieval]({result['plot']})"]
        return lines


@dataclass
class BabilongOptions:
    tasks: list[str] = field(default_factory=lambda: list(babilong.TASKS))
    # Prompt lengths as multiples of the training length, or absolute token counts in `lengths`.
    multiples: list[float] = field(default_factory=lambda: [1, 2, 4])
    lengths: list[int] | None = None
    # null: each sentence at its own uniform-random depth, in story order (BABILong); a list of depths in
    # [0, 1]: the story kept together at each depth (one more grid axis, as in retrieval).
    depths: list[float] | None = None
    samples: int = 20
    # A text file for the haystack instead of the training data's validation shard.
    text_file: str | None = None


@register
class Babilong(Suite):
    """BABILong-style reasoning in a haystack: bAbI-style stories (qa1-qa5, generated by pelab.train.eval.babilong)
    scattered through held-out text; exact match of the greedily generated one-word answer."""

    name, options_key, Options = "babilong", "babilong", BabilongOptions

    def run(self, ctx, opts):
        tokens, source = heldout_tokens(ctx.train_cfg, ctx.tokenizer, opts.text_file)
        res = babilong.run_babilong(
            ctx.scorer(ctx.train_len),
            ctx.tokenizer,
            tokens,
            ctx.train_len,
            tasks=list(opts.tasks),
            lengths=opts.lengths,
            multiples=list(opts.multiples),
            depths=None if opts.depths is None else list(opts.depths),
            samples=int(opts.samples),
            seed=int(ctx.options.seed),
            limit=ctx.limit,
        )
        res["haystack"] = source
        if ctx.out_dir is not None:
            res["plot"] = babilong.plot_babilong(res, ctx.out_dir / f"{ctx.stem}_babilong.png", ctx.title).name
        return res

    def metrics(self, result):
        out = {f"babilong/{t}": float(r["mean"]) for t, r in result["tasks"].items() if r["mean"] is not None}
        if result.get("mean") is not None:
            out["babilong/avg"] = float(result["mean"])
        return out

    def markdown(self, result):
        lengths = result["lengths"]
        lines = [
            f"## babilong ({result['samples']} samples per cell, facts {result['placement']}; {result['metric']})",
            "",
            "| task | mean | " + " | ".join(f"{x} tok" for x in lengths) + " |",
            "|---|---|" + "---|" * len(lengths),
        ]
        for task, t in result["tasks"].items():
            cols = " | ".join(_fmt(t["per_length"].get(str(x)), 3) for x in lengths)
            lines.append(f"| {task} {t['name']} | {_fmt(t['mean'], 3)} | {cols} |")
        lines.append(f"| **mean** | {_fmt(result.get('mean'), 3)} |" + " |" * len(lengths))
        if result.get("plot"):
            lines += ["", f"![babilong]({result['plot']})"]
        return lines


# ---- every suite of a config --------------------------------------------------------------------------


def run_suites(
    lm,
    tokenizer,
    train_cfg,
    train_len: int,
    cfg: DictConfig,
    out_dir: Path | None = None,
    stem: str = "eval",
    title: str = "",
    save_partial=None,
) -> dict:
    """Run `cfg.suites` on a scorer model; returns {suite: result}. Plots go to `out_dir` when given;
    `save_partial(suite, result so far)` gets the finished parts of long suites."""
    unknown = [s for s in cfg.suites if s not in SUITES]
    if unknown:
        raise EvalError(f"unknown suite(s) {unknown}; choose from {list(SUITES)} or suite=all")
    ctx = SuiteContext(lm, tokenizer, train_cfg, int(train_len), cfg.eval, out_dir, stem, title, save_partial)
    results = {}
    for name in cfg.suites:
        results[name] = SUITES[name].run(ctx, cfg[SUITES[name].options_key])
        if save_partial is not None:
            save_partial(name, results[name])
    return results


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """The scalars of suite results for loggers: <prefix>/<task>/acc, <prefix>/ppl/<m>x, <prefix>/retrieval/<task>,
    <prefix>/babilong/<task>."""
    return {f"{prefix}/{k}": v for name, r in results.items() for k, v in SUITES[name].metrics(r).items()}


def render_markdown(doc: dict) -> str:
    """eval.md: the header of an eval document, then each suite's section in registry order."""
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
    for name, suite in SUITES.items():
        if name in doc["suites"]:
            lines += [*suite.markdown(doc["suites"][name]), ""]
    return "\n".join(lines) + "\n"
