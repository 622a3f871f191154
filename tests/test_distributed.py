"""Multi-process training on CPU (gloo) through the real `python -m train` path.

One chain of runs of gpt_tiny (fp32, global batch 8 sequences x 64 tokens, decay fixed at 6 steps):

  R  1 process,  accumulation 4, steps 0 -> 6             (the reference; checkpoints at 2, 4, 6)
  D  2 processes DDP, accumulation 2, steps 0 -> 2        == R at step 2
  S  1 process, resumes D's step-2 checkpoint -> 4         == R at step 4 (resume across world sizes)
  F  2 processes FSDP (activation checkpointing per block), resumes S's single file -> 6,
     sharded checkpoints, retained count 1;
     consolidated into one file                           == R at step 6 (params and AdamW moments),
                                                             and loads into a one-process model

Lightning launches the second process by re-running the command (its subprocess launcher), so
every run is a subprocess; torch's FSDP1 runs on CPU with gloo here (see train.strategy).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from pelab.train.config import compose, model_config
from pelab.train.plan import plan

from tests.conftest import REPO, TINY

COMMON = [
    *TINY,
    "trainer.accelerator=cpu",
    "trainer.micro_batch_size=2",
    "optim.decay_steps=6",
    "trainer.val_every=1000",
    "trainer.log_every=1",
    "trainer.ckpt_every=2",
    "trainer.keep_checkpoints=3",
]
ATOL = 2e-5  # fp32; different reduction order across processes


def train(runs: Path, name: str, data_root: Path, *overrides: str) -> Path:
    # Lightning launches the second process itself: no launcher variables from the test environment.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
    }
    env.update({"OMP_NUM_THREADS": "1", "PELAB_RUNS": str(runs)})
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            *COMMON,
            f"paths.data={data_root}",
            f"paths.runs={runs}",
            f"run_name={name}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return runs / name


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=ATOL), (k, (a[k] - b[k]).abs().max())


def losses(run_dir: Path, column: str = "train/loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def start_from(ckpt: Path, run_dir: Path) -> None:
    """Put a checkpoint where `python -m train` resumes from (<run_dir>/checkpoints/last.ckpt)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copyfile(ckpt, run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist_runs")


@pytest.fixture(scope="module")
def ref(runs, data_root) -> Path:
    return train(runs, "ref", data_root, "trainer.max_steps=6")


@pytest.fixture(scope="module")
def ddp(runs, data_root, ref) -> Path:
    return train(runs, "ddp", data_root, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=2")


@pytest.fixture(scope="module")
def resumed(runs, data_root, ddp) -> Path:
    start_from(ddp / "checkpoints" / "step-00000002.ckpt", runs / "resumed")
    return train(runs, "resumed", data_root, "trainer.devices=1", "trainer.max_steps=4")


@pytest.fixture(scope="module")
def fsdp(runs, data_root, resumed) -> Path:
    start_from(resumed / "checkpoints" / "step-00000004.ckpt", runs / "fsdp")
    return train(
        runs,
        "fsdp",
        data_root,
        "trainer=fsdp",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "trainer.fsdp.activation_checkpointing=true",
        "trainer.ckpt_every=1",
        "trainer.keep_checkpoints=1",
    )


# ---- two processes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(ref, ddp):
    assert OmegaConf.load(ddp / "config.yaml").trainer.strategy == "ddp"
    assert_same_params(params(ddp / "checkpoints" / "last.ckpt"), params(ref / "checkpoints" / "step-00000002.ckpt"))
    # train/loss is the mean over the global batch (both ranks), step for step the same as one process,
    # and so are the interval statistics and the spike rule's input (not rank 0's half of the batch)
    for column in ("train/loss", "train/lse", "train/z_loss", "train/loss_max"):
        a, b = losses(ddp, column), losses(ref, column)
        assert sorted(a) == [1, 2], column
        for step in a:
            assert a[step] == pytest.approx(b[step], abs=1e-5 * max(1.0, abs(b[step]))), (column, step)
    # one metrics.csv / summary from rank 0 only, with per-GPU and total throughput
    with open(ddp / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["tokens_per_s_per_gpu"]) == pytest.approx(float(rows[-1]["tokens_per_s"]) / 2)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_with_the_same_data(ref, resumed):
    assert_same_params(
        params(resumed / "checkpoints" / "last.ckpt"), params(ref / "checkpoints" / "step-00000004.ckpt")
    )
    a, b = losses(resumed), losses(ref)
    assert sorted(a) == [3, 4]  # the checkpoint's own steps are not in this run dir's metrics
    for step in a:  # each step's loss is a function of that step's global batch
        assert a[step] == pytest.approx(b[step], abs=1e-5)


def test_resume_step_sees_the_same_global_batch_on_one_and_two_processes(data_root):
    from pelab.data.datamodule import TokenDataModule

    cfg = compose([*COMMON, f"paths.data={data_root}"])

    def batch(rank, world, step=2):
        accum = plan(compose([*COMMON, f"paths.data={data_root}", f"trainer.devices={world}"]))["accum"]
        dm = TokenDataModule(cfg.data, cfg.trainer.seq_len, cfg.trainer.micro_batch_size, accum, cfg.seed)
        dm.trainer = SimpleNamespace(global_step=step, global_rank=rank, world_size=world)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    one = batch(0, 1)
    assert one.shape == (4, 2, 65)
    halves = [batch(r, 2) for r in range(2)]
    assert all(h.shape == (2, 2, 65) for h in halves)
    # micro-step m of the single process == micro-step m // 2 of rank m % 2 (sequence ids m*2..m*2+1)
    for m in range(4):
        assert torch.equal(one[m], halves[m % 2][m // 2])


@pytest.mark.slow
def test_fsdp_loads_a_single_file_saves_sharded_and_consolidates(ref, fsdp, tmp_path):
    from pelab.train.consolidate import consolidate
    from pelab.train.module import TrainGPT

    ckpts = fsdp / "checkpoints"
    # sharded directories, written atomically (no .tmp left), only the newest kept, last.ckpt -> it
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000006.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and os.readlink(ckpts / "last.ckpt") == "step-00000006.ckpt"
    shard_files = sorted(p.name for p in (ckpts / "step-00000006.ckpt").iterdir())
    assert "meta.pt" in shard_files and sum(f.endswith(".distcp") for f in shard_files) == 2
    a, b = losses(fsdp), losses(ref)
    assert sorted(a) == [5, 6]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)

    out = tmp_path / "consolidated.ckpt"
    info = consolidate(ckpts / "last.ckpt", out)
    assert info["global_step"] == 6
    full, expected = (
        torch.load(p, map_location="cpu", weights_only=False) for p in (out, ref / "checkpoints" / "step-00000006.ckpt")
    )
    assert_same_params(full["state_dict"], expected["state_dict"])
    # AdamW moments: name-keyed, groups in the optimizer's order, so they map by position onto the
    # position-keyed state of the one-process run
    got, want = full["optimizer_states"][0], expected["optimizer_states"][0]
    got_ids = [p for g in got["param_groups"] for p in g["params"]]
    want_ids = [p for g in want["param_groups"] for p in g["params"]]
    assert len(got_ids) == len(want_ids) and all(isinstance(p, str) for p in got_ids)
    for g, w in zip(got_ids, want_ids, strict=True):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got["state"][g][k], want["state"][w][k], rtol=1e-4, atol=ATOL), (g, k)
        assert float(got["state"][g]["step"]) == float(want["state"][w]["step"]) == 6
    assert full["global_step"] == 6 and full["lr_schedulers"] == expected["lr_schedulers"]

    # load on one process: the same model (same logits as the reference run's weights)
    mcfg = model_config(compose(TINY))
    models = []
    for sd in (full["state_dict"], expected["state_dict"]):
        m = TrainGPT(mcfg)
        m.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()})
        models.append(m.eval())
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(models[0](idx), models[1](idx), atol=1e-4)

    # consolidating onto the run's last.ckpt link replaces it with the file; one process resumes from it
    consolidate(ckpts / "last.ckpt", ckpts / "last.ckpt")
    assert (ckpts / "last.ckpt").is_file() and not (ckpts / "last.ckpt").is_symlink()
    assert (ckpts / "step-00000006.ckpt").is_dir()


