"""Compare runs: `python -m train.report <run dirs or multirun dirs> [--out DIR]`, or
`python -m train.report --wandb ENTITY/PROJECT[/GROUP]` to pull the same data from W&B.

Reads each run's local logs (metrics.csv, probes.csv, summary.json / config.yaml) and writes into
the output directory:
  overview.png     train loss (spikes marked), val loss, grad norm, max attention logit; 2 x 2
  loss.png, val_loss.png, grad_norm.png, max_logit_layers.png (one panel per layer)
  report.md        a markdown table, one row per run: final / best val loss, spikes, tokens/s, MFU
  report.json      the same rows, machine-readable
One line per run, labelled `{model}-{pe}-s{seed}`; x is tokens on a log scale.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Figure sizes in pixels (width, height) at DPI; tests check them.
DPI = 100
SINGLE_PX = (900, 560)
OVERVIEW_PX = (1400, 1000)
LAYER_PANEL_PX = (350, 260)  # per panel of max_logit_layers.png; 4 panels per row


@dataclass
class Run:
    label: str
    meta: dict
    rows: list[dict] = field(default_factory=list)  # one dict per logged step, sorted by step
    source: str = ""


# ---- reading ---------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if v in ("", None) or k is None:
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    continue
            out.append(row)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv rows merged with probes.csv rows of the same step, sorted by step."""
    run_dir = Path(run_dir)
    by_step: dict[float, dict] = {}
    for name in ("metrics.csv", "probes.csv"):
        for r in _read_csv(run_dir / name):
            if "step" in r:
                by_step.setdefault(r["step"], {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def _meta_from_config(cfg: dict) -> dict:
    def get(path, default=None):
        node = cfg
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, dict) and path in node:  # flattened "model.name" keys
                return node[path]
            else:
                return default
        return node

    return {
        "model": get("model.name", "?"),
        "pe": get("pe.name", "?"),
        "seed": get("seed", "?"),
        "data": get("data.name", "?"),
        "kv_shift": bool(get("kv_shift", False)),
    }


def label_of(meta: dict) -> str:
    shift = "-kvshift" if meta.get("kv_shift") else ""
    return f"{meta.get('model', '?')}-{meta.get('pe', '?')}{shift}-s{meta.get('seed', '?')}"


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    meta: dict = {}
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        meta = {k: s.get(k) for k in ("model", "pe", "seed", "data", "kv_shift")}
        meta["summary"] = s
    elif (run_dir / "config.yaml").exists():
        from omegaconf import OmegaConf

        meta = _meta_from_config(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False))
    else:
        meta = {"model": "?", "pe": run_dir.name, "seed": "?"}
    return Run(label_of(meta), meta, read_metrics(run_dir), str(run_dir))


