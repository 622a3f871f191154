"""SLURM: ranks from srun, checkpoint-and-requeue on the pre-timeout signal, and checks before submission.

One mechanism for preemption and time limits, the same for `sbatch slurm/train.sbatch` and for
`hydra/launcher=slurm` (submitit):

1. Slurm sends a signal some time before the limit (`#SBATCH --signal=SIGUSR1@90`; submitit's
   `--signal=USR2@<signal_delay_s>`) or before a preemption. `RequeueOnSignal` only records it.
2. At the end of the optimizer step in progress (all ranks agree on the step), the run writes
   `checkpoints/last.ckpt` with the same atomic writer as the periodic checkpoints and raises
   `Preempted`. A checkpoint is never taken in the middle of a step, which Lightning's own
   SLURM handler (`SLURMEnvironment(auto_requeue=True)`, `hpc_ckpt_*.ckpt`) would do; it is
   switched off (`cluster_plugins`), so `last.ckpt` is the only resume point.
3. `requeue_after` (rank 0) requeues the job (`scontrol requeue`) at most
   `preemption.max_requeues` times per run and never twice at the same step (a job that makes
   no progress in a whole allocation is broken, not preempted); the count lives in
   `<run_dir>/requeue.json`. A job that fails for any other reason is never requeued by pelab.
4. The requeued job runs the same command in the same run directory; `resume: auto` continues
   from `last.ckpt` (stateless data order, RNG state in the checkpoint, W&B run id in the run dir).

Ranks: under `srun` Lightning's `SLURMEnvironment` takes ranks from SLURM_PROCID etc.;
`apply_slurm_world` sets `trainer.devices`/`trainer.num_nodes` from the job's tasks per node and
nodes, so the launcher config (or the #SBATCH lines) decides the world size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import open_dict
from pelab.data.atomic import atomic_write_json
from pelab.train.config import ConfigError, compose, config_error_message
from pelab.train.plan import plan

log = logging.getLogger("pelab")

REQUEUE_FILE = "requeue.json"


# ---- inside a job ----------------------------------------------------------------------------------


def in_slurm() -> bool:
    """A SLURM-managed process (batch script or srun task), by Lightning's rule (SLURMEnvironment.detect):
    SLURM_NTASKS is set and the job is not an interactive shell."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def job_id() -> str | None:
    """The id `scontrol requeue` takes: <array job>_<task> for array jobs (submitit sweeps)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def global_rank() -> int:
    env = os.environ
    for key in ("RANK", "SLURM_PROCID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def slurm_world() -> tuple[int, int] | None:
    """(tasks per node, nodes) of this SLURM job step, or None outside SLURM."""
    if not in_slurm():
        return None
    env = os.environ
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit():
        return int(per_node), nodes
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    return max(ntasks // max(nodes, 1), 1), nodes


def apply_slurm_world(cfg) -> None:
    """Under srun every task is one Lightning rank: take trainer.devices / trainer.num_nodes from the
    job (tasks per node x nodes), so the launcher config or the #SBATCH lines decide them."""
    world = slurm_world()
    if world is None:
        return
    per_node, nodes = world
    t = cfg.trainer
    if (str(t.devices), str(t.num_nodes)) == (str(per_node), str(nodes)):
        return
    if str(t.devices) not in ("1", "auto", "-1") or str(t.num_nodes) != "1":
        log.warning(
            "trainer.devices=%s trainer.num_nodes=%s replaced by the SLURM job's %d task(s) per node x %d "
            "node(s): under srun each task is one rank",
            t.devices,
            t.num_nodes,
            per_node,
            nodes,
        )
    else:
        log.info("SLURM job: trainer.devices=%d trainer.num_nodes=%d (tasks per node x nodes)", per_node, nodes)
    with open_dict(cfg):
        t.devices, t.num_nodes = per_node, nodes


