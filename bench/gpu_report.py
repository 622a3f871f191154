"""Pass/fail tables of the GPU check (bench/gpu_check.sh), written as it goes so a stopped run keeps them.

As a pytest plugin (`pytest -p bench.gpu_report`, with PELAB_GPU_RESULTS=<file.json>): records every
collected test and each outcome, rewriting the JSON after each test, so tests that never ran (a time
limit) show up as `not run`. As a command:

    python -m bench.gpu_report tests OUT/test_gpu.json [OUT/test_gpu_rows.jsonl]   # make test-gpu table
    python -m bench.gpu_report runs OUT/runs                                        # python -m train runs
    python -m bench.gpu_report merge A/latest.json B/latest.json > bench/results/latest.json

print markdown tables (and write them next to the input as .md).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

# ---- pytest plugin -------------------------------------------------------------------------------------

_STATE: dict = {"collected": [], "outcomes": {}}


def _save() -> None:
    path = os.environ.get("PELAB_GPU_RESULTS")
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(_STATE, indent=1))
        tmp.replace(path)


def pytest_collection_finish(session) -> None:
    _STATE["collected"] = [item.nodeid for item in session.items]
    _save()


def pytest_runtest_logreport(report) -> None:
    # one outcome per test: the call's, or a skip / failure in setup or teardown
    if report.when != "call" and report.outcome == "passed":
        return
    entry = {"outcome": report.outcome, "seconds": round(report.duration, 1)}
    if report.outcome == "failed":
        entry["error"] = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
    if report.outcome == "failed" or report.nodeid not in _STATE["outcomes"]:
        _STATE["outcomes"][report.nodeid] = entry
    _save()


# ---- tables --------------------------------------------------------------------------------------------


def _group(nodeid: str) -> str:
    """tests/test_gpu.py::test_model_attention_paths[rope-docs-train] -> test_gpu.py::test_model_attention_paths"""
    return nodeid.split("[")[0].replace("tests/", "")


def tests_table(results: Path, rows: Path | None = None) -> str:
    state = json.loads(results.read_text())
    outcomes = state["outcomes"]
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seconds: dict[str, float] = defaultdict(float)
    for nodeid in state["collected"]:
        o = outcomes.get(nodeid, {"outcome": "not run"})
        counts[_group(nodeid)][o["outcome"]] += 1
        seconds[_group(nodeid)] += o.get("seconds", 0.0)
    lines = ["| tests | passed | failed | skipped | not run | s |", "| --- | --- | --- | --- | --- | --- |"]
    for g, c in counts.items():
        lines.append(f"| {g} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['not run']} | {seconds[g]:.0f} |")
    total = {k: sum(c[k] for c in counts.values()) for k in ("passed", "failed", "skipped", "not run")}
    lines.append(f"| **all** | {total['passed']} | {total['failed']} | {total['skipped']} | {total['not run']} | |")
    failed = [(n, o) for n, o in outcomes.items() if o["outcome"] == "failed"]
    if failed:
        lines += ["", "Failed:"] + [f"- `{n}`: {o.get('error', '')}" for n, o in failed]
    if rows and rows.exists():
        lines += ["", *_rows_table([json.loads(x) for x in rows.read_text().splitlines() if x.strip()])]
    return "\n".join(lines)


def _rows_table(rows: list[dict]) -> list[str]:
    """Model-level cases per backend (from PELAB_GPU_REPORT) and the train/eval entry points."""
    out = ["| backend (kernel) | model cases ok | not ok | worst err / tolerance |", "| --- | --- | --- | --- |"]
    per: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if "backend" in r:
            per[r["backend"] if r["backend"] != "auto" else "auto"].append(r)
    for name, rs in sorted(per.items()):
        ok = sum(r["ok"] for r in rs)
        worst = max(r["worst_err"] / (3 * r["worst_floor"] + 2e-3) for r in rs)
        out.append(f"| {name} | {ok} | {len(rs) - ok} | {worst:.2f} |")
    entries = [r for r in rows if r.get("entry") == "train"]
    if entries:
        out += [
            "",
            "| python -m train | documents | loss first -> last | val | kernels |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in sorted(entries, key=lambda r: (r["pe"], r["docs"])):
            kernels = ", ".join(f"{k}: {v}" for k, v in (r.get("kernels") or {}).items())
            out.append(f"| {r['pe']} | {r['docs']} | {r['first']:.2f} -> {r['last']:.2f} | {r['val']} | {kernels} |")
    for r in rows:
        if r.get("entry") == "eval":
            losses = ", ".join(f"{m}: {v['loss']:.3f}" for m, v in r["lengths"].items())
            out.append(f"\npython -m train.eval suite=ppl_vs_length on {r['run']}: loss per length multiple {losses}")
    return out


def runs_table(root: Path) -> str:
    """One row per `python -m train` run directory under root (metrics.csv, summary.json, rc file)."""
    import csv

    lines = [
        "| run | exit | steps | loss first -> last | val | finite | tokens/s | kernels (or the error) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        rc = (run / "rc").read_text().strip() if (run / "rc").exists() else "?"
        train, val = [], []
        if (run / "metrics.csv").exists():
            with open(run / "metrics.csv", newline="") as f:
                for r in csv.DictReader(f):
                    if r.get("train/loss"):
                        train.append(float(r["train/loss"]))
                    if r.get("val/loss"):
                        val.append(float(r["val/loss"]))
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        kernels = ", ".join(f"{k}: {v}" for k, v in (summary.get("attention_kernels") or {}).items())
        finite = bool(train) and all(math.isfinite(x) for x in train + val)
        loss = f"{train[0]:.2f} -> {train[-1]:.2f}" if train else "-"
        tps = summary.get("tokens_per_s")
        log = run / "train.log"
        if rc != "0" and log.exists():  # the failure's last line instead of the kernels
            kernels = "; ".join(log.read_text(errors="replace").strip().splitlines()[-1:])[:200]
        lines.append(
            f"| {run.name} | {rc} | {summary.get('steps', len(train))} | {loss} | "
            f"{', '.join(f'{v:.3f}' for v in val) or '-'} | {finite} | {f'{tps:,.0f}' if tps else '-'} | {kernels} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    kind, path, *rest = argv
    if kind == "merge":  # latest.json halves from separate calls -> one list (each keeps its x_rope)
        print(json.dumps([row for p in (path, *rest) for row in json.loads(Path(p).read_text())], indent=1))
        return
    text = tests_table(Path(path), Path(rest[0]) if rest else None) if kind == "tests" else runs_table(Path(path))
    out = Path(path).with_suffix(".md") if kind == "tests" else Path(path) / "runs.md"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
