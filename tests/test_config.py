"""Every config group composes, and every choice builds a model config."""

from __future__ import annotations

import pytest
from pelab.train.config import CONF_DIR, compose, model_config

GROUPS = ["model", "pe", "data", "optim", "trainer", "logger", "monitor"]


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_choice_composes(group, choice):
    cfg = compose([f"{group}={choice}"])
    assert cfg[group].name == choice
    mcfg = model_config(cfg)
    assert mcfg.pe["name"] == cfg.pe.name and mcfg.vocab_size == 50257


def test_defaults_are_the_cpu_default_job():
    cfg = compose([])
    assert (cfg.model.name, cfg.pe.name, cfg.data.name, cfg.logger.name) == ("gpt_tiny", "rope", "sample", "csv")
    assert cfg.run_name == "gpt_tiny-rope-sample-s0"
    assert compose(["kv_shift=true", "seed=3"]).run_name == "gpt_tiny-rope-kvshift-sample-s3"


def test_kv_shift_reaches_the_model():
    assert model_config(compose(["kv_shift=true"])).kv_shift is True


def test_sweep_cell_dirnames_fit_the_file_system():
    from pelab.train.config import short_dirname

    short = "pe=rope,seed=1"
    assert short_dirname(short) == short
    long_a, long_b = "x=" + "a" * 300 + ",pe=rope", "x=" + "a" * 300 + ",pe=nope"
    assert len(short_dirname(long_a).encode()) <= 200
    assert short_dirname(long_a) != short_dirname(long_b)
