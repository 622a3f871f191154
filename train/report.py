"""Compare runs over seeds: `python -m train.report <run dirs or multirun dirs> [--out DIR] [--paper grape]`,
or `python -m train.report --wandb ENTITY/PROJECT/GROUP` for the same report from the W&B API.

Runs whose resolved configs differ only in `seed` (and names, paths, logging: `train.groups.IGNORED`)
form a group. Per group and metric: n, mean, std and a 95% interval over seeds (Student t by default);
per metric, the difference of each group from a baseline group (`--baseline`, default `pe=rope`) with
its 95% interval, paired over common seeds (same seed = same data order) or Welch otherwise.
Writes into the output directory:
  report.md         group tables (mean ± 95% interval), differences with one sentence each, the papers'
                    published rows beside the groups (`--paper`), the plots, and one row per run
  report.json       the same numbers: settings, metrics, groups, differences, papers, runs
  loss.png, val_loss.png, grad_norm.png, overview.png   curves per group: mean over seeds, min-max band
  max_logit_layers.png, offset_curves.png               per layer, per group
  metrics.png       each group's metrics: mean, 95% interval and the seeds
  differences.png   each group's difference from the baseline with its 95% interval
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from pelab.data.atomic import atomic_write_json, atomic_write_text
from pelab.train import groups as G
from pelab.train import report_plots, stats
from pelab.train.runs import Group, Run, group_runs, load_run, load_runs, runs_from_wandb, series

log = logging.getLogger("pelab")

PAPERS_FILE = Path(__file__).with_name("papers.yaml")
DEFAULT_BASELINE = "pe=rope"


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    fmt: str  # format spec of one value
    better: int = -1  # -1: lower is better, 1: higher is better, 0: neither


def parse_selector(text: str, groups: list[Group]) -> dict[str, str]:
    """`pe=rope,kv_shift=false` -> {"pe.name": "rope", "kv_shift": "false"} (a config group's name when
    the key is a group, e.g. pe, model, data)."""
    sel = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--baseline takes KEY=VALUE[,KEY=VALUE], got {text!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        if any(f"{k}.name" in g.key for g in groups):
            k = f"{k}.name"
        sel[k] = v
    return sel


def _matches(group: Group, sel: dict[str, str]) -> bool:
    return all(k in group.key and G.fmt_value(group.key[k]) == v for k, v in sel.items())


def _owned_by(key: str, sel: dict[str, str]) -> bool:
    """Keys a baseline selector speaks for: pe.name=rope stands for all of pe.*."""
    roots = {k[: -len(".name")] if k.endswith(".name") else k for k in sel}
    return any(key == r or key.startswith(r + ".") for r in roots)


def baselines(groups: list[Group], selector: str | None) -> tuple[dict[str, tuple[Group, list[str]]], str | None]:
    """{group label: (its baseline group, other keys in which the two differ)} and the selector used.

    A group's baseline is the group matching the selector that agrees with it on everything the
    selector does not speak for (gpt_355m/fox is compared with gpt_355m/rope, fox with kv_shift with
    rope with kv_shift); if none agrees, the closest one, and the other differences are listed."""
    if selector is None:
        selector = DEFAULT_BASELINE
        if not any(_matches(g, parse_selector(selector, groups)) for g in groups):
            return {}, None
    sel = parse_selector(selector, groups)
    bases = [g for g in groups if _matches(g, sel)]
    if not bases:
        known = sorted({f"{k}={G.fmt_value(g.key.get(k))}" for g in groups for k in sel})
        raise ValueError(f"--baseline {selector}: no group matches; the groups have {', '.join(known) or 'none'}")
    out = {}
    for g in groups:
        if g in bases:
            continue
        options = []
        for b in bases:
            names = set(g.key) | set(b.key)
            other = sorted(
                k for k in names if not _owned_by(k, sel) and repr(g.key.get(k, None)) != repr(b.key.get(k, None))
            )
            options.append((len(other), b, other))
        _, b, other = min(options, key=lambda o: o[0])
        out[g.label] = (b, other)
    return out, selector


# ---- per-run numbers ---------------------------------------------------------------------------------


def tokens_to_target(points: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which the validation loss first reaches `target`, linearly interpolated between the two
    validations around the crossing; None when it never does."""
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


