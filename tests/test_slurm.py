"""Against a real Slurm (`make test-slurm`), on CPU with gpt_tiny:

1. a two-cell multirun through hydra/launcher=slurm (submitit: one job per cell, two srun tasks = two
   Lightning DDP ranks per job), after the launcher refused a missing partition and an impossible GPU count;
   one cell's job gets submitit's pre-timeout signal mid-run, requeues itself and finishes;
2. the sbatch route (slurm/train.sbatch) for an uninterrupted run;
3. the same run interrupted twice: the pre-timeout signal (SIGUSR1 as `--signal=SIGUSR1@90` sends it) in the
   middle of a step -> checkpoint + self-requeue, then a hard `scontrol requeue` (SIGTERM, resume from the
   last periodic checkpoint); its final parameters must equal the uninterrupted run's bit for bit.

Cluster: used as is when `sinfo` works. Otherwise, with PELAB_SLURM_START=1 (what `make test-slurm` sets),
tests/slurm_cluster.sh installs Debian's Slurm if needed and starts a one-node cluster for this module, and
stops every daemon it started at the end (also on failure). Without either, the tests are skipped.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pelab.train import slurm

from tests.conftest import REPO

pytestmark = pytest.mark.slurm

CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"


def _sinfo_works() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster():
    started = False
    if not _sinfo_works():
        if os.environ.get("PELAB_SLURM_START") != "1":
            pytest.skip(
                "no Slurm cluster reachable (sinfo failed); `make test-slurm` starts a one-node test cluster "
                "from Debian's packages (root and apt-get needed)"
            )
        r = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=1200)
        if r.returncode == 77:
            pytest.skip("cannot start a Slurm cluster on this machine: " + r.stderr.strip().splitlines()[-1])
        started = r.returncode == 0 or "SLURM_CONF" in r.stdout
        m = re.search(r"export SLURM_CONF=(\S+)", r.stdout)
        if m:
            os.environ["SLURM_CONF"] = m.group(1)
        if r.returncode != 0:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)
            pytest.fail(f"tests/slurm_cluster.sh start failed ({r.returncode}):\n{r.stderr[-4000:]}")
    try:
        info = slurm.query_cluster()
        part = info.default_partition or info.partitions[0]
        cpus = max(n.cpus for n in info.nodes if part in n.partitions)
        yield {"partition": part, "cpus": cpus}
    finally:
        if started:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)
            os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded data built once, before any job (jobs of a sweep would otherwise all build it at once)."""
    from pelab.data.ready import ensure_prepared
    from pelab.train.config import compose

    d = tmp_path_factory.mktemp("slurm_data")
    ensure_prepared(compose(["experiment=tiny", f"paths.data={d}"]).data)
    return d


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "PYTEST_"))}
    if os.environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    env["PELAB_PYTHON"] = sys.executable  # the interpreter the jobs run (slurm/train.sbatch)
    return env


