"""`python -m train.report`: groups over seeds, metrics, differences from a baseline and the papers' rows
on synthetic run directories whose answer is known; the W&B path through a fake Api; and a real gpt_tiny
sweep of 2 PEs x 2 seeds (`+sweep=pe_matrix_seeds`) logged to CSV and offline W&B, summarised and reported."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from pelab.train import groups as G
from pelab.train import report, report_plots
from pelab.train.loggers import read_wandb_offline, read_wandb_records
from pelab.train.runs import group_runs, layer_keys, load_run, load_runs, read_metrics, runs_from_wandb, spike_points

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


def config(pe: str, seed: int, model: str = "gpt_tiny", kv_shift: bool = False, lr: float = 1e-3, root="/r") -> dict:
    """A resolved config as `python -m train` writes to config.yaml (the parts that matter here)."""
    pe_cfg = {"name": pe, **({"base": 10000.0, "before_qk_norm": True} if pe == "rope" else {})}
    if pe == "fox":
        pe_cfg["init_std"] = 0.02
    return {
        "model": {"name": model, "n_layer": 3},
        "pe": pe_cfg,
        "data": {"name": "sample", "dir": f"{root}/data/sample", "val_tokens": 2048},
        "optim": {"lr": lr, "betas": [0.9, 0.95]},
        "trainer": {"max_steps": 100, "ckpt_every": 50},
        "seed": seed,
        "kv_shift": kv_shift,
        "run_name": f"{model}-{pe}-s{seed}",
        "paths": {"runs": f"{root}/runs", "data": f"{root}/data"},
        "logger": {"name": "csv"},
    }


def fake_run(root: Path, cfg: dict, val_shift: float = 0.0, *, scale: float = 1.0, spike_at=None, name=None) -> Path:
    """A run directory as `python -m train` leaves it; validation every 20 steps (5 points), val loss
    9.5 - step/25 + val_shift, and known stability/throughput numbers."""
    d = root / (name or f"{cfg['model']['name']}-{cfg['pe']['name']}-s{cfg['seed']}")
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows, probes, spikes = [], [], 0
    for step in range(10, 101, 10):
        if spike_at is not None and step >= spike_at:
            spikes = 1
        row = {
            "step": step,
            "tokens": step * 512,
            "train/loss": scale * (10 - step / 20),
            "grad_norm": 1 + step / 100,
            "tokens_per_s": 1000 * scale + step,
            "mfu": 0.1 * scale,
            "stability/spikes": spikes,
            "stability/clip_rate": 0.5 if step <= 50 else 0.0,
            "train/loss_max": scale * (10 - step / 20) + 0.5,
        }
        if step % 20 == 0:
            row["val/loss"] = 9.5 - step / 25 + val_shift
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
    (d / "diagnostics").mkdir()
    offsets = [0, 1, 2, 4, 8, 16, 32]
    (d / "diagnostics" / "nr-step-00000100.json").write_text(
        json.dumps(
            {
                "step": 100,
                "tokens": 51200,
                "offsets": offsets,
                "layers": [{"nr": 0.1, "offset_mean": [scale * (3 - i) / (1 + o) for o in offsets]} for i in range(3)],
            }
        )
    )
    return d


def known_sweep(root: Path, deltas: dict[str, float], seeds=range(5), noise=0.004, seed_effect=0.03) -> Path:
    """Groups whose val losses differ from rope's by a fixed amount, plus a per-seed effect shared by all
    groups (same seed = same data order) and independent noise, all seeded."""
    rng = np.random.default_rng(123)
    shared = {s: rng.normal(0, seed_effect) for s in seeds}
    for pe, delta in deltas.items():
        for s in seeds:
            fake_run(root, config(pe, s), delta + shared[s] + rng.normal(0, noise))
    return root


def parse_tables(md: str) -> list[list[dict]]:
    """Every markdown table of a document, as lists of {header: cell}."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            tables.append([dict(zip(cur[0], r)) for r in cur[2:]])
            cur = []
    return tables


def by_label(doc: dict) -> dict[str, dict]:
    return {g["label"]: g for g in doc["groups"]}


@pytest.fixture
def no_plots(monkeypatch):
    """Reports without their PNGs, for the tests about tables (plotting is the slow part)."""
    monkeypatch.setattr(report_plots, "plot_report", lambda *args: [])


# ---- synthetic runs with a known answer -----------------------------------------------------------------