def run_values(run: Run, last_k: int = 5, target_loss: float | None = None) -> dict[str, float]:
    """The run's value of every metric it has (see `metrics_for`)."""
    rows = run.rows
    out: dict[str, float] = {}
    val = series(run, "val/loss")
    if val:
        losses = [y for _, y in val]
        out["final_val_loss"] = losses[-1]
        out["last_k_val_loss"] = statistics.fmean(losses[-last_k:])
        out["best_val_loss"] = min(losses)
        if target_loss is not None:
            reached = tokens_to_target(val, target_loss)
            if reached is not None:
                out["tokens_to_target"] = reached
    zs = run.evals.get("zeroshot") or {}
    if "average" in zs:
        out["zeroshot_avg"] = 100 * float(zs["average"]["acc"])
    for task, r in (zs.get("tasks") or {}).items():
        if "acc" in r:
            out[f"zeroshot/{task}"] = 100 * float(r["acc"])
    lengths = (run.evals.get("ppl_vs_length") or {}).get("lengths") or {}
    base = lengths.get("1x", {}).get("ppl")
    for k, r in lengths.items():
        if base and k != "1x" and r.get("ppl") is not None:
            out[f"ppl_ratio/{k}"] = float(r["ppl"]) / float(base)

    def column(key):
        return [r[key] for r in rows if key in r and math.isfinite(r[key])]

    spikes = column("stability/spikes")
    if spikes:
        out["spikes"] = spikes[-1]
    clip = column("stability/clip_rate") or column("grad_clipped")
    if clip:
        out["clip_rate"] = 100 * statistics.fmean(clip)
    logit = column("attn/max_logit")
    if logit:
        out["max_attn_logit"] = max(logit)
    for key, name, scale in (("tokens_per_s", "tokens_per_s", 1), ("mfu", "mfu", 100)):
        vals = column(key)
        if vals:
            out[name] = scale * statistics.median(vals)
    return out


def run_row(run: Run, values: dict) -> dict:
    """One row of the per-run table."""
    steps = [r["step"] for r in run.rows if "step" in r]
    train = [r["train/loss"] for r in run.rows if "train/loss" in r]
    return {
        "run": run.label,
        "group": None,
        **{k: run.meta.get(k) for k in ("model", "pe", "kv_shift", "seed")},
        "steps": int(max(steps)) if steps else None,
        "tokens": int(max((r.get("tokens", 0) for r in run.rows), default=0)),
        "final_train_loss": train[-1] if train else None,
        "val_points": len(series(run, "val/loss")),
        **values,
        "source": run.source,
    }


# ---- metrics and statistics ---------------------------------------------------------------------------

GRAPE_TASK_TITLES = {
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
    "hellaswag": "HellaSwag",
    "openbookqa": "OBQA",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "sciq": "SciQ",
}


def metrics_for(values: list[dict], last_k: int, target_loss: float | None) -> list[Metric]:
    """The metrics at least one run has, in report order."""
    have = set().union(*values) if values else set()
    out = [
        Metric("final_val_loss", "final val loss", ".4f"),
        Metric("last_k_val_loss", f"mean of last {last_k} val", ".4f"),
        Metric("best_val_loss", "best val loss", ".4f"),
    ]
    if target_loss is not None:
        out.append(Metric("tokens_to_target", f"tokens to val loss {target_loss:g}", ",.0f"))
    out.append(Metric("zeroshot_avg", "zero-shot avg (%)", ".2f", 1))
    tasks = sorted(k for k in have if k.startswith("zeroshot/"))
    out += [Metric(k, f"{GRAPE_TASK_TITLES.get(k[9:], k[9:])} (%)", ".2f", 1) for k in tasks]
    ratios = sorted((k for k in have if k.startswith("ppl_ratio/")), key=lambda k: float(k[10:-1]))
    out += [Metric(k, f"ppl {k[10:]} / 1x", ".3f") for k in ratios]
    out += [
        Metric("spikes", "spikes", ".1f"),
        Metric("clip_rate", "clip rate (%)", ".1f"),
        Metric("max_attn_logit", "max attn logit", ".2f", 0),
        Metric("tokens_per_s", "tokens/s (median)", ",.0f", 1),
        Metric("mfu", "MFU (%, median)", ".1f", 1),
    ]
    return [m for m in out if m.key in have or m.key == "tokens_to_target"]


