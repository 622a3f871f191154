"""Runs as `train.report` reads them: a run directory (config.yaml, metrics.csv, probes.csv, eval.json,
diagnostics) or a W&B run, mapped to one `Run`; runs that differ only in `seed` grouped into a `Group`."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from pelab.train import groups as G


@dataclass
class Run:
    label: str  # {model}-{pe}[-kvshift]-s{seed}
    meta: dict  # model, pe, kv_shift, data, seed
    rows: list[dict] = field(default_factory=list)  # one dict per logged step, sorted by step
    source: str = ""
    config: dict = field(default_factory=dict)  # the resolved config (or what summary.json tells)
    evals: dict = field(default_factory=dict)  # eval.json "suites", when it exists beside the run
    offsets: dict | None = None  # the newest diagnostics/nr-step-*.json


@dataclass
class Group:
    label: str
    key: dict  # flat config minus the ignored keys
    runs: list[Run]

    @property
    def meta(self) -> dict:
        return {k: v for k, v in self.runs[0].meta.items() if k != "seed"}

    @property
    def seeds(self) -> list:
        return [r.meta.get("seed") for r in self.runs]


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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_label(meta: dict) -> str:
    return f"{G.short_name(meta)}-s{meta.get('seed', '?')}"


def load_run(run_dir: Path) -> Run:
    """A run directory as `python -m train` leaves it: config.yaml (else summary.json) for the group key,
    metrics.csv + probes.csv, eval.json and the newest diagnostics/nr-step-*.json when present."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists():
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    else:
        s = _read_json(run_dir / "summary.json") or {}
        config = {
            "model": {"name": s.get("model", "?")},
            "pe": {"name": s.get("pe", run_dir.name)},
            "kv_shift": bool(s.get("kv_shift", False)),
            "data": {"name": s.get("data", "?")},
            "seed": s.get("seed", "?"),
        }
    meta = G.meta_of(config)
    evals = (_read_json(run_dir / "eval.json") or {}).get("suites", {})
    nr = sorted(run_dir.glob("diagnostics/nr-step-*.json"))
    offsets = _read_json(nr[-1]) if nr else None
    return Run(run_label(meta), meta, read_metrics(run_dir), str(run_dir), config, evals, offsets)


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
    (history rows keyed by step, grouped names also under their metrics.csv names; the logged config
    is the resolved config, so the runs group exactly as their local directories do)."""
    from pelab.train.metrics import CSV_ALIASES  # imports torch; only for --wandb

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
        meta = G.meta_of(cfg)
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
        source = f"wandb:{parts[0]}/{parts[1]}/runs/{getattr(r, 'id', '?')}"
        runs.append(Run(run_label(meta), meta, rows, source, cfg))
    if not runs:
        raise SystemExit(f"no W&B runs found in {path}")
    return _dedupe_labels(runs)


# ---- grouping and series ----------------------------------------------------------------------------------------


def group_runs(runs: list[Run], ignore: list[str] = ()) -> list[Group]:
    """Runs with equal group keys (config minus seed, names, paths; minus `ignore`), labelled by what
    differs between the groups. Runs keep their order; groups are in order of their first run."""
    keys: dict[str, dict] = {}
    members: dict[str, list[Run]] = {}
    for run in runs:
        key = G.group_key(run.config, ignore)
        kid = G.key_id(key)
        keys.setdefault(kid, key)
        members.setdefault(kid, []).append(run)
    ids = list(keys)
    labels = G.labels([keys[i] for i in ids])
    return [Group(label, keys[i], members[i]) for label, i in zip(labels, ids)]


def series(run: Run, key: str, x: str = "tokens") -> list[tuple[float, float]]:
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