def cluster_plugins() -> list:
    """Lightning's SLURM environment for ranks, without its own requeue handler (see module doc)."""
    if not in_slurm():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def _signal(name) -> signal.Signals:
    name = str(name).upper()
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def preemption_signals(cfg_signal) -> list[signal.Signals]:
    """The configured signal, plus submitit's (USR2 unless SUBMITIT_PREEMPT_SIGNAL) in submitit jobs."""
    sigs = [
        _signal(s)
        for s in (
            cfg_signal
            if isinstance(cfg_signal, (list, tuple)) or type(cfg_signal).__name__ == "ListConfig"
            else [cfg_signal]
        )
        if s
    ]
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        sub = _signal(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        if sub not in sigs:
            sigs.append(sub)
    return sigs


class Preempted(Exception):
    """Raised at a step boundary after a preemption signal, once checkpoints/last.ckpt holds that step."""

    def __init__(self, step: int, signame: str, run_dir: Path):
        self.step, self.signame, self.run_dir = step, signame, Path(run_dir)
        super().__init__(f"{signame} received: checkpoint saved at step {step} in {self.run_dir / 'checkpoints'}")


class RequeueOnSignal(L.Callback):
    """On one of `signals`, save last.ckpt at the end of the current step on every rank and raise
    Preempted. `save(trainer, step)` is the periodic checkpointer's writer (atomic, last.ckpt ->
    newest); `already_saved(trainer, step)` says whether it has just written this step."""

    def __init__(self, signals, save, run_dir: Path, already_saved=None):
        self.signals = list(signals)
        self.save = save
        self.run_dir = Path(run_dir)
        self.already_saved = already_saved or (lambda trainer, step: False)
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:  # only records: the work happens at the step boundary
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed here, after Lightning's signal connector took its snapshot of the handlers (which it
        # restores at teardown), so the process leaves fit() with the handlers it had before.
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)

    def teardown(self, trainer, pl_module, stage) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps:  # the last step: finishing is quicker than a requeue
            return
        hit = self.received is not None
        if trainer.world_size > 1:  # the signal reaches ranks at slightly different times: agree on one step
            hit = trainer.strategy.reduce_boolean_decision(hit, all=False)
        if not hit:
            return
        step = trainer.global_step
        name = signal.Signals(self.received).name if self.received is not None else "a preemption signal (other rank)"
        if not self.already_saved(trainer, step):
            self.save(trainer, step)
        raise Preempted(step, name, self.run_dir)


def _read_requeues(run_dir: Path) -> dict:
    path = Path(run_dir) / REQUEUE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"count": 0, "history": []}