def test_known_difference_is_covered_and_identical_groups_cover_zero(tmp_path, capsys):
    runs = known_sweep(tmp_path / "sweep", {"rope": 0.0, "alibi": -0.05, "nope": 0.0})
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    groups = by_label(doc)
    assert list(groups) == ["rope", "alibi", "nope"]  # the baseline first; labels: only the PE differs
    for g in groups.values():
        assert g["n"] == 5 and g["seeds"] == [0, 1, 2, 3, 4] and g["pe"] == g["label"]
        m = g["metrics"]["final_val_loss"]
        assert m["method"] == "t" and m["df"] == 4.0
        assert m["mean"] == pytest.approx(np.mean(m["values"])) and m["std"] == pytest.approx(
            np.std(m["values"], ddof=1)
        )
        assert m["ci95"][0] < m["mean"] < m["ci95"][1]
    diffs = {(d["group"], d["metric"]): d for d in doc["differences"]}
    for metric in ("final_val_loss", "last_k_val_loss", "best_val_loss"):
        alibi, nope = diffs[("alibi", metric)], diffs[("nope", metric)]
        assert alibi["baseline"] == "rope" and alibi["paired_seeds"] == [0, 1, 2, 3, 4]
        assert alibi["method"] == "paired t"
        assert alibi["ci95"][0] <= -0.05 <= alibi["ci95"][1] and alibi["excludes_zero"]  # covers the truth
        assert alibi["ci95"][1] - alibi["ci95"][0] < 0.02  # pairing removes the shared seed effect (sd 0.03)
        assert nope["ci95"][0] <= 0.0 <= nope["ci95"][1] and not nope["excludes_zero"]
    # the same numbers for the constant metrics: difference 0 with a zero-width interval
    assert diffs[("alibi", "tokens_per_s")]["difference"] == 0.0
    md = (out / "report.md").read_text()
    main = parse_tables(md)[0]
    assert [r["group"] for r in main] == ["**rope**", "**alibi**", "**nope**"] and {r["n"] for r in main} == {"5"}
    a = groups["alibi"]["metrics"]["final_val_loss"]
    assert main[1]["final val loss"] == f"{a['mean']:.4f} ± {(a['ci95'][1] - a['ci95'][0]) / 2:.4f}"
    d = diffs[("alibi", "final_val_loss")]
    assert d["sentence"].startswith(f"alibi − rope, final val loss: −{-d['difference']:.4f} ± ")
    assert "(95% CI, n=5 paired seeds): lower (better); the 95% interval excludes 0." in d["sentence"]
    assert "no difference shown: the 95% interval includes 0" in diffs[("nope", "final_val_loss")]["sentence"]
    assert f"- {d['sentence']}" in md
    assert "| **−0.0" in md  # a difference that excludes 0 is bold in the table
    printed = capsys.readouterr().out
    assert "## Groups" in printed and "report.md" in printed