def group_stats(group: Group, values: dict[int, dict], metrics: list[Metric], method: str) -> dict:
    """report.json's entry of one group: pe, model, n, seeds, and per metric n/mean/std/ci95."""
    entry = {
        "label": group.label,
        **group.meta,
        "n": len(group.runs),
        "seeds": group.seeds,
        "runs": [r.source for r in group.runs],
        "metrics": {},
    }
    for m in metrics:
        pairs = [(r.meta.get("seed"), values[id(r)][m.key]) for r in group.runs if m.key in values[id(r)]]
        if m.key == "tokens_to_target" and len(pairs) < len(group.runs):  # a mean of the runs that got there lies
            entry["metrics"][m.key] = {"n": 0, "reached": len(pairs), "of": len(group.runs), "mean": None}
            continue
        if not pairs:
            continue
        est = stats.mean_interval([v for _, v in pairs], method)
        entry["metrics"][m.key] = {
            **est.to_dict(),
            "seeds": [s for s, _ in pairs],
            "values": [v for _, v in pairs],
        }
    return entry


def differences(
    groups: list[Group],
    entries: dict[str, dict],
    metrics: list[Metric],
    base_of: dict[str, tuple[Group, list[str]]],
    method: str,
) -> list[dict]:
    """Per group with a baseline and per metric: the difference (group - baseline) and its interval."""
    out = []
    for g in groups:
        if g.label not in base_of:
            continue
        b, other = base_of[g.label]
        for m in metrics:
            mine, theirs = entries[g.label]["metrics"].get(m.key), entries[b.label]["metrics"].get(m.key)
            if not mine or not theirs or mine.get("mean") is None or theirs.get("mean") is None:
                continue
            a = dict(zip(mine["seeds"], mine["values"]))
            c = dict(zip(theirs["seeds"], theirs["values"]))
            if len(a) < len(mine["seeds"]) or len(c) < len(theirs["seeds"]):  # a seed twice: no pairing
                est, paired = stats.welch_difference(mine["values"], theirs["values"], method), []
            else:
                est, paired = stats.difference(a, c, method)
            d = {
                "group": g.label,
                "baseline": b.label,
                "metric": m.key,
                "title": m.title,
                "difference": est.mean,
                **{k: v for k, v in est.to_dict().items() if k != "mean"},
                "paired_seeds": paired,
                "n_group": len(mine["values"]),
                "n_baseline": len(theirs["values"]),
                "excludes_zero": est.excludes_zero,
                "also_differs_in": other,
            }
            d["sentence"] = sentence(d, m)
            out.append(d)
    return out


def _num(v: float, fmt: str) -> str:
    """A value as the metric formats it, with a true minus sign."""
    s = format(v, fmt)
    return s.replace("-", "−") if s.startswith("-") else s


def _signed(v: float, fmt: str) -> str:
    s = _num(v, fmt)
    return s if s.startswith("−") else "+" + s


def sentence(d: dict, m: Metric) -> str:
    """The difference in one sentence, e.g. `grape_ap − rope, mean of last 5 val: −0.0120 ± 0.0040 (95% CI,
    n=3 paired seeds): lower (better); the 95% interval excludes 0.`"""
    head = f"{d['group']} − {d['baseline']}, {m.title}: {_signed(d['difference'], m.fmt)}"
    if d["ci95"] is None:
        return f"{head} (n={d['n_group']} vs {d['n_baseline']}): no interval with one seed on a side; run more seeds."
    if d["paired_seeds"]:
        how = f"n={len(d['paired_seeds'])} paired seeds"
    else:
        how = f"{d['method']}, n={d['n_group']} vs {d['n_baseline']}"
    lo, hi = d["ci95"]
    span = (
        f" ± {_num((hi - lo) / 2, m.fmt)}"
        if "bootstrap" not in d["method"]
        else f" [{_num(lo, m.fmt)}, {_num(hi, m.fmt)}]"
    )
    if d["excludes_zero"]:
        word = "lower" if d["difference"] < 0 else "higher"
        if m.better:
            word += " (better)" if (d["difference"] < 0) == (m.better < 0) else " (worse)"
        verdict = f"{word}; the 95% interval excludes 0"
    else:
        verdict = "no difference shown: the 95% interval includes 0"
    also = f" The two groups also differ in {', '.join(d['also_differs_in'])}." if d["also_differs_in"] else ""
    return f"{head}{span} (95% CI, {how}): {verdict}.{also}"


