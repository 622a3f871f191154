"""Extending pelab touches only the files the README's "Code map and how to extend" names.

A throwaway PE (what its module under models/pe/ would hold, plus its dense reference for
models/pe/reference.py) and a throwaway optimizer (one function) are registered here at runtime;
their YAML files go to a config directory of their own. Nothing else is edited, and both are picked
up everywhere: the config schema (their keys, checked), the reference tests, the training run, the
PE matrix and the strategy's memory rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from pelab.models import pe as pe_registry
from pelab.models.kernels.bias import LowRankBias
from pelab.models.pe import reference
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import centered_positions, repeat_kv
from pelab.train import optim
from pelab.train.config import compose, config_error_message, to_dict
from pelab.train.run import run
from pelab.train.strategy import bytes_per_param
from pelab.train.sweep import expand

from tests.conftest import TINY
from tests.test_pe import layer, reference_forward
from tests.test_sweep import hydra_cfg, hydra_ctx


class ToyBias(PositionalEncoding):
    """ALiBi with one slope for every head: bias -slope * (i - j)."""

    def __init__(self, shape, slope: float = 0.5):
        super().__init__(shape)
        self.slope = float(slope)

    def attention_bias(self, q, k, x, positions):
        H, T = self.layout().attn_heads, positions.shape[0]
        k_terms = (self.slope * centered_positions(positions))[None, None, :, None].expand(1, H, T, 1)
        return LowRankBias(torch.ones(1, H, T, 1, device=positions.device), k_terms)


def toy_reference(pe, q, k, x, positions):
    """Its dense reference: q.k / sqrt(D) - slope * (i - j), in float64."""
    content = torch.einsum("bthd,bshd->bhts", q, repeat_kv(k, q.shape[2], dim=2)) / math.sqrt(q.shape[-1])
    offset = (positions[:, None] - positions[None, :]).to(content.dtype)
    return content - pe.slope * offset


def toy_sgd(param_groups: list[dict], lr: float, momentum: float = 0.9, nesterov: bool = False):
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """Register the toy PE and optimizer (the registries are restored afterwards); their YAML files in
    a config directory of their own. Returns the overrides that add that directory to Hydra's path."""
    monkeypatch.setattr(pe_registry, "_REGISTRY", dict(pe_registry._REGISTRY))
    monkeypatch.setattr(optim, "_OPTIMIZERS", dict(optim._OPTIMIZERS))
    monkeypatch.setitem(reference._REFS, ToyBias, toy_reference)
    pe_registry.register("toy_bias")(ToyBias)
    optim.register_optimizer("toy_sgd", state_bytes_per_param=4)(toy_sgd)  # one momentum buffer
    conf = tmp_path / "conf"
    (conf / "pe").mkdir(parents=True)
    (conf / "optim").mkdir()
    (conf / "pe" / "toy_bias.yaml").write_text("# A throwaway PE.\nname: toy_bias\nslope: 0.25\n")
    (conf / "optim" / "toy_sgd.yaml").write_text("# A throwaway optimizer.\nname: toy_sgd\nmomentum: 0.8\n")
    return [f"hydra.searchpath=[file://{conf}]"]


def test_a_new_pe_and_optimizer_compose_with_their_own_keys(toy):
    cfg = compose([*toy, "pe=toy_bias", "optim=toy_sgd"])
    assert to_dict(cfg.pe) == {"name": "toy_bias", "slope": 0.25}
    assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.lr) == (0.8, False, 1e-3)  # + the shared keys
    with pytest.raises(Exception) as err:  # noqa: B017
        compose([*toy, "pe=toy_bias", "pe.slop=1"])
    assert "'slop' is not a key of pe; valid keys: name, slope" in config_error_message(err.value)
    with hydra_ctx():  # the PE matrix asks the registry
        assert "pe=toy_bias" in [cell[0] for cell in expand(hydra_cfg(*toy, "+sweep=pe_matrix"))]
    assert bytes_per_param(compose([*toy, "optim=toy_sgd"])) == 12  # fp32 weights + gradients + momentum


def test_a_new_pe_meets_its_dense_reference(toy):
    attn = layer({"name": "toy_bias", "slope": 0.3})
    x, pos = torch.randn(2, 12, 32), torch.arange(12)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, pos).double(), reference_forward(attn, x, pos), atol=1e-5, rtol=1e-5)


def test_a_new_pe_and_optimizer_train_through_the_training_run(toy, data_root, tmp_path):
    cfg = compose(
        [*TINY, *toy, f"paths.data={data_root}", "pe=toy_bias", "optim=toy_sgd", "optim.lr=0.05", "trainer.max_steps=4"]
    )
    summary = run(cfg, tmp_path / "run")
    assert summary["pe"] == "toy_bias" and summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["momentum"] for g in groups] == [0.8, 0.8] and [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert ckpt["pelab"]["model_cfg"]["pe"] == {"name": "toy_bias", "slope": 0.25}