def test_per_run_metrics_are_exact(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, config("rope", 0), spike_at=60)
    d = fake_run(root, config("rope", 1), 0.2, scale=1.2)
    (d / "eval.json").write_text(
        json.dumps(
            {
                "suites": {
                    "zeroshot": {
                        "tasks": {"arc_easy": {"acc": 0.5}, "piqa": {"acc": 0.6}, "boolq": {"skipped": "no data"}},
                        "average": {"acc": 0.55, "tasks": ["arc_easy", "piqa"], "complete": False},
                    },
                    "ppl_vs_length": {"lengths": {"1x": {"ppl": 20.0}, "2x": {"ppl": 30.0}, "4x": {"skipped": "x"}}},
                }
            }
        )
    )
    runs = load_runs([root])
    v0, v1 = (report.run_values(r, last_k=3, target_loss=6.0) for r in runs)
    # val loss 9.5 - step/25 at steps 20..100: 8.7, 7.9, 7.1, 6.3, 5.5
    assert v0["final_val_loss"] == pytest.approx(5.5) and v0["best_val_loss"] == pytest.approx(5.5)
    assert v0["last_k_val_loss"] == pytest.approx((7.1 + 6.3 + 5.5) / 3)
    # 6.0 is crossed between 6.3 (step 80) and 5.5 (step 100): 80 + 0.3 / 0.8 * 20 steps
    assert v0["tokens_to_target"] == pytest.approx((80 + 0.3 / 0.8 * 20) * 512)
    assert report.run_values(runs[0], target_loss=1.0).get("tokens_to_target") is None  # never reached
    assert v0["spikes"] == 1 and v1["spikes"] == 0
    assert v0["clip_rate"] == pytest.approx(25.0)  # 0.5 in 5 of the 10 logging intervals
    assert v0["max_attn_logit"] == pytest.approx(10.0) and v1["max_attn_logit"] == pytest.approx(12.0)
    assert v0["tokens_per_s"] == pytest.approx(1055.0) and v1["mfu"] == pytest.approx(12.0)
    assert "zeroshot_avg" not in v0
    assert v1["zeroshot_avg"] == pytest.approx(55.0) and v1["zeroshot/piqa"] == pytest.approx(60.0)
    assert v1["ppl_ratio/2x"] == pytest.approx(1.5) and "ppl_ratio/4x" not in v1
    doc, *_ = report.build(runs, last_k=3, target_loss=6.0)
    (g,) = doc["groups"]
    assert g["metrics"]["zeroshot_avg"]["n"] == 1 and g["metrics"]["zeroshot_avg"]["ci95"] is None
    assert g["metrics"]["spikes"]["mean"] == 0.5 and g["metrics"]["final_val_loss"]["n"] == 2
    assert doc["groups"][0]["metrics"]["tokens_to_target"]["n"] == 2
    doc, *_ = report.build(runs, target_loss=5.6)  # run 1 ends at 5.7: no mean over the runs that got there
    assert doc["groups"][0]["metrics"]["tokens_to_target"] == {"n": 0, "reached": 1, "of": 2, "mean": None}
    assert "reached 1/2" in report.markdown({**doc, "plots": []}, report.metrics_for([v0, v1], 5, 5.6), [])
    with pytest.raises(ValueError, match="--last-k"):
        report.build(runs, last_k=0)


def test_group_keys_labels_and_wandb_job_type():
    a, b = config("rope", 0, root="/a"), config("rope", 1, root="/b")
    assert G.group_key(a) == G.group_key(b)  # seed, names, paths, data dir, ckpt_every, logger: ignored
    assert G.job_type(a) == G.job_type(b) and G.job_type(a).startswith("gpt_tiny-rope-")
    assert G.job_type(config("rope", 0, lr=2e-3)) != G.job_type(a)
    assert "optim.lr" not in G.group_key(a, ignore=["optim"])
    flat_wandb = {f"{k}.{kk}": vv for k, v in a.items() if isinstance(v, dict) for kk, vv in v.items()}
    flat_wandb.update({k: v for k, v in a.items() if not isinstance(v, dict)})
    flat_wandb["_wandb"] = {"runtime": 12}
    assert G.group_key(flat_wandb) == G.group_key(a)  # flat W&B keys group like nested ones

    def labels(*cfgs):
        return G.labels([G.group_key(c) for c in cfgs])

    assert labels(config("rope", 0), config("fox", 0)) == ["rope", "fox"]  # pe.base etc. collapse into pe=...
    assert labels(config("rope", 0, "gpt_355m"), config("grape_ap", 0, "gpt_770m")) == [
        "gpt_355m/rope",
        "gpt_770m/grape_ap",
    ]
    assert labels(config("fox", 0, kv_shift=True), config("rope", 0)) == [
        "pe=fox,kv_shift=true",
        "pe=rope,kv_shift=false",
    ]
    assert labels(config("rope", 0, lr=1e-3), config("rope", 0, lr=2e-3)) == ["optim.lr=0.001", "optim.lr=0.002"]
    c1, c2 = config("rope", 0), config("rope", 0)
    c2["pe"]["base"] = 500000.0
    assert labels(c1, c2, config("alibi", 0)) == [
        "pe=rope,pe.base=10000,pe.before_qk_norm=true",
        "pe=rope,pe.base=500000,pe.before_qk_norm=true",
        "pe=alibi,pe.base=-,pe.before_qk_norm=-",
    ]
    assert labels(config("rope", 0)) == ["gpt_tiny-rope"]


