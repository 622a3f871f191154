"""Backbone presets, the inspect CLI, the fused loss, and attention-kernel dispatch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from pelab.models import GPT, GPTConfig
from pelab.models.inspect import describe
from pelab.models.kernels import attend
from pelab.models.loss import linear_cross_entropy
from pelab.train.config import compose, model_config

# Parameter counts stated by the GRAPE paper/code and the RoPE++ configs.
EXPECTED_PARAMS = {
    ("gpt_355m", 50257): 353.5e6,
    ("gpt_770m", 50257): 772.2e6,
    ("gpt_776m", 128256): 776.2e6,
}


@pytest.mark.parametrize("model,vocab", list(EXPECTED_PARAMS))
def test_preset_param_counts(model, vocab):
    cfg = compose([f"model={model}", f"model.vocab_size={vocab}", "pe=rope"])
    info = describe(model_config(cfg), 4096)
    assert abs(info["total_params"] / EXPECTED_PARAMS[(model, vocab)] - 1) < 1e-3, info["total_params"]


def test_776m_shape_and_gpt2_vocab():
    info = describe(model_config(compose(["model=gpt_776m"])), 4096)
    assert info["padded_vocab"] == 50304 and info["kv_heads"] == 6 and info["attention_heads"] == 12
    # Non-embedding part does not depend on the vocabulary: 382.2M as in the RoPE++ configs.
    assert abs(info["non_embedding_params"] / 382.2e6 - 1) < 1e-3
    assert info["kv_cache_bytes_per_token"] == 36 * 1024  # 2 x 12 layers x 6 heads x 128 x 2 bytes


def test_355m_flops_per_token_matches_formula():
    info = describe(model_config(compose(["model=gpt_355m"])), 4096)
    # 6N + 12 L H D T with N = 353.5M tied params: 3.33 GFLOP per token at T=4096.
    assert info["flops_per_token"] == 6 * info["total_params"] + 12 * 24 * 8 * 128 * 4096
    assert abs(info["flops_per_token"] / 3.33e9 - 1) < 5e-3


def test_inspect_cli_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "models.inspect", "model=gpt_355m", "pe=nope"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert set(info) >= {
        "total_params",
        "non_embedding_params",
        "attention_heads",
        "kv_heads",
        "kv_cache_bytes_per_token",
        "flops_per_token",
    }
    assert info["pe"] == "nope" and info["attention_heads"] == 8


def test_inspect_cli_unknown_choice_is_one_clear_error():
    r = subprocess.run([sys.executable, "-m", "models.inspect", "model=gpt_9b"], capture_output=True, text=True)
    assert r.returncode != 0 and "Could not find 'model/gpt_9b'" in r.stderr and "Traceback" not in r.stderr


def test_init_scales():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, d_model=256, n_head=4, vocab_size=1000, init="grape")
    m = GPT(cfg)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert abs(std(m.embed.weight) - 0.02) < 2e-3
    assert abs(std(m.blocks[0].attn.q_proj.weight) - 0.5 / 16) < 3e-3
    assert abs(std(m.blocks[0].attn.o_proj.weight) - 0.5 / 16 / 2) < 2e-3
    assert abs(std(m.blocks[0].mlp.down_proj.weight) - 0.5 / 16 / 2) < 2e-3
    assert cfg.padded_vocab == 1024


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_fused_cross_entropy_matches_plain(z_loss):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[3] = -100
    loss, lse, lse_sq = linear_cross_entropy(h, w, t, chunk_rows=8, z_loss=z_loss)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = h @ w.t()
    ref_lse = torch.logsumexp(logits, -1)[t != -100]
    ref = F.cross_entropy(logits, t, ignore_index=-100) + z_loss * ref_lse.square().mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lse, ref_lse.mean())
    torch.testing.assert_close(lse_sq, ref_lse.square().mean())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_model_loss_equals_logits_cross_entropy():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, n_layer=2, d_model=64, n_head=2, loss_chunk_rows=16))
    x = torch.randint(0, 300, (2, 20))
    loss = m.loss(x[:, :-1], x[:, 1:])["loss"]
    logits = m(x[:, :-1])
    ref = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_attention_kernels_match_reference_with_gqa(backend):
    torch.manual_seed(0)
    q = torch.randn(2, 33, 4, 16, requires_grad=True)
    k = torch.randn(2, 33, 2, 16, requires_grad=True)
    v = torch.randn(2, 33, 2, 16, requires_grad=True)
    out = attend(q, k, v, backend=backend)
    ref = attend(q, k, v, backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Query head h reads KV head h // 2: recompute head 3 by hand.
    s = (q[:, :, 3] @ k[:, :, 1].transpose(1, 2)) / 4.0
    s = s.masked_fill(torch.ones(33, 33, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out[:, :, 3], s.softmax(-1) @ v[:, :, 1], atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_unknown_backend_and_unsupported_backend_are_clear():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attend(q, q, q, backend="fast")
    with pytest.raises(ValueError, match="cannot run"):
        attend(q, q, q, backend="cudnn")  # CPU fp32


def test_causality_of_the_backbone():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, n_layer=2, d_model=64, n_head=4))
    x = torch.randint(0, 100, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 100
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_scores_are_relative():
    from pelab.models.pe.rope import apply_rotary, rope_cos_sin, rope_inv_freq

    torch.manual_seed(0)
    q, k = torch.randn(1, 12, 1, 32), torch.randn(1, 12, 1, 32)
    inv, _ = rope_inv_freq(32, 10000.0)

    def scores(offset):
        pos = torch.arange(12) + offset
        cos, sin = rope_cos_sin(pos, inv)
        return apply_rotary(q, cos, sin)[0, :, 0] @ apply_rotary(k, cos, sin)[0, :, 0].T

    torch.testing.assert_close(scores(0), scores(777), atol=1e-3, rtol=1e-4)


def test_bad_model_shapes_are_clear():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(d_model=384, n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="unknown model options"):
        GPTConfig.from_dict({"n_layers": 3})
    m = GPT(GPTConfig(vocab_size=100, n_layer=1, d_model=32, n_head=2, max_seq_len=8))
    with pytest.raises(ValueError, match="model.max_seq_len=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


# ---- document masking ------------------------------------------------------------------------------


def _docs_by_hand(q, k, v, doc):
    """Reference of the reference: every (row, document) segment attended on its own."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for d in doc[b].unique():
            s = (doc[b] == d).nonzero()[:, 0]
            sl = slice(int(s[0]), int(s[-1]) + 1)
            out[b : b + 1, sl] = attend(q[b : b + 1, sl], k[b : b + 1, sl], v[b : b + 1, sl], backend="eager")
    return out