# ---- the papers' numbers ------------------------------------------------------------------------------


def load_paper(name: str) -> dict:
    papers = yaml.safe_load(PAPERS_FILE.read_text())
    if name not in papers:
        raise ValueError(f"--paper {name}: unknown; choose one of {', '.join(papers)}")
    paper = dict(papers[name])
    tasks = [c["key"] for c in paper["columns"] if c["key"].startswith("zeroshot/")]
    rows = []
    for r in paper["rows"]:
        row = dict(r)
        for task, v in zip(tasks, row.pop("zeroshot", [])):
            row[task] = v
        rows.append(row)
    paper["rows"] = rows
    return paper


def paper_rows(paper: dict, meta: dict) -> list[dict]:
    """The paper's rows for a group: same PE and KV-shift; same model when the group's model is one of the
    paper's sizes, every size otherwise."""
    same = [r for r in paper["rows"] if r["pe"] == meta.get("pe") and bool(r["kv_shift"]) == bool(meta.get("kv_shift"))]
    sized = [r for r in same if r["model"] == meta.get("model")]
    return sized or same


# ---- markdown ----------------------------------------------------------------------------------------


def _cell(entry: dict | None, m: Metric) -> str:
    if not entry:
        return "–"
    if entry.get("mean") is None:
        return f"reached {entry['reached']}/{entry['of']}" if "reached" in entry else "–"
    if entry.get("ci95") is None:
        return _num(entry["mean"], m.fmt)
    lo, hi = entry["ci95"]
    if entry["method"] == "bootstrap":
        return f"{_num(entry['mean'], m.fmt)} [{_num(lo, m.fmt)}, {_num(hi, m.fmt)}]"
    return f"{_num(entry['mean'], m.fmt)} ± {_num((hi - lo) / 2, m.fmt)}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def _seeds(entry: dict) -> str:
    return ",".join(map(str, entry["seeds"]))


def _tokens(groups_json: list[dict], runs_json: list[dict]) -> dict[str, str]:
    by_group: dict[str, set] = {}
    for r in runs_json:
        by_group.setdefault(r["group"], set()).add(r["tokens"])
    return {g["label"]: "/".join(f"{t:,}" for t in sorted(by_group.get(g["label"], ()))) for g in groups_json}


