"""Plots and tables from local run directories (metrics.csv)."""
from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def plot_runs(run_dirs: list[Path], out_png: Path) -> Path:
    """Train and validation loss against tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        label = Path(run_dir).name
        train = [(r["tokens"], r["train/loss"]) for r in rows if "train/loss" in r and "tokens" in r]
        val = [(r["tokens"], r["val/loss"]) for r in rows if "val/loss" in r and "tokens" in r]
        if train:
            line, = ax.plot(*zip(*train), label=f"{label} train", lw=1.2)
            color = line.get_color()
        else:
            color = None
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{label} val", ms=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