def test_baseline_is_the_same_model_and_welch_when_seeds_differ(tmp_path, capsys):
    root = tmp_path / "runs"
    for model, shift in (("gpt_355m", 0.0), ("gpt_770m", -1.0)):
        for s in range(3):
            fake_run(root, config("rope", s, model), shift + 0.01 * s)
            fake_run(root, config("fox", s, model), shift - 0.1 + 0.012 * s)
    for s in (7, 8, 9):  # other seeds: no pairing with rope
        fake_run(root, config("alibi", s, "gpt_355m"), -0.2 + 0.01 * s)
    doc, *_ = report.build(load_runs([root]))
    diffs = {(d["group"], d["metric"]): d for d in doc["differences"]}
    assert diffs[("gpt_355m/fox", "final_val_loss")]["baseline"] == "gpt_355m/rope"
    assert diffs[("gpt_770m/fox", "final_val_loss")]["baseline"] == "gpt_770m/rope"
    assert diffs[("gpt_770m/fox", "final_val_loss")]["difference"] == pytest.approx(-0.1 + 0.002 * 1)
    welch = diffs[("gpt_355m/alibi", "final_val_loss")]
    assert welch["method"] == "Welch t" and welch["paired_seeds"] == [] and welch["also_differs_in"] == []
    assert "Welch t, n=3 vs 3" in welch["sentence"]
    assert [g["label"] for g in doc["groups"][:2]] == ["gpt_355m/rope", "gpt_770m/rope"]

    doc, *_ = report.build(load_runs([root]), baseline="pe=fox")
    assert {d["baseline"] for d in doc["differences"]} == {"gpt_355m/fox", "gpt_770m/fox"}
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--baseline", "pe=nope"]) == 2
    assert "--baseline pe=nope: no group matches; the groups have pe.name=alibi, pe.name=fox" in capsys.readouterr().err
    assert report.main([str(root), "--out", str(out), "--baseline", "rope"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_no_rope_no_differences_and_the_report_says_how(tmp_path, no_plots):
    root = tmp_path / "runs"
    fake_run(root, config("alibi", 0), 0.0)
    fake_run(root, config("fox", 0), 0.1)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["differences"] == [] and doc["settings"]["baseline"] is None
    assert "choose one with `--baseline KEY=VALUE`" in (out / "report.md").read_text()
    # single runs: values without intervals, the difference without one, and the sentence says why
    assert report.main([str(root), "--out", str(out), "--baseline", "pe=alibi"]) == 0
    doc = json.loads((out / "report.json").read_text())
    d = next(d for d in doc["differences"] if d["metric"] == "final_val_loss")
    assert d["ci95"] is None and d["difference"] == pytest.approx(0.1) and "run more seeds" in d["sentence"]
    assert parse_tables((out / "report.md").read_text())[0][0]["final val loss"] == "5.5000"


def test_bootstrap_intervals_are_labelled(tmp_path, no_plots):
    runs = known_sweep(tmp_path / "sweep", {"rope": 0.0, "alibi": -0.05})
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out), "--interval", "bootstrap"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["groups"][0]["metrics"]["final_val_loss"]["method"] == "bootstrap"
    d = next(d for d in doc["differences"] if d["metric"] == "final_val_loss")
    assert d["method"] == "paired bootstrap" and d["ci95"][0] <= -0.05 <= d["ci95"][1]
    md = (out / "report.md").read_text()
    assert "percentile-bootstrap interval" in md and " [" in parse_tables(md)[0][0]["final val loss"]


# ---- the papers' numbers ----------------------------------------------------------------------------


def test_paper_data_is_consistent_and_installed():
    papers = yaml.safe_load(report.PAPERS_FILE.read_text())
    assert set(papers) == {"grape", "ropepp"}
    grape = report.load_paper("grape")
    assert len(grape["rows"]) == 23
    for r in grape["rows"]:
        tasks = [r[c["key"]] for c in grape["columns"] if c["key"].startswith("zeroshot/")]
        assert len(tasks) == 7 and abs(np.mean(tasks) - r["zeroshot_avg"]) < 0.006, r["method"]
    rope = next(r for r in grape["rows"] if r["model"] == "gpt_355m" and r["method"] == "RoPE")
    assert (rope["zeroshot/arc_easy"], rope["final_val_loss"], rope["last_k_val_loss"]) == (56.36, 2.556, 2.578)
    assert any("read from" in n for n in grape["notes"])
    pes = {p.stem for p in (REPO / "conf" / "pe").glob("*.yaml")}
    models = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    for name in papers:
        for r in report.load_paper(name)["rows"]:
            assert r["pe"] in pes and (r["model"] in models or r["model"] == "376m")
    assert '"pelab.train" = ["papers.yaml"]' in (REPO / "pyproject.toml").read_text()
    with pytest.raises(ValueError, match="unknown"):
        report.load_paper("fope")


def test_paper_rows_sit_beside_matching_groups(tmp_path, no_plots):
    root = tmp_path / "runs"
    for s in range(2):
        fake_run(root, config("rope", s, "gpt_355m"))
        fake_run(root, config("grape_ap", s, "gpt_355m"), -0.01)
        fake_run(root, config("fox", s, "gpt_355m", kv_shift=True), -0.02)
        fake_run(root, config("nope", s, "gpt_355m"), 0.3)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--paper", "grape", "--paper", "ropepp"]) == 0
    md = (out / "report.md").read_text()
    doc = json.loads((out / "report.json").read_text())
    grape = next(p for p in doc["papers"] if p["paper"] == "grape")
    matches = {m["group"]: [r["method"] for r in m["rows"]] for m in grape["matches"]}
    assert matches == {
        "pe=rope,kv_shift=false": ["RoPE"],
        "pe=grape_ap,kv_shift=false": ["GRAPE-AP"],
        "pe=fox,kv_shift=true": ["FoX w/ KV-shift"],
    }  # same model only; nope is in no paper
    table = parse_tables(md.split("## Published numbers: GRAPE")[1])[0]
    rows = {r[""]: r for r in table}
    assert rows["↳ 353M RoPE (published)"]["val loss at 49.15B tokens (read from Figs. 2-3)"] == "2.556"
    assert rows["↳ 353M RoPE (published)"]["zero-shot avg, 7 tasks (%)"] == "51.73"
    assert rows["↳ 353M FoX w/ KV-shift (published)"]["SciQ"] == "79.70"
    ours = rows["**pe=rope,kv_shift=false** (this comparison)"]
    assert ours["n"] == "2" and ours["val loss at 49.15B tokens (read from Figs. 2-3)"].startswith("5.5000 ± ")
    assert ours["mean of last 5 val, 41-49B (read from Figs. 2-3)"] != "–"
    assert "Published single-seed numbers from a different training run" in md
    assert "read from the camera-ready PDF's vector paths" in md and "49.2B tokens" in md
    ropepp = md.split("## Published numbers: RoPE++")[1]
    assert "376M RoPE (published)" in ropepp and "27.4" in ropepp  # gpt_355m is no RoPE++ size: every size
    # --last-k other than the paper's 5: our column is left empty rather than misaligned
    assert report.main([str(root), "--out", str(out), "--paper", "grape", "--last-k", "3"]) == 0
    table = parse_tables((out / "report.md").read_text().split("## Published numbers")[1])[0]
    assert table[0]["mean of last 5 val, 41-49B (read from Figs. 2-3)"] == "–"


# ---- plots ----------------------------------------------------------------------------------------------


def test_plots_have_seed_bands_distinct_styles_and_the_expected_size(tmp_path):
    root = tmp_path / "runs"
    for s, scale in enumerate((0.9, 1.0, 1.1)):
        fake_run(root, config("rope", s), scale=scale, spike_at=60 if s == 0 else None)
        fake_run(root, config("alibi", s), -0.1, scale=scale)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    for name in ("loss.png", "val_loss.png", "grad_norm.png"):
        assert png_size(out / name) == report_plots.CURVE_PX, name
    assert png_size(out / "overview.png") == report_plots.OVERVIEW_PX
    layers = (3 * report_plots.LAYER_PANEL_PX[0] + report_plots.LEGEND_PX, report_plots.LAYER_PANEL_PX[1])
    assert png_size(out / "max_logit_layers.png") == layers and png_size(out / "offset_curves.png") == layers
    for name in ("metrics.png", "differences.png"):
        w, h = png_size(out / name)
        assert w >= 3 * report_plots.METRIC_PANEL_PX[0] and h > 300, name
    doc = json.loads((out / "report.json").read_text())
    assert doc["plots"] == [
        "loss.png",
        "val_loss.png",
        "grad_norm.png",
        "overview.png",
        "max_logit_layers.png",
        "offset_curves.png",
        "metrics.png",
        "differences.png",
    ]
    assert all(f"![{p}]({p})" in (out / "report.md").read_text() for p in doc["plots"])
    groups = group_runs(load_runs([root]))
    xs, mean, lo, hi = report_plots.band(groups[0].runs, "train/loss")
    assert (
        xs[0] == 10 * 512 and mean[0] == pytest.approx(9.5) and (lo[0], hi[0]) == pytest.approx((0.9 * 9.5, 1.1 * 9.5))
    )
    style = report_plots.styles([f"g{i}" for i in range(24)])
    assert len({(s["color"], s["ls"]) for s in style.values()}) == 24
    assert len({s["color"] for s in list(style.values())[:12]}) == 12  # one colour per PE of the registry


def test_spike_markers_and_merged_probe_rows(tmp_path):
    run = load_run(fake_run(tmp_path, config("rope", 0), spike_at=60))
    assert spike_points(run) == [(60 * 512, 1.0 * (10 - 60 / 20) + 0.5)]
    assert run.label == "gpt_tiny-rope-s0" and run.offsets["step"] == 100
    row40 = next(r for r in run.rows if r["step"] == 40)
    assert row40["attn/max_logit/L2"] == 2.0 and row40["train/loss"] == 8.0  # metrics + probes of one step
    assert layer_keys([run]) == ["attn/max_logit/L0", "attn/max_logit/L1", "attn/max_logit/L2"]


def test_report_command_line_errors_are_clear(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


# ---- W&B ----------------------------------------------------------------------------------------------


class FakeRun:
    def __init__(self, run_dir: Path, run_id: str):
        self.id = run_id
        self.config = yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved config, as logged
        self.summary = {"final/val_loss": 1.0}
        # What LoggerBridge / StabilityMonitor send: grouped names, one history row per log call.
        from pelab.train.metrics import grouped

        self._rows = []
        for i, r in enumerate(read_metrics(run_dir)):
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


def test_wandb_gives_the_same_grouped_report(tmp_path, monkeypatch, no_plots):
    root = known_sweep(tmp_path / "sweep", {"rope": 0.0, "alibi": -0.05}, seeds=range(3))
    dirs = sorted(p for p in root.iterdir())
    api = FakeApi([FakeRun(d, f"id{i}") for i, d in enumerate(dirs)])
    runs = runs_from_wandb("me/pelab/sweep-1", api=api)
    assert api.calls == [("me/pelab", {"group": "sweep-1"})]
    local, *_ = report.build(load_runs([root]))
    remote, *_ = report.build(runs)
    assert [g["label"] for g in remote["groups"]] == [g["label"] for g in local["groups"]] == ["rope", "alibi"]
    for lg, rg in zip(local["groups"], remote["groups"]):
        assert rg["n"] == lg["n"] == 3 and set(rg["metrics"]) == set(lg["metrics"]) - {"zeroshot_avg"}
        for key, m in rg["metrics"].items():
            assert m["mean"] == pytest.approx(lg["metrics"][key]["mean"]), key
            assert m["ci95"] == pytest.approx(lg["metrics"][key]["ci95"]), key
    ld = {(d["group"], d["metric"]): d["ci95"] for d in local["differences"]}
    rd = {(d["group"], d["metric"]): d["ci95"] for d in remote["differences"]}
    assert set(rd) == set(ld) - {("alibi", "zeroshot_avg")} and all(rd[k] == pytest.approx(ld[k]) for k in rd)
    # the command line goes through wandb.Api()
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: api)
    out = tmp_path / "wb"
    assert report.main(["--wandb", "me/pelab/sweep-1", "--out", str(out)]) == 0
    assert len(parse_tables((out / "report.md").read_text())[0]) == 2
    assert json.loads((out / "report.json").read_text())["groups"][0]["runs"][0].startswith("wandb:me/pelab/runs/")


# ---- a real sweep: 2 PEs x 2 seeds, CSV + offline W&B, then the summary and the report ----------------

SWEEP = [
    *TINY,
    "model.n_layer=2",
    "trainer.max_steps=4",
    "trainer.val_every=2",
    "trainer.ckpt_every=4",
    "data.val_tokens=512",
    "monitor.probe_every=2",
    "monitor.nr_every=4",
    "logger=wandb",
]
PES = ["rope", "alibi"]


@pytest.fixture(scope="module")
def sweep(data_root, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            "+sweep=pe_matrix_seeds",
            f"pe={','.join(PES)}",
            "seed=0,1",
            *SWEEP,
            f"paths.data={data_root}",
            f"paths.runs={runs}",
            "hydra.sweep.subdir=${hydra.job.num}-${pe.name}-s${seed}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    (root,) = list((runs / "multirun").iterdir())
    return root


def _job_type(cell: Path) -> str:
    (f,) = cell.glob("wandb/offline-run-*/run-*.wandb")
    return next(r.run.job_type for r in read_wandb_records(f) if r.WhichOneof("record_type") == "run")


def test_sweep_logs_every_metric_to_csv_and_offline_wandb(sweep):
    cells = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(cells) == 4
    ids, groups, job_types = set(), set(), {}
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
        assert [int(r["step"]) for r in rows] == [2, 4] and all(r["val/loss"] for r in rows)
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
        summary = json.loads((cell / "summary.json").read_text())
        pe, seed = summary["pe"], summary["seed"]
        assert wb["name"] == f"gpt_tiny-{pe}-s{seed}" and f"pe:{pe}" in wb["tags"]
        assert wb["config"]["pe"]["name"] == pe and wb["config"]["monitor"]["probe_every"] == 2
        job_types.setdefault(pe, set()).add(_job_type(cell))
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
    assert len(ids) == 4  # one W&B run per job
    assert len(groups) == 1 and groups.pop() == f"multirun-{sweep.name}"  # grouped by sweep
    # the two seeds of a PE share one job_type (the workspace groups them); PEs differ
    assert all(len(t) == 1 for t in job_types.values()) and len(set().union(*job_types.values())) == 2
    assert job_types["rope"].pop().startswith("gpt_tiny-rope-")


def test_sweep_summary_carries_the_grouped_table(sweep):
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["counts"] == {"ok": 4} and len(summary["rows"]) == 4
    groups = {g["label"]: g for g in summary["groups"]}
    assert set(groups) == set(PES) and all(g["n"] == 2 and g["seeds"] == [0, 1] for g in groups.values())
    rope = groups["rope"]["metrics"]["final_val_loss"]
    rope_rows = [r for r in summary["rows"] if r["pe"] == "rope"]
    assert rope["mean"] == pytest.approx(np.mean([r["val_loss"] for r in rope_rows]))
    assert {d["group"] for d in summary["differences"]} == {"alibi"}
    assert all(d["baseline"] == "rope" and d["paired_seeds"] == [0, 1] for d in summary["differences"])
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["group_n"] for r in rows} == {"2"}
    for r in rows:
        g = groups[r["group"]]["metrics"]["final_val_loss"]
        assert r["pe"] == r["group"] and float(r["final_val_loss_mean"]) == pytest.approx(g["mean"])
        assert float(r["final_val_loss_lo"]) == pytest.approx(g["ci95"][0])


def test_report_on_the_sweep(sweep, tmp_path):
    out = tmp_path / "report"
    r = subprocess.run(
        [sys.executable, "-m", "train.report", str(sweep), "--out", str(out), "--paper", "grape"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    groups = {g["pe"]: g for g in doc["groups"]}
    assert set(groups) == set(PES) and all(g["n"] == 2 for g in groups.values())
    for pe, g in groups.items():
        for key in ("final_val_loss", "last_k_val_loss", "best_val_loss", "spikes", "max_attn_logit", "tokens_per_s"):
            m = g["metrics"][key]
            assert {"mean", "std", "ci95"} <= set(m) and m["ci95"][0] <= m["mean"] <= m["ci95"][1], (pe, key)
    assert {(d["group"], d["baseline"]) for d in doc["differences"]} == {("alibi", "rope")}
    md = (out / "report.md").read_text()
    main = parse_tables(md)[0]
    assert [r["group"] for r in main] == ["**rope**", "**alibi**"] and {r["n"] for r in main} == {"2"}
    assert all(" ± " in r["final val loss"] for r in main)
    assert "alibi − rope, final val loss: " in md and "n=2 paired seeds" in md
    assert "↳ 353M RoPE (published)" in md and "↳ 770M ALiBi (published)" in md  # gpt_tiny: every size
    assert png_size(out / "overview.png") == report_plots.OVERVIEW_PX
    assert png_size(out / "max_logit_layers.png") == (
        2 * report_plots.LAYER_PANEL_PX[0] + report_plots.LEGEND_PX,
        report_plots.LAYER_PANEL_PX[1],
    )
    assert (out / "differences.png").exists() and (out / "offset_curves.png").exists()


def test_resumed_run_continues_the_same_wandb_run(sweep, tiny_cfg):
    from pelab.train.run import run

    cell = sweep / "0-rope-s0"  # hydra.sweep.subdir=${hydra.job.num}-${pe.name}-s${seed}
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
