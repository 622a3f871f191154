"""A pelab model as a self-contained Hugging Face model: `python -m train.export` writes this file into every
export whose positional encoding has no native Hugging Face layout (RoPE++, GRAPE-M/A/AP, ALiBi, FoX,
KV-shift, document masking, and RoPE rotating before the QK-norm), and
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it.

Plain PyTorch and transformers only: nothing here imports pelab. The backbone is pelab's (pre-norm RMSNorm,
optional per-head QK-RMSNorm with one gain of size head_dim, SwiGLU, no biases, tied or untied head); each
positional encoding is written out from its formula in the form pelab trains it (parameters keep pelab's
names under `self_attn.pe.`), with its bias as a dense (B, H, T, T) fp32 tensor passed to
`F.scaled_dot_product_attention`. Rotations are counter-clockwise on half-split pairs, as pelab's and
Hugging Face's `rotate_half`. There is no KV cache: `generate` recomputes the prefix at every step (correct
for every PE, O(T^2) per token). Padded batches: each row's contiguous run of `attention_mask` ones is
computed alone (left or right padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PelabConfig(PretrainedConfig):
    model_type = "pelab"

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 256,
        intermediate_size: int = 682,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-5,
        qk_norm: bool = True,
        kv_shift: bool = False,
        document_mask: bool = False,
        pe: dict | None = None,
        max_position_embeddings: int = 4096,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm = qk_norm
        self.kv_shift = kv_shift
        self.document_mask = document_mask
        self.pe = dict(pe or {"name": "rope"})
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("use_cache", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ---- helpers ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes (ofirpress/attention_with_linear_biases), incl. the non-power-of-two rule."""
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return alibi_slopes(p) + alibi_slopes(2 * p)[0::2][: n - p]


