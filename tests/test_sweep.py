"""Sweeps and SLURM without a cluster: presets, the PE matrix, launcher checks, a local multirun with a
failing cell, and the signal -> checkpoint -> resume path (the real-Slurm tests are in test_slurm.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from pelab.models.pe import available
from pelab.train import slurm
from pelab.train.config import CONF_DIR
from pelab.train.plan import plan
from pelab.train.run import run
from pelab.train.sweep import check_sweep, expand

from tests.conftest import REPO

# The PE matrix is every registered PE (conf/sweep/pe_matrix.yaml asks the registry).
PE_MATRIX = available()


def hydra_cfg(*overrides: str):
    """The master config of `python -m train -m <overrides>` (with its hydra node); use inside `hydra_ctx()`."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    return GlobalHydra.instance().config_loader().load_configuration("config", list(overrides), RunMode.MULTIRUN)


def hydra_ctx():
    return initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _cli(*args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
    )


# ---- presets -------------------------------------------------------------------------------------------


def test_experiment_presets_reproduce_the_papers(tmp_path):
    presets = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert presets == ["grape_large", "grape_medium", "ropepp_776m", "tiny"]
    with hydra_ctx():
        for name, model, micro in (("grape_medium", "gpt_355m", 20), ("grape_large", "gpt_770m", 15)):
            c = hydra_cfg(f"experiment={name}", f"paths.data={tmp_path}")
            assert (c.model.name, c.data.name, c.trainer.seq_len, c.trainer.micro_batch_size) == (
                model,
                "fineweb_edu",
                4096,
                micro,
            )
            assert c.trainer.global_batch_tokens == 480 * 4096 and c.trainer.max_steps == 25000
            assert c.trainer.max_steps * c.trainer.global_batch_tokens == pytest.approx(49.2e9, rel=2e-3)
            o = c.optim
            assert (o.lr, o.min_lr, list(o.betas), o.weight_decay, o.warmup_steps, o.grad_clip, o.schedule) == (
                1e-3,
                3e-5,
                [0.9, 0.95],
                0.01,
                2000,
                1.0,
                "cosine",
            )
            assert o.decay_steps == 25000 and c.run_name == f"{name}-rope-s0"
            # the official 8-GPU layout: micro 20 x 3 (medium) / 15 x 4 (large) accumulation
            with_world = c.copy()
            with_world.trainer.devices = 8
            assert plan(with_world)["accum"] == 480 // (8 * micro)
        assert "2e-3" in (CONF_DIR / "experiment" / "grape_medium.yaml").read_text()  # the paper's lr, noted

        c = hydra_cfg("experiment=ropepp_776m", "pe=ropepp_eh")
        o = c.optim
        assert (c.model.name, c.model.tie_embeddings, c.trainer.seq_len, c.trainer.global_batch_tokens) == (
            "gpt_776m",
            False,
            4096,
            128 * 4096,
        )
        assert (o.lr, list(o.betas), o.weight_decay, o.warmup_steps, o.schedule, o.decay_steps, o.min_lr) == (
            5e-4,
            [0.95, 0.99],
            0.1,
            500,
            "wsd",
            10000,
            0.0,
        )
        assert c.trainer.max_steps == 100000 and c.run_name == "ropepp_776m-ropepp_eh-s0"
        from pelab.train.schedule import lr_multiplier

        lr = [
            lr_multiplier(s, schedule="wsd", warmup_steps=500, decay_steps=10000, total_steps=100000, min_ratio=0.0)
            for s in (0, 499, 500, 50000, 90000, 95000, 100000)
        ]
        assert lr[0] == pytest.approx(1 / 500) and lr[1:5] == [1.0] * 4
        assert lr[5] == pytest.approx(0.5) and lr[6] == pytest.approx(0.0)

        c = hydra_cfg("experiment=tiny")
        assert (c.model.name, c.data.name, c.trainer.accelerator, plan(c)["accum"]) == ("gpt_tiny", "sample", "cpu", 2)


# ---- the PE matrix -------------------------------------------------------------------------------------