def _sh(*cmd: str, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r


def _job(jid: str) -> dict:
    """scontrol's view of a job (kept for MinJobAge after it ends): JobState, Restarts, ExitCode, ..."""
    r = _sh("scontrol", "show", "job", "-o", jid, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}


def _wait(pred, timeout: float, what: str, every: float = 0.5, explain=None):
    """Poll pred until truthy; on timeout, fail with `explain()` (the job's state and log) attached."""
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{explain()}" if explain else ""))


def _explain(jid: str, log_dir: Path, run_dir: Path):
    """What a timed-out wait shows: scontrol's job record, the run's last logged step, the job log's tail."""

    def explain() -> str:
        info = _job(jid)
        keys = ("JobState", "Reason", "Restarts", "ExitCode", "BatchFlag", "StartTime", "EndTime")
        logs = sorted(log_dir.glob(f"*{jid}*.out")) + sorted(log_dir.glob(f".submitit/{jid}*/*_log.*"))
        tails = "".join(f"--- {p}\n" + p.read_text(errors="replace")[-3000:] for p in logs)
        queue = _sh("squeue", "-h", "-o", "%i %T %r %M", check=False).stdout
        nodes = _sh("sinfo", "-h", "-N", "-o", "%N %T %E", check=False).stdout
        daemons = Path(os.environ.get("PELAB_SLURM_DIR", "/tmp/pelab-slurm"))  # tests/slurm_cluster.sh's logs
        for name in ("slurmctld.log", "slurmd.log"):
            if (daemons / name).exists():
                tails += f"--- {daemons / name}\n" + "".join(
                    (daemons / name).read_text(errors="replace").splitlines(keepends=True)[-25:]
                )
        return (
            f"job {jid}: " + " ".join(f"{k}={info.get(k)}" for k in keys) + f"\nlast step in metrics.csv: "
            f"{_last_step(run_dir)}\nsqueue:\n{queue}sinfo:\n{nodes}{tails or 'no job log found'}"
        )

    return explain


def _last_step(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return max((int(r["step"]) for r in csv.DictReader(f)), default=-1)
    except (OSError, ValueError, KeyError):
        return -1


def _params(run_dir: Path) -> tuple[int, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"]


def _requeued_and_pending(jid: str, restarts: int):
    info = _job(jid)
    return info if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= restarts else None


def _release(jid: str) -> None:
    """Slurm holds a requeued batch job for ~2 minutes (BeginTime); let it start in a few seconds.
    Not at once: slurmd revokes the stopped run's job credential, and a relaunch within the same second
    is killed as "Job credential revoked" (the job then ends FAILED instead of resuming)."""
    _sh("scontrol", "update", f"jobid={jid}", "StartTime=now+3", check=False)


def test_launcher_multirun_one_job_per_cell(cluster, data_dir, tmp_path):
    runs = tmp_path / "runs"
    tasks = 2 if cluster["cpus"] >= 2 else 1
    common = [
        sys.executable,
        "-m",
        "train",
        "-m",
        "hydra/launcher=slurm",
        "experiment=tiny",
        f"paths.runs={runs}",
        f"paths.data={data_dir}",
        f"hydra.launcher.partition={cluster['partition']}",
        "hydra.launcher.gpus_per_node=0",
        f"hydra.launcher.tasks_per_node={tasks}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=15",
        "hydra.launcher.signal_delay_s=60",
    ]
    before = _sh("squeue", "-h", "-o", "%i").stdout.split()

    # Bad input is refused before anything is submitted.
    r = subprocess.run(
        [*common, "pe=rope,nope", "hydra.launcher.partition=no_such_partition"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 2 and "partition 'no_such_partition' does not exist" in r.stdout + r.stderr
    r = subprocess.run(
        [*common, "pe=rope,nope", "hydra.launcher.gpus_per_node=1", "hydra.launcher.tasks_per_node=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 2 and "gpus_per_node=1 is impossible" in r.stdout + r.stderr
    assert _sh("squeue", "-h", "-o", "%i").stdout.split() == before and not (runs / "multirun").exists()

    # Two cells, one SLURM job each; the launcher waits for both. The first cell's job gets submitit's
    # pre-timeout signal (USR2) mid-run: both ranks stop at the same step, it checkpoints and requeues itself.
    launcher = subprocess.Popen(
        [*common, "pe=rope,nope", "trainer.max_steps=12", "optim.decay_steps=12"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:

        def running_cell():
            for m in runs.glob("multirun/*/*/metrics.csv"):
                if _last_step(m.parent) >= 4:
                    return m.parent
            return None

        cell = _wait(running_cell, 600, "a cell to reach step 4")
        jid = _sh("squeue", "-h", "-t", "RUNNING", "-o", "%i").stdout.split()[0]
        _sh("scancel", "--signal=USR2", jid)
        _wait(
            lambda: _requeued_and_pending(jid, 1),
            180,
            "the cell's job to requeue itself",
            explain=_explain(jid, cell.parent, cell),
        )
        _release(jid)
        out, _ = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-4000:]
    (sweep,) = (runs / "multirun").iterdir()
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2}, summary
    jobs = set()
    for row in summary["rows"]:
        assert row["steps"] == 12 and row["val_loss"] < 11.0 and row["tokens_per_s"] > 0
        status = json.loads((Path(row["run_dir"]) / "status.json").read_text())
        assert status["status"] == "ok" and re.fullmatch(r"\d+_\d", status["slurm_job_id"])
        jobs.add(status["slurm_job_id"])
        log = (Path(row["run_dir"]) / "__main__.log").read_text()
        assert f"| {tasks} process(es)" in log  # the world came from srun's tasks, not the config
    assert len(jobs) == 2 and sorted(row["pe"] for row in summary["rows"]) == ["nope", "rope"]
    history = json.loads((cell / "requeue.json").read_text())["history"]
    assert len(history) == 1 and history[0]["job"] == jid and history[0]["signal"] == "SIGUSR2"
    assert "Restoring states from the checkpoint" in (cell / "__main__.log").read_text()
    logs = list(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 * tasks


def test_sbatch_route_and_requeue_resume_exactly(cluster, data_dir, tmp_path):
    runs = tmp_path / "runs"
    common = [
        "experiment=tiny",
        "trainer.max_steps=24",
        "optim.decay_steps=24",
        f"paths.runs={runs}",
        f"paths.data={data_dir}",
    ]
    sbatch = [
        "sbatch",
        "--parsable",
        f"--partition={cluster['partition']}",
        "--gpus-per-node=0",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--mem=2G",
        "--time=20",
        f"--output={tmp_path}/%x-%j.out",
        "slurm/train.sbatch",
    ]
    straight = _sh(*sbatch, *common, "run_name=straight").stdout.strip().split(";")[0]
    jid = _sh(*sbatch, *common, "run_name=requeued").stdout.strip().split(";")[0]
    run_dir = runs / "requeued"

    # 1) The pre-timeout signal in the middle of the run: checkpoint at the step boundary, requeue itself.
    explain = _explain(jid, tmp_path, run_dir)
    _wait(lambda: _last_step(run_dir) >= 4, 600, "the job to reach step 4", explain=explain)
    _sh("scancel", "--signal=USR1", jid)
    _wait(lambda: _requeued_and_pending(jid, 1), 180, "the job to requeue itself", explain=explain)
    history = json.loads((run_dir / "requeue.json").read_text())["history"]
    assert len(history) == 1 and history[0]["signal"] == "SIGUSR1" and history[0]["job"] == jid
    first_stop = history[0]["step"]
    assert first_stop >= 4 and _params(run_dir)[0] == first_stop  # last.ckpt holds exactly that step
    _release(jid)

    # 2) A hard requeue (scontrol requeue: SIGTERM, then SIGKILL) of the resumed job; it resumes from the
    #    last periodic checkpoint.
    _wait(
        lambda: _job(jid).get("JobState") == "RUNNING" and _last_step(run_dir) >= first_stop + 4,
        600,
        "the requeued job to resume and make progress",
        explain=explain,
    )
    _sh("scontrol", "requeue", jid)
    _wait(lambda: _requeued_and_pending(jid, 2), 180, "the hard requeue", explain=explain)
    _release(jid)

    # Both jobs finish.
    _wait(
        lambda: all(
            _job(j).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", None)
            and _job(j).get("JobState") != "PENDING"
            for j in (straight, jid)
        ),
        900,
        "both jobs to end",
        every=2,
        explain=explain,
    )
    for j in (straight, jid):
        info = _job(j)
        assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (j, info)
    log = next(tmp_path.glob(f"*-{jid}.out")).read_text()
    assert "requeued SLURM job" in log and "(restart 2)" in log
    assert json.loads((run_dir / "requeue.json").read_text())["count"] == 1  # the hard requeue was not ours

    # The interrupted run ends exactly where the uninterrupted one does.
    step_a, a = _params(runs / "straight")
    step_b, b = _params(run_dir)
    assert step_a == step_b == 24
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for d in (runs / "straight", run_dir):
        s = json.loads((d / "summary.json").read_text())
        assert s["steps"] == 24 and s["val_loss"] < 11.0
    steps = [int(r["step"]) for r in csv.DictReader(open(run_dir / "metrics.csv", newline=""))]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no step logged twice across the requeues
    assert steps[:2] == [2, 4]  # and the rows from before the requeues are kept