def rope_frequencies(head_dim: int, spec: dict) -> tuple[Tensor, float]:
    """RoPE's theta_i = base^(-2i/D) under linear or YaRN scaling, and the logit factor (YaRN's mscale^2)."""
    base, scaling = float(spec.get("base", 10000.0)), spec.get("scaling", "none") or "none"
    factor, orig = float(spec.get("factor", 1.0) or 1.0), int(spec.get("original_max_len", 4096) or 4096)
    theta = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling == "none" or factor == 1.0:
        return theta.float(), 1.0
    if scaling == "linear":
        return (theta / factor).float(), 1.0
    keep = ((orig * theta / (2 * math.pi) - 1.0) / 31.0).clamp(0.0, 1.0)  # YaRN ramp, alpha 1, beta 32
    mscale = 0.1 * math.log(factor) + 1.0
    return ((1 - keep) * theta / factor + keep * theta).float(), mscale * mscale


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the pairs (x[i], x[i + D/2]) counter-clockwise by `angles` (broadcastable to (..., D/2)), fp32."""
    a = angles.float()
    cos, sin = torch.cat((a.cos(), a.cos()), -1), torch.cat((a.sin(), a.sin()), -1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def per_head(t: Tensor, heads: int, dim: int) -> Tensor:
    """Repeat KV heads (on `dim`) for `heads` query heads: query head h reads KV head h // group."""
    return t if t.shape[dim] == heads else t.repeat_interleave(heads // t.shape[dim], dim=dim)


def relative(positions: Tensor) -> Tensor:
    """(T, T) fp32 i - j."""
    p = positions.double()
    return (p[:, None] - p[None, :]).float()


# ---- positional encodings ----------------------------------------------------------------------------------


class PE(nn.Module):
    """NoPE, and the interface of every PE (as in pelab): heads layout, q/k transform, bias, output transform."""

    before_qk_norm = False

    def __init__(self, config: PelabConfig, spec: dict):
        super().__init__()
        self.spec, self.head_dim = spec, config.head_dim
        self.q_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.attn_heads = config.num_attention_heads
        self.logit_scale = 1.0

    def transform_qk(self, q: Tensor, k: Tensor, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def bias(self, q: Tensor, k: Tensor, x: Tensor, positions: Tensor) -> Tensor | None:
        return None

    def transform_output(self, y: Tensor, x: Tensor) -> Tensor:
        return y


class RoPE(PE):
    """rope, and RoPE++ (ropepp_eh / ropepp_ec): real heads and imaginary heads (query rotated by -90 degrees)
    interleaved [r0, i0, r1, i1, ...]."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.before_qk_norm = bool(spec.get("before_qk_norm", True))
        self.variant = spec["name"]
        self.logit_scale = rope_frequencies(config.head_dim, spec)[1]
        if self.variant == "ropepp_eh":
            self.q_heads, self.kv_heads = self.q_heads // 2, self.kv_heads // 2
        elif self.variant == "ropepp_ec":
            self.attn_heads = 2 * self.attn_heads

    def transform_qk(self, q, k, x, positions):
        theta = rope_frequencies(self.head_dim, self.spec)[0].to(q.device)  # computed here: no buffer to load
        angles = (positions.float()[:, None] * theta[None, :])[:, None, :]  # (T, 1, D/2)
        if self.variant == "rope":
            return rotate(q, angles), rotate(k, angles)
        q = torch.stack((rotate(q, angles), rotate(-rotate_half(q), angles)), dim=3).flatten(2, 3)
        return q, rotate(k, angles)


class GrapeM(PE):
    """GRAPE-M: RoPE with learned frequencies exp(log_freq / log_freq_scale); `form: rodrigues` applies
    exp(n sum_i w_i (a_i b_i^T - b_i a_i^T)) in a learned orthogonal basis in closed form."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        D = config.head_dim
        self.before_qk_norm = bool(spec.get("before_qk_norm", True))
        self.log_freq_scale = float(spec.get("log_freq_scale", 16.0))
        self.form = spec.get("form", "rope")
        self.planes = int(spec.get("planes") or D // 2)
        self.series_threshold = float(spec.get("series_threshold", 0.05))
        heads = 1 if spec.get("share_across_heads", True) else self.kv_heads
        self.log_freq = nn.Parameter(torch.zeros(heads, self.planes))
        learned_basis = self.form == "rodrigues" and spec.get("basis", "learned") == "learned"
        self.basis_skew = nn.Parameter(torch.zeros(D * (D - 1) // 2)) if learned_basis else None
        self.logit_scale = rope_frequencies(D, spec)[1]

    def freqs(self) -> Tensor:
        return torch.exp(self.log_freq.float() / self.log_freq_scale)

    def _rodrigues(self, x: Tensor, t: Tensor) -> Tensor:
        D, half, m = self.head_dim, self.head_dim // 2, self.planes
        Q = torch.eye(D, device=x.device)
        if self.basis_skew is not None:
            iu = torch.triu_indices(D, D, 1, device=x.device)
            K = torch.zeros(D, D, device=x.device).index_put((iu[0], iu[1]), self.basis_skew.float())
            Q = torch.linalg.matrix_exp(K - K.T)
        a, b = Q[:, half : half + m].T, Q[:, :m].T
        alpha, beta, gamma = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
        s = (alpha * beta - gamma * gamma).clamp_min(1e-12).sqrt()
        z = t * s
        small = z.abs() < self.series_threshold
        zs = torch.where(small, torch.ones_like(z), z)
        z2 = z * z
        sinc = torch.where(small, 1 - z2 / 6 + z2 * z2 / 120, torch.sin(zs) / zs)
        cosc = torch.where(small, 0.5 - z2 / 24 + z2 * z2 / 720, 2 * torch.sin(zs / 2) ** 2 / (zs * zs))
        f1, f2 = t * sinc, t * t * cosc
        xf = x.float()
        u, v = xf @ a.T, xf @ b.T
        ca = f1 * v + f2 * (gamma * v - beta * u)
        cb = -f1 * u + f2 * (gamma * u - alpha * v)
        return (xf + ca @ a + cb @ b).to(x.dtype)

    def transform_qk(self, q, k, x, positions):
        t = positions.float()[:, None, None] * self.freqs()[None]  # (T, kv heads or 1, planes)
        if self.form == "rodrigues":
            return self._rodrigues(q, per_head(t, q.shape[2], 1)), self._rodrigues(k, per_head(t, k.shape[2], 1))
        return rotate(q, per_head(t, q.shape[2], 1)), rotate(k, t)


class GrapeMCtx(PE):
    """GRAPE-M-ctx: rotation angle Phi_t * theta_j with the phase Phi_t = sum_{tau < t} omega_tau."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.before_qk_norm = bool(spec.get("before_qk_norm", True))
        self.log_freq_scale = float(spec.get("log_freq_scale", 1.0))
        self.init_mode = spec.get("init_mode", "head")
        self.omega_scale = float(spec.get("omega_scale", 16.0))
        self.log_freq = nn.Parameter(torch.zeros(config.head_dim // 2))
        self.omega_proj = nn.Linear(config.hidden_size, 1, bias=True)
        self.logit_scale = rope_frequencies(config.head_dim, spec)[1]

    def transform_qk(self, q, k, x, positions):
        z = self.omega_proj(x).float()[..., 0]
        omega = torch.sigmoid(z / self.omega_scale) if self.init_mode == "head" else F.softplus(z)
        phase = F.pad(omega.cumsum(dim=1)[:, :-1], (1, 0))  # (B, T)
        angles = (phase[..., None] * torch.exp(self.log_freq.float() / self.log_freq_scale))[:, :, None, :]
        return rotate(q, angles), rotate(k, angles)


class ALiBi(PE):
    def bias(self, q, k, x, positions):
        slopes = torch.tensor(alibi_slopes(self.attn_heads), device=q.device)
        return (-slopes[:, None, None] * relative(positions).to(q.device))[None]


class GrapeA(PE):
    """GRAPE-A-Q/-K/-QK: bias -(i - j) w_h (lq_i + lk_j) from content gates on q and/or k (after QK-norm)."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.gate = spec.get("gate", "softplus")
        name = spec["name"]
        H, D = self.attn_heads, config.head_dim
        self.omega_param = nn.Parameter(torch.zeros(H))
        self.v = nn.Parameter(torch.zeros(H, D)) if name in ("grape_a_q", "grape_a_qk") else None
        self.u = nn.Parameter(torch.zeros(H, D)) if name in ("grape_a_k", "grape_a_qk") else None

    def _gate(self, x: Tensor, direction: Tensor) -> Tensor:
        z = (x.float() * F.normalize(direction.float(), dim=-1)).sum(-1).transpose(1, 2)  # (B, H, T)
        return F.softplus(z / math.sqrt(self.head_dim)) if self.gate == "softplus" else z

    def bias(self, q, k, x, positions):
        H = self.attn_heads
        if self.gate == "softplus":
            w = F.softplus(self.omega_param.float()) * torch.tensor(alibi_slopes(H), device=q.device)
        else:
            w = self.omega_param.float()
        gates = torch.zeros(q.shape[0], H, q.shape[1], q.shape[1], device=q.device)
        if self.v is not None:
            gates = gates + self._gate(q, self.v)[..., :, None]
        if self.u is not None:
            lk = self._gate(per_head(k, H, 2), self.u)
            gates = gates + (lk if self.gate == "softplus" else -lk)[..., None, :]
        return -relative(positions).to(q.device) * w[None, :, None, None] * gates


class GrapeAP(PE):
    """GRAPE-AP: b(t, j) = sum_{l=j+1..t} alpha_h logsigmoid(<p_t, R_l pbar_l> / P), probes p = W_p x."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.probe_dim = int(spec.get("probe_dim", 8))
        self.query_probe_norm = bool(spec.get("query_probe_norm", False))
        H = self.attn_heads
        self.probe = nn.Linear(config.hidden_size, H * self.probe_dim, bias=False)
        self.alpha_param = nn.Parameter(torch.zeros(H)) if spec.get("learn_alpha", False) else None

    def bias(self, q, k, x, positions):
        B, T, _ = x.shape
        P, H = self.probe_dim, self.attn_heads
        p = self.probe(x).view(B, T, H, P).float()
        p_bar = F.rms_norm(p, (P,))
        k_probe = rotate(p_bar, positions.float()[:, None, None].expand(T, 1, P // 2))  # R_l: unit frequencies
        q_probe = p_bar if self.query_probe_norm else p
        alpha = torch.tensor(alibi_slopes(H), device=x.device)
        if self.alpha_param is not None:
            alpha = F.softplus(self.alpha_param.float()) * alpha
        psi = alpha[None, :, None, None] * F.logsigmoid(torch.einsum("bthp,blhp->bhtl", q_probe, k_probe) / P)
        psi = psi.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), 0.0)  # l <= t
        c = psi.cumsum(-1)  # C(t, j) = sum_{l <= j} psi(t, l)
        return c.diagonal(dim1=-2, dim2=-1)[..., None] - c  # sum_{l = j+1..t} psi(t, l)


class FoX(PE):
    """FoX: bias sum_{l=j+1..i} log sigmoid(w_h . x_l + b_h); FoX-Pro output norm and gate as options."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        H, D = self.attn_heads, config.head_dim
        self.output_norm_eps = float(spec.get("output_norm_eps", 1e-5))
        self.fgate = nn.Linear(config.hidden_size, H, bias=True)
        self.ogate = nn.Linear(config.hidden_size, H * D, bias=False) if spec.get("output_gate") else None
        self.onorm_weight = nn.Parameter(torch.ones(H * D)) if spec.get("output_norm") else None

    def bias(self, q, k, x, positions):
        c = F.logsigmoid(self.fgate(x).float()).cumsum(dim=1).transpose(1, 2)  # (B, H, T)
        return c[..., :, None] - c[..., None, :]

    def transform_output(self, y, x):
        if self.onorm_weight is not None:
            H, D = y.shape[2], y.shape[3]
            y = (F.rms_norm(y.float(), (D,), eps=self.output_norm_eps) * self.onorm_weight.float().view(H, D)).to(
                y.dtype
            )
        if self.ogate is not None:
            y = y * torch.sigmoid(self.ogate(x)).view_as(y).to(y.dtype)
        return y


PES = {
    "nope": PE,
    "rope": RoPE,
    "ropepp_eh": RoPE,
    "ropepp_ec": RoPE,
    "grape_m": GrapeM,
    "grape_m_ctx": GrapeMCtx,
    "grape_a_q": GrapeA,
    "grape_a_k": GrapeA,
    "grape_a_qk": GrapeA,
    "grape_ap": GrapeAP,
    "alibi": ALiBi,
    "fox": FoX,
}


# ---- backbone ----------------------------------------------------------------------------------------------


class KVShift(nn.Module):
    """k'_t = a_t k_{t-1} + (1 - a_t) k_t, a_t = sigmoid(w_h . x_t) per KV head; the same for v."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.k_proj = nn.Linear(hidden, heads, bias=False)
        self.v_proj = nn.Linear(hidden, heads, bias=False)

    @staticmethod
    def _shift(t: Tensor, a: Tensor, first: Tensor | None) -> Tensor:
        prev = F.pad(t, (0, 0, 0, 0, 1, 0))[:, :-1]
        if first is not None:
            prev = prev.masked_fill(first[:, :, None, None], 0.0)
        a = a[..., None].to(t.dtype)
        return a * prev + (1 - a) * t

    def forward(self, x, k, v, docs):
        first = None if docs is None else F.pad(docs[:, 1:] != docs[:, :-1], (1, 0))
        return (
            self._shift(k, torch.sigmoid(self.k_proj(x)), first),
            self._shift(v, torch.sigmoid(self.v_proj(x)), first),
        )


class Attention(nn.Module):
    def __init__(self, config: PelabConfig):
        super().__init__()
        self.pe = PES[config.pe["name"]](config, config.pe)
        D, pe = config.head_dim, self.pe
        self.head_dim = D
        self.q_proj = nn.Linear(config.hidden_size, pe.q_heads * D, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, pe.kv_heads * D, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, pe.kv_heads * D, bias=False)
        self.o_proj = nn.Linear(pe.attn_heads * D, config.hidden_size, bias=False)
        self.kv_shift = KVShift(config.hidden_size, pe.kv_heads) if config.kv_shift else None
        self.q_norm = RMSNorm(D, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(D, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x: Tensor, positions: Tensor, docs: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        D, pe = self.head_dim, self.pe
        q = self.q_proj(x).view(B, T, -1, D)
        k = self.k_proj(x).view(B, T, -1, D)
        v = self.v_proj(x).view(B, T, -1, D)
        if self.kv_shift is not None:
            k, v = self.kv_shift(x, k, v, docs)
        if pe.before_qk_norm:
            q, k = pe.transform_qk(q, k, x, positions)
        q, k = self.q_norm(q), self.k_norm(k)
        if not pe.before_qk_norm:
            q, k = pe.transform_qk(q, k, x, positions)
        bias = pe.bias(q, k, x, positions)
        H = q.shape[2]
        k, v = per_head(k, H, 2), per_head(v, H, 2)
        scale = pe.logit_scale / math.sqrt(D)
        if bias is None and docs is None:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
            )
        else:
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
            if docs is not None:
                allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device) if bias is None else bias.float()
            mask = mask.masked_fill(~allowed, float("-inf")).to(q.dtype)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
            )
        y = pe.transform_output(y.transpose(1, 2), x)
        return self.o_proj(y.flatten(2))


class MLP(nn.Module):
    def __init__(self, config: PelabConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PelabConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, positions: Tensor, docs: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class PelabModel(nn.Module):
    def __init__(self, config: PelabConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eot_id = config.eos_token_id if config.document_mask else None

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # A document begins at each end-of-text token (pelab's document masking); positions stay global.
        docs = None if self.eot_id is None else (input_ids == self.eot_id).cumsum(dim=1)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, docs)
        return self.norm(x)


class PelabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PelabConfig
    base_model_prefix = "model"

    def __init__(self, config: PelabConfig):
        super().__init__(config)
        self.model = PelabModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)
        self.post_init()

    def _init_weights(self, module):  # only for models built from a config; exports load every weight
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def _logits(self, input_ids: Tensor) -> Tensor:
        h = self.model(input_ids)
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (h @ w.to(h.dtype).t()).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **kwargs):
        if attention_mask is None or bool(attention_mask.all()):
            logits = self._logits(input_ids)
        else:  # each row's contiguous run of real tokens, alone (no padding leaks into any PE)
            logits = torch.zeros(*input_ids.shape, self.config.vocab_size, device=input_ids.device)
            for r in range(input_ids.shape[0]):
                idx = attention_mask[r].nonzero().flatten()
                if len(idx) == 0:
                    continue
                start, end = int(idx[0]), int(idx[-1]) + 1
                if len(idx) != end - start:
                    raise ValueError(
                        "attention_mask must mark one contiguous run of tokens per row (left or right padding)"
                    )
                logits[r, start:end] = self._logits(input_ids[r : r + 1, start:end])[0]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No KV cache: the whole prefix every step.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