def markdown(doc: dict, metrics: list[Metric], papers: list[dict]) -> str:
    s = doc["settings"]
    groups_json, runs_json = doc["groups"], doc["runs"]
    interval = (
        "mean ± half-width of the 95% Student-t interval over seeds (n−1 degrees of freedom)"
        if s["interval"] == "t"
        else "mean [95% percentile-bootstrap interval] over seeds (10,000 resamples of the seeds)"
    )
    lines = [
        f"# Comparison: {len(runs_json)} runs in {len(groups_json)} groups",
        "",
        f"Runs whose resolved configs differ only in `seed` form a group (ignored: {', '.join(s['ignored'])}). "
        f"Every cell is the {interval}; a single run shows its value alone. Intervals are per comparison "
        f"(no correction for the number of groups and metrics).",
        "",
    ]
    short = [r["run"] for r in runs_json if r["val_points"] < s["last_k"]]
    if short:
        lines += [
            f"{len(short)} run(s) have fewer than {s['last_k']} validations; their mean of the last "
            f"{s['last_k']} is the mean of all they have.",
            "",
        ]
    by_key = {m.key: m for m in metrics}
    tokens = _tokens(groups_json, runs_json)
    main = [m for m in metrics if m.key in ("final_val_loss", "last_k_val_loss", "best_val_loss", "tokens_to_target")]
    main += [by_key[k] for k in ("zeroshot_avg",) if k in by_key]
    main += [m for m in metrics if m.key.startswith("ppl_ratio/")]
    stable = [by_key[k] for k in ("spikes", "clip_rate", "max_attn_logit", "tokens_per_s", "mfu") if k in by_key]
    tasks = [m for m in metrics if m.key.startswith("zeroshot/")]
    lines += ["## Groups", ""]
    lines += _table(
        ["group", "n", "seeds", "tokens", *(m.title for m in main)],
        [
            [f"**{g['label']}**", str(g["n"]), _seeds(g), tokens[g["label"]]]
            + [_cell(g["metrics"].get(m.key), m) for m in main]
            for g in groups_json
        ],
    )
    if stable:
        lines += ["Stability and speed:", ""]
        lines += _table(
            ["group", "n", *(m.title for m in stable)],
            [[g["label"], str(g["n"])] + [_cell(g["metrics"].get(m.key), m) for m in stable] for g in groups_json],
        )
    if tasks:
        lines += ["Zero-shot accuracy per task (eval.json beside each run):", ""]
        lines += _table(
            ["group", *(m.title for m in tasks)],
            [[g["label"]] + [_cell(g["metrics"].get(m.key), m) for m in tasks] for g in groups_json],
        )

    lines += ["## Differences from the baseline", ""]
    diffs = doc["differences"]
    if not diffs:
        why = (
            "no group matches the default baseline `pe=rope`; choose one with `--baseline KEY=VALUE`"
            if s["baseline"] is None
            else "only the baseline group has runs"
        )
        lines += [f"None: {why}.", ""]
    else:
        lines += [
            f"Baseline `{s['baseline']}`. Each cell: group − baseline, {interval.split(' over ')[0]}; "
            f"**bold**: the interval excludes 0. Paired over the seeds both groups ran (same seed = same data "
            f"order); Welch's t when fewer than two seeds are shared.",
            "",
        ]
        shown = [m for m in metrics if any(d["metric"] == m.key for d in diffs) and not m.key.startswith("zeroshot/")]
        table_rows = []
        for label in dict.fromkeys(d["group"] for d in diffs):
            mine = {d["metric"]: d for d in diffs if d["group"] == label}
            first = next(iter(mine.values()))
            pairing = f"{len(first['paired_seeds'])} paired" if first["paired_seeds"] else first["method"]
            row = [label, first["baseline"], pairing]
            for m in shown:
                d = mine.get(m.key)
                if d is None:
                    row.append("–")
                    continue
                cell = _cell({**d, "mean": d["difference"]}, m)
                cell = cell if cell.startswith("−") else "+" + cell
                row.append(f"**{cell}**" if d["excludes_zero"] else cell)
            table_rows.append(row)
        lines += _table(["group", "baseline", "seeds", *(m.title for m in shown)], table_rows)
        for label in dict.fromkeys(d["group"] for d in diffs):
            lines += [f"**{label}**", ""]
            lines += [f"- {d['sentence']}" for d in diffs if d["group"] == label]
            lines.append("")

    for paper in papers:
        lines += _paper_section(paper, doc, by_key)

    lines += ["## Plots", ""]
    lines += [f"![{p}]({p})" for p in doc["plots"]]
    lines += ["", "## Runs", ""]
    per_run = [
        ("run", "run", None),
        ("group", "group", None),
        ("steps", "steps", "d"),
        ("tokens", "tokens", ",d"),
        ("final_train_loss", "final train loss", ".4f"),
        ("final_val_loss", "final val loss", ".4f"),
        ("best_val_loss", "best val loss", ".4f"),
        ("spikes", "spikes", ".0f"),
        ("tokens_per_s", "tokens/s", ",.0f"),
        ("mfu", "MFU (%)", ".1f"),
        ("max_attn_logit", "max attn logit", ".2f"),
    ]
    lines += _table(
        [t for _, t, _ in per_run],
        [
            ["–" if r.get(k) is None else (str(r[k]) if f is None else _num(r[k], f)) for k, _, f in per_run]
            for r in runs_json
        ],
    )
    return "\n".join(lines)


