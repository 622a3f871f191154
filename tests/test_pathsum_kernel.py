"""The GRAPE-AP path-sum attention kernels (`models/kernels/triton_pathsum.py`) against the fp32 reference.

CPU (make test): the Triton interpreter (TRITON_INTERPRET=1, in a fresh interpreter started by
test_cpu_interpreter_in_subprocess) at tiny shapes: every output and gradient (o, dq, dk, dv, both
probes, alpha) with GQA, T not a multiple of the blocks, large probes, alpha = 0, document masking,
and the custom ops' fake kernels (strides included: torch.compile checks them; a compiled GRAPE-AP GPT
with documents is in tests/test_kernels.py). The interpreter runs the backward's atomic path.
GPU (skipped without CUDA): the TMA-reduction path at T=4096 in bf16, via `bench.pathsum`'s checks:
fresh random inputs, NaN-poisoned outputs, errors against the bf16 floor.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
IN_SUBPROCESS = os.environ.get("PELAB_PATHSUM_SUBPROCESS") == "1"
cpu_test = pytest.mark.skipif(
    HAS_CUDA or not IN_SUBPROCESS, reason="CPU interpreter test: runs inside test_cpu_interpreter_in_subprocess"
)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# hi+lo bf16 pairs on the tensor cores (~2^-16): errors ~2e-5 for fp32 inputs
TOL = 4e-4


def _rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()


@pytest.mark.skipif(HAS_CUDA or IN_SUBPROCESS, reason="the GPU tests run here; the CPU tests are inside")
def test_cpu_interpreter_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", PELAB_PATHSUM_SUBPROCESS="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not in_subprocess"],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


def _case(B, Hq, Hkv, T, D, P, probe_scale=1.0, alpha_zero=False, docs=None, seed=0):
    from pelab.models.kernels.bias import PathSumBias

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).requires_grad_()
    k, v = (torch.randn(B, Hkv, T, D, generator=g).requires_grad_() for _ in range(2))
    qp = (torch.randn(B, Hq, T, P, generator=g) * probe_scale).requires_grad_()
    kp = torch.randn(B, Hq, T, P, generator=g).requires_grad_()
    alpha = torch.rand(Hq, generator=g) + 0.2
    if alpha_zero:
        alpha[0] = 0.0
    alpha.requires_grad_()
    do = torch.randn(B, Hq, T, D, generator=g)
    doc = None
    if docs:
        doc = torch.zeros(B, T, dtype=torch.int32)
        for c in docs:
            doc[:, c:] += 1
        doc[-1, : T // 4] = 0  # rows differ: another boundary in the last row
        doc[-1, T // 4 :] = doc[-1, T // 4 :].clamp_min(1)
    return (q, k, v, qp, kp, alpha, do, doc), PathSumBias(qp, kp, alpha, 1.0 / P)


def _grads(fn, inputs, do):
    out = fn()
    return [out, *torch.autograd.grad(out, inputs, do)]


CASES = {  # B, Hq, Hkv, T, D, P, extra
    "mha": (1, 2, 2, 40, 32, 8, {}),
    "gqa_ragged": (2, 4, 2, 50, 32, 8, {}),
    "p4_d64": (1, 2, 1, 64, 64, 4, {}),
    "p12": (1, 2, 2, 40, 16, 12, {}),  # packed probe operands padded 36 -> 64 and 24 -> 32
    "large_probes": (1, 2, 2, 48, 16, 8, {"probe_scale": 6.0}),
    "alpha_zero": (1, 2, 2, 33, 16, 8, {"alpha_zero": True}),
    "docs": (2, 4, 2, 50, 32, 8, {"docs": (7, 21, 22)}),
    "docs_ragged": (2, 2, 1, 37, 16, 8, {"docs": (16, 32)}),
}


@cpu_test
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    from pelab.models.kernels.reference import dense_attention
    from pelab.models.kernels.triton_pathsum import pathsum_attention

    *shape, extra = CASES[name]
    (q, k, v, qp, kp, alpha, do, doc), bias = _case(*shape, **extra, seed=len(name))
    ins = [q, k, v, qp, kp, alpha]
    scale = shape[4] ** -0.5
    got = _grads(lambda: pathsum_attention(q, k, v, bias, scale, doc_ids=doc), ins, do)
    ref = _grads(lambda: dense_attention(q, k, v, bias, scale, doc_ids=doc), ins, do)
    for n, x, y in zip(["out", "dq", "dk", "dv", "dqp", "dkp", "dalpha"], got, ref):
        assert x.shape == y.shape, n
        assert torch.isfinite(x).all(), n
        assert _rel(x, y) < TOL, f"{name} {n}: rel err {_rel(x, y):.2e}"


@cpu_test
def test_one_document_is_no_documents():
    from pelab.models.kernels.triton_pathsum import pathsum_attention

    (q, k, v, qp, kp, alpha, do, _), bias = _case(2, 2, 2, 40, 16, 8)
    one = torch.full((2, 40), 3, dtype=torch.int32)
    a = pathsum_attention(q, k, v, bias, 0.25, doc_ids=one)
    b = pathsum_attention(q, k, v, bias, 0.25)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@cpu_test
def test_fake_kernels_match_real():
    """Shapes, strides and dtypes of both custom ops' fake kernels equal the real outputs, for q/k/v laid
    out as `attend` passes them ((B, T, H, D) buffers): torch.compile checks exactly this."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, T, H, Hkv, D, P = 1, 40, 4, 2, 16, 8
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2) for _ in range(2))
    qp, kp, al = torch.randn(B, H, T, P, generator=g), torch.randn(B, H, T, P, generator=g), torch.rand(H)
    do = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    doc = torch.zeros(B, T, dtype=torch.int32)
    fwd, bwd = torch.ops.pelab.pathsum_attn_fwd, torch.ops.pelab.pathsum_attn_bwd
    o, lse = real_f = fwd(q, k, v, qp, kp, al, 0.25, 0.125, doc)
    real_b = bwd(do, q, k, v, qp, kp, al, o, lse, 0.25, 0.125, True, doc)
    with FakeTensorMode() as mode:
        f = [mode.from_tensor(t) for t in (do, q, k, v, qp, kp, al, o, lse, doc)]
        fake_f = fwd(*f[1:7], 0.25, 0.125, f[9])
        fake_b = bwd(*f[:9], 0.25, 0.125, True, f[9])
    for r, x in zip([*real_f, *real_b], [*fake_f, *fake_b]):
        assert (r.shape, r.stride(), r.dtype) == (x.shape, x.stride(), x.dtype)


# ---- GPU: T=4096, bf16 ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "spec",  # seed, B, Hq, Hkv, T, probe scale, documents
    [(21, 1, 4, 4, 4096, 1.0, False), (22, 2, 4, 2, 4096, 4.0, False), (23, 2, 2, 1, 4000, 1.0, True)],
    ids=["mha", "gqa_large_probes", "docs_ragged"],
)
def test_gpu_t4096_against_fp32_reference(spec):
    from bench.pathsum import check, make_set, references

    s = make_set(*spec)
    ref, floors = references(s)
    rep = check(s, ref, floors)
    assert rep["pass"], rep
