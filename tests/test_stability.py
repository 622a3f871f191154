"""Stability metrics against direct computations: attention max logit / entropy, update ratio,
the Behind-RoPE NR decomposition, the OLMo-core spike rule, and optim.skip_spikes."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT
from pelab.models.kernels import attend
from pelab.models.pe.common import repeat_kv
from pelab.train.metrics import MetricSink
from pelab.train.schema import MonitorConfig
from pelab.train.stability import (
    SpikeDetector,
    StabilityMonitor,
    StepStats,
    attention_stats,
    curve_offsets,
    probe_forward,
    relative_decomposition,
    spike_flags,
)

from tests.conftest import scale_loss


def tiny_gpt(pe: str = "rope", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, n_layer=2, d_model=32, n_head=4, mlp_hidden=64, max_seq_len=128, pe={"name": pe})
    cfg.update(kw)
    return GPT(GPTConfig.from_dict(cfg))


def layer_inputs(model: GPT, idx: torch.Tensor) -> list[tuple]:
    """(q, k, v, bias) of every layer, captured from an ordinary forward."""
    got = []

    def hook(attn, args):
        got.append(attn.project(args[0], args[1]))

    hooks = [b.attn.register_forward_pre_hook(hook) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return got


def dense_scores(q, k, bias) -> torch.Tensor:
    """(B, H, T, T) causal scores, -inf above the diagonal, bias anchored at its diagonal."""
    B, T, H, D = q.shape
    k = repeat_kv(k, H, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(D)
    if bias is not None:
        b = bias.dense().double()
        s = s + b - torch.diagonal(b, dim1=-2, dim2=-1)[..., None]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))


# ---- attention statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("pe", ["rope", "alibi", "fox", "nope"])
def test_max_logit_and_entropy_match_a_dense_recomputation(pe):
    model = tiny_gpt(pe, kv_shift=(pe == "fox"))
    idx = torch.randint(0, 256, (3, 40))
    for q, k, v, bias in layer_inputs(model, idx):
        st = attention_stats(q, k, bias, chunk=16, score_map=True)  # several query chunks
        s = dense_scores(q, k, bias)
        p = s.softmax(-1)
        # The anchored scores are the ones the kernel uses (up to per-row constants): same attention output.
        out = torch.einsum("bhij,bjhd->bihd", p, repeat_kv(v, q.shape[2], dim=2).double())
        torch.testing.assert_close(out.float(), attend(q, k, v, bias, backend="eager"), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st["max_logit"], s.amax(dim=(0, 2, 3)).float(), atol=1e-5, rtol=1e-5)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean(dim=(0, 2))
        torch.testing.assert_close(st["entropy"], ent.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st["map"], s.masked_fill(torch.isinf(s), 0).mean(0).float(), atol=1e-5, rtol=1e-5)


def test_document_masked_probes_see_only_their_document():
    """With model.document_mask the statistics are those of the rows the kernel attends over: keys of
    earlier documents are hidden (a dense recomputation with the document mask), not whole causal rows."""
    from pelab.models.kernels.documents import doc_ids_from_tokens, same_document

    eot = 255
    model = tiny_gpt("alibi", document_mask=True, eot_id=eot)
    idx = torch.randint(0, 250, (2, 40))
    idx[0, [9, 25]] = eot
    idx[1, 17] = eot
    docs = doc_ids_from_tokens(idx, eot)
    got = []
    hooks = [b.attn.register_forward_pre_hook(lambda attn, args: got.append(attn.project(*args))) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    probes = probe_forward(model, idx)["scalars"]
    for i, (q, k, v, bias) in enumerate(got):
        st = attention_stats(q, k, bias, chunk=16, score_map=True, doc_ids=docs)
        s = dense_scores(q, k, bias).masked_fill(~same_document(docs, docs), float("-inf"))
        p = s.softmax(-1)
        out = torch.einsum("bhij,bjhd->bihd", p, repeat_kv(v, q.shape[2], dim=2).double())
        torch.testing.assert_close(
            out.float(), attend(q, k, v, bias, backend="eager", doc_ids=docs), atol=1e-5, rtol=1e-4
        )
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean(dim=(0, 2))
        torch.testing.assert_close(st["entropy"], ent.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st["max_logit"], s.amax(dim=(0, 2, 3)).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st["map"], s.masked_fill(torch.isinf(s), 0).mean(0).float(), atol=1e-5, rtol=1e-5)
        assert probes[f"attn/entropy/L{i}"] == pytest.approx(float(ent.mean()), abs=1e-5)
        whole_rows = attention_stats(q, k, bias, chunk=16)["entropy"]
        assert not torch.allclose(whole_rows, st["entropy"], atol=1e-3)  # the mask matters at these shapes


def test_alibi_bias_is_taken_as_the_true_relative_bias():
    """The kernels' ALiBi factor is +m*j (softmax ignores the -m*i row constant); the probe must see
    -m*(i - j): with zero query/key projections the scores are exactly the ALiBi bias."""
    from pelab.models.pe.alibi import alibi_slopes

    model = tiny_gpt("alibi", qk_norm=False)
    for b in model.blocks:
        torch.nn.init.zeros_(b.attn.q_proj.weight)
    T = 24
    out = probe_forward(model, torch.randint(0, 256, (2, T)), nr=True)
    m = torch.tensor(alibi_slopes(4))
    assert out["scalars"]["attn/max_logit/L0"] == pytest.approx(0.0, abs=1e-6)  # the diagonal, bias 0
    for layer in out["nr"]["layers"]:
        assert layer["nr"] == pytest.approx(0.0, abs=1e-6)  # purely relative
        assert layer["nr_heads"] == pytest.approx([0.0] * 4, abs=1e-6)
        offs = out["nr"]["offsets"]
        assert layer["offset_mean"] == pytest.approx(
            (-m.mean() * torch.tensor(offs, dtype=torch.float)).tolist(), abs=1e-4
        )


def test_probe_forward_reports_every_layer_and_leaves_the_model_alone():
    model = tiny_gpt("rope", n_layer=3)
    idx = torch.randint(0, 256, (2, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(idx)
    out = probe_forward(model, idx, nr=True, resid_layers=[-1])
    s = {k: float(v) for k, v in out["scalars"].items()}
    assert {f"attn/max_logit/L{i}" for i in range(3)} <= set(s) and {f"attn/entropy/L{i}" for i in range(3)} <= set(s)
    assert s["attn/max_logit"] == max(s[f"attn/max_logit/L{i}"] for i in range(3))
    assert set(k for k in s if k.startswith("stability/resid_rms")) == {
        "stability/resid_rms/embed",
        "stability/resid_rms/L2",
    }
    real = logits[..., :256]
    assert s["stability/output_logit_max"] == pytest.approx(float(real.max()), rel=1e-5)
    assert s["stability/output_logit_mean"] == pytest.approx(float(real.mean()), rel=1e-4, abs=1e-6)
    assert 0 < s["attn/entropy/L0"] < math.log(32)
    assert len(out["nr"]["layers"]) == 3 and all(0 <= layer["nr"] <= 1 for layer in out["nr"]["layers"])
    assert not model.blocks[0].attn._forward_pre_hooks  # hooks removed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pe_stats_are_collected_per_layer():
    out = probe_forward(tiny_gpt("fox"), torch.randint(0, 256, (2, 16)))
    s = out["scalars"]
    assert {"pe/forget_gate_mean/L0", "pe/forget_gate_mean/L1", "pe/half_life_tokens/L1"} <= set(s)
    assert 0 < float(s["pe/forget_gate_min/L0"]) <= float(s["pe/forget_gate_mean/L0"]) < 1


# ---- Behind-RoPE decomposition --------------------------------------------------------------------


def _causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def test_nr_is_zero_for_relative_maps_and_exact_for_a_known_mixture():
    T = 48
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    rel = torch.randn(T)[(i - j).clamp(min=0)]  # any function of i - j (ALiBi: -m (i - j))
    alibi = -0.25 * (i - j).float()
    upper = torch.triu(torch.full((T, T), 123.0), 1)  # ignored: above the diagonal
    for s in (rel, alibi, rel + upper):
        nr, curve = relative_decomposition(s)
        assert float(nr) == pytest.approx(0.0, abs=1e-9)
    nr, curve = relative_decomposition(alibi)
    torch.testing.assert_close(curve, -0.25 * torch.arange(T).float())

    # rel + N with N of zero mean on every diagonal: NR = ||N||^2 / ||S - mean S||^2 exactly.
    noise = torch.randn(T, T, dtype=torch.float64).masked_fill(~_causal(T), 0)
    for o in range(T):
        d = torch.diagonal(noise, -o)
        d -= d.mean()
    s = rel.double() + noise
    c = _causal(T)
    expected = (noise[c] ** 2).sum() / ((s[c] - s[c].mean()) ** 2).sum()
    nr, _ = relative_decomposition(s)
    assert float(nr) == pytest.approx(float(expected), rel=1e-5)
    assert 0 < float(nr) < 1


def test_nr_is_positive_for_absolute_position_maps_and_batches_over_leading_dims():
    T = 32
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    absolute = (0.1 * j).float().expand(T, T).clone()  # depends on the key position only
    nr, _ = relative_decomposition(absolute)
    assert float(nr) > 0.3
    stack = torch.stack([absolute, -0.5 * (i - j).float(), torch.randn(T, T)])
    nrs, curves = relative_decomposition(stack)
    assert nrs.shape == (3,) and curves.shape == (3, T)
    assert float(nrs[0]) == pytest.approx(float(nr), rel=1e-5) and float(nrs[1]) == pytest.approx(0, abs=1e-9)
    assert float(nrs[2]) > 0.5  # unstructured scores are mostly non-relative
    assert curve_offsets(1024)[:16] == list(range(16)) and curve_offsets(1024)[-1] == 1023
    assert len(curve_offsets(1024)) <= 96 and curve_offsets(8) == list(range(8))


# ---- update ratio against a manual AdamW step -------------------------------------------------------


class _Windows:
    seq_len = 24

    def __len__(self):
        return 8

    def windows(self, ids):
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (len(ids), self.seq_len + 1))


def test_param_grad_and_update_rms_match_a_manual_adamw_step(tmp_path):
    model = tiny_gpt("rope")
    lr, wd, eps, clip = 1e-2, 0.1, 1e-8, 0.05
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95), eps=eps)
    x = torch.randint(0, 256, (2, 17))
    model.loss(x[:, :-1], x[:, 1:])["loss"].backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    assert pre > clip  # clipping fired: the monitor must report the pre-clip gradient
    clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    old = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer = SimpleNamespace(
        global_step=0,
        max_steps=1,
        global_rank=0,
        is_global_zero=True,
        loggers=[],
        datamodule=SimpleNamespace(val_windows=_Windows()),
        precision_plugin=SimpleNamespace(forward_context=nullcontext),
    )
    module = SimpleNamespace(model=model, tokens_per_step=32, step_stats=SimpleNamespace(last_grad_norm=pre))
    sink = MetricSink(tmp_path, tokens_per_step=32)
    mon = StabilityMonitor(tmp_path, MonitorConfig(probe_every=1, nr_every=0, probe_batch=2), sink)
    mon.on_before_optimizer_step(trainer, module, opt)
    opt.step()
    trainer.global_step = 1
    mon.on_train_batch_end(trainer, module, None, None, 0)
    row = sink.rows("probes")[1]

    groups: dict[str, list[str]] = {}
    for n, _ in model.named_parameters():
        parts = n.split(".")
        groups.setdefault(
            f"L{parts[1]}" if parts[0] == "blocks" else ("embed" if parts[0] == "embed" else "head"), []
        ).append(n)
    assert set(groups) == {"embed", "L0", "L1", "head"}
    for g, names in groups.items():
        # AdamW's first step: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps) + lr * wd * p_old.
        upd = {n: lr * clipped[n] / (clipped[n].abs() + eps) + lr * wd * old[n] for n in names}
        for n in names:
            torch.testing.assert_close(old[n] - upd[n], dict(model.named_parameters())[n].detach(), atol=1e-6, rtol=0)
        numel = sum(old[n].numel() for n in names)
        p_sq = sum(float((old[n].double() ** 2).sum()) for n in names)
        u_sq = sum(float((upd[n].double() ** 2).sum()) for n in names)
        g_sq = sum(float((raw[n].double() ** 2).sum()) for n in names)
        assert row[f"stability/param_rms/{g}"] == pytest.approx(math.sqrt(p_sq / numel), rel=1e-5)
        assert row[f"stability/grad_rms/{g}"] == pytest.approx(math.sqrt(g_sq / numel), rel=1e-4)
        assert row[f"stability/update_ratio/{g}"] == pytest.approx(math.sqrt(u_sq / p_sq), rel=1e-3)
    assert (tmp_path / "probes.csv").exists()
    assert (tmp_path / "diagnostics" / "nr-step-00000001.json").exists()  # last step: NR at the end


# ---- the spike rule --------------------------------------------------------------------------------


def synthetic_loss(n=400, seed=0, spikes=(150, 300)):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 4.0 - 0.002 * t + 6.0 * np.exp(-t / 5.0) + rng.normal(0, 0.02, n)  # fast drop, then a slow decrease
    for s in spikes:
        loss[s] += 1.0
    return loss


def test_spike_rule_on_a_synthetic_loss_series():
    loss = synthetic_loss()
    flags = spike_flags(loss, window=128, sigma=6.0)
    assert [i for i, f in enumerate(flags) if f] == [150, 300]
    # No check before half a window of history (OLMo-core): an early jump is not flagged.
    early = synthetic_loss(spikes=(40,))
    assert not any(spike_flags(early)[:64])
    # A smaller window reacts to the fast early decrease differently but still finds both spikes.
    assert {150, 300} <= {i for i, f in enumerate(spike_flags(loss, window=32)) if f}
    # Non-finite values are not spikes and do not poison the history.
    broken = loss.copy()
    broken[200] = float("nan")
    assert [i for i, f in enumerate(spike_flags(broken)) if f] == [150, 300]


def test_device_detector_and_step_stats_agree_with_the_reference():
    loss = synthetic_loss()
    rng = np.random.default_rng(1)
    gnorm = 1.0 + 0.05 * rng.standard_normal(len(loss))
    gnorm[220] = 5.0
    det = SpikeDetector(2, 128, 6.0)
    got = np.array([det.update(torch.tensor([a, b], dtype=torch.float32)).tolist() for a, b in zip(loss, gnorm)])
    assert [i for i in range(len(loss)) if got[i, 0]] == [i for i, f in enumerate(spike_flags(loss)) if f]
    assert [i for i in range(len(loss)) if got[i, 1]] == [220]

    stats = StepStats(spike_window=128, spike_sigma=6.0, spike_score_window=100)
    metrics = {}
    for step, (a, b) in enumerate(zip(loss, gnorm), start=1):
        stats.record(torch.tensor(a), torch.tensor(2.0), torch.tensor(4.0), torch.tensor(b), clip=1.0)
        if step % 10 == 0:
            metrics[step] = stats.flush(step)
    assert metrics[400]["stability/spikes"] == 3
    assert (metrics[400]["stability/loss_spikes"], metrics[400]["stability/grad_spikes"]) == (2, 1)
    assert metrics[160]["stability/spike_score"] == pytest.approx(100 * 1 / 100)  # one spike in the last 100 steps
    assert metrics[400]["stability/spike_score"] == pytest.approx(100 * 1 / 100)  # only step 300 is recent
    assert metrics[10]["train/z_loss"] == 4.0 and metrics[10]["stability/clip_rate"] == pytest.approx(
        float(np.mean(gnorm[:10] > 1.0))
    )
    assert metrics[160]["train/loss_max"] == pytest.approx(float(loss[150:160].max()), rel=1e-6)
    # state survives a checkpoint round trip
    again = StepStats(128, 6.0, 100)
    again.load_state_dict(stats.state_dict())
    assert again.detector.count == stats.detector.count and torch.equal(again.detector.buf, stats.detector.buf)


# ---- optim.skip_spikes ------------------------------------------------------------------------------


def test_skip_spikes_leaves_parameters_unchanged_on_the_spiking_step(tiny_cfg, tmp_path, monkeypatch):
    import lightning as L
    from pelab.data.datamodule import TokenDataModule
    from pelab.train.config import model_config
    from pelab.train.module import LMModule

    cfg = tiny_cfg("model.n_layer=1", "optim.skip_spikes=true")
    scale_loss(monkeypatch, 30.0, lambda n: n in (9, 10), grad_only=True)  # both micro-batches of step 5
    snaps = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snaps[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    module = LMModule(
        model_config(cfg),
        dict(cfg.optim),
        max_steps=6,
        tokens_per_step=512,
        flops_per_token=1.0,
        log_every=2,
        monitor=MonitorConfig(spike_window=8),
    )
    dm = TokenDataModule(cfg.data, seq_len=64, micro_batch_size=4, accum_steps=2, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Snap()],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    assert module.step_stats.skipped == 1 and module.step_stats.loss_spikes == 1
    for k in snaps[4]:
        assert torch.equal(snaps[5][k], snaps[4][k]), k  # the spiking step changed nothing
    assert any(not torch.equal(snaps[6][k], snaps[5][k]) for k in snaps[5])  # training went on
    assert any(not torch.equal(snaps[4][k], snaps[3][k]) for k in snaps[3])
