"""`python -m train.report`: plots and the comparison table from local logs and from the W&B API
(a fake Api object), and a real 3-PE gpt_tiny sweep logged to CSV and to offline W&B runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from pelab.train import report
from pelab.train.loggers import read_wandb_offline

from tests.conftest import REPO, TINY


def png_size(path: Path) -> tuple[int, int]:
    h, w = mpimg.imread(path).shape[:2]
    return w, h


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def fake_run(root: Path, pe: str, seed: int, scale: float, spike_at: int | None = None) -> Path:
    """A run directory as `python -m train` leaves it, with known numbers."""
    d = root / f"gpt_tiny-{pe}-sample-s{seed}"
    d.mkdir(parents=True)
    rows, probes, spikes = [], [], 0
    for step in range(10, 101, 10):
        if spike_at is not None and step >= spike_at:
            spikes = 1
        row = {
            "step": step,
            "tokens": step * 512,
            "train/loss": scale * (10 - step / 20),
            "lr": 1e-3,
            "grad_norm": 1 + step / 100,
            "tokens_per_s": 1000 * scale + step,
            "mfu": 0.1 * scale,
            "stability/spikes": spikes,
            "train/loss_max": scale * (10 - step / 20) + 0.5,
        }
        if step % 50 == 0:
            row["val/loss"] = scale * (9.5 - step / 25) + (3.0 if step == 100 and pe == "nope" else 0)
        rows.append(row)
        if step % 20 == 0:
            probes.append(
                {
                    "step": step,
                    "tokens": step * 512,
                    "attn/max_logit": scale * step / 10,
                    **{f"attn/max_logit/L{i}": scale * step / 10 - i for i in range(3)},
                }
            )
    write_csv(d / "metrics.csv", rows)
    write_csv(d / "probes.csv", probes)
    (d / "summary.json").write_text(
        json.dumps({"model": "gpt_tiny", "pe": pe, "seed": seed, "data": "sample", "kv_shift": False})
    )
    return d


@pytest.fixture
def fake_sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    fake_run(root, "rope", 0, 1.0, spike_at=60)
    fake_run(root, "nope", 0, 1.1)
    fake_run(root, "alibi", 1, 0.9)
    return root


def parse_table(md: str) -> list[dict]:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_report_writes_plots_of_the_expected_size_and_one_row_per_run(fake_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(fake_sweep), "--out", str(out)]) == 0
    for name in ("loss.png", "val_loss.png", "grad_norm.png"):
        assert png_size(out / name) == report.SINGLE_PX, name
    assert png_size(out / "overview.png") == report.OVERVIEW_PX
    # 3 layers -> one row of 3 panels
    assert png_size(out / "max_logit_layers.png") == (3 * report.LAYER_PANEL_PX[0], report.LAYER_PANEL_PX[1])
    rows = {r["run"]: r for r in parse_table((out / "report.md").read_text())}
    assert set(rows) == {"gpt_tiny-rope-s0", "gpt_tiny-nope-s0", "gpt_tiny-alibi-s1"}
    rope, nope, alibi = rows["gpt_tiny-rope-s0"], rows["gpt_tiny-nope-s0"], rows["gpt_tiny-alibi-s1"]
    assert rope["final val loss"] == f"{9.5 - 100 / 25:.4f}" and rope["best val loss"] == f"{9.5 - 100 / 25:.4f}"
    # nope: the last val loss is worse than its best
    assert nope["final val loss"] == f"{1.1 * 5.5 + 3.0:.4f}" and nope["best val loss"] == f"{1.1 * 7.5:.4f}"
    assert (rope["spikes"], nope["spikes"], alibi["spikes"]) == ("1", "0", "0")
    assert rope["tokens/s"] == f"{1000 + 55:,.0f}"  # median of 1010..1100
    assert alibi["MFU"] == "9.0%" and rope["steps"] == "100" and rope["tokens"] == "51,200"
    assert alibi["max attn logit"] == f"{0.9 * 10:.2f}"
    data = json.loads((out / "report.json").read_text())
    assert len(data) == 3 and {d["pe"] for d in data} == {"rope", "nope", "alibi"}
    assert "| run |" in capsys.readouterr().out


def test_spike_markers_and_merged_probe_rows(fake_sweep):
    run = report.load_run(fake_sweep / "gpt_tiny-rope-sample-s0")
    assert report.spike_points(run) == [(60 * 512, 1.0 * (10 - 60 / 20) + 0.5)]
    assert run.label == "gpt_tiny-rope-s0"
    row40 = next(r for r in run.rows if r["step"] == 40)
    assert row40["attn/max_logit/L2"] == 2.0 and row40["train/loss"] == 8.0  # metrics + probes of one step
    assert report.layer_keys([run]) == ["attn/max_logit/L0", "attn/max_logit/L1", "attn/max_logit/L2"]


def test_report_command_line_errors_are_clear(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


class FakeRun:
    def __init__(self, run_dir: Path, run_id: str):
        self.id = run_id
        s = json.loads((run_dir / "summary.json").read_text())
        self.config = {
            "model": {"name": s["model"]},
            "pe": {"name": s["pe"]},
            "seed": s["seed"],
            "data": {"name": "sample"},
            "kv_shift": False,
        }
        self.summary = {"final/val_loss": 1.0}
        # What LoggerBridge / StabilityMonitor send: grouped names, one history row per log call.
        from pelab.train.metrics import grouped

        self._rows = []
        for i, r in enumerate(report.read_metrics(run_dir)):
            probe_keys = [k for k in r if k.startswith("attn/")]
            main = grouped({k: v for k, v in r.items() if k not in probe_keys and k != "step"})
            self._rows.append({**main, "trainer/global_step": int(r["step"]), "_step": 2 * i, "_runtime": 1.0})
            if probe_keys:
                self._rows.append(
                    {
                        **{k: r[k] for k in probe_keys},
                        "tokens": r["tokens"],
                        "trainer/global_step": int(r["step"]),
                        "_step": 2 * i + 1,
                        "attn/offset_curve_table": {"_type": "table-file"},
                    }
                )

    def scan_history(self):
        return iter(self._rows)


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return list(self._runs)


def test_wandb_path_maps_history_to_the_same_report(fake_sweep, tmp_path, monkeypatch):
    dirs = sorted(p for p in fake_sweep.iterdir())
    api = FakeApi([FakeRun(d, f"id{i}") for i, d in enumerate(dirs)])
    runs = report.runs_from_wandb("me/pelab/sweep-1", api=api)
    assert api.calls == [("me/pelab", {"group": "sweep-1"})]
    local = {s["run"]: s for s in (report.summarize(r) for r in report.load_runs([fake_sweep]))}
    remote = {s["run"]: s for s in (report.summarize(r) for r in runs)}
    assert set(remote) == set(local)
    for name, s in remote.items():
        for key in (
            "steps",
            "tokens",
            "final_train_loss",
            "final_val_loss",
            "best_val_loss",
            "spikes",
            "tokens_per_s",
            "mfu",
            "max_attn_logit",
        ):
            assert s[key] == pytest.approx(local[name][key]), (name, key)
    # the command line goes through wandb.Api()
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: api)
    out = tmp_path / "wb"
    assert report.main(["--wandb", "me/pelab/sweep-1", "--out", str(out)]) == 0
    assert len(parse_table((out / "report.md").read_text())) == 3 and (out / "overview.png").exists()


# ---- a real sweep: 3 PEs, CSV + offline W&B, then the report ------------------------------------------

SWEEP = [
    *TINY,
    "model.n_layer=2",
    "trainer.max_steps=4",
    "trainer.val_every=4",
    "trainer.ckpt_every=4",
    "data.val_tokens=512",
    "monitor.probe_every=2",
    "monitor.nr_every=4",
    "logger=wandb",
]


@pytest.fixture(scope="module")
def sweep(data_root, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            "pe=rope,nope,alibi",
            *SWEEP,
            f"paths.data={data_root}",
            f"paths.runs={runs}",
            "hydra.sweep.subdir=${hydra.job.num}-${pe.name}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    (root,) = list((runs / "multirun").iterdir())
    return root


def test_sweep_logs_every_metric_to_csv_and_offline_wandb(sweep):
    cells = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(cells) == 3
    ids, groups = set(), set()
    for cell in cells:
        with open(cell / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {
            "step",
            "tokens",
            "train/loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "train/z_loss",
            "train/lse",
            "stability/clip_rate",
            "stability/spikes",
            "stability/spike_score",
            "throughput/step_time_s",
            "throughput/data_wait",
        } <= set(rows[0])
        assert [int(r["step"]) for r in rows] == [2, 4]
        with open(cell / "probes.csv", newline="") as f:
            probes = list(csv.DictReader(f))
        assert [int(r["step"]) for r in probes] == [2, 4]
        assert {
            "attn/max_logit/L0",
            "attn/max_logit/L1",
            "attn/entropy/L1",
            "stability/update_ratio/L0",
            "stability/param_rms/embed",
            "stability/grad_rms/L1",
            "stability/resid_rms/L1",
            "stability/output_logit_max",
        } <= set(probes[0])
        assert probes[1]["attn/nr/L1"] and not probes[0].get("attn/nr/L1")  # NR at step 4 only
        nr = json.loads((cell / "diagnostics" / "nr-step-00000004.json").read_text())
        assert len(nr["layers"]) == 2 and len(nr["layers"][0]["offset_mean"]) == len(nr["offsets"])

        wb = read_wandb_offline(cell)
        assert wb["id"] == (cell / "wandb_id.txt").read_text().strip()
        ids.add(wb["id"])
        groups.add(wb["group"])
        pe = json.loads((cell / "summary.json").read_text())["pe"]
        assert wb["name"] == f"gpt_tiny-{pe}-s0" and f"pe:{pe}" in wb["tags"]
        assert wb["config"]["pe"]["name"] == pe and wb["config"]["monitor"]["probe_every"] == 2
        keys = set().union(*wb["history"])
        assert {
            "train/loss",
            "train/lr",
            "stability/grad_norm",
            "throughput/tokens_per_s",
            "val/loss",
            "attn/max_logit/L1",
            "stability/update_ratio/L0",
            "attn/nr/L0",
            "tokens",
        } <= keys
        assert "lr" not in keys and "grad_norm" not in keys  # W&B gets the grouped names only
        train_loss = [h["train/loss"] for h in wb["history"] if "train/loss" in h]
        assert train_loss == pytest.approx([float(r["train/loss"]) for r in rows])
        assert {"glob": "attn/*", "step_metric": "tokens", "name": ""} in wb["metrics"]
    assert len(ids) == 3  # one W&B run per job
    assert len(groups) == 1 and groups.pop() == f"multirun-{sweep.name}"  # grouped by sweep


def test_resumed_run_continues_the_same_wandb_run(sweep, tiny_cfg):
    from pelab.train.run import run

    cell = sweep / "0-rope"  # hydra.sweep.subdir=${hydra.job.num}-${pe.name}
    run_id = (cell / "wandb_id.txt").read_text().strip()
    group = read_wandb_offline(cell)["group"]
    overrides = [o for o in SWEEP if o not in TINY and not o.startswith("trainer.max_steps")]
    run(tiny_cfg(*overrides, "pe=rope", "trainer.max_steps=6"), cell)  # no Hydra sweep here: group from the run dir
    offline = sorted(cell.glob("wandb/offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    assert read_wandb_offline(cell)["group"] == group
    steps = [h["trainer/global_step"] for h in read_wandb_offline(cell)["history"] if "train/loss" in h]
    assert steps == [2, 4, 6]
    for name in ("metrics.csv", "probes.csv"):  # rows from before the resume are kept
        with open(cell / name, newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 6], name


def test_report_on_the_sweep(sweep, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    rows = parse_table((out / "report.md").read_text())
    assert sorted(r["run"] for r in rows) == ["gpt_tiny-alibi-s0", "gpt_tiny-nope-s0", "gpt_tiny-rope-s0"]
    for r in rows:
        cell = next(sweep.glob(f"*-{r['run'].split('-')[1]}"))
        summary = json.loads((cell / "summary.json").read_text())
        assert r["final val loss"] == f"{summary['val_loss']:.4f}"
        assert r["spikes"] == str(summary["spikes"])
        assert float(r["max attn logit"]) > 0
    assert png_size(out / "overview.png") == report.OVERVIEW_PX
    assert png_size(out / "max_logit_layers.png") == (2 * report.LAYER_PANEL_PX[0], report.LAYER_PANEL_PX[1])