def _paper_section(paper: dict, doc: dict, by_key: dict[str, Metric]) -> list[str]:
    last_k = doc["settings"]["last_k"]
    cols = paper["columns"]
    lines = [
        f"## Published numbers: {paper['title']}",
        "",
        f"Source: {paper['source']} **Published single-seed numbers from a different training run** "
        f"(the paper's recipe, below), shown beside this comparison's groups; compare orders and gaps, "
        f"not absolute values, unless the recipe matches.",
        "",
    ]
    rows = []
    for g in doc["groups"]:
        matched = paper_rows(paper, g)
        if not matched:
            continue
        mine = []
        for c in cols:
            m = by_key.get(c["key"])
            comparable = m is not None and c.get("last_k", last_k) == last_k
            mine.append(_cell(g["metrics"].get(c["key"]), m) if comparable else "–")
        rows.append([f"**{g['label']}** (this comparison)", str(g["n"]), *mine])
        for r in matched:
            size = paper["sizes"].get(r["model"], r["model"])
            vals = [("–" if r.get(c["key"]) is None else format(r[c["key"]], c["fmt"])) for c in cols]
            rows.append([f"↳ {size} {r['method']} (published)", "1", *vals])
    if not rows:
        return lines + ["No group has a PE of this paper.", ""]
    lines += _table(["", "n", *(c["title"] for c in cols)], rows)
    lines += [f"- {n}" for n in paper["notes"]]
    lines += [f"- Recipe, {paper['sizes'].get(k, k)}: {v}" for k, v in paper["recipes"].items()]
    return lines + [""]


# ---- the report ----------------------------------------------------------------------------------------


def build(
    runs: list[Run],
    last_k: int = 5,
    target_loss: float | None = None,
    baseline: str | None = None,
    method: str = "t",
    ignore: list[str] = (),
) -> tuple[dict, list[Group], list[Metric]]:
    """(report.json's document without plots and papers, the groups, the metrics)."""
    if last_k < 1:
        raise ValueError(f"--last-k must be at least 1, got {last_k}")
    groups = group_runs(runs, ignore)
    values = {id(r): run_values(r, last_k, target_loss) for r in runs}
    metrics = metrics_for(list(values.values()), last_k, target_loss)
    base_of, used = baselines(groups, baseline)
    bases = {b.label for b, _ in base_of.values()}
    groups.sort(key=lambda g: (g.label not in bases, g.label))  # baselines first
    entries = {g.label: group_stats(g, values, metrics, method) for g in groups}
    run_rows = []
    for g in groups:
        for r in g.runs:
            row = run_row(r, values[id(r)])
            row["group"] = g.label
            run_rows.append(row)
    doc = {
        "settings": {
            "last_k": last_k,
            "target_loss": target_loss,
            "interval": method,
            "level": stats.LEVEL,
            "baseline": used,
            "ignored": list(G.IGNORED) + list(ignore),
            "bands": "curves: mean over the seeds of a group, band = min-max over the seeds",
        },
        "metrics": [{"key": m.key, "title": m.title, "better": m.better} for m in metrics],
        "groups": [entries[g.label] for g in groups],
        "differences": differences(groups, entries, metrics, base_of, method),
        "runs": run_rows,
    }
    return doc, groups, metrics


def report(
    runs: list[Run],
    out_dir: Path,
    last_k: int = 5,
    target_loss: float | None = None,
    baseline: str | None = None,
    papers: list[str] = (),
    method: str = "t",
    ignore: list[str] = (),
) -> dict:
    out_dir = Path(out_dir)
    loaded = [load_paper(p) for p in papers]
    doc, groups, metrics = build(runs, last_k, target_loss, baseline, method, ignore)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = report_plots.plot_report(groups, doc, metrics, out_dir)
    doc["plots"] = [p.name for p in plots]
    doc["papers"] = []
    for name, paper in zip(papers, loaded):
        matches = [{"group": g["label"], "rows": paper_rows(paper, g)} for g in doc["groups"]]
        doc["papers"].append({"paper": name, "title": paper["title"], "matches": [m for m in matches if m["rows"]]})
    text = markdown(doc, metrics, loaded)
    atomic_write_text(out_dir / "report.md", text + "\n")
    atomic_write_json(out_dir / "report.json", doc, indent=1, default=str)
    return {"doc": doc, "markdown": text, "plots": plots, "out": out_dir}


