"""The plots of `train.report`: curves per group (mean over seeds, min-max band), per-layer panels,
the per-offset score curves, each group's metrics with their 95% intervals, and the differences from
the baseline. Legends sit outside the axes, right of the panels; 12 colours, and line styles beyond
them, keep 48 groups distinct."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pelab.train.runs import layer_keys, series, spike_points

# Figure sizes in pixels (width, height) at DPI; tests check them.
DPI = 100
CURVE_PX = (1100, 560)
RUN_PX = (900, 450)
OVERVIEW_PX = (1600, 1000)
LAYER_PANEL_PX = (340, 260)  # per panel of the per-layer figures; 4 panels per row
LEGEND_PX = 260  # width added to the per-layer figures for the legend
METRIC_PANEL_PX = (420, 60)  # per panel of metrics.png / differences.png: width, height per group (+ margin)
# The 10 dark colours of tab20 (= tab10), black and the darkest of tab20b: 12 colours that stay apart,
# one per PE, also as the light fill of a band.
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#000000",
    "#393b79",
)
LINESTYLES = ("-", "--", ":", "-.")
BAND_NOTE = "line: mean over seeds; band: min-max over seeds"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styles(labels: list[str]) -> dict[str, dict]:
    """Colour and line style per group: 12 distinct colours (one per PE of the registry) with solid lines,
    then the same colours with the next line styles."""
    return {
        label: {"color": COLORS[i % len(COLORS)], "ls": LINESTYLES[(i // len(COLORS)) % len(LINESTYLES)]}
        for i, label in enumerate(labels)
    }


def band(runs, key: str, x: str = "tokens"):
    """(xs, mean, lo, hi) over the runs at the x values all of them logged (every logged x when they share
    none); None without data."""
    series = []
    for run in runs:
        pts = {r[x]: r[key] for r in run.rows if key in r and x in r and math.isfinite(r[key]) and r[x] > 0}
        if pts:
            series.append(pts)
    if not series:
        return None
    common = sorted(set.intersection(*(set(s) for s in series)))
    xs = common if common else sorted(set().union(*series))
    vals = [[s[v] for s in series if v in s] for v in xs]
    return (
        np.array(xs),
        np.array([np.mean(v) for v in vals]),
        np.array([min(v) for v in vals]),
        np.array([max(v) for v in vals]),
    )


def _draw_bands(ax, groups, key, title, style, logy=False, marker=None, spikes=False, ylabel="") -> bool:
    drawn = False
    for g in groups:
        b = band(g.runs, key)
        if b is None:
            continue
        xs, mean, lo, hi = b
        st = style[g.label]
        ax.plot(
            xs, mean, color=st["color"], ls=st["ls"], lw=1.5, marker=marker, ms=3, label=f"{g.label} (n={len(g.runs)})"
        )
        if len(g.runs) > 1:
            ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.18, lw=0)
        if spikes:
            for run in g.runs:
                sp = [(x, y) for x, y in spike_points(run) if x > 0 and math.isfinite(y)]
                if sp:
                    ax.plot(*zip(*sp), "x", color=st["color"], ms=9, mew=2)
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens")
    if ylabel:
        ax.set_ylabel(ylabel)
    if drawn:
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3, which="both")
    return drawn


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend(
            [handles[lab] for lab in labels],
            labels,
            loc="outside right upper",
            fontsize=8,
            ncols=1 if len(labels) <= 30 else 2,
            title=BAND_NOTE.replace("; ", "\n"),
            title_fontsize=8,
        )


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _figure(px, nrows=1, ncols=1):
    return _plt().subplots(
        nrows, ncols, squeeze=False, figsize=(px[0] / DPI, px[1] / DPI), layout="constrained", dpi=DPI
    )


def plot_curves(groups, out_dir: Path) -> list[Path]:
    style = styles([g.label for g in groups])
    made = []
    specs = [
        ("loss.png", "train/loss", "train loss (x = spike)", "loss", False, True, None),
        ("val_loss.png", "val/loss", "validation loss", "loss", False, False, "o"),
        ("grad_norm.png", "grad_norm", "grad norm (pre-clip)", "norm", True, False, None),
    ]
    for name, key, title, ylabel, logy, spikes, marker in specs:
        fig, axes = _figure(CURVE_PX)
        _draw_bands(axes[0, 0], groups, key, title, style, logy, marker, spikes, ylabel)
        _legend(fig, axes)
        made.append(_save(fig, out_dir / name))

    fig, axes = _figure(OVERVIEW_PX, 2, 2)
    _draw_bands(axes[0, 0], groups, "train/loss", "train loss (x = spike)", style, spikes=True, ylabel="loss")
    _draw_bands(axes[0, 1], groups, "val/loss", "validation loss", style, marker="o", ylabel="loss")
    _draw_bands(axes[1, 0], groups, "grad_norm", "grad norm (pre-clip)", style, logy=True, ylabel="norm")
    _draw_bands(axes[1, 1], groups, "attn/max_logit", "max attention logit (all layers)", style, marker=".")
    _legend(fig, axes)
    made.append(_save(fig, out_dir / "overview.png"))
    return made


def _layer_figure(n_panels: int, n_groups: int):
    ncols = min(4, n_panels)
    nrows = math.ceil(n_panels / ncols)
    # tall enough for the legend (about 15 px per entry)
    px = (LAYER_PANEL_PX[0] * ncols + LEGEND_PX, max(LAYER_PANEL_PX[1] * nrows, 60 + 15 * n_groups))
    fig, axes = _figure(px, nrows, ncols)
    for j in range(n_panels, nrows * ncols):
        axes[j // ncols, j % ncols].axis("off")
    return fig, axes, ncols


def plot_layers(groups, out_dir: Path) -> Path:
    style = styles([g.label for g in groups])
    keys = layer_keys([r for g in groups for r in g.runs]) or ["attn/max_logit"]
    fig, axes, ncols = _layer_figure(len(keys), len(groups))
    for i, key in enumerate(keys):
        title = f"max attention logit, layer {key.rsplit('L', 1)[-1]}" if "/L" in key else "max attention logit"
        _draw_bands(axes[i // ncols, i % ncols], groups, key, title, style, marker=".")
    _legend(fig, axes)
    return _save(fig, out_dir / "max_logit_layers.png")


def plot_offsets(groups, out_dir: Path) -> Path | None:
    """Per layer, the mean pre-softmax score by offset i - j at the last diagnostic step (Behind RoPE),
    mean over a group's seeds with the min-max band."""
    have = [(g, [r.offsets for r in g.runs if r.offsets]) for g in groups]
    have = [(g, docs) for g, docs in have if docs]
    if not have:
        return None
    style = styles([g.label for g in groups])
    n_layers = max(len(d["layers"]) for _, docs in have for d in docs)
    fig, axes, ncols = _layer_figure(n_layers, len(groups))
    for i in range(n_layers):
        ax = axes[i // ncols, i % ncols]
        for g, docs in have:
            docs = [d for d in docs if len(d["layers"]) > i and d["offsets"] == docs[0]["offsets"]]
            curves = np.array([d["layers"][i]["offset_mean"] for d in docs], dtype=float)
            xs = np.array(docs[0]["offsets"])
            st = style[g.label]
            steps = sorted({d["step"] for d in docs})
            ax.plot(xs, curves.mean(0), color=st["color"], ls=st["ls"], lw=1.3, label=f"{g.label} (n={len(docs)})")
            if len(docs) > 1:
                ax.fill_between(xs, curves.min(0), curves.max(0), color=st["color"], alpha=0.18, lw=0)
        ax.set_xscale("symlog", linthresh=1, linscale=0.4)
        ax.set_title(f"layer {i}: mean score by offset (step {'/'.join(map(str, steps))})", fontsize=9)
        ax.set_xlabel("offset i - j")
        ax.set_ylabel("mean pre-softmax score")
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes)
    return _save(fig, out_dir / "offset_curves.png")


