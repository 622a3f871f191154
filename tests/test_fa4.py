"""The `fa4` backend on the CPU: selection logic, and the extra-head-dimension construction of the bias
factor gradients (models/kernels/fa4.py) against autograd on a dense reference.

FlashAttention-4 itself needs a Hopper/Blackwell GPU (tests/test_gpu.py runs it there). Here its two
entry points are replaced by a dense emulation with the same interface and numerics (bf16 inputs,
fp32 accumulation, dS rounded to bf16 before the dQ/dK products, bf16 outputs), so the custom ops,
their autograd formula, GQA and torch.compile run end to end.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pelab.models.kernels import attend, fa4, kernels_used, select_kernel
from pelab.models.kernels.bias import LowRankBias, PathSumBias

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-300)).item()


# ---- a dense stand-in for flash_attn.cute.interface -------------------------------------------------


def _dense_bias(aux, B, H, T):
    if not aux:
        return 0.0
    a, b = aux
    R = a.numel() // (B * H * T)
    a, b = a.view(B, H, T, R).double(), b.view(B, H, T, R).double()
    return a @ b.transpose(-1, -2)


def _logits(q, k, scale, aux):
    """(B, H, T, T) fp64 logits of (B, T, H, D) q and k (k with Hkv heads), causal mask applied."""
    B, T, H, _ = q.shape
    kh = k.repeat_interleave(H // k.shape[2], 2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kh.double()) * scale + _dense_bias(aux, B, H, T)
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)


class DenseFA4:
    """`_flash_attn_fwd/_flash_attn_bwd` with FlashAttention-4's roundings: operands and outputs in the
    input dtype, fp32 accumulation, P and dS rounded to the input dtype before their products."""

    @staticmethod
    def _round(x, dtype):
        """x (fp64) as the kernel holds it: fp32, then `dtype` for an MMA operand (exact for fp64 inputs)."""
        return x if dtype == torch.float64 else x.float().to(dtype).double()

    def _flash_attn_fwd(self, q, k, v, softmax_scale, causal, return_lse, score_mod=None, aux_tensors=None):
        assert causal
        s = _logits(q, k, softmax_scale, aux_tensors)
        lse = torch.logsumexp(s, -1)
        p = self._round(torch.exp(s - lse[..., None]), q.dtype)
        vh = v.repeat_interleave(q.shape[2] // v.shape[2], 2).double()
        out = torch.einsum("bhij,bjhd->bihd", p, vh).to(q.dtype).contiguous()
        return out, lse if q.dtype == torch.float64 else lse.float(), None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale, causal, **aux):
        B, T, H, _ = q.shape
        g = H // k.shape[2]
        s = _logits(q, k, softmax_scale, aux.get("aux_tensors"))
        f32 = lambda x: x if q.dtype == torch.float64 else x.float().double()  # noqa: E731
        p = f32(torch.exp(s - lse.double()[..., None]))
        vh = v.repeat_interleave(g, 2).double()
        dp = f32(torch.einsum("bihd,bjhd->bhij", dout.double(), vh))
        delta = f32((dout.double() * out.double()).sum(-1).transpose(1, 2)[..., None])
        ds = self._round(p * (dp - delta), q.dtype)
        kh = k.repeat_interleave(g, 2).double()
        dq = (softmax_scale * torch.einsum("bhij,bjhd->bihd", ds, kh)).to(q.dtype)
        dk = softmax_scale * torch.einsum("bhij,bihd->bjhd", ds, q.double())
        dv = torch.einsum("bhij,bihd->bjhd", self._round(p, q.dtype), dout.double())
        dk = dk.unflatten(2, (k.shape[2], g)).sum(3).to(k.dtype)
        dv = dv.unflatten(2, (v.shape[2], g)).sum(3).to(v.dtype)
        return dq.contiguous(), dk, dv


@pytest.fixture
def dense_fa4(monkeypatch):
    """Run the fa4 backend on the CPU through the dense stand-in."""
    monkeypatch.setattr(fa4, "_interface", lambda: DenseFA4())
    monkeypatch.setattr(fa4, "_mods", lambda rank, heads, seq_len: (None, None))
    monkeypatch.setattr(fa4, "device_supported", lambda q: True)


# ---- the construction in exact arithmetic ----------------------------------------------------------------


@pytest.mark.parametrize("need_da,need_db,R", [(True, False, 3), (False, True, 1), (True, True, 1), (True, False, 4)])
def test_extra_columns_give_exact_factor_gradients(need_da, need_db, R):
    """In float64 the extra columns of dq' and dk' are the factor gradients of autograd's dense reference."""
    g = torch.Generator().manual_seed(R + 10 * need_da + 20 * need_db)
    B, T, H, D = 2, 33, 3, 16
    f64 = dict(dtype=torch.float64)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g, **f64) for _ in range(4))
    a = torch.randn(B, H, T, R, generator=g, **f64).requires_grad_(need_da)
    b = (3 * torch.randn(B, H, T, R, generator=g, **f64)).requires_grad_(need_db)
    scale = D**-0.5
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale + a @ b.transpose(-1, -2)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    leaves = [t for t in (a, b) if t.requires_grad]
    want = torch.autograd.grad(ref, leaves, do)

    aux = [a.detach().reshape(-1), b.detach().reshape(-1)]
    out, lse, *_ = DenseFA4()._flash_attn_fwd(q, k, v, scale, True, True, aux_tensors=aux)
    at, bt = a.detach().transpose(1, 2), b.detach().transpose(1, 2)
    qx, kx = fa4.extra_columns(q, k, at, bt, scale, need_da, need_db)
    assert qx.shape[-1] % 8 == 0 and qx.shape[-1] - D <= fa4.MAX_EXTRA
    # the extra columns leave the scores unchanged
    torch.testing.assert_close(qx @ kx.transpose(-1, -2), q @ k.transpose(-1, -2))
    dqx, dkx, _ = DenseFA4()._flash_attn_bwd(qx, kx, v, out, do, lse, scale, True, aux_tensors=aux)
    da, db = fa4.factor_grads(dqx, dkx, bt, scale, D, need_da, need_db)
    got = [t.transpose(1, 2) for t in (da, db) if t is not None]
    for x, y in zip(got, want):
        assert _rel(x, y) < 1e-10