# ---- configuration, world size, strategy choice (no processes) ------------------------------------


def test_world_size_and_accumulation(monkeypatch):
    from pelab.train.plan import world_size

    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    t = lambda **kw: OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, **kw})  # noqa: E731
    assert world_size(t(devices=2)) == 2
    assert world_size(t(devices="2", num_nodes=3)) == 6
    assert world_size(t(devices=[0, 1, 2])) == 3 and world_size(t(devices="0,1")) == 2
    assert world_size(t(devices="auto")) == 1 and world_size(t(devices=-1)) == 1  # CPU: one process
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_NAME", "pelab")
    assert world_size(t(devices=8, num_nodes=2)) == 16
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc shell: Lightning ignores SLURM too
    assert world_size(t(devices=2)) == 2
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size(t(devices=1)) == 4

    def sizes(devices):
        return plan(compose([*COMMON, f"trainer.devices={devices}"]))

    # same global batch in tokens on 1, 2, 8 processes: accumulation adapts
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert [(s["world"], s["accum"], s["tokens_per_step"]) for s in map(sizes, (1, 2, 4))] == [
        (1, 4, 512),
        (2, 2, 512),
        (4, 1, 512),
    ]


def test_trainer_configs_compose_and_build_their_strategies():
    from hydra.errors import ConfigCompositionException
    from lightning.pytorch.strategies import DDPStrategy
    from pelab.models.gpt import Block
    from pelab.train.schema import DDPOptions, FSDPOptions
    from pelab.train.strategy import PelabFSDPStrategy, build
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    for name in ("ddp", "fsdp", "auto"):
        cfg = compose([f"trainer={name}"])
        assert cfg.trainer.name == name and cfg.trainer.devices == "auto" and cfg.trainer.seq_len == 128
    auto = compose(["trainer=auto"]).trainer
    assert auto.ddp == OmegaConf.structured(DDPOptions) and auto.fsdp == OmegaConf.structured(FSDPOptions)

    s, name = build(compose(["trainer=ddp"]), 2, 10**6, "32-true")
    assert name == "ddp" and isinstance(s, DDPStrategy) and s._ddp_kwargs["gradient_as_bucket_view"] is True

    s, name = build(compose(["trainer=fsdp", "trainer.fsdp.activation_checkpointing=true"]), 2, 10**6, "bf16-mixed")
    assert name == "fsdp" and isinstance(s, PelabFSDPStrategy)
    assert s.sharding_strategy == ShardingStrategy.FULL_SHARD and s._state_dict_type == "sharded"
    assert s.mixed_precision == MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    assert s.kwargs["auto_wrap_policy"]._module_classes == {Block} and s.kwargs["use_orig_params"] is True
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    s, _ = build(compose(["trainer=fsdp"]), 2, 10**6, "32-true")
    assert s.mixed_precision is None and not s._activation_checkpointing_kwargs  # fp32 on CPU
    s, _ = build(
        compose(["trainer=fsdp", "trainer.fsdp.sharding=hybrid", "trainer.num_nodes=2"]), 16, 10**6, "bf16-mixed"
    )
    assert s.sharding_strategy == ShardingStrategy.HYBRID_SHARD and s.kwargs["device_mesh"] == (2, 8)
    # the plain default trainer with trainer.strategy=fsdp gets the same defaults
    s, name = build(compose(["trainer.strategy=fsdp"]), 2, 10**6, "32-true")
    assert name == "fsdp" and s.sharding_strategy == ShardingStrategy.FULL_SHARD
    with pytest.raises(ConfigCompositionException, match="trainer.fsdp.shardin"):  # strict keys: at composition
        compose(["trainer=fsdp", "trainer.fsdp.shardin=full"])
    assert build(compose([]), 1, 10**6, "32-true") == ("auto", "single")