def test_pe_matrix_expands_to_every_pe_cell_and_each_cell_composes():
    assert PE_MATRIX == sorted(p.stem for p in (CONF_DIR / "pe").glob("*.yaml"))
    with hydra_ctx():
        cfg = hydra_cfg("+sweep=pe_matrix", "experiment=tiny")
        cells = expand(cfg)
        assert [c[0] for c in cells] == [f"pe={p}" for p in PE_MATRIX]
        assert all(c[1:] == ["+sweep=pe_matrix", "experiment=tiny"] for c in cells)
        problems, dirs = check_sweep(cfg, cells)
        assert problems == []
        assert dirs[0] == f"experiment=tiny,pe={PE_MATRIX[0]}"  # run dir named after the cell's overrides
        assert len(expand(hydra_cfg("+sweep=pe_matrix", "seed=0,1"))) == 2 * len(PE_MATRIX)
        # a pe list on the command line replaces the matrix's
        assert [c[0] for c in expand(hydra_cfg("+sweep=pe_matrix", "pe=rope,alibi"))] == ["pe=rope", "pe=alibi"]


# ---- launcher checks -----------------------------------------------------------------------------------

SINFO = "gpu*|g1|64|512000|gpu:h100:8(S:0-1)\ngpu*|g2|64|512000|gpu:h100:8(S:0-1)\ncpu|c1|2|16000|(null)\n"


def test_resource_checks_against_sinfo():
    cluster = slurm.parse_sinfo(SINFO)
    assert cluster.partitions == ["gpu", "cpu"] and cluster.default_partition == "gpu"
    assert [n.gpus for n in cluster.nodes] == [8, 8, 0]
    assert slurm.gpus_in_gres("gpu:a100:4,gpu:2,nvme:1") == 6 and slurm.gpus_in_gres("(null)") == 0
    ok = dict(
        partition=None,
        nodes=2,
        gpus_per_node=8,
        tasks_per_node=8,
        cpus_per_task=8,
        mem_gb=400,
        timeout_min=60,
        signal_delay_s=120,
    )
    assert slurm.check_resources(ok, cluster) == []

    def problems(**change):
        return " | ".join(slurm.check_resources({**ok, **change}, cluster))

    assert "partition 'gpux' does not exist on this cluster; partitions: gpu, cpu (default: gpu)" in problems(
        partition="gpux"
    )
    assert "gpus_per_node=16 is impossible: the nodes of partition gpu have at most 8 GPU(s)" in problems(
        gpus_per_node=16, tasks_per_node=16, cpus_per_task=1
    )
    assert "gpus_per_node=1 is impossible" in problems(
        partition="cpu", gpus_per_node=1, tasks_per_node=1, cpus_per_task=1, mem_gb=1
    )
    assert "tasks_per_node=1 but gpus_per_node=8" in problems(tasks_per_node=1)
    assert "nodes=3 but partition gpu has 2 node(s)" in problems(nodes=3)
    assert "at most 64" in problems(cpus_per_task=16)
    assert "mem_gb=600" in problems(mem_gb=600)
    assert "signal_delay_s=120 is not shorter" in problems(timeout_min=2)
    assert (
        slurm.check_resources(
            {
                **ok,
                "partition": "cpu",
                "nodes": 1,
                "gpus_per_node": 0,
                "tasks_per_node": 2,
                "cpus_per_task": 1,
                "mem_gb": 1,
            },
            cluster,
        )
        == []
    )


def test_slurm_sweep_is_checked_before_submission(tmp_path):
    """Every cell with the launcher's world size, and the data, before any job exists."""
    cluster = slurm.parse_sinfo(SINFO)
    with hydra_ctx():
        cfg = hydra_cfg("hydra/launcher=slurm", "experiment=grape_medium", "pe=rope,alibi", f"paths.data={tmp_path}")
        problems, _ = check_sweep(cfg, expand(cfg), cluster)
        assert len(problems) == 1 and "data:" in problems[0] and "data.prepare" in problems[0]  # shards missing
        cfg = hydra_cfg(
            "hydra/launcher=slurm",
            "experiment=grape_medium",
            "pe=rope",
            "hydra.launcher.nodes=2",
            f"paths.data={tmp_path}",
        )
        problems, _ = check_sweep(cfg, expand(cfg), cluster)
        assert len(problems) == 1 and "global_batch_tokens=1966080 is not a multiple" in problems[0]  # 16 GPUs
        cfg = hydra_cfg("hydra/launcher=slurm", "experiment=tiny", "pe=rope,typo")
        problems, _ = check_sweep(cfg, expand(cfg), cluster)
        assert any("pe=typo" in p and "Could not find 'pe/typo'" in p for p in problems)
        assert any("gpus_per_node" not in p and "hydra.launcher" not in p for p in problems)