def requeue_after(exc: Preempted, max_requeues: int) -> tuple[bool, str]:
    """Requeue this SLURM job after a checkpointed preemption (rank 0 only). Returns (requeued, why)."""
    jid = job_id()
    if jid is None or not in_slurm():
        return False, (f"not a SLURM job: rerun the same command to continue from step {exc.step}")
    if global_rank() != 0:
        return True, "rank 0 requeues the job"
    state = _read_requeues(exc.run_dir)
    history = state.get("history", [])
    if state.get("count", 0) >= max_requeues:
        return False, (
            f"already requeued {state.get('count', 0)} times (preemption.max_requeues={max_requeues}); "
            f"resubmit the same command to continue from step {exc.step}"
        )
    if history and history[-1].get("step") == exc.step:
        return False, (
            f"no progress since the last requeue (still step {exc.step}): the time limit is too short "
            f"for startup plus one step; resubmit with a longer --time"
        )
    if shutil.which("scontrol") is None:
        return False, "scontrol not found on the compute node"
    history.append({"job": jid, "step": exc.step, "signal": exc.signame, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    state = {"count": state.get("count", 0) + 1, "history": history}
    atomic_write_json(exc.run_dir / REQUEUE_FILE, state)
    r = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return False, f"scontrol requeue {jid} failed: {(r.stderr or r.stdout).strip()}"
    return True, f"requeued SLURM job {jid} ({state['count']}/{max_requeues})"


# ---- before submission -------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    partitions: list[str]
    cpus: int
    mem_mb: int
    gpus: int
    gres: str


@dataclass
class ClusterInfo:
    nodes: list[Node] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    default_partition: str | None = None


SINFO_FORMAT = "%P|%N|%c|%m|%G"


def gpus_in_gres(gres: str) -> int:
    """GPUs in a sinfo/sbatch GRES string: 'gpu:h100:8(S:0-1),nvme:1' -> 8, '(null)' -> 0."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres or ""):
        fields = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def parse_sinfo(text: str) -> ClusterInfo:
    """`sinfo -h -N -o '%P|%N|%c|%m|%G'` (one line per node and partition; '*' marks the default)."""
    info = ClusterInfo()
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        part, name, cpus, mem, gres = parts
        default = part.endswith("*")
        part = part.rstrip("*")
        if default:
            info.default_partition = part
        if part not in info.partitions:
            info.partitions.append(part)
        node = nodes.setdefault(
            name,
            Node(
                name,
                [],
                int(re.sub(r"\D.*", "", cpus) or 0),
                int(re.sub(r"\D.*", "", mem) or 0),
                gpus_in_gres(gres),
                gres,
            ),
        )
        node.partitions.append(part)
    info.nodes = list(nodes.values())
    return info


def query_cluster() -> ClusterInfo:
    if shutil.which("sinfo") is None:
        raise RuntimeError(
            "sinfo is not on PATH: hydra/launcher=slurm (and slurm/train.sbatch) submit from a machine "
            "with the Slurm client commands (a login node); run locally with hydra/launcher=local"
        )
    r = subprocess.run(["sinfo", "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(
            f"sinfo failed ({r.returncode}): {(r.stderr or r.stdout).strip()} -- is the Slurm "
            f"controller reachable from here?"
        )
    return parse_sinfo(r.stdout)


def _int(v, default=0) -> int:
    return default if v in (None, "", "null") else int(v)


def check_resources(lc, cluster: ClusterInfo) -> list[str]:
    """Problems of a submitit/sbatch resource request (`lc`: the hydra.launcher node or a dict with
    partition, nodes, gpus_per_node, tasks_per_node, cpus_per_task, mem_gb, timeout_min, gres)
    against the cluster. Empty when it can be scheduled."""
    get = lc.get if hasattr(lc, "get") else (lambda k, d=None: getattr(lc, k, d))
    problems: list[str] = []
    part_req = get("partition")
    if part_req:
        wanted = [p.strip() for p in str(part_req).split(",") if p.strip()]
        missing = [p for p in wanted if p not in cluster.partitions]
        if missing:
            dflt = f" (default: {cluster.default_partition})" if cluster.default_partition else ""
            return [
                f"partition {', '.join(map(repr, missing))} does not exist on this cluster; partitions: "
                f"{', '.join(cluster.partitions) or 'none'}{dflt}"
            ]
    elif cluster.default_partition:
        wanted = [cluster.default_partition]
    else:
        return [
            f"this cluster has no default partition: set the partition to one of: "
            f"{', '.join(cluster.partitions) or 'none'}"
        ]
    nodes = [n for n in cluster.nodes if set(n.partitions) & set(wanted)]
    where = f"partition {','.join(wanted)}"
    n_nodes = _int(get("nodes"), 1)
    gpus = _int(get("gpus_per_node"))
    if not gpus and get("gres"):
        gpus = gpus_in_gres(str(get("gres")))
    tasks = _int(get("tasks_per_node"), 1)
    cpus = _int(get("cpus_per_task"), 1) * tasks
    mem_mb = int(float(get("mem_gb") or 0) * 1024)
    timeout = _int(get("timeout_min"), 1)
    if n_nodes < 1 or tasks < 1:
        problems.append(f"nodes={n_nodes} and tasks_per_node={tasks} must be at least 1")
    if n_nodes > len(nodes):
        problems.append(f"nodes={n_nodes} but {where} has {len(nodes)} node(s)")
    if gpus:
        fit = [n for n in nodes if n.gpus >= gpus]
        if len(fit) < n_nodes:
            most = max((n.gpus for n in nodes), default=0)
            problems.append(
                f"gpus_per_node={gpus} is impossible: the nodes of {where} have at most {most} GPU(s) "
                f"(sinfo GRES: {', '.join(sorted({n.gres for n in nodes})) or 'none'})"
            )
        if tasks != gpus:
            problems.append(
                f"tasks_per_node={tasks} but gpus_per_node={gpus}: pelab runs one task (one Lightning "
                f"rank) per GPU; set tasks_per_node={gpus}"
            )
    if nodes and cpus > max(n.cpus for n in nodes):
        problems.append(
            f"cpus_per_task x tasks_per_node = {cpus} CPUs but the nodes of {where} have at most "
            f"{max(n.cpus for n in nodes)}"
        )
    if nodes and mem_mb > max(n.mem_mb for n in nodes):
        problems.append(
            f"mem_gb={get('mem_gb')} but the nodes of {where} have at most {max(n.mem_mb for n in nodes) // 1024} GB"
        )
    if timeout < 1:
        problems.append(f"timeout_min={timeout} must be at least 1")
    delay = get("signal_delay_s")
    if delay is not None and timeout >= 1 and int(delay) >= timeout * 60:
        problems.append(
            f"signal_delay_s={delay} is not shorter than the time limit ({timeout} min): the pre-timeout "
            f"checkpoint signal would come at the start"
        )
    return problems


# ---- the sbatch route: check before `sbatch` ------------------------------------------------------------

_SBATCH_KEYS = {
    "partition": "partition",
    "p": "partition",
    "nodes": "nodes",
    "N": "nodes",
    "gpus-per-node": "gpus_per_node",
    "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task",
    "c": "cpus_per_task",
    "mem": "mem",
    "time": "time",
    "t": "time",
    "gres": "gres",
}


def sbatch_request(script: Path, options: list[str] = (), env=None) -> dict:
    """Resources of an sbatch script: its #SBATCH lines, overridden by SBATCH_* input variables, then by
    command-line `options` (`--nodes=2`, `-p gpu`, as given to sbatch)."""
    env = os.environ if env is None else env
    req: dict = {}
    for line in Path(script).read_text().splitlines():
        m = re.match(r"^#SBATCH\s+--?([\w-]+)(?:[=\s]+(\S+))?", line)
        if m and m.group(1) in _SBATCH_KEYS:
            req[_SBATCH_KEYS[m.group(1)]] = m.group(2)
    for var, key in (
        ("SBATCH_PARTITION", "partition"),
        ("SBATCH_GPUS_PER_NODE", "gpus_per_node"),
        ("SBATCH_TIMELIMIT", "time"),
        ("SBATCH_MEM_PER_NODE", "mem"),
    ):
        if env.get(var):
            req[key] = env[var]
    m = None
    for opt in " ".join(options).replace("=", " ").split():
        if m is not None:
            req[_SBATCH_KEYS[m]] = opt
            m = None
        elif opt.lstrip("-") in _SBATCH_KEYS and opt.startswith("-"):
            m = opt.lstrip("-")
    if req.get("gpus_per_node") and ":" in str(req["gpus_per_node"]):
        req["gpus_per_node"] = str(req["gpus_per_node"]).rsplit(":", 1)[1]
    if req.get("mem"):
        m = re.match(r"^(\d+)([KMGT]?)", str(req.pop("mem")).upper())
        if m:
            scale = {"K": 1 / 1024**2, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[m.group(2)]
            req["mem_gb"] = int(m.group(1)) * scale
    if req.get("time"):
        req["timeout_min"] = _minutes(str(req.pop("time")))
    return req


def _minutes(t: str) -> int:
    """Slurm time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        parts = [int(x) for x in t.split(":")]
        h, m = (parts + [0, 0])[:2]
        return days * 1440 + h * 60 + m
    parts = [int(x) for x in t.split(":")]
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    return parts[0] + (1 if len(parts) == 2 and parts[1] else 0)


def check_cells(cell_cfgs: list, world: int | None) -> list[str]:
    """Run plan() on every cell config (with the launcher's world size when given)."""
    problems = []
    for label, cfg in cell_cfgs:
        try:
            if world is not None:
                with open_dict(cfg):
                    cfg.trainer.devices, cfg.trainer.num_nodes = world[0], world[1]
            plan(cfg)
        except (ConfigError, ValueError) as e:
            problems.append(f"{label}: {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m train.slurm check [--sbatch-script slurm/train.sbatch] [overrides]`: what would fail at
    submission or at the job's start, checked here (partition, GPUs, CPUs, memory, config)."""
    ap = argparse.ArgumentParser(prog="python -m train.slurm", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="check a single run's overrides and sbatch resources")
    chk.add_argument(
        "--sbatch-script", type=Path, default=Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"
    )
    chk.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPT",
        help="an sbatch option as given on its command line (--nodes=2); repeatable",
    )
    chk.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    problems: list[str] = []
    req = sbatch_request(args.sbatch_script, args.sbatch_option)
    try:
        problems += [f"sbatch: {p}" for p in check_resources(req, query_cluster())]
    except RuntimeError as e:
        problems.append(str(e))
    try:
        cfg = compose(args.overrides)
    except Exception as e:  # Hydra's composition errors name the bad override
        problems.append(f"config: {config_error_message(e) or e}")
    else:
        tasks = _int(req.get("tasks_per_node"), 1)
        problems += check_cells([("config", cfg)], (tasks, _int(req.get("nodes"), 1)))
    if problems:
        print("cannot submit:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    print(f"ok: {args.sbatch_script} {' '.join(args.overrides)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
