"""Nothing in a run directory is lost: rerunning a finished run, damaged or missing checkpoints, two runs on
one directory, SIGTERM, a full disk, killed checkpoint writes and values that cannot work."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pelab.train import checkpoints as ckpt_io
from pelab.train.checkpoints import AtomicCheckpointIO, DiskFull, verify
from pelab.train.config import ConfigError, compose
from pelab.train.plan import plan
from pelab.train.run import run
from pelab.train.rundir import resume_checkpoint, run_lock

from tests.conftest import REPO, TINY

STEPS = ["trainer.max_steps=4", "optim.decay_steps=4", "trainer.ckpt_every=2", "trainer.val_every=2"]
OUTPUTS = ("metrics.csv", "summary.json", "loss.png", "config.yaml")


def _cfg(data_root, *overrides):
    return compose([*TINY, f"paths.data={data_root}", *STEPS, *overrides])


def _cli(data_root, runs, *overrides, **kwargs) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # -m before the overrides
    rest = [o for o in overrides if not o.startswith("-")]
    cmd = [sys.executable, "-m", "train", *flags, *TINY, *STEPS, f"paths.data={data_root}", f"paths.runs={runs}", *rest]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kwargs)


def _digests(run_dir: Path) -> dict[str, str]:
    files = [run_dir / n for n in OUTPUTS] + sorted((run_dir / "checkpoints").iterdir())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A finished 4-step run: step-2 and step-4 checkpoints, last.ckpt = step 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "r"
    run(_cfg(data_root), run_dir)
    return run_dir


@pytest.fixture
def copy_of(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "r"))


# ---- 1: rerunning a finished run ------------------------------------------------------------------------


def test_rerun_of_a_finished_run_has_nothing_to_do(data_root, copy_of):
    before = _digests(copy_of)
    r = _cli(data_root, copy_of.parent, "run_name=r")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing to do" in r.stdout + r.stderr
    assert _digests(copy_of) == before


def test_rerun_after_a_kill_past_the_last_checkpoint_completes_the_outputs(data_root, copy_of):
    rows = (copy_of / "metrics.csv").read_text()
    (copy_of / "summary.json").unlink()  # killed after the final checkpoint, before the summary
    summary = run(_cfg(data_root), copy_of)
    assert summary["steps"] == 4 and summary["train_loss"] is not None
    assert (copy_of / "metrics.csv").read_text().splitlines()[:3] == rows.splitlines()[:3]
    assert len((copy_of / "metrics.csv").read_text().splitlines()) == len(rows.splitlines())


def test_relaunched_sweep_keeps_its_finished_cells(data_root, tmp_path):
    sweep = ["-m", "pe=rope,alibi", "trainer.max_steps=2", "optim.decay_steps=2", f"hydra.sweep.dir={tmp_path}"]
    first = _cli(data_root, tmp_path, *sweep)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = sorted(p.parent for p in tmp_path.glob("*/summary.json"))
    assert len(cells) == 2
    before = [_digests(c) for c in cells]
    again = _cli(data_root, tmp_path, *sweep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [_digests(c) for c in cells] == before
    assert '"ok": 2' in (tmp_path / "summary.json").read_text().replace("\n", "").replace("  ", "")


# ---- 2: checkpoint integrity -----------------------------------------------------------------------------


def test_last_ckpt_is_a_verified_copy_not_a_link(finished):
    last, step4 = finished / "checkpoints" / "last.ckpt", finished / "checkpoints" / "step-00000004.ckpt"
    assert last.stat().st_nlink == 1 and not last.is_symlink() and not os.path.samefile(last, step4)
    assert verify(last) is None and verify(step4) is None
    assert (finished / "checkpoints" / "last.ckpt.sha256").read_text().split()[0] == ckpt_io.file_sha256(last)


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate", "random_bytes"])
def test_damaged_or_missing_last_ckpt_falls_back_to_the_newest_intact_one(data_root, copy_of, damage, caplog):
    last = copy_of / "checkpoints" / "last.ckpt"
    if damage == "delete":
        last.unlink()
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncate":
        last.write_bytes(last.read_bytes()[:100_000])
    else:
        data = bytearray(last.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
        last.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="pelab"):
        chosen = resume_checkpoint(_cfg(data_root), copy_of)
    assert chosen == copy_of / "checkpoints" / "step-00000004.ckpt"
    assert "continuing from" in caplog.text and "last.ckpt is" in caplog.text


def test_no_intact_checkpoint_refuses_instead_of_restarting_from_zero(data_root, copy_of):
    for p in (copy_of / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="holds no intact checkpoint .* delete .*checkpoints"):
        resume_checkpoint(_cfg(data_root), copy_of)


def test_resume_past_a_damaged_last_ckpt_trains_on_from_the_step_file(data_root, copy_of):
    (copy_of / "checkpoints" / "last.ckpt").write_bytes(b"")
    r = _cli(data_root, copy_of.parent, "run_name=r", "trainer.max_steps=6", "optim.decay_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "last.ckpt is empty; continuing from" in r.stdout + r.stderr
    names = sorted(p.name for p in (copy_of / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step-00000004.ckpt", "step-00000006.ckpt"]
    assert all(verify(copy_of / "checkpoints" / n) is None for n in names)


# ---- 3: one run per directory ----------------------------------------------------------------------------


def test_second_run_on_a_locked_dir_refuses_naming_the_holder(data_root, tmp_path):
    with run_lock(tmp_path / "r"):
        r = _cli(data_root, tmp_path, "run_name=r")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    lines = [ln for ln in out.splitlines() if "in use by" in ln]
    assert len(lines) == 1 and f"pid {os.getpid()} on" in lines[0], out[-2000:]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    code = (
        "import os, signal; from pelab.train.rundir import run_lock\n"
        f"with run_lock({str(tmp_path)!r}): os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert "pid" in (tmp_path / "run.lock").read_text()
    with run_lock(tmp_path):  # the kernel released it with the process
        pass


# ---- 5: SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_the_step_and_exits_nonzero(data_root, tmp_path):
    cmd = [sys.executable, "-m", "train", *TINY, f"paths.data={data_root}", f"paths.runs={tmp_path}", "run_name=t"]
    cmd += ["trainer.max_steps=500", "trainer.ckpt_every=0", "trainer.val_every=500", "trainer.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "t" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    line = next(ln for ln in out.splitlines() if "SIGTERM received" in ln)
    step = int(line.split("checkpoint saved at step ")[1].split()[0])
    assert "rerun the same command to continue" in line
    last = tmp_path / "t" / "checkpoints" / "last.ckpt"
    assert verify(last) is None
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step >= 2


# ---- 6: checkpoint writes ------------------------------------------------------------------------------


def test_disk_full_removes_the_partial_file_and_says_how_much_is_needed(tmp_path, monkeypatch):
    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    target = tmp_path / "checkpoints" / "step-00000002.ckpt"
    with pytest.raises(DiskFull, match=r"disk full: 4 MB needed at .*checkpoints \(\d+ MB free\)"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 20)}, target)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_checkpoint_temp_files_are_beside_the_target_and_orphans_are_removed(data_root, copy_of, monkeypatch):
    seen = []
    real_save = torch.save

    def spy(obj, f):
        seen.append(Path(f.f.name))
        return real_save(obj, f)

    monkeypatch.setattr(ckpt_io.torch, "save", spy)
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(4)}, copy_of / "checkpoints" / "x.ckpt")
    assert seen[0].parent == copy_of / "checkpoints" and seen[0].name.startswith(".x.ckpt.")
    orphan = copy_of / "checkpoints" / ".step-00000006.ckpt.12345-deadbeef.tmp"  # a writer killed mid-write
    orphan.write_bytes(b"half a checkpoint")
    resume_checkpoint(_cfg(data_root), copy_of)
    assert not orphan.exists()


# ---- 8/9: values that cannot work: one line, before any heavy work -------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("+trainer.foo=1", "'foo' is not a key of trainer"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
        ("trainer.attention_backend=flashy", "trainer.attention_backend=flashy is not an attention kernel"),
        ("optim.schedule=linearr", "optim.schedule=linearr is unknown; choose one of"),
        ("init_from=/nonexistent", "init_from=/nonexistent does not exist"),
        ("trainer.accelerator=gpu", "no GPU is visible"),
    ],
)
def test_values_that_cannot_work_are_refused_by_plan(data_root, override, message):
    if override == "trainer.accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")):
        plan(_cfg(data_root, override))


@pytest.mark.parametrize(
    "override,message",
    [
        ("run_name=../x", "must name one directory inside paths.runs"),
        ("run_name=", "must name one directory inside paths.runs"),
        ("kv_shift=maybe", "'maybe' is not a valid bool"),
        ("trainer.attention_backend=flashy", "is not an attention kernel available here"),
        ("model.vocab_size=1000", "model.vocab_size=1000 is smaller than"),
    ],
)
def test_cli_config_errors_are_one_line_with_status_2(data_root, tmp_path, override, message):
    r = _cli(data_root, tmp_path / "runs", override)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert message in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs" / ".hydra").exists()


def test_skipped_nonfinite_steps_are_counted_and_reported(data_root, tmp_path, caplog):
    cfg = _cfg(data_root, "optim.lr=1e30", "trainer.stop_on_nonfinite=false", "optim.warmup_steps=0")
    with caplog.at_level("WARNING", logger="pelab"):
        summary = run(cfg, tmp_path)
    assert summary["skipped_steps"] >= 3, summary
    assert "update skipped" in caplog.text


# ---- 4/10: evaluation results per checkpoint, saved as they finish; sweep-cell paths --------------------


def _eval(checkpoint, *overrides):
    from pelab.train.eval.run import run_eval

    return run_eval(compose([f"checkpoint={checkpoint}", *overrides], config_name="eval"))


PPL = ["suite=ppl_vs_length", "eval.limit=1", "ppl.multiples=[1]", "ppl.curve_points=8"]


def test_eval_json_keeps_every_checkpoint_keyed_by_step_and_content(copy_of):
    from pelab.train.eval.run import checkpoint_key

    ckpts = copy_of / "checkpoints"
    _eval(copy_of, *PPL)
    doc = _eval(ckpts / "step-00000004.ckpt", *PPL)  # the same file as last.ckpt: one entry
    assert len(doc["checkpoints"]) == 1
    doc = _eval(ckpts / "step-00000002.ckpt", *PPL)  # an older step: added, the final model's results stay
    keys = sorted(doc["checkpoints"])
    assert keys == [
        checkpoint_key({"step": 2, "sha256": ckpt_io.recorded_sha256(ckpts / "step-00000002.ckpt")}),
        checkpoint_key({"step": 4, "sha256": ckpt_io.recorded_sha256(ckpts / "last.ckpt")}),
    ]
    assert doc["header"]["step"] == 4 and "ppl_vs_length" in doc["suites"]
    assert all("ppl_vs_length" in e["suites"] for e in doc["checkpoints"].values())


def test_a_stopped_retrieval_keeps_its_finished_cells(copy_of, monkeypatch):
    from pelab.train.eval import retrieval

    calls = {"n": 0}
    real = retrieval.string_match_all

    def stop_at_third_cell(prediction, answers):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(prediction, answers)

    monkeypatch.setattr(retrieval, "string_match_all", stop_at_third_cell)
    opts = ["suite=retrieval", "retrieval.tasks=[passkey]", "retrieval.samples=1", "retrieval.lengths=[256,320]"]
    with pytest.raises(KeyboardInterrupt):
        _eval(copy_of, *opts, "retrieval.depths=[0.0,1.0]")
    saved = json.loads((copy_of / "eval.json").read_text())["suites"]["retrieval"]
    assert saved["partial"] is True
    assert sum(v is not None for row in saved["tasks"]["passkey"]["grid"] for v in row) == 2


def test_zeroshot_scoring_shows_progress(copy_of, capsys):
    from pelab.train.eval.checkpoint import load
    from pelab.train.eval.zeroshot import GPTModel, Scorer

    loaded = load(copy_of)
    scorer = Scorer(GPTModel(loaded.model, loaded.device, None), loaded.tokenizer, 64, batch_size=1)
    scorer.progress = "zeroshot piqa"
    scorer.loglikelihood([("The cat", " sat"), ("A dog", " ran"), ("Hello", " world")])
    assert "zeroshot piqa" in capsys.readouterr().err


def test_eval_accepts_a_sweep_cell_dir_unquoted(copy_of, tmp_path):
    cell = Path(shutil.copytree(copy_of, tmp_path / "pe=rope,seed=1"))
    cmd = [sys.executable, "-m", "train.eval", f"checkpoint={cell}", *PPL]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert (cell / "eval.json").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.limit=-1", "eval.limit=-1 must be positive"),
        ("eval.batch_size=0", "eval.batch_size=0 must be positive"),
        ("ppl.multiples=[0]", "ppl.multiples=[0.0] must all be positive"),
        ("eval.data_dir=/typo", "eval.data_dir=/typo is not a directory"),
        ("+eval.foo=1", "'foo' is not a key of eval"),
    ],
)
def test_eval_values_that_cannot_work_are_refused(copy_of, override, message):
    from pelab.train.eval.run import check_request
    from pelab.train.eval.suites import EvalError

    with pytest.raises(EvalError, match=re.escape(message)):
        check_request(compose([f"checkpoint={copy_of}", "suite=all", override], config_name="eval"))


def test_a_garbage_checkpoint_is_one_line(tmp_path):
    from pelab.train.eval.checkpoint import CheckpointError, checkpoint_state

    bad = tmp_path / "x.ckpt"
    bad.write_bytes(os.urandom(5000))
    with pytest.raises(CheckpointError) as e:
        checkpoint_state(bad)
    assert "\n" not in str(e.value) and "x.ckpt is damaged" in str(e.value)


# ---- 7: data.prepare repairs what is damaged --------------------------------------------------------------


def test_prepare_rebuilds_a_damaged_shard(tmp_path, capsys):
    from pelab.data.shards import verify_manifest
    from pelab.data.tokenizer import load_tokenizer
    from pelab.data.writer import write_shards

    tok, texts = load_tokenizer(), ["one two three " * 20] * 5
    kwargs = dict(prefix="t", shard_tokens=100, settings={"source": "synthetic"})
    write_shards(texts, tmp_path, tok, **kwargs)
    shard = tmp_path / "t_train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2] + b"\xff\xff")  # same size and header, other tokens
    write_shards(texts, tmp_path, tok, **kwargs)
    assert "sha256 differs from the manifest; rebuilding" in capsys.readouterr().out
    assert shard.read_bytes() == good
    verify_manifest(tmp_path, hashes=True)


def test_prepare_of_a_small_input_says_what_to_set_and_can_be_retried(tmp_path):
    from pelab.data.tokenizer import load_tokenizer
    from pelab.data.writer import write_shards

    tok, texts = load_tokenizer(), ["one two three " * 20] * 5
    with pytest.raises(ValueError, match=r"has 310 tokens, .* rerun with data.shard_tokens=1024"):
        write_shards(texts, tmp_path, tok, prefix="t", shard_tokens=10**8, settings={"source": "s"})
    assert list(tmp_path.iterdir()) == []  # a retry with other settings is not blocked
    assert (
        write_shards(texts, tmp_path, tok, prefix="t", shard_tokens=100, settings={"source": "s"})["num_tokens"] == 310
    )


# ---- 10: report colours and legend ---------------------------------------------------------------------


def test_report_has_twelve_distinct_colours_and_the_layer_legend_covers_no_panel(tmp_path, monkeypatch):
    import matplotlib.colors as mcolors
    from pelab.train import report_plots
    from pelab.train.runs import group_runs, load_runs

    from tests.test_report import config, fake_run

    pes = [f"pe{i}" for i in range(12)]
    rgb = [mcolors.to_rgb(s["color"]) for s in report_plots.styles(pes).values()]
    assert min(sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5 for i, x in enumerate(rgb) for y in rgb[i + 1 :]) > 0.2
    for pe in pes:
        fake_run(tmp_path / "runs", config(pe, 0))
    boxes = {}
    real_save = report_plots._save

    def keep(fig, path):  # the figure's legend and panel boxes, before it is closed
        fig.canvas.draw()
        panels = [ax.get_window_extent() for ax in fig.axes if ax.get_visible() and ax.axison]
        boxes[path.name] = ([lg.get_window_extent() for lg in fig.legends], panels)
        return real_save(fig, path)

    monkeypatch.setattr(report_plots, "_save", keep)
    report_plots.plot_layers(group_runs(load_runs([tmp_path / "runs"])), tmp_path / "out")
    legends, panels = boxes["max_logit_layers.png"]
    assert len(legends) == 1 and not any(legends[0].overlaps(p) for p in panels)


def test_lm_eval_with_a_missing_checkpoint_is_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    cmd = [sys.executable, "-m", "train.eval.lm_eval_adapter", "--model", "pelab"]
    cmd += ["--model_args", f"checkpoint={tmp_path / 'nope'},batch_size=2", "--tasks", "arc_easy"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"checkpoint {tmp_path / 'nope'} not found" in r.stderr


def test_a_checkpoint_that_fails_verification_neither_replaces_last_nor_prunes(tmp_path, monkeypatch):
    class Trainer:
        global_rank = 0
        strategy = type("S", (), {"barrier": lambda self: None})()

        def save_checkpoint(self, path):
            AtomicCheckpointIO().save_checkpoint({"step": path.name}, path)

    ckpts = ckpt_io.PeriodicCheckpoint(tmp_path, every=1, keep=1)
    ckpts.save(Trainer(), 1)
    last = (tmp_path / "last.ckpt").read_bytes()
    monkeypatch.setattr(ckpt_io, "verify", lambda path: "checksum mismatch (read back)")
    ckpts.save(Trainer(), 2)
    assert (tmp_path / "step-00000001.ckpt").exists() and (tmp_path / "last.ckpt").read_bytes() == last


def test_a_checkpoint_of_another_model_without_config_yaml_is_one_line(data_root, copy_of):
    (copy_of / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"holds another model: n_layer=4 \(configured 2\)"):
        run(_cfg(data_root, "model.n_layer=2"), copy_of)