def test_cli_refuses_a_bad_slurm_sweep_before_submitting(tmp_path, data_root):
    """Through the real command line, with stand-ins for sinfo (a CPU-only cluster) and sbatch (records calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'debug*|n1|2|16000|(null)\\n'\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    common = [
        "-m",
        "hydra/launcher=slurm",
        "experiment=tiny",
        "pe=rope,nope",
        f"paths.runs={tmp_path}/runs",
        f"paths.data={data_root}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.tasks_per_node=1",
    ]
    r = _cli(*common, "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=0", env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert "partition 'gpu' does not exist on this cluster; partitions: debug (default: debug)" in out
    r = _cli(*common, "hydra.launcher.gpus_per_node=4", env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "gpus_per_node=4 is impossible" in out, out[-2000:]
    r = _cli(*common, "hydra.launcher.gpus_per_node=0", "hydra.launcher.partitionn=debug", env=env)
    assert r.returncode == 2 and "Could not override 'hydra.launcher.partitionn'" in r.stderr
    assert "'partitionn' is not a key of hydra.launcher; valid keys:" in r.stderr and "partition," in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1  # one clear line
    assert not (tmp_path / "submitted").exists() and not list((tmp_path / "runs").glob("multirun/*/*/status.json"))


def test_local_multirun_refuses_in_process_ddp_and_unknown_choices(tmp_path, data_root):
    common = ["-m", "experiment=tiny", f"paths.runs={tmp_path}", f"paths.data={data_root}"]
    r = _cli(*common, "pe=rope,nope", "trainer.devices=2")
    assert r.returncode == 2 and "relaunch the whole sweep in every rank" in r.stdout + r.stderr
    r = _cli(*common, "pe=rope,rope_typo")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "pe=rope_typo" in out and "Could not find 'pe/rope_typo'" in out
    assert "Traceback" not in out
    assert not list(tmp_path.glob("multirun/*/*/metrics.csv"))  # nothing ran


# ---- a local sweep with a failing cell -----------------------------------------------------------------


def test_failing_cell_is_recorded_and_the_others_finish(tmp_path, data_root):
    # The bad cell comes first: the sweep must go on to the other two.
    r = _cli(
        "-m",
        "experiment=tiny",
        "trainer.max_steps=3",
        "optim.schedule=bogus,cosine,wsd",
        f"paths.runs={tmp_path}",
        f"paths.data={data_root}",
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]  # the sweep reports that a cell failed, after running all of them
    (sweep_dir,) = tmp_path.glob("multirun/*")
    summary = json.loads((sweep_dir / "summary.json").read_text())
    rows = {row["cell"]: row for row in summary["rows"]}
    assert list(rows) == ["optim.schedule=bogus", "optim.schedule=cosine", "optim.schedule=wsd"]
    assert summary["counts"] == {"failed": 1, "ok": 2}
    bad = rows["optim.schedule=bogus"]
    assert bad["status"] == "failed" and "unknown optim.schedule 'bogus'" in bad["error"]
    for name in ("optim.schedule=cosine", "optim.schedule=wsd"):
        row = rows[name]
        assert row["status"] == "ok" and row["steps"] == 3 and row["error"] is None
        assert math.isfinite(row["val_loss"]) and row["tokens_per_s"] > 0
        assert Path(row["run_dir"]).name == f"experiment=tiny,{name},trainer.max_steps=3"
        assert (Path(row["run_dir"]) / "checkpoints" / "last.ckpt").exists()
    assert json.loads((Path(bad["run_dir"]) / "status.json").read_text())["status"] == "failed"
    assert (sweep_dir / "summary.csv").read_text().count("\n") == 4
    assert "1 of 3 cell(s) did not finish" in out
    # the summary can be rebuilt from the cell dirs at any time
    s = subprocess.run(
        [sys.executable, "-m", "train.sweep", "summarize", str(sweep_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert s.returncode == 1 and "failed" in s.stdout and s.stdout.count(" ok ") == 2


# ---- preemption: signal -> checkpoint at the step boundary -> exact resume -------------------------------


def test_preemption_signal_checkpoints_the_step_and_resume_is_exact(tiny_cfg, tmp_path, monkeypatch):
    from pelab.train.module import LMModule

    real_step = LMModule.training_step

    def step_then_signal(self, batch, batch_idx):
        out = real_step(self, batch, batch_idx)
        if self.global_step == 3:  # as Slurm would, in the middle of the run (not at a checkpoint step)
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    common = ["trainer.max_steps=6", "optim.decay_steps=6", "trainer.val_every=1000", "trainer.ckpt_every=1000"]
    split, straight = tmp_path / "split", tmp_path / "straight"
    monkeypatch.setattr(LMModule, "training_step", step_then_signal)
    with pytest.raises(slurm.Preempted) as exc:
        run(tiny_cfg(*common), split)
    assert exc.value.step == 3 and exc.value.signame == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handler restored
    assert torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not (split / "summary.json").exists()
    ok, why = slurm.requeue_after(exc.value, 5)  # outside SLURM: nothing to requeue
    assert not ok and "rerun the same command to continue from step 3" in why
    monkeypatch.undo()

    run(tiny_cfg(*common), split)  # the requeued job: same command, same run dir
    run(tiny_cfg(*common), straight)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- SLURM environment handling (env vars only) ----------------------------------------------------------


@pytest.fixture
def slurm_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for k, v in dict(
        SLURM_JOB_ID="77",
        SLURM_NTASKS="4",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="2",
        SLURM_PROCID="0",
        SLURM_JOB_NAME="pelab",
        SLURM_NODELIST="n[1-2]",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
    ).items():
        monkeypatch.setenv(k, v)
    return log


def test_ranks_and_world_come_from_slurm(slurm_env, tiny_cfg):
    cfg = tiny_cfg("trainer.global_batch_tokens=2048")
    slurm.apply_slurm_world(cfg)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 2)
    assert plan(cfg)["world"] == 4 and plan(cfg)["accum"] == 2
    (env,) = slurm.cluster_plugins()
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False  # one requeue mechanism: ours
    assert slurm.job_id() == "77"


def test_requeue_is_bounded(slurm_env, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    p = lambda step: slurm.Preempted(step, "SIGUSR1", run_dir)  # noqa: E731
    assert slurm.requeue_after(p(5), 2) == (True, "requeued SLURM job 77 (1/2)")
    ok, why = slurm.requeue_after(p(5), 2)
    assert not ok and "no progress since the last requeue" in why
    assert slurm.requeue_after(p(9), 2)[0]
    ok, why = slurm.requeue_after(p(12), 2)
    assert not ok and "already requeued 2 times (preemption.max_requeues=2)" in why
    assert slurm_env.read_text().split("\n")[:2] == ["requeue 77", "requeue 77"]
    assert json.loads((run_dir / "requeue.json").read_text())["count"] == 2
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "80")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm.job_id() == "80_3"  # submitit sweeps are job arrays
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert slurm.requeue_after(p(20), 9) == (True, "rank 0 requeues the job")


def test_sbatch_template_and_its_check(tmp_path):
    script = REPO / "slurm" / "train.sbatch"
    text = script.read_text()
    for line in (
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "srun ",
    ):
        assert line in text
    req = slurm.sbatch_request(script, ["--nodes=2", "-p", "gpu", "--time=1-12:00:00"], env={})
    assert req == {
        "nodes": "2",
        "tasks_per_node": "8",
        "gpus_per_node": "8",
        "cpus_per_task": "8",
        "partition": "gpu",
        "timeout_min": 2160,
    }
    assert slurm._minutes("90") == 90 and slurm._minutes("2:00:00") == 120