def test_auto_rule_picks_fsdp_only_when_the_training_state_does_not_fit():
    from pelab.train.strategy import bytes_per_param, choose

    assert bytes_per_param(compose(["trainer=auto"])) == 16  # fp32 weights + gradients + AdamW's two moments
    assert bytes_per_param(compose(["trainer=auto", "trainer.auto.bytes_per_param=12"])) == 12

    def pick(t, world, n_params, gpu_memory):  # 16 bytes per parameter: AdamW's training state
        return choose(t, world, n_params, gpu_memory, bytes_per_param=16)[0]

    t = compose(["trainer=auto"]).trainer
    h200, a100_40 = 141e9, 40e9
    assert pick(t, 1, 353_500_000, h200) == "single"
    assert pick(t, 2, 353_500_000, h200) == "ddp"  # 5.7 GB < 56 GB
    assert pick(t, 8, 772_200_000, h200) == "ddp"
    assert pick(t, 8, 7_000_000_000, h200) == "fsdp"  # 112 GB > 56 GB
    assert pick(t, 8, 1_500_000_000, a100_40) == "fsdp"  # 24 GB > 16 GB
    assert pick(t, 2, 7_000_000_000, None) == "ddp"  # no GPU
    assert pick(OmegaConf.merge(t, {"strategy": "fsdp"}), 2, 1, h200) == "fsdp"  # explicit wins


def test_sharded_checkpoint_needs_fsdp_or_consolidation(tmp_path):
    from pelab.train.checkpoints import replace_dir, resume_format_problem

    d = tmp_path / "step-00000004.ckpt"
    d.mkdir()
    (d / "meta.pt").write_bytes(b"")
    assert resume_format_problem(d, "fsdp") is None
    msg = resume_format_problem(d, "ddp")
    assert "python -m train.consolidate" in msg and "trainer.strategy=fsdp" in msg
    # replace_dir: a directory replaces a link, a file replaces a directory; nothing left aside
    (tmp_path / "last.ckpt").symlink_to(d.name)
    new = tmp_path / "new"
    new.mkdir()
    replace_dir(new, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").is_dir() and not (tmp_path / "last.ckpt").is_symlink() and d.is_dir()
    (tmp_path / "f").write_text("x")
    replace_dir(tmp_path / "f", tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step-00000004.ckpt"]