def _dot_panels(n_panels: int, n_rows: int):
    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    px = (METRIC_PANEL_PX[0] * ncols + 160, (METRIC_PANEL_PX[1] * n_rows + 110) * nrows + 40)
    fig, axes = _figure(px, nrows, ncols)
    for j in range(n_panels, nrows * ncols):
        axes[j // ncols, j % ncols].axis("off")
    return fig, axes, ncols


def _interval_dot(ax, y, mean, ci, color, filled=True, label=None):
    err = None if ci is None else [[mean - ci[0]], [ci[1] - mean]]
    ax.errorbar(
        [mean],
        [y],
        xerr=err,
        fmt="o",
        color=color,
        mfc=color if filled else "white",
        ms=7,
        capsize=4,
        lw=1.8,
        label=label,
    )


def plot_metrics(groups_json: list[dict], metrics, out_dir: Path) -> Path | None:
    """Each metric's group means with their 95% intervals (bars) and the seeds' values (small dots)."""
    shown = [
        m for m in metrics if not m.key.startswith("zeroshot/") and any(m.key in g["metrics"] for g in groups_json)
    ]
    shown = [m for m in shown if any(g["metrics"].get(m.key, {}).get("mean") is not None for g in groups_json)]
    if not shown:
        return None
    style = styles([g["label"] for g in groups_json])
    fig, axes, ncols = _dot_panels(len(shown), len(groups_json))
    ys = np.arange(len(groups_json))[::-1]
    for i, m in enumerate(shown):
        ax = axes[i // ncols, i % ncols]
        for y, g in zip(ys, groups_json):
            e = g["metrics"].get(m.key)
            if not e or e.get("mean") is None:
                continue
            color = style[g["label"]]["color"]
            _interval_dot(ax, y, e["mean"], e["ci95"], color)
            ax.plot(e["values"], [y - 0.22] * len(e["values"]), "|", color=color, ms=8, alpha=0.8)
        ax.set_yticks(ys, [g["label"] for g in groups_json], fontsize=8)
        ax.set_ylim(-0.7, len(groups_json) - 0.4)
        ax.set_title(m.title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("mean over seeds with its 95% interval (bar); seeds as ticks below", fontsize=10)
    return _save(fig, out_dir / "metrics.png")


def plot_differences(doc: dict, metrics, out_dir: Path) -> Path | None:
    """Each group's difference from its baseline with the 95% interval; filled when it excludes 0."""
    differences = doc["differences"]
    shown = [m for m in metrics if not m.key.startswith("zeroshot/") and any(d["metric"] == m.key for d in differences)]
    if not shown:
        return None
    labels = list(dict.fromkeys(d["group"] for d in differences))
    style = styles([g["label"] for g in doc["groups"]])  # the colours of the other plots
    fig, axes, ncols = _dot_panels(len(shown), len(labels))
    ys = np.arange(len(labels))[::-1]
    for i, m in enumerate(shown):
        ax = axes[i // ncols, i % ncols]
        ax.axvline(0, color="gray", lw=1, ls="--")
        for y, label in zip(ys, labels):
            d = next((d for d in differences if d["group"] == label and d["metric"] == m.key), None)
            if d is None:
                continue
            _interval_dot(ax, y, d["difference"], d["ci95"], style[label]["color"], d["excludes_zero"])
        ax.set_yticks(ys, [f"{lab} − {_base(differences, lab)}" for lab in labels], fontsize=8)
        ax.set_ylim(-0.7, len(labels) - 0.4)
        ax.set_title(m.title, fontsize=10)
        ax.set_xlabel("group − baseline", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(
        f"difference from the baseline ({doc['settings']['baseline']}) with its 95% interval; "
        f"filled: the interval excludes 0",
        fontsize=10,
    )
    return _save(fig, out_dir / "differences.png")


def _base(differences: list[dict], label: str) -> str:
    return next(d["baseline"] for d in differences if d["group"] == label)


def plot_report(groups, doc: dict, metrics, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    made = plot_curves(groups, out_dir)
    made.append(plot_layers(groups, out_dir))
    made.append(plot_offsets(groups, out_dir))
    made.append(plot_metrics(doc["groups"], metrics, out_dir))
    made.append(plot_differences(doc, metrics, out_dir))
    return [p for p in made if p is not None]


def plot_runs(runs, out_png: Path) -> Path:
    """Train loss (line) and validation loss (dots) against tokens, one colour per run (the per-run loss.png)."""
    style = styles([run.label for run in runs])
    fig, axes = _figure(RUN_PX)
    ax = axes[0, 0]
    for run in runs:
        st = style[run.label]
        train, val = series(run, "train/loss"), series(run, "val/loss")
        if train:
            ax.plot(*zip(*train), color=st["color"], ls=st["ls"], label=f"{run.label} train", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o--", color=st["color"], label=f"{run.label} val", ms=4)
        sp = [(x, y) for x, y in spike_points(run) if math.isfinite(y)]
        if sp:
            ax.plot(*zip(*sp), "x", color="red", ms=8, mew=2, label="spike")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        fig.legend(loc="outside right upper", fontsize=8)
    return _save(fig, Path(out_png))