def test_document_ids_from_tokens_and_cu_seqlens():
    from pelab.models.kernels import doc_ids_from_cu_seqlens, doc_ids_from_tokens
    from pelab.models.kernels.documents import doc_bounds

    idx = torch.tensor([[5, 1, 9, 2, 9, 9, 3], [9, 1, 2, 3, 4, 9, 6]])
    doc = doc_ids_from_tokens(idx, eot_id=9)  # each eot opens a document
    assert doc.dtype == torch.int32 and doc.tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 2, 2]]
    start, end = doc_bounds(doc)
    assert start.tolist() == [[0, 0, 2, 2, 4, 5, 5], [0, 0, 0, 0, 0, 5, 5]]
    assert end.tolist() == [[2, 2, 4, 4, 5, 7, 7], [5, 5, 5, 5, 5, 7, 7]]
    cu = torch.tensor([0, 2, 4, 5, 9, 14], dtype=torch.int32)  # the document 5..8 runs into row 1
    assert doc_ids_from_cu_seqlens(cu, 2, 7).tolist() == [[0, 0, 1, 1, 2, 3, 3], [3, 3, 4, 4, 4, 4, 4]]


def test_document_masking_eager_chunked_and_by_hand():
    torch.manual_seed(0)
    B, T = 2, 45
    q = torch.randn(B, T, 4, 16, requires_grad=True)
    k = torch.randn(B, T, 2, 16, requires_grad=True)
    v = torch.randn(B, T, 2, 16, requires_grad=True)
    doc = torch.tensor([[0] * 7 + [1] * 20 + [2] * 18, [0] * 40 + [1] * 4 + [2]], dtype=torch.int32)
    out = attend(q, k, v, backend="chunked", doc_ids=doc)
    ref = attend(q, k, v, backend="eager", doc_ids=doc)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, _docs_by_hand(q, k, v, doc), atol=1e-5, rtol=1e-5)
    from pelab.models.kernels.reference import chunked_attention

    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    small = chunked_attention(qh, kh, vh, None, 0.25, block=16, doc_ids=doc).transpose(1, 2)  # several chunks
    torch.testing.assert_close(small, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_document_masking_dispatch():
    """auto picks a kernel that can mask documents; a named kernel that cannot is one clear error."""
    from pelab.models.kernels import select_kernel

    q = torch.randn(1, 8, 2, 16)
    doc = torch.zeros(1, 8, dtype=torch.int32)
    qh = q.transpose(1, 2)
    assert select_kernel(qh, qh, qh, None).name == "sdpa"
    assert select_kernel(qh, qh, qh, None, docs=True).name == "chunked"
    can = r"backends that can: \['chunked', 'eager'\]"
    with pytest.raises(ValueError, match=r"'sdpa' cannot apply document masking .*" + can):
        attend(q, q, q, backend="sdpa", doc_ids=doc)
    with pytest.raises(ValueError, match="cannot run causal/cpu/float32\\+docs"):
        attend(q, q, q, backend="cudnn", doc_ids=doc)  # cannot run these inputs at all


def test_flex_document_mask_matches_reference(monkeypatch):
    """flex's document BlockMask (mask_mod) and score_mod, run by FlexAttention's eager CPU path
    (forward only; the kernel itself is CUDA only)."""
    import warnings

    from pelab.models.kernels import flex
    from pelab.models.kernels.bias import LowRankBias
    from pelab.models.kernels.reference import dense_attention
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)  # no torch.compile on CPU
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 160, 16  # T > the 128-token mask blocks
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    doc = torch.tensor([[0] * 20 + [1] * 120 + [2] * 20, [0] * 130 + [1] * 30], dtype=torch.int32)
    bias = LowRankBias(torch.randn(1, H, T, 1), 3 * torch.randn(B, H, T, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        for b in (None, bias):
            out = flex.flex_lowrank_attention(q, k, v, b, 0.25, doc)
            torch.testing.assert_close(out, dense_attention(q, k, v, b, 0.25, doc_ids=doc), atol=1e-5, rtol=1e-5)


TINY_DOC = dict(vocab_size=100, n_layer=2, d_model=32, n_head=4, n_kv_head=2, mlp_hidden=64, max_seq_len=64)


@pytest.mark.parametrize("pe,kv_shift", [("nope", False), ("alibi", False), ("nope", True)])
def test_document_mask_equals_documents_run_separately(pe, kv_shift):
    """With document_mask each document's logits and every parameter gradient equal those of the
    documents run one by one (at their global positions) by the same model without masking."""
    eot = 99
    torch.manual_seed(0)
    on = GPT(GPTConfig(**TINY_DOC, pe={"name": pe}, kv_shift=kv_shift, document_mask=True, eot_id=eot))
    off = GPT(GPTConfig(**TINY_DOC, pe={"name": pe}, kv_shift=kv_shift))
    off.load_state_dict(on.state_dict())
    idx = torch.randint(0, eot, (2, 24))
    idx[0, [5, 13]] = eot
    idx[1, [0, 23]] = eot  # a row starting with a document, and a one-token document at the end
    w = torch.randn(2, 24, on.cfg.padded_vocab)
    logits = on(idx)
    (logits * w).sum().backward()
    sep, total = torch.empty_like(logits), 0.0
    for b, cuts in ((0, [0, 5, 13, 24]), (1, [0, 23, 24])):
        for s, e in zip(cuts[:-1], cuts[1:]):
            part = off(idx[b : b + 1, s:e], positions=torch.arange(s, e))
            sep[b : b + 1, s:e] = part.detach()
            total = total + (part * w[b : b + 1, s:e]).sum()
    total.backward()
    torch.testing.assert_close(logits, sep, atol=2e-5, rtol=1e-5)
    for (name, p), r in zip(on.named_parameters(), off.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_document_mask_off_is_unchanged_and_on_without_eot_is_causal():
    torch.manual_seed(0)
    on = GPT(GPTConfig(**TINY_DOC, pe={"name": "alibi"}, kv_shift=True, document_mask=True, eot_id=99))
    off = GPT(GPTConfig(**TINY_DOC, pe={"name": "alibi"}, kv_shift=True))
    off.load_state_dict(on.state_dict())
    assert off.document_ids(torch.zeros(1, 4, dtype=torch.long)) is None
    idx = torch.randint(0, 99, (2, 20))
    assert torch.equal(on(idx), off(idx))  # one document per row: exactly plain causal attention
    idx[:, 10] = 99
    a, b = on(idx), off(idx)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_document_mask_config():
    with pytest.raises(ValueError, match="document_mask needs model.eot_id"):
        GPTConfig(document_mask=True)
    cfg = model_config(compose(["model.document_mask=true"]))
    assert cfg.document_mask and cfg.eot_id == 50256  # GPT-2's <|endoftext|>, from data.tokenizer
    assert not model_config(compose([])).document_mask


def test_swiglu_padding_changes_nothing():
    """mlp_pad_to pads the weights inside forward only: same outputs, same gradients, same parameters."""
    from pelab.models.gpt import SwiGLU

    torch.manual_seed(0)
    plain, padded = SwiGLU(32, 85, pad_to=0), SwiGLU(32, 85, pad_to=64)
    padded.load_state_dict(plain.state_dict())
    assert padded.pad == 43 and plain.state_dict().keys() == padded.state_dict().keys()
    x = torch.randn(2, 5, 32)
    y0, y1 = plain(x), padded(x)
    assert torch.allclose(y0, y1, atol=1e-6)
    y0.square().sum().backward()
    y1.square().sum().backward()
    for p0, p1 in zip(plain.parameters(), padded.parameters()):
        assert torch.allclose(p0.grad, p1.grad, atol=1e-5)


def test_cos_sin_op_matches_autograd():
    """The opaque cos/sin op (one table per call) has the gradient of plain cos/sin."""
    from pelab.models.pe.common import half_split_cos_sin

    a = torch.randn(7, 3, 4, dtype=torch.float32) * 50
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    gc, gs = torch.randn(7, 3, 8), torch.randn(7, 3, 8)
    cos, sin = half_split_cos_sin(a1)
    ((cos * gc).sum() + (sin * gs).sum()).backward()
    full = torch.cat((a2, a2), -1)
    ((full.cos() * gc).sum() + (full.sin() * gs).sum()).backward()
    assert torch.allclose(cos, full.detach().cos()) and torch.allclose(sin, full.detach().sin())
    assert torch.allclose(a1.grad, a2.grad, atol=1e-5)
