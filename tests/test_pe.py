"""The positional-encoding matrix: every PE against its dense reference, the relative laws, the papers'
reductions, causality, gradients, parameter counts and KV-cache sizes (CPU, tiny shapes)."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from pelab.models.attention import CausalSelfAttention
from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT
from pelab.models.kernels.bias import LowRankBias, PathSumBias
from pelab.models.kernels.reference import chunked_attention, dense_attention
from pelab.models.pe import available
from pelab.models.pe.alibi import alibi_slopes
from pelab.models.pe.common import repeat_kv
from pelab.models.pe.reference import reference_output, reference_scores
from pelab.train.config import CONF_DIR, compose, to_dict

from tests.conftest import REPO

# Every registered PE: a PE missing from a hand-written list cannot escape the tests below.
ALL_PES = available()


@functools.cache
def _shipped(name: str) -> tuple:
    return tuple(to_dict(compose([f"pe={name}"]).pe).items())


def pe_spec(name: str, **overrides) -> dict:
    """The PE's composed config (conf/pe/<name>.yaml over its constructor defaults: the shipped knobs)
    plus overrides."""
    return {**dict(_shipped(name)), **overrides}


# (test id, spec): every shipped config plus the documented options.
VARIANTS = [(n, pe_spec(n)) for n in ALL_PES] + [
    ("grape_m-per_head", pe_spec("grape_m", share_across_heads=False)),
    ("grape_m-rodrigues", pe_spec("grape_m", form="rodrigues")),
    ("grape_m-rodrigues-3planes", pe_spec("grape_m", form="rodrigues", planes=3, basis="canonical")),
    ("grape_m_ctx-first_release", pe_spec("grape_m_ctx", init_mode="first_release")),
    ("grape_a_qk-linear", pe_spec("grape_a_qk", gate="linear")),
    ("grape_ap-paper", pe_spec("grape_ap", query_probe_norm=True, learn_alpha=True)),
    ("fox-pro", pe_spec("fox", output_gate=True, output_norm=True)),
]
VARIANT_IDS = [v[0] for v in VARIANTS]


def tiny_cfg(spec: dict, **kw) -> GPTConfig:
    # GQA (4 query heads on 2 KV heads) so that RoPE++'s interleaved head layout is exercised.
    base = dict(
        name="t",
        vocab_size=61,
        n_layer=2,
        d_model=32,
        n_head=4,
        n_kv_head=2,
        head_dim=8,
        mlp_hidden=48,
        loss_chunk_rows=0,
        pe=dict(spec),
    )
    base.update(kw)
    return GPTConfig(**base)


@torch.no_grad()
def perturb_pe(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every PE parameter off its initial value (zero gates, unit gains, RoPE frequencies)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        pe = getattr(m, "pe", None)
        if pe is None:
            continue
        for name, p in pe.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name == "log_freq":
                noise = noise * getattr(pe, "log_freq_scale", 1.0)
            p.add_(noise)


def layer(spec: dict, seed: int = 0, kv_shift: bool = False, perturb: bool = True) -> CausalSelfAttention:
    torch.manual_seed(seed)
    attn = CausalSelfAttention(tiny_cfg(spec, kv_shift=kv_shift), layer_idx=0)
    attn.pe.reset_parameters()
    if perturb:
        perturb_pe(torch.nn.ModuleDict({"a": attn}), seed=seed)
    return attn


def normed_heads(attn: CausalSelfAttention, x: torch.Tensor):
    """q, k (after KV-shift and QK-norm, before the PE) and v, as the reference takes them."""
    B, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, D)
    k = attn.k_proj(x).view(B, T, -1, D)
    v = attn.v_proj(x).view(B, T, -1, D)
    if attn.kv_shift is not None:
        k, v = attn.kv_shift(x, k, v)
    return attn.q_norm(q), attn.k_norm(k), v


def reference_forward(attn: CausalSelfAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """softmax(dense reference scores) V, the PE's output transform, o_proj; in float64."""
    q, k, v = normed_heads(attn, x)
    scores = reference_scores(attn.pe, q, k, x, positions).double()
    H = scores.shape[1]
    v = repeat_kv(v, H, dim=2).double()
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    y = reference_output(attn.pe, y, x)
    return y.flatten(2) @ attn.o_proj.weight.double().T


