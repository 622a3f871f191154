"""Every config group composes, every choice builds a model config, and the schema is strict."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from pelab.models.config import GPTConfig
from pelab.train.config import CONF_DIR, ConfigError, compose, config_error_message, model_config

from tests.conftest import REPO

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


def test_attention_backend_is_checked_against_the_kernel_registry():
    assert model_config(compose(["trainer.attention_backend=fa4"])).attention_backend == "fa4"
    with pytest.raises(ConfigError, match=r"trainer.attention_backend: unknown attention backend 'fa5'; .*'fa4'"):
        model_config(compose(["trainer.attention_backend=fa5"]))


def test_sweep_cell_dirnames_fit_the_file_system():
    from pelab.train.config import short_dirname

    short = "pe=rope,seed=1"
    assert short_dirname(short) == short
    long_a, long_b = "x=" + "a" * 300 + ",pe=rope", "x=" + "a" * 300 + ",pe=nope"
    assert len(short_dirname(long_a).encode()) <= 200
    assert short_dirname(long_a) != short_dirname(long_b)


# ---- the schema: strict keys, types, one default per key ---------------------------------------------


def _message(*overrides: str, config_name: str = "config") -> str:
    """The one-line message of the composition error these overrides raise."""
    with pytest.raises(Exception) as err:  # noqa: B017  (Hydra raises its own composition exceptions)
        compose(list(overrides), config_name=config_name)
    message = config_error_message(err.value)
    assert message is not None and "\n" not in message, err.value
    return message


def test_unknown_keys_fail_at_composition_listing_the_valid_ones():
    msg = _message("model.n_layers=2")
    assert "'n_layers' is not a key of model" in msg and "n_layer, d_model" in msg
    assert "'gate' is not a key of pe" in _message("pe=rope", "pe.gate=linear")  # a grape_a key on rope
    assert "base, before_qk_norm" in _message("pe=rope", "pe.gate=linear")
    assert "'betas2' is not a key of optim" in _message("optim.betas2=[0.9,0.95]")  # AdamW's keys: betas, eps
    assert "'shardin' is not a key of trainer.fsdp" in _message("trainer.fsdp.shardin=full")
    assert "'foo' is not a key of zeroshot; valid keys: tasks, max_length, files" in _message(
        "zeroshot.foo=1", config_name="eval"
    )


def test_wrong_types_fail_naming_the_key():
    assert "(key kv_shift)" in _message("kv_shift=maybe") and "not a valid bool" in _message("kv_shift=maybe")
    assert "(key trainer.seq_len)" in _message("trainer.seq_len=abc")
    assert "(key pe.base)" in _message("pe=grape_m", "pe.base=ten")
    assert "(key eval.batch_size)" in _message("eval.batch_size=many", config_name="eval")


def test_a_bad_key_in_a_yaml_file_is_reported_with_the_file(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\nmodel:\n  n_layr: 3\n")
    msg = _message("experiment=typo", f"hydra.searchpath=[file://{tmp_path}]")
    assert msg.startswith("In 'experiment/typo'") and "'n_layr' is not a key of model" in msg


def test_every_model_key_can_be_overridden_without_plus():
    cfg = compose(["model.n_kv_head=2", "model.loss_chunk_rows=0", "model.norm_eps=1e-6", "pe=grape_m", "pe.planes=4"])
    m = model_config(cfg)
    assert (m.n_kv_head, m.loss_chunk_rows, m.norm_eps, m.pe["planes"]) == (2, 0, 1e-6, 4)
    assert set(GPTConfig.__dataclass_fields__) - set(cfg.model) == {"pe", "kv_shift", "attention_backend"}


def test_pe_and_optimizer_keys_come_from_the_code():
    import inspect

    from pelab.models.pe.base import PositionalEncoding
    from pelab.models.pe.grape_m import GrapeM
    from pelab.train.optim import adamw

    grape = compose(["pe=grape_m"]).pe
    shared = list(inspect.signature(PositionalEncoding.__init__).parameters.items())[2:]  # forwarded: **shared
    for name, p in list(inspect.signature(GrapeM.__init__).parameters.items())[2:-1] + shared:
        assert grape[name] == p.default, name
    optim = compose([]).optim
    assert list(optim.betas) == [0.9, 0.95] and optim.eps == inspect.signature(adamw).parameters["eps"].default


# Each group file only chooses and overrides: it repeats no default of its schema. A backbone file
# spells out its shape (layers, width, heads) even where GPTConfig's library defaults happen to agree.
SHAPE_KEYS = {"n_layer", "d_model", "n_head", "head_dim", "mlp_hidden"}


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_group_files_repeat_no_default(group, choice):
    written = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{choice}.yaml"))
    assert written["name"] == choice  # a choice is named after its file
    schema = OmegaConf.get_type(compose([f"{group}={choice}"])[group])
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    repeated = [
        k
        for k, v in written.items()
        if k != "name" and not (group == "model" and k in SHAPE_KEYS) and v == defaults.get(k, object())
    ]
    assert not repeated, f"conf/{group}/{choice}.yaml repeats the defaults of {repeated}"


def test_cli_reports_config_errors_in_one_line_with_exit_status_2():
    for module, overrides in (("train", ["trainer.seq_len=abc"]), ("train.eval", ["suite=ppl_vs_length", "ppl.x=1"])):
        r = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