# ---- the bf16 numerics ---------------------------------------------------------------------------------


def _grape_a(kind, T, H, gen):
    """Leaves and LowRankBias builder of GRAPE-A-Q / -K and FoX at init-like values (fp64)."""
    w = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)[None, :, None]
    p = (torch.arange(T, dtype=torch.float64) - T // 2)[None, None, :].expand(1, H, T)
    if kind == "fox":
        leaf = torch.randn(1, H, T, generator=gen, dtype=torch.float64)

        def make(x):
            c = F.logsigmoid(x).cumsum(-1)
            return LowRankBias(torch.ones(1, H, T, 1, dtype=torch.float64), -c[..., None])

    else:
        leaf = F.softplus(0.3 * torch.randn(1, H, T, generator=gen, dtype=torch.float64))
        if kind == "grape_a_q":

            def make(x):
                return LowRankBias((w * x)[..., None], p[..., None])

        else:  # grape_a_k: -(i - j) w lk_j = (-w p_i) lk_j + w (p_j lk_j)

            def make(x):
                qa = torch.stack([(-w * p).expand(1, H, T), w.expand(1, H, T)], -1)
                return LowRankBias(qa, torch.stack([x, p * x], -1))

    return leaf.requires_grad_(), make


@pytest.mark.parametrize("kind", ["fox", "grape_a_q", "grape_a_k"])
def test_bf16_factor_gradients_reach_the_bf16_floor(kind, dense_fa4):
    """With FlashAttention-4's roundings the gate gradients stay near the error that bf16 inputs cause
    anyway (the kernel tests' yardstick) for the biases fa4 takes; for a rank-2 key-side gradient
    (GRAPE-A-K) they do not, which is why fa4 refuses it (module docstring)."""
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 512, 2, 64
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1) * 5 for _ in range(2))
    v, do = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    leaf, make = _grape_a(kind, T, H, g)

    def grad(backend, dtype, fn=attend):
        x = leaf.detach().requires_grad_()
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype), make(x), backend=backend)
        return torch.autograd.grad(out.double(), x, do)[0]

    ref = grad("eager", torch.float64)
    floor = _rel(grad("eager", torch.bfloat16).double(), ref)  # bf16 inputs, exact attention

    def forced(q, k, v, bias, backend):  # fa4's path even where `supports` refuses it
        return fa4.run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, D**-0.5).transpose(1, 2)

    err = _rel(grad("fa4", torch.bfloat16, forced), ref)
    tol = 3 * floor + 2e-3
    if kind == "fox":
        tol = 0.3  # a suffix sum of column sums of dS (as in test_kernels.py's FoX tolerance)
    if kind == "grape_a_k":
        assert err > tol, f"rank-2 key-side gradient now within tolerance ({err:.2e}): let fa4 take it"
    else:
        assert err < tol, f"{kind}: rel err {err:.2e} (bf16 floor {floor:.2e})"


# ---- selection and the whole backend on the CPU stand-in ----------------------------------------------------