def fast_scores(attn: CausalSelfAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The scores the kernel sees (q.k/sqrt(D) + bias tiles), lower triangle valid."""
    q, k, v, bias = attn.project(x, positions)
    H = q.shape[2]
    k = repeat_kv(k, H, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return s if bias is None else s + bias.dense()


def lower(s: torch.Tensor) -> torch.Tensor:
    T = s.shape[-1]
    return s[..., torch.ones(T, T, dtype=torch.bool).tril()]


def toeplitz_defect(s: torch.Tensor) -> torch.Tensor:
    """max |(s[t,j] - s[t,t]) - (s[t+1,j+1] - s[t+1,t+1])| over j <= t: zero iff, up to per-row
    constants (which the softmax ignores), the scores depend only on t - j."""
    rel = s - torch.diagonal(s, dim1=-2, dim2=-1)[..., :, None]
    d = rel[..., :-1, :-1] - rel[..., 1:, 1:]
    T = d.shape[-1]
    return d[..., torch.ones(T, T, dtype=torch.bool).tril()].abs().max()


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- registry and configs -------------------------------------------------------------------------


def test_every_registered_pe_has_a_config_and_every_config_a_pe():
    assert sorted(p.stem for p in (CONF_DIR / "pe").glob("*.yaml")) == ALL_PES
    for name in ALL_PES:
        assert pe_spec(name)["name"] == name


# ---- attention output == softmax(reference scores) V ---------------------------------------------


@pytest.mark.parametrize("kv_shift", [False, True], ids=["plain", "kvshift"])
@pytest.mark.parametrize("backend", ["chunked", "eager"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_attention_output_matches_dense_reference(variant, backend, kv_shift):
    _, spec = variant
    attn = layer(spec, kv_shift=kv_shift)
    attn.backend = backend
    torch.manual_seed(1)
    x = torch.randn(2, 11, 32)
    positions = torch.arange(11) + 5
    with torch.no_grad():
        out = attn(x, positions)
        ref = reference_forward(attn, x, positions)
    assert out.abs().mean() > 1e-3
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_bias_tiles_match_dense_bias(variant):
    """The memory-frugal kernel over many small query blocks equals the dense path (bias tiling)."""
    attn = layer(variant[1])
    torch.manual_seed(2)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        q, k, v, bias = attn.project(x, torch.arange(13))
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = q.shape[-1] ** -0.5
        torch.testing.assert_close(
            chunked_attention(qh, kh, vh, bias, scale, block=4),
            dense_attention(qh, kh, vh, bias, scale),
            atol=1e-5,
            rtol=1e-5,
        )
    if bias is not None:
        assert isinstance(bias, (LowRankBias, PathSumBias))
        if isinstance(bias, LowRankBias):
            assert bias.rank <= 3 and bias.q_terms.dtype == torch.float32


# ---- relative laws --------------------------------------------------------------------------------

RELATIVE = [
    "rope",
    "ropepp_eh",
    "ropepp_ec",
    "grape_m",
    "grape_m-per_head",
    "grape_m-rodrigues",
    "grape_m-rodrigues-3planes",
    "alibi",
    "grape_a_q",
    "grape_a_k",
    "grape_a_qk",
    "grape_a_qk-linear",
]


@pytest.mark.parametrize("name", RELATIVE)
def test_scores_are_invariant_to_a_position_shift(name):
    attn = layer(dict(VARIANTS)[name])
    torch.manual_seed(3)
    x = torch.randn(2, 10, 32)
    pos = torch.arange(10)
    with torch.no_grad():
        s0, s1 = fast_scores(attn, x, pos), fast_scores(attn, x, pos + 37)
        torch.testing.assert_close(lower(s1), lower(s0), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(attn(x, pos + 37), attn(x, pos), atol=1e-5, rtol=1e-5)
        q, k, _ = normed_heads(attn, x)
        r0 = reference_scores(attn.pe, q, k, x, pos)
        torch.testing.assert_close(
            lower(reference_scores(attn.pe, q, k, x, pos + 1000)), lower(r0), atol=1e-4, rtol=1e-5
        )
    # The law is not vacuous: the scores do depend on position (a zero shift of content would not).
    assert (lower(s0) - lower(fast_scores(attn, torch.randn(2, 10, 32), pos))).abs().max() > 1e-3


@pytest.mark.parametrize("name", RELATIVE + ["grape_m_ctx", "grape_m_ctx-first_release"])
def test_constant_content_gives_toeplitz_scores(name):
    """With the same token at every position (same q, k, gates, phase increments) the scores depend
    only on t - j, for the fast path and for the reference."""
    attn = layer(dict(VARIANTS)[name])
    torch.manual_seed(4)
    x = torch.randn(1, 1, 32).expand(2, 12, 32).contiguous()
    pos = torch.arange(12) + 3
    with torch.no_grad():
        s = fast_scores(attn, x, pos)
        q, k, _ = normed_heads(attn, x)
        r = reference_scores(attn.pe, q, k, x, pos)
    assert toeplitz_defect(s) < 1e-4
    assert toeplitz_defect(torch.nan_to_num(r, neginf=0.0).tril()) < 1e-4
    # ... and not trivially: scores vary along a row.
    assert (lower(s).max() - lower(s).min()) > 1e-2


@pytest.mark.parametrize("name", ["grape_m_ctx", "grape_m_ctx-first_release"])
def test_grape_m_ctx_is_relative_in_phase(name):
    attn = layer(dict(VARIANTS)[name])
    pe = attn.pe
    torch.manual_seed(5)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        q, k, _ = normed_heads(attn, x)
        phase = pe.phase(x)
        assert torch.all(phase[:, 0] == 0) and torch.all(phase[:, 1:] >= phase[:, :-1])  # exclusive cumsum, omega >= 0
        torch.testing.assert_close(phase[:, 1:], pe.omega(x).cumsum(1)[:, :-1])

        def scores(ph):
            qr, kr = pe.rotate(q, k, ph)
            kr = kr[:, :, torch.arange(4) // 2]
            return torch.einsum("bthd,bshd->bhts", qr, kr)

        base = scores(phase)
        torch.testing.assert_close(scores(phase + 123.0), base, atol=1e-4, rtol=1e-5)
        assert (scores(phase * 2.0) - base).abs().max() > 1e-3  # phase differences matter
        # The layer ignores absolute positions: only the phase (from content) positions tokens.
        torch.testing.assert_close(attn(x, torch.arange(10) + 50), attn(x, torch.arange(10)))


def test_grape_m_ctx_initial_omega_matches_both_code_versions():
    x = torch.randn(2, 64, 32)
    head = layer(pe_spec("grape_m_ctx"), perturb=False).pe
    with torch.no_grad():
        omega = head.omega(x)
    expected = 1 / (1 + math.exp(-math.log(math.expm1(1e-3)) / 16))  # sigmoid(softplus^-1(1e-3) / 16)
    assert round(expected, 3) == 0.394
    torch.testing.assert_close(omega, torch.full((2, 64), expected), atol=1e-6, rtol=0)
    assert torch.all(head.omega_proj.weight == 0)
    first = layer(pe_spec("grape_m_ctx", init_mode="first_release"), perturb=False).pe
    with torch.no_grad():
        w = first.omega(F.rms_norm(x, (32,)))
    assert 1e-4 < w.min() and w.max() < 1e-2 and abs(w.log().mean().item() - math.log(1e-3)) < 0.3


# ---- the papers' reductions -------------------------------------------------------------------------


def _shared_weights(src: CausalSelfAttention, dst: CausalSelfAttention) -> None:
    """Copy every non-PE weight whose shape matches (RoPE++ EC has a wider o_proj)."""
    own = dst.state_dict()
    dst.load_state_dict(
        {k: v for k, v in src.state_dict().items() if not k.startswith("pe.") and k in own and own[k].shape == v.shape},
        strict=False,
    )


@pytest.mark.parametrize(
    "spec",
    [pe_spec("grape_m"), pe_spec("grape_m", form="rodrigues"), pe_spec("grape_m", form="rodrigues", basis="canonical")],
    ids=["rope_form", "rodrigues_learned_basis", "rodrigues_canonical"],
)
def test_grape_m_at_init_equals_rope(spec):
    torch.manual_seed(6)
    rope, grape = layer(pe_spec("rope"), perturb=False), layer(spec, perturb=False)
    _shared_weights(rope, grape)
    x, pos = torch.randn(2, 40, 32), torch.arange(40) * 3
    with torch.no_grad():
        q, k = torch.randn(2, 40, 4, 8), torch.randn(2, 40, 2, 8)
        for a, b in zip(grape.pe.transform_qk(q, k, x, pos), rope.pe.transform_qk(q, k, x, pos)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grape(x, pos), rope(x, pos), atol=1e-5, rtol=1e-5)
    assert grape.pe.log_freq.dtype == torch.float32
    torch.testing.assert_close(grape.pe.log_freq / 16.0, rope.pe.inv_freq.log().expand_as(grape.pe.log_freq))


def test_grape_m_full_model_at_init_equals_rope():
    torch.manual_seed(7)
    rope = GPT(tiny_cfg(pe_spec("rope")))
    grape = GPT(tiny_cfg(pe_spec("grape_m")))
    missing, unexpected = grape.load_state_dict(rope.state_dict(), strict=False)
    assert all(m.endswith("pe.log_freq") for m in missing) and not unexpected
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(grape(idx), rope(idx), atol=1e-5, rtol=1e-5)


def test_grape_m_keeps_its_frequencies_in_fp32():
    attn = layer(pe_spec("grape_m", form="rodrigues"))
    before = attn.pe.log_freq.detach().clone()
    attn = attn.to(torch.bfloat16)
    assert attn.pe.log_freq.dtype == torch.float32 and attn.pe.basis_skew.dtype == torch.float32
    assert torch.equal(attn.pe.log_freq, before)  # not rounded through bf16
    assert attn.q_proj.weight.dtype == torch.bfloat16


def test_rodrigues_series_and_closed_form_agree_near_the_threshold():
    from pelab.models.pe.grape_m import _sinc_cosc

    z = torch.tensor([0.0, 1e-4, 0.049, 0.051, 0.5, 3.0], dtype=torch.float64)
    sinc, cosc = _sinc_cosc(z, 0.05)
    zs = torch.where(z == 0, torch.ones_like(z), z)
    torch.testing.assert_close(sinc, torch.where(z == 0, torch.ones_like(z), torch.sin(zs) / zs))
    torch.testing.assert_close(cosc, torch.where(z == 0, torch.full_like(z, 0.5), (1 - torch.cos(zs)) / zs**2))
    zg = torch.tensor([0.0, 0.01], requires_grad=True)
    s, c = _sinc_cosc(zg, 0.05)
    (s + c).sum().backward()
    assert torch.isfinite(zg.grad).all()


def test_rodrigues_learned_basis_is_orthogonal_and_not_rope():
    attn = layer(pe_spec("grape_m", form="rodrigues"))  # perturbed: a non-trivial basis
    pe = attn.pe
    with torch.no_grad():
        Q = pe.orthogonal_basis()
        torch.testing.assert_close(Q @ Q.T, torch.eye(8), atol=1e-5, rtol=0)
        assert (Q - torch.eye(8)).abs().max() > 0.1
        q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8)
        qr, _ = pe.transform_qk(q, k, None, torch.arange(6))
        torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))  # G(n) is a rotation


@pytest.mark.parametrize("n_head", [4, 8])
def test_fox_with_a_constant_gate_equals_alibi(n_head):
    torch.manual_seed(8)
    kw = dict(n_head=n_head, n_kv_head=n_head // 2)
    alibi = CausalSelfAttention(tiny_cfg(pe_spec("alibi"), **kw), 0)
    fox = CausalSelfAttention(tiny_cfg(pe_spec("fox"), **kw), 0)
    _shared_weights(alibi, fox)
    m = torch.tensor(alibi_slopes(n_head), dtype=torch.float64)
    with torch.no_grad():
        fox.pe.fgate.weight.zero_()
        fox.pe.fgate.bias.copy_(torch.log(torch.exp(-m) / (1 - torch.exp(-m))))  # sigmoid(b) = e^{-m}
    x, pos = torch.randn(2, 20, 32), torch.arange(20)
    with torch.no_grad():
        torch.testing.assert_close(fox(x, pos), alibi(x, pos), atol=1e-5, rtol=1e-5)
        q, k, _ = normed_heads(fox, x)
        torch.testing.assert_close(
            reference_scores(fox.pe, q, k, x, pos), reference_scores(alibi.pe, q, k, x, pos), atol=1e-5, rtol=1e-6
        )


def test_grape_ap_with_constant_probe_term_is_scaled_alibi():
    torch.manual_seed(9)
    alibi, ap = layer(pe_spec("alibi"), perturb=False), layer(pe_spec("grape_ap"), perturb=False)
    _shared_weights(alibi, ap)
    with torch.no_grad():
        ap.pe.probe.weight.zero_()  # s = 0 -> psi = alpha_h log sigmoid(0) = -ln2 alpha_h per link
        alibi.pe.slopes.mul_(math.log(2.0))
    x, pos = torch.randn(2, 16, 32), torch.arange(16)
    with torch.no_grad():
        torch.testing.assert_close(ap(x, pos), alibi(x, pos), atol=1e-5, rtol=1e-5)
        _, _, _, bias = ap.project(x, pos)
        i = pos[:, None] - pos[None, :]
        expected = -math.log(2.0) * ap.pe.slopes[:, None, None] * i
        torch.testing.assert_close(lower(bias.dense()[0]), lower(expected), atol=1e-5, rtol=1e-6)


def test_grape_ap_starts_as_alibi_with_two_thirds_slopes():
    """At init |s| is small, so the bias is close to -ln2 * slope * (i - j) (notes: "0.69x ALiBi")."""
    torch.manual_seed(10)
    ap = layer(pe_spec("grape_ap"), perturb=False)
    x = F.rms_norm(torch.randn(4, 32, 32), (32,))
    with torch.no_grad():
        _, _, _, bias = ap.project(x, torch.arange(32))
        b = bias.dense()
    dist = torch.arange(32)[:, None] - torch.arange(32)[None, :]
    strict = dist > 0
    ratio = (b[..., strict] / (-ap.pe.slopes[:, None] * dist[strict])).mean()
    assert 0.6 < ratio.item() < 0.8


def test_ropepp_imaginary_scores_are_minus_im_of_the_complex_rope_product():
    torch.manual_seed(11)
    ec = layer(pe_spec("ropepp_ec"), perturb=False)
    rope = layer(pe_spec("rope"), perturb=False)
    _shared_weights(ec, rope)
    x, pos = torch.randn(2, 9, 32), torch.arange(9) + 2
    with torch.no_grad():
        q, k, _, _ = ec.project(x, pos)
        assert q.shape[2] == 8 and k.shape[2] == 2
        qr, kr, _, _ = rope.project(x, pos)
        torch.testing.assert_close(q[:, :, 0::2], qr)  # real heads are RoPE heads
        torch.testing.assert_close(k, kr)
        s = fast_scores(ec, x, pos)
        qn, kn, _ = normed_heads(ec, x)
        ref = reference_scores(ec.pe, qn, kn, x, pos)  # real: Re, imaginary: -Im of the complex product
        torch.testing.assert_close(lower(s), lower(ref), atol=1e-5, rtol=1e-5)
        # At zero offset the imaginary score is -(q x k) = sum_n (q2 k1 - q1 k2) / sqrt(D) (pairs n, n + D/2).
        kn_h = kn[:, :, torch.arange(4) // 2]
        cross = (qn[..., 4:] * kn_h[..., :4] - qn[..., :4] * kn_h[..., 4:]).sum(-1) / math.sqrt(8)
        torch.testing.assert_close(
            torch.diagonal(s[:, 1::2], dim1=-2, dim2=-1), cross.transpose(1, 2), atol=1e-5, rtol=1e-5
        )


def test_ropepp_heads_share_their_parent_kv_head():
    """Under repeat_interleave GQA, query heads 2j and 2j+1 read KV head j // group."""
    torch.manual_seed(12)
    ec = layer(pe_spec("ropepp_ec"), perturb=False)
    x, pos = torch.randn(1, 7, 32), torch.arange(7)
    with torch.no_grad():
        q, k, v, _ = ec.project(x, pos)
        y = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 8**-0.5)
        # Query head j of the original layer (4 heads on 2 KV heads) uses KV head j // 2.
        for j in range(4):
            for part in (0, 1):
                h = 2 * j + part
                ref = dense_attention(
                    q[:, :, h : h + 1].transpose(1, 2),
                    k[:, :, j // 2 : j // 2 + 1].transpose(1, 2),
                    v[:, :, j // 2 : j // 2 + 1].transpose(1, 2),
                    None,
                    8**-0.5,
                )
                torch.testing.assert_close(y[:, h : h + 1], ref)


def test_ropepp_eh_needs_even_heads():
    with pytest.raises(ValueError, match="even"):
        CausalSelfAttention(tiny_cfg(pe_spec("ropepp_eh"), n_head=3, n_kv_head=3, d_model=24), 0)


def test_alibi_slopes_standard_rule():
    assert alibi_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    assert alibi_slopes(10) == alibi_slopes(8) + [2**-0.5, 2**-1.5]
    assert alibi_slopes(12) == pytest.approx(alibi_slopes(8) + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5])
    assert alibi_slopes(4) == [2**-2, 2**-4, 2**-6, 2**-8]
    attn = CausalSelfAttention(tiny_cfg(pe_spec("alibi"), n_head=12, n_kv_head=4, d_model=96), 0)
    assert attn.pe.slopes.tolist() == pytest.approx(alibi_slopes(12))


@pytest.mark.parametrize("name,n_gates", [("grape_a_q", 1), ("grape_a_k", 1), ("grape_a_qk", 2)])
def test_grape_a_at_zero_gate_logits_is_alibi_times_ln2(name, n_gates):
    """At init w_h = slope_h, and a zero gate logit gives softplus(0) = ln 2 per gate, so the bias is
    -(i - j) slope_h ln2 * n_gates (the notes' "0.69x / 1.39x ALiBi")."""
    attn = layer(pe_spec(name), perturb=False)
    torch.testing.assert_close(attn.pe.omega(), attn.pe.slopes)
    pos = torch.arange(9) + 4
    q0, k0, x = torch.zeros(2, 9, 4, 8), torch.zeros(2, 9, 2, 8), torch.zeros(2, 9, 32)
    i = (pos[:, None] - pos[None, :]).float()
    expected = -i * attn.pe.slopes[:, None, None] * math.log(2.0) * n_gates  # (H, T, T)
    with torch.no_grad():
        fast = attn.pe.attention_bias(q0, k0, x, pos).dense()
        ref = reference_scores(attn.pe, q0, k0, x, pos)
    torch.testing.assert_close(lower(ref), lower(expected.expand(2, -1, -1, -1)), atol=1e-5, rtol=1e-6)
    rel = fast - torch.diagonal(fast, dim1=-2, dim2=-1)[..., :, None]  # fast path drops per-row constants
    torch.testing.assert_close(lower(rel), lower(expected.expand(2, -1, -1, -1)), atol=1e-5, rtol=1e-6)


# ---- EH/EC shapes, parameter counts, KV cache ---------------------------------------------------------


@functools.cache
def _describe(model: str, pe: str, vocab: int | None = None, *extra: str) -> dict:
    from pelab.models.inspect import describe
    from pelab.train.config import compose, model_config

    over = [f"model={model}", f"pe={pe}", *extra] + ([f"model.vocab_size={vocab}"] if vocab else [])
    return describe(model_config(compose(over)), 4096)


def test_ropepp_param_counts_and_kv_cache_on_776m():
    rope, eh, ec = (_describe("gpt_776m", pe, 128256) for pe in ("rope", "ropepp_eh", "ropepp_ec"))
    assert round(rope["total_params"] / 1e6, 1) == 776.2
    assert round(eh["total_params"] / 1e6, 1) == 747.9
    assert round(ec["total_params"] / 1e6, 1) == 804.6
    assert round(rope["non_embedding_params"] / 1e6, 1) == 382.2
    assert round(eh["non_embedding_params"] / 1e6, 1) == 353.9
    assert round(ec["non_embedding_params"] / 1e6, 1) == 410.6
    assert eh["kv_cache_bytes_per_token"] * 2 == rope["kv_cache_bytes_per_token"] == ec["kv_cache_bytes_per_token"]
    assert rope["kv_cache_bytes_per_token"] == 36 * 1024  # 36 KiB per token in bf16
    assert (rope["attention_heads"], eh["attention_heads"], ec["attention_heads"]) == (12, 12, 24)
    assert (eh["query_heads_projected"], eh["kv_heads"]) == (6, 3)
    assert (ec["query_heads_projected"], ec["kv_heads"]) == (12, 6)


# GRAPE notes §3.10: extra parameters per layer (d_model, H) = (1024, 8) medium and (1280, 10) large.
def _extra_per_layer(pe: str, d: int, H: int, D: int = 128) -> int:
    return {
        "nope": 0,
        "rope": 0,
        "alibi": 0,
        "grape_m": D // 2,
        "grape_m_ctx": D // 2 + d + 1,
        "grape_a_q": H + H * D,
        "grape_a_k": H + H * D,
        "grape_a_qk": H + 2 * H * D,
        "grape_ap": d * H * 8,
        "fox": d * H + H,
    }[pe]


@pytest.mark.parametrize("model,d,H,L", [("gpt_355m", 1024, 8, 24), ("gpt_770m", 1280, 10, 36)])
def test_grape_extra_params_match_the_notes(model, d, H, L):
    base = _describe(model, "rope")["total_params"]
    assert round(base / 1e6, 1) == {"gpt_355m": 353.5, "gpt_770m": 772.2}[model]
    for pe in ["nope", "alibi", "grape_m", "grape_m_ctx", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap", "fox"]:
        info = _describe(model, pe)
        assert info["pe_params"] == L * _extra_per_layer(pe, d, H), pe
        assert info["total_params"] == base + info["pe_params"], pe
    assert _extra_per_layer("grape_m_ctx", 1024, 8) == 1089 and _extra_per_layer("grape_ap", 1280, 10) == 102400
    # KV-shift adds 2 * d_model * H per layer.
    assert (
        _describe(model, "fox", None, "kv_shift=true")["total_params"] - _describe(model, "fox")["total_params"]
        == L * 2 * d * H
    )


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_describe_works_for_every_pe_on_every_backbone(model):
    for pe in ALL_PES:
        info = _describe(model, pe)
        assert info["pe"] == pe and info["total_params"] > 0
        assert info["attention_heads"] * info["head_dim"] >= info["query_heads_projected"] * info["head_dim"]


# ---- causality, gradients, stats through a full GPT ---------------------------------------------------


@pytest.mark.parametrize("kv_shift", [False, True], ids=["plain", "kvshift"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_perturbing_a_token_changes_no_earlier_output(variant, kv_shift):
    torch.manual_seed(14)
    model = GPT(tiny_cfg(variant[1], kv_shift=kv_shift))
    perturb_pe(model)
    model.eval()
    idx = torch.randint(0, 61, (2, 14))
    t = 7
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 61
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


@pytest.mark.parametrize("kv_shift", [False, True], ids=["plain", "kvshift"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_every_pe_parameter(variant, kv_shift):
    torch.manual_seed(15)
    model = GPT(tiny_cfg(variant[1], kv_shift=kv_shift))
    idx = torch.randint(0, 61, (2, 12))
    model.loss(idx[:, :-1], idx[:, 1:])["loss"].backward()
    params = [(f"{i}.{n}", p) for i, pe in enumerate(model.pes()) for n, p in pe.named_parameters()]
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    expected = {"nope": 0, "rope": 0, "ropepp_eh": 0, "ropepp_ec": 0, "alibi": 0}.get(variant[0])
    if expected is not None:
        assert not params
    else:
        assert params, "a learnable PE without parameters"
    for blk in model.blocks:
        if blk.attn.kv_shift is not None:
            assert blk.attn.kv_shift.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_stats_are_finite_scalars(variant):
    model = GPT(tiny_cfg(variant[1]))
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 10)))
    for pe in model.pes():
        for key, value in pe.stats().items():
            assert value.dim() == 0 and torch.isfinite(value), key
    stats = model.pes()[0].stats()
    required = {
        "grape_m": "log_freq_drift_mean",
        "grape_m_ctx": "omega_mean",
        "grape_a_qk": "omega/h0",
        "grape_ap": "sim_diag_abs_mean",
        "fox": "half_life_tokens",
    }
    if variant[0] in required:
        assert required[variant[0]] in stats
    if variant[0] == "fox":
        assert 0 < stats["forget_gate_min"] <= stats["forget_gate_mean"] < 1
        assert stats["half_life_tokens"] == pytest.approx(-math.log(2) / stats["log_forget_mean"].item())


COMPILE_VARIANTS = [v for v in VARIANTS if v[0] in ALL_PES or v[0] in ("grape_m-rodrigues", "fox-pro")]


@pytest.mark.parametrize("variant", COMPILE_VARIANTS, ids=[v[0] for v in COMPILE_VARIANTS])
def test_pe_traces_under_torch_compile(variant):
    """GPU runs use torch.compile: every PE must trace (Dynamo + AOTAutograd, no inductor) and give
    the eager outputs and gradients."""
    attn = layer(variant[1], seed=16, kv_shift=True)
    x, pos = torch.randn(2, 10, 32, requires_grad=True), torch.arange(10)
    eager = attn(x, pos)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="aot_eager")(x, pos)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for n, p in attn.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


# ---- the README's tables ---------------------------------------------------------------------------


def _readme_table(header: str) -> list[str]:
    """The first-column cells of the README table whose header row starts with `header`."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    return rows


def test_readme_tables_list_every_registered_pe():
    for header in ("| PE (`pe=`) |", "| PE | gpt_355m |"):
        named = {n for cell in _readme_table(header) for n in re.findall(r"`([a-z_0-9]+)`", cell)}
        named.discard("kv_shift")
        assert named == set(ALL_PES), (header, named ^ set(ALL_PES))


# ---- weight decay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_PES)
def test_weight_decay_groups_are_the_models_own(name):
    """No decay on the norm gains and the parameters each PE names (GPT.no_weight_decay); the groups keep
    the order and content of the earlier rule (norms and parameters named *bias), so optimizer states
    in checkpoints written before map onto the same parameters."""
    from pelab.models.attention import RMSNorm
    from pelab.train.optim import build, optim_config

    model = GPT(tiny_cfg(pe_spec(name), kv_shift=True))
    opt, _ = build(model, optim_config({"name": "adamw"}), max_steps=10)
    decay, no_decay = (g["params"] for g in opt.param_groups)
    norms = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    before = [p for n, p in model.named_parameters() if id(p) in norms or n.endswith("bias")]
    assert [id(p) for p in no_decay] == [id(p) for p in before]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