def find_run_dirs(paths: list[Path | str]) -> list[Path]:
    """Run directories (holding metrics.csv) given run dirs or directories above them (a multirun dir)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.csv").exists():
            out.append(p)
        elif p.is_dir():
            out += sorted(m.parent for m in p.rglob("metrics.csv"))
        else:
            raise FileNotFoundError(f"{p}: no such run directory")
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _dedupe_labels(runs: list[Run]) -> list[Run]:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({Path(r.source).name or r.source})"
    return runs


def load_runs(paths: list[Path | str]) -> list[Run]:
    return _dedupe_labels([load_run(d) for d in find_run_dirs(paths)])


def runs_from_wandb(path: str, api=None) -> list[Run]:
    """Runs of `entity/project[/group]` through the W&B public API, mapped to the local structures
    (history rows keyed by step, grouped names also under their metrics.csv names)."""
    from pelab.train.metrics import CSV_ALIASES

    parts = path.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"--wandb takes ENTITY/PROJECT or ENTITY/PROJECT/GROUP, got {path!r}")
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": parts[2]} if len(parts) == 3 else None
    runs = []
    for r in api.runs(f"{parts[0]}/{parts[1]}", filters=filters):
        cfg = dict(r.config) if r.config is not None else {}
        meta = _meta_from_config(cfg)
        by_step: dict[float, dict] = {}
        history = r.scan_history() if hasattr(r, "scan_history") else r.history(pandas=False)
        for h in history:
            step = h.get("trainer/global_step", h.get("_step"))
            if step is None:
                continue
            row = by_step.setdefault(float(step), {"step": float(step)})
            for k, v in h.items():
                if k.startswith("_") or k == "trainer/global_step" or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)) and v is not None:
                    row[k] = float(v)
        rows = [by_step[s] for s in sorted(by_step)]
        for row in rows:
            for legacy, name in CSV_ALIASES.items():
                if name in row and legacy not in row:
                    row[legacy] = row[name]
        meta["summary"] = dict(getattr(r, "summary", {}) or {})
        runs.append(Run(label_of(meta), meta, rows, f"wandb:{parts[0]}/{parts[1]}/runs/{getattr(r, 'id', '?')}"))
    if not runs:
        raise SystemExit(f"no W&B runs found in {path}")
    return _dedupe_labels(runs)


# ---- numbers ---------------------------------------------------------------------------------------


def _series(run: Run, key: str, x: str = "tokens") -> list[tuple[float, float]]:
    return [(r[x], r[key]) for r in run.rows if key in r and x in r and math.isfinite(r[key])]


def spike_points(run: Run) -> list[tuple[float, float]]:
    """(tokens, loss) where the cumulative spike count rose (at the logging step that reported it)."""
    pts, prev = [], 0.0
    for r in run.rows:
        if "stability/spikes" in r:
            if r["stability/spikes"] > prev and "tokens" in r:
                pts.append((r["tokens"], r.get("train/loss_max", r.get("train/loss", float("nan")))))
            prev = r["stability/spikes"]
    return pts


def layer_keys(runs: list[Run], prefix: str = "attn/max_logit/L") -> list[str]:
    keys = {k for run in runs for r in run.rows for k in r if k.startswith(prefix)}
    return sorted(keys, key=lambda k: int(k[len(prefix) :]))


def summarize(run: Run) -> dict:
    rows = run.rows

    def last(key):
        return next((r[key] for r in reversed(rows) if key in r), None)

    def median(key):
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else None

    vals = [r["val/loss"] for r in rows if "val/loss" in r]
    spikes = last("stability/spikes")
    return {
        "run": run.label,
        "model": run.meta.get("model"),
        "pe": run.meta.get("pe"),
        "seed": run.meta.get("seed"),
        "steps": int(last("step")) if last("step") is not None else None,
        "tokens": int(max((r.get("tokens", 0) for r in rows), default=0)),
        "final_train_loss": last("train/loss"),
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "spikes": int(spikes) if spikes is not None else None,
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "max_attn_logit": last("attn/max_logit"),
        "source": run.source,
    }


TABLE_COLUMNS = [
    ("run", "run"),
    ("steps", "steps"),
    ("tokens", "tokens"),
    ("final_train_loss", "final train loss"),
    ("final_val_loss", "final val loss"),
    ("best_val_loss", "best val loss"),
    ("spikes", "spikes"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("max_attn_logit", "max attn logit"),
]


def _fmt(key: str, v) -> str:
    if v is None:
        return "–"
    if key in ("final_train_loss", "final_val_loss", "best_val_loss"):
        return f"{v:.4f}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "tokens_per_s":
        return f"{v:,.0f}"
    if key == "max_attn_logit":
        return f"{v:.2f}"
    if key == "tokens":
        return f"{v:,}"
    return str(v)


def markdown_table(summaries: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    sep = "| " + " | ".join("---" for _ in TABLE_COLUMNS) + " |"
    body = ["| " + " | ".join(_fmt(k, s.get(k)) for k, _ in TABLE_COLUMNS) + " |" for s in summaries]
    return "\n".join([head, sep, *body]) + "\n"


# ---- plots -----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[Run]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {r.label: palette[i % len(palette)] for i, r in enumerate(runs)}


def _draw(
    ax,
    runs: list[Run],
    key: str,
    title: str,
    colors: dict,
    logy: bool = False,
    spikes: bool = False,
    marker: str | None = None,
) -> bool:
    drawn = False
    for run in runs:
        pts = [(x, y) for x, y in _series(run, key) if x > 0]
        if not pts:
            continue
        ax.plot(*zip(*pts), color=colors[run.label], label=run.label, lw=1.3, marker=marker, ms=3)
        drawn = True
        if spikes:
            sp = [(x, y) for x, y in spike_points(run) if x > 0 and math.isfinite(y)]
            if sp:
                ax.plot(*zip(*sp), "x", color=colors[run.label], ms=9, mew=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens")
    if drawn:
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3, which="both")
    return drawn


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _legend(fig, ax, runs):
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")


def plot_report(runs: list[Run], out_dir: Path) -> list[Path]:
    plt = _plt()
    out_dir = Path(out_dir)
    colors = _colors(runs)
    made = []
    specs = [
        ("loss.png", "train/loss", "train loss (x = spike)", False, True, None),
        ("val_loss.png", "val/loss", "validation loss", False, False, "o"),
        ("grad_norm.png", "grad_norm", "grad norm (pre-clip)", True, False, None),
    ]
    for name, key, title, logy, spikes, marker in specs:
        fig, ax = plt.subplots(figsize=(SINGLE_PX[0] / DPI, SINGLE_PX[1] / DPI))
        _draw(ax, runs, key, title, colors, logy=logy, spikes=spikes, marker=marker)
        _legend(fig, ax, runs)
        fig.tight_layout()
        made.append(_save(fig, out_dir / name))

    fig, axes = plt.subplots(2, 2, figsize=(OVERVIEW_PX[0] / DPI, OVERVIEW_PX[1] / DPI))
    _draw(axes[0, 0], runs, "train/loss", "train loss (x = spike)", colors, spikes=True)
    _draw(axes[0, 1], runs, "val/loss", "validation loss", colors, marker="o")
    _draw(axes[1, 0], runs, "grad_norm", "grad norm (pre-clip)", colors, logy=True)
    _draw(axes[1, 1], runs, "attn/max_logit", "max attention logit (all layers)", colors, marker=".")
    _legend(fig, axes[0, 0], runs)
    fig.tight_layout()
    made.append(_save(fig, out_dir / "overview.png"))

    keys = layer_keys(runs) or ["attn/max_logit"]
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False, figsize=(LAYER_PANEL_PX[0] * ncols / DPI, LAYER_PANEL_PX[1] * nrows / DPI)
    )
    for i, key in enumerate(keys):
        _draw(
            axes[i // ncols, i % ncols],
            runs,
            key,
            f"max attention logit, layer {key.rsplit('L', 1)[-1]}",
            colors,
            marker=".",
        )
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols, j % ncols].axis("off")
    _legend(fig, axes[0, 0], runs)
    fig.tight_layout()
    made.append(_save(fig, out_dir / "max_logit_layers.png"))
    return made


def plot_runs(run_dirs: list[Path], out_png: Path) -> Path:
    """Train and validation loss against tokens, one colour per run (the per-run loss.png)."""
    plt = _plt()
    runs = [load_run(d) for d in run_dirs]
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    for run in runs:
        train, val = _series(run, "train/loss"), _series(run, "val/loss")
        if train:
            ax.plot(*zip(*train), color=colors[run.label], label=f"{run.label} train", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o--", color=colors[run.label], label=f"{run.label} val", ms=4)
        sp = [(x, y) for x, y in spike_points(run) if math.isfinite(y)]
        if sp:
            ax.plot(*zip(*sp), "x", color="red", ms=8, mew=2, label="spike")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ---- command line ----------------------------------------------------------------------------------


def report(runs: list[Run], out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r) for r in runs]
    table = markdown_table(summaries)
    (out_dir / "report.md").write_text(table)
    (out_dir / "report.json").write_text(json.dumps(summaries, indent=2) + "\n")
    plots = plot_report(runs, out_dir)
    return {"table": table, "summaries": summaries, "plots": plots, "out": out_dir}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths",
        nargs="*",
        help="run directories or directories holding them (a multirun dir); default: $PELAB_RUNS or runs/",
    )
    ap.add_argument("--out", help="output directory (default: <first path>/report, or report-<group> with --wandb)")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT[/GROUP]", help="read the runs from W&B instead of local logs")
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
    result = report(runs, out)
    print(result["table"])
    for p in result["plots"]:
        print(f"plot   {p}")
    print(f"table  {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