# ---- the sweep summary ---------------------------------------------------------------------------------

SWEEP_COLUMNS = [
    "group",
    "group_n",
    "final_val_loss_mean",
    "final_val_loss_lo",
    "final_val_loss_hi",
    "last_k_val_loss_mean",
    "last_k_val_loss_lo",
    "last_k_val_loss_hi",
]


def sweep_groups(run_dirs: list[str | Path], last_k: int = 5) -> tuple[dict, dict[str, dict]]:
    """For a sweep's summary: ({"groups", "differences", "settings"} as in report.json, {run_dir: the
    columns SWEEP_COLUMNS of its group}). Never raises: a problem is returned under "error"."""
    try:
        runs = [load_run(Path(d)) for d in run_dirs if (Path(d) / "metrics.csv").exists()]
        if not runs:
            return {"groups": [], "differences": []}, {}
        doc, groups, _ = build(runs, last_k)
    except Exception as e:  # noqa: BLE001  (the per-cell summary must still be written)
        log.warning("sweep summary: no grouped table: %s", e)
        return {"groups": [], "differences": [], "error": f"{type(e).__name__}: {e}"}, {}
    columns = {}
    for entry, g in zip(doc["groups"], groups):
        cols = {"group": entry["label"], "group_n": entry["n"]}
        for key in ("final_val_loss", "last_k_val_loss"):
            m = entry["metrics"].get(key) or {}
            ci = m.get("ci95") or [None, None]
            cols.update({f"{key}_mean": m.get("mean"), f"{key}_lo": ci[0], f"{key}_hi": ci[1]})
        for r in g.runs:
            columns[str(r.source)] = cols
    return {k: doc[k] for k in ("settings", "groups", "differences")}, columns


# ---- command line ----------------------------------------------------------------------------------


def plot_runs(run_dirs: list[Path], out_png: Path) -> Path:
    """Train and validation loss of single runs (the per-run loss.png that `python -m train` writes)."""
    return report_plots.plot_runs([load_run(d) for d in run_dirs], out_png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths",
        nargs="*",
        help="run directories or directories holding them (a multirun dir); default: $PELAB_RUNS or runs/",
    )
    ap.add_argument("--out", help="output directory (default: <first path>/report, or report-<group> with --wandb)")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT[/GROUP]", help="read the runs from W&B instead of local logs")
    ap.add_argument("--last-k", type=int, default=5, help="metric: mean of the last K validations (default 5)")
    ap.add_argument("--target-loss", type=float, help="metric: tokens until the val loss first reaches this value")
    ap.add_argument(
        "--baseline",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="the group the others are compared with (default pe=rope when present), e.g. pe=rope,kv_shift=false",
    )
    ap.add_argument(
        "--paper",
        action="append",
        default=[],
        choices=["grape", "ropepp"],
        help="show the paper's published numbers beside the groups (repeatable)",
    )
    ap.add_argument(
        "--interval",
        choices=stats.METHODS,
        default="t",
        help="95%% intervals: Student t (default; right for a few seeds) or a percentile bootstrap (n >= 10)",
    )
    ap.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="a config key (or subtree) to leave out of the group key, e.g. trainer.devices (repeatable)",
    )
    args = ap.parse_args(argv)
    if args.wandb:
        runs = runs_from_wandb(args.wandb)
        out = Path(args.out or f"report-{args.wandb.strip('/').split('/')[-1]}")
    else:
        paths = args.paths or [os.environ.get("PELAB_RUNS", "runs")]
        try:
            runs = load_runs(paths)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not runs:
            print(f"error: no run directories (with metrics.csv) under {', '.join(map(str, paths))}", file=sys.stderr)
            return 2
        out = Path(args.out or Path(paths[0]) / "report")
    try:
        result = report(runs, out, args.last_k, args.target_loss, args.baseline, args.paper, args.interval, args.ignore)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc = result["doc"]
    print(result["markdown"].split("\n## Plots")[0])
    print()
    for p in result["plots"]:
        print(f"plot   {p}")
    print(f"report {out / 'report.md'}  ({len(doc['groups'])} groups of {len(doc['runs'])} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
