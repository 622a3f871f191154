"""Fidelity corners: YaRN's temperature on QK-norm backbones, GRAPE-A's 431bad1 linear gates, the GRAPE
presets' initialisation against the GRAPE code's, the rotation direction against the GRAPE code's, RoPE's
relativity with unequal QK-norm gains, and context extension as a method of the PE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pelab.models.attention import CausalSelfAttention
from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT
from pelab.models.pe import available, build_pe, options
from pelab.models.pe.alibi import slopes_tensor
from pelab.models.pe.base import AttentionShape
from pelab.models.pe.common import softplus_inverse
from pelab.models.pe.rope import check_context_extension, context_keys, convert_rotation, rope_inv_freq

from tests.test_pe import pe_spec, perturb_pe

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_layer(spec: dict, qk_norm: bool = True, seed: int = 0, **kw) -> CausalSelfAttention:
    torch.manual_seed(seed)
    shape = dict(name="t", vocab_size=61, n_layer=1, d_model=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=48)
    return CausalSelfAttention(GPTConfig(**{**shape, **kw}, qk_norm=qk_norm, pe=dict(spec)), layer_idx=0)


def causal_softmax_output(attn: CausalSelfAttention, q, k, v, bias=None, logit_scale: float = 1.0):
    """softmax(logit_scale * q.k / sqrt(D) + bias) V, o_proj; q (B, T, H, D), k/v on their KV heads."""
    H, T = q.shape[2], q.shape[1]
    kv = torch.arange(H) // (H // k.shape[2])
    s = torch.einsum("bthd,bshd->bhts", q, k[:, :, kv]) * logit_scale / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v[:, :, kv])
    return attn.o_proj(y.flatten(2))


def heads(attn: CausalSelfAttention, x):
    B, T, _ = x.shape
    D = attn.head_dim
    return (attn.q_proj(x).view(B, T, -1, D), attn.k_proj(x).view(B, T, -1, D), attn.v_proj(x).view(B, T, -1, D))


@torch.no_grad()
def unequal_gains(attn: CausalSelfAttention, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for norm in (attn.q_norm, attn.k_norm):
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))


# ---- 1. YaRN's attention temperature survives the QK-RMSNorm ---------------------------------------


@pytest.mark.parametrize("qk_norm,before", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("name", ["rope", "ropepp_ec", "grape_m", "grape_m_ctx"])
def test_yarn_temperature_multiplies_the_logits(name, qk_norm, before):
    """With pe.scaling=yarn the logits are (0.1 ln s + 1)^2 q.k / sqrt(D) (YaRN; the RoPE++ code scales cos
    and sin by 0.1 ln s + 1), whatever the order of rotation and QK-norm: a temperature put on cos/sin is
    removed by a QK-RMSNorm that follows the rotation."""
    factor = 16.0
    spec = pe_spec(name, scaling="yarn", factor=factor, original_max_len=8, before_qk_norm=before)
    attn = attention_layer(spec, qk_norm=qk_norm)
    pe = attn.pe
    torch.manual_seed(1)
    x = torch.randn(2, 12, 32)
    positions = torch.arange(12)
    mscale = 0.1 * math.log(factor) + 1
    with torch.no_grad():
        q, k, v = heads(attn, x)
        if pe.before_qk_norm:
            q, k = pe.transform_qk(q, k, x, positions)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if not pe.before_qk_norm:
            q, k = pe.transform_qk(q, k, x, positions)
        want = causal_softmax_output(attn, q, k, v, logit_scale=mscale**2)
        torch.testing.assert_close(attn(x, positions), want, atol=1e-5, rtol=1e-5)
        # Not vacuous: without the temperature the output differs.
        assert (causal_softmax_output(attn, q, k, v) - want).abs().max() > 1e-3


def test_yarn_temperature_changes_the_logits_of_a_qk_norm_model():
    torch.manual_seed(0)
    cfg = dict(name="t", vocab_size=64, n_layer=2, d_model=32, n_head=2, head_dim=16, mlp_hidden=48, qk_norm=True)
    yarn = {"name": "rope", "scaling": "yarn", "factor": 16.0, "original_max_len": 8}
    model = GPT(GPTConfig(**cfg, pe=yarn))
    idx = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        with_t = model(idx)
        for pe in model.pes():
            pe.logit_scale = 1.0
        without = model(idx)
    assert (with_t - without).abs().max() > 1e-2  # the issue measured 7e-6 before the fix


# ---- 2. GRAPE-A `gate: linear` is the form of commit 431bad1 -------------------------------------------


def bias_431bad1(kind: str, q, k, omega, u, v):
    """Transcribed from model/llama-mha-grape-a-{querygated,keygated,querykeygated}.py @431bad1:
    dist = (i - j) clamped at 0; u, v L2-normalised; no 1/sqrt(D); omega unconstrained."""
    B, T, H, D = q.shape
    ar = torch.arange(T)
    dist = (ar[:, None] - ar[None, :]).clamp_min(0).float()[None, None]
    w = omega.view(1, H, 1, 1)
    gate_q = (q * F.normalize(v, dim=-1).view(1, 1, H, D)).sum(-1).transpose(1, 2) if v is not None else None
    gate_k = (k * F.normalize(u, dim=-1).view(1, 1, H, D)).sum(-1).transpose(1, 2) if u is not None else None
    if kind == "q":
        return -dist * w * gate_q.view(B, H, T, 1)
    if kind == "k":
        return dist * w * gate_k.view(B, H, 1, T)
    return dist * w * gate_k.view(B, H, 1, T) - dist * w * gate_q.view(B, H, T, 1)


@pytest.mark.parametrize("kind", ["q", "k", "qk"])
def test_grape_a_linear_gate_is_the_431bad1_code(kind):
    spec = pe_spec(f"grape_a_{kind}", gate="linear")
    attn = attention_layer(spec, n_kv_head=4)  # the 431bad1 files are multi-head
    pe = attn.pe
    # Init as that code: omega = +slopes (-Q, -QK) or -slopes (-K), unconstrained.
    sign = -1.0 if kind == "k" else 1.0
    torch.testing.assert_close(pe.omega(), sign * slopes_tensor(4))
    with torch.no_grad():
        pe.omega_param.copy_(torch.tensor([0.3, -0.2, 0.05, -0.6]))  # any sign: not softplus-constrained
        perturb_pe(torch.nn.ModuleDict({"a": attn}), seed=2)
        unequal_gains(attn)
        torch.manual_seed(1)
        x = torch.randn(2, 10, 32)
        q, k, v = heads(attn, x)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = bias_431bad1(kind, q, k, pe.omega(), pe.u, pe.v)
        torch.testing.assert_close(
            attn(x, torch.arange(10)), causal_softmax_output(attn, q, k, v, bias), atol=1e-5, rtol=1e-5
        )


# ---- 3. The GRAPE presets initialise every PE parameter as the GRAPE code -------------------------------


def preset_pe(experiment: str, pe: str) -> dict:
    from pelab.train.config import compose, model_config

    return model_config(compose([f"experiment={experiment}", f"pe={pe}"])).pe


@pytest.mark.parametrize("experiment,d_model,n_head", [("grape_medium", 1024, 8), ("grape_large", 1280, 10)])
def test_grape_presets_train_fox_with_the_grape_code_gate_init(experiment, d_model, n_head):
    spec = preset_pe(experiment, "fox")
    assert spec["init"] == "grape" and preset_pe(experiment, "alibi")["init"] == "grape"  # one key for every PE
    shape = AttentionShape(d_model, n_head, n_head, 128, 24, 0)
    torch.manual_seed(0)
    fox = build_pe(spec, shape)
    w, b = fox.fgate.weight, fox.fgate.bias
    assert w.std().item() == pytest.approx(0.5 / math.sqrt(d_model), rel=0.03)  # 0.0156 / 0.0140
    bound = 1 / math.sqrt(d_model)  # nn.Linear's default bias, which the GRAPE code never redraws
    assert b.abs().max() <= bound and b.abs().max() > bound / 4
    # Outside the GRAPE presets FoX keeps the FoX code's init.
    from pelab.train.config import compose, model_config

    native = build_pe(model_config(compose(["pe=fox", "model=gpt_355m"])).pe, shape)
    assert native.fgate.weight.std().item() == pytest.approx(0.02, rel=0.03) and not native.fgate.bias.any()


def test_init_is_an_option_of_every_pe_with_one_default():
    from pelab.train.config import compose, config_error_message

    for name in available():
        assert ("init", str, "native") in options(name), name  # from PositionalEncoding.__init__ (**shared)
    assert compose(["pe=grape_ap", "pe.init=grape"]).pe.init == "grape"
    with pytest.raises(ValueError, match="pe.init must be one of native, grape, got 'gpt2'"):
        build_pe({"name": "fox", "init": "gpt2"}, AttentionShape(32, 4, 4, 8, 1, 0))
    with pytest.raises(Exception) as err:  # noqa: B017
        compose(["pe=fox", "pe.inti=grape"])
    assert "'inti' is not a key of pe; valid keys: name, output_gate" in config_error_message(err.value)


@pytest.mark.parametrize("name", available())
def test_grape_medium_pe_parameters_start_where_the_grape_code_starts_them(name):
    """Each PE parameter under the grape_medium preset, against the GRAPE code's initial values
    (model/init_utils.py re-draws every >= 2-D weight N(0, 0.5/sqrt(d_model)) except the suffixes it
    excludes; 1-D parameters keep their module's init)."""
    d, H, D = 1024, 8, 128
    spec = preset_pe("grape_medium", name)
    if name == "ropepp_eh":
        return  # not a GRAPE-code model (no parameters of its own anyway)
    torch.manual_seed(0)
    pe = build_pe(spec, AttentionShape(d, H, H, D, 24, 0))
    params = dict(pe.named_parameters())
    hidden = 0.5 / math.sqrt(d)
    rope_log = rope_inv_freq(D, 10000.0)[0].log()
    if name in ("rope", "ropepp_ec", "nope", "alibi"):
        assert not params
    elif name == "grape_m":  # MSGRAPECommuting: log_freq = 16 * log(RoPE's), excluded from the re-init
        assert set(params) == {"log_freq"}
        torch.testing.assert_close(params["log_freq"][0], 16 * rope_log)
    elif name == "grape_m_ctx":  # log_freq unscaled; omega_proj.weight excluded (zeros), bias softplus^-1(1e-3)
        torch.testing.assert_close(params["log_freq"], rope_log)
        assert not params["omega_proj.weight"].any()
        torch.testing.assert_close(params["omega_proj.bias"], torch.full((1,), softplus_inverse(1e-3)))
    elif name.startswith("grape_a_"):  # omega = slopes; u, v ~ N(0, 1/sqrt(D)), excluded from the re-init
        torch.testing.assert_close(pe.omega(), slopes_tensor(H))
        for p in ("u", "v"):
            if p in params:
                assert params[p].std().item() == pytest.approx(1 / math.sqrt(D), rel=0.05)
    elif name == "grape_ap":  # c_p: N(0, 0.5/sqrt(d)); alpha = fixed slopes (a buffer)
        assert set(params) == {"probe.weight"}
        assert params["probe.weight"].std().item() == pytest.approx(hidden, rel=0.02)
    elif name == "fox":
        assert params["fgate.weight"].std().item() == pytest.approx(hidden, rel=0.03)
    else:
        raise AssertionError(f"no GRAPE-code init recorded for pe={name}")


def test_grape_preset_kv_shift_weights_are_drawn_as_the_grape_code():
    from pelab.train.config import compose, model_config

    cfg = model_config(compose(["experiment=grape_medium", "pe=rope", "kv_shift=true"])).__dict__
    cfg.update(n_layer=1, vocab_size=64)
    torch.manual_seed(0)
    shift = GPT(GPTConfig.from_dict(cfg)).blocks[0].attn.kv_shift
    for lin in (shift.k_proj, shift.v_proj):  # ShiftLinear.shift_proj: re-drawn N(0, 0.5/sqrt(d))
        assert lin.weight.std().item() == pytest.approx(0.5 / math.sqrt(1024), rel=0.05)


# ---- 4. Rotation direction: pelab (counter-clockwise) vs the GRAPE code (clockwise) --------------------


def rotate_clockwise(x, positions, inv_freq):
    """The GRAPE code's rotary (model/llama-mha-rope.py): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    ang = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1)


@pytest.mark.parametrize("name", ["rope", "grape_m"])
def test_converted_weights_give_the_grape_code_rotation_the_same_logits(name):
    """pelab's model with W_q, W_k equals the GRAPE code's (rotate clockwise, then QK-RMSNorm with unequal
    gains) with convert_rotation(W) -- and not with W itself."""
    attn = attention_layer(pe_spec(name), n_kv_head=4)
    unequal_gains(attn)
    perturb_pe(torch.nn.ModuleDict({"a": attn}), seed=3)
    torch.manual_seed(1)
    x = torch.randn(2, 10, 32)
    pos = torch.arange(10)
    D = attn.head_dim
    inv_freq = attn.pe.freqs()[0] if name == "grape_m" else attn.pe.inv_freq

    def grape_code(wq, wk):
        B, T, _ = x.shape
        q = rotate_clockwise((x @ wq.T).view(B, T, -1, D), pos, inv_freq)
        k = rotate_clockwise((x @ wk.T).view(B, T, -1, D), pos, inv_freq)
        v = attn.v_proj(x).view(B, T, -1, D)
        return causal_softmax_output(attn, attn.q_norm(q), attn.k_norm(k), v)

    wq, wk = attn.q_proj.weight, attn.k_proj.weight
    with torch.no_grad():
        out = attn(x, pos)
        conv = [convert_rotation(w, D, "counter-clockwise", "clockwise") for w in (wq, wk)]
        torch.testing.assert_close(grape_code(*conv), out, atol=1e-5, rtol=1e-5)
        assert (grape_code(wq, wk) - out).abs().max() > 1e-3
        torch.testing.assert_close(convert_rotation(conv[0], D, "clockwise", "counter-clockwise"), wq)


def test_converted_probe_weights_give_the_grape_code_ap_bias():
    """GRAPE-AP's key probes R_l pbar_l: the GRAPE code's clockwise R_l with converted W_p gives pelab's bias."""
    attn = attention_layer(pe_spec("grape_ap"), n_kv_head=4)
    pe = attn.pe
    torch.manual_seed(1)
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)
    P = pe.probe_dim

    def sims(weight, rotate):
        B, T, _ = x.shape
        p = (x @ weight.T).view(B, T, -1, P)
        p_bar = F.rms_norm(p, (P,))
        return torch.einsum("bthp,blhp->bhtl", p, rotate(p_bar))

    ones = torch.ones(P // 2)
    with torch.no_grad():
        q_probe, k_probe = pe.probes(x, pos)
        ours = torch.einsum("bhtp,bhlp->bhtl", q_probe, k_probe)
        conv = convert_rotation(pe.probe.weight, P, "counter-clockwise", "clockwise")
        torch.testing.assert_close(sims(conv, lambda z: rotate_clockwise(z, pos, ones)), ours, atol=1e-5, rtol=1e-5)


# ---- QK-norm with unequal gains: RoPE is relative only when rotating after the norm ----------------------


@pytest.mark.parametrize("before,relative", [(True, False), (False, True)])
def test_rope_with_unequal_qk_norm_gains_is_relative_only_after_the_norm(before, relative):
    attn = attention_layer(pe_spec("rope", before_qk_norm=before))
    unequal_gains(attn)
    torch.manual_seed(3)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        shift = (attn(x, torch.arange(10) + 37) - attn(x, torch.arange(10))).abs().max().item()
    assert (shift < 1e-5) if relative else (shift > 1e-3), shift


# ---- context extension is a method of the PE --------------------------------------------------------------


@pytest.mark.parametrize("name", available())
def test_every_pe_extends_its_context_or_refuses_clearly(name):
    shape = AttentionShape(32, 4, 2, 8, 1, 0)
    rotary = bool(context_keys(name))  # the knobs are constructor options of the rotary PEs only
    assert rotary == (name in ("rope", "ropepp_eh", "ropepp_ec", "grape_m", "grape_m_ctx"))
    trained = {**pe_spec(name), "base": 10000.0} if rotary else pe_spec(name)
    if not rotary:
        with pytest.raises(ValueError, match=f"pe={name} cannot extend its context: .* applies to grape_m, "):
            check_context_extension(name, {"base": 500000.0})
        with pytest.raises(ValueError, match=f"bad options for pe={name}: .*'base'"):
            build_pe({**pe_spec(name), "base": 500000.0}, shape)
        return
    check_context_extension(name, {"base": 500000.0, "scaling": "yarn"})
    for new in ({"base": 500000.0}, {"scaling": "linear", "factor": 4.0}, {"scaling": "yarn", "factor": 4.0}):
        pe = build_pe({**trained, **new}, shape)
        note = pe.extend_context(trained)
        assert note and "->" in note, (name, new)
        assert pe.logit_scale == pytest.approx((0.1 * math.log(4) + 1) ** 2 if new.get("scaling") == "yarn" else 1.0)
    assert build_pe(trained, shape).extend_context(trained) is None


def test_grape_m_yarn_trains_and_continues_from_an_unscaled_checkpoint(tmp_path):
    """init_from with pe.scaling=yarn on grape_m: the model builds (the constructor takes the knobs) and the
    learned frequencies move the way RoPE's do."""
    from pelab.train.eval.checkpoint import load_weights

    cfg = dict(name="t", vocab_size=64, n_layer=1, d_model=32, n_head=2, head_dim=16, mlp_hidden=48)
    trained = GPT(GPTConfig(**cfg, pe={"name": "grape_m"}))
    yarn = {"name": "grape_m", "scaling": "yarn", "factor": 8.0, "original_max_len": 64}
    model = GPT(GPTConfig(**cfg, pe=yarn))
    state = {"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}
    assert load_weights(model, state, {"name": "grape_m"})
    torch.testing.assert_close(model.pes()[0].freqs()[0], rope_inv_freq(16, 10000.0, "yarn", 8.0, 64)[0])