def test_selection(dense_fa4):
    """fa4 runs causal attention, constant biases, FoX-like and query-side-gradient biases; not key-side
    gradients of rank > 1, path sums, or documents; auto takes it where the H200 measured it fastest
    (fa4.AUTO: causal and constant biases)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 16, 2, 32
    q = torch.randn(B, H, T, D, generator=g).bfloat16()
    one = torch.ones(1, H, T, 1)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    cases = {  # name: (bias, fa4 runs it, auto picks it)
        "causal": (None, True, True),
        "alibi": (LowRankBias(one, torch.randn(1, H, T, 1)), True, True),
        "fox": (LowRankBias(one, grad(torch.randn(B, H, T, 1))), True, False),
        "grape_a_q": (LowRankBias(grad(torch.randn(B, H, T, 1)), torch.randn(1, H, T, 1)), True, False),
        "grape_a_qk": (LowRankBias(grad(torch.randn(B, H, T, 3)), grad(torch.randn(B, H, T, 3))), False, False),
        "grape_ap": (PathSumBias(torch.randn(B, H, T, 4), torch.randn(B, H, T, 4), torch.ones(H), 0.25), False, False),
    }
    for name, (bias, runs, auto) in cases.items():
        assert fa4.supports(q, q, q, bias) == runs, name
        if runs:
            assert select_kernel(q, q, q, bias, "fa4").name == "fa4"
            assert fa4.AUTO[fa4.bias_kind(bias)] == auto, name
        assert (select_kernel(q, q, q, bias).name == "fa4") == auto, name
        assert select_kernel(q, q, q, bias, docs=True).name != "fa4", name
    with torch.no_grad():  # evaluation: no factor gradients, so every low-rank bias
        assert select_kernel(q, q, q, cases["grape_a_qk"][0]).name == "fa4"
    with pytest.raises(ValueError, match="cannot apply document masking"):
        attend(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), backend="fa4", doc_ids=torch.zeros(B, T))
    with pytest.raises(ValueError, match="cannot run"):
        attend(q.float(), q.float(), q.float(), backend="fa4")  # fp32 inputs
    assert fa4.bias_kind(cases["fox"][0]) == "key_grad" and fa4.bias_kind(cases["grape_a_q"][0]) == "query_grad"


@pytest.mark.parametrize("Hq,Hkv,kind", [(4, 4, "fox"), (4, 2, "grape_a_q"), (4, 2, "fox"), (2, 1, None)])
def test_backend_matches_reference(Hq, Hkv, kind, dense_fa4):
    """attend(backend="fa4") through the custom ops: outputs and gradients of q, k, v and the bias
    leaves, GQA included, against the fp64 reference, at the bf16 floor."""
    g = torch.Generator().manual_seed(Hq + Hkv)
    B, T, D = 2, 48, 32
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    leaf, make = _grape_a(kind, T, Hq, g) if kind else (None, None)

    def run(backend, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        x = [leaf.detach().requires_grad_()] if leaf is not None else []
        out = attend(*ins, make(*x) if x else None, backend=backend)
        return [out, *torch.autograd.grad(out.double(), ins + x, do)]

    ref, low, got = run("eager", torch.float64), run("eager", torch.bfloat16), run("fa4", torch.bfloat16)
    for name, x, y, z in zip(["out", "dq", "dk", "dv", "dgate"], got, low, ref):
        floor = _rel(y, z)
        tol = 0.3 if (kind == "fox" and name == "dgate") else 3 * floor + 2e-3
        assert _rel(x, z) < tol, f"{name}: {_rel(x, z):.2e} (floor {floor:.2e})"


def test_compiled_model_has_no_graph_break(dense_fa4):
    """A small GPT with backend=fa4, every block compiled: custom ops, fake kernels and autograd in one
    graph, and the same loss and gradients as without compilation."""
    import torch._dynamo
    from pelab.models.config import GPTConfig
    from pelab.models.gpt import GPT
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = GPTConfig(
        name="t",
        vocab_size=128,
        n_layer=2,
        d_model=64,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        mlp_hidden=96,
        max_seq_len=64,
        pe={"name": "fox"},
        attention_backend="fa4",
    )
    model = GPT(cfg)
    idx, tgt = torch.randint(0, 128, (2, 40)), torch.randint(0, 128, (2, 40))

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(idx, tgt)["loss"]
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    eager, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile()
    loss, grads = loss_and_grads()
    assert kernels_used()["LowRankBias/cpu/bfloat16"] == "fa4"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert abs(loss.item() - eager.item()) < 1e-2
    for (name, _), x, y in zip(model.named_parameters(), grads, eager_grads):
        # the FoX gate gradients are sums of dS through cumulative sums: bf16 fusion noise shows most there
        assert _rel(x, y) < (0.15 if "fgate" in name else 5e-2), name
    torch._dynamo.reset()
