"""FoX, the Forgetting Transformer (Lin et al., ICLR 2025, arXiv 2503.02130; code
zhixuan-lin/forgetting-transformer, `ForgettingAttentionLayer` with fgate_type="full"; the GRAPE
comparison uses this plain LLaMA-block FoX with QK-RMSNorm, `model/llama-mha-fox.py`).

Per attention head a data-dependent scalar forget gate f_t = sigmoid(w_h^T x_t + b_h) (`fgate`:
Linear(d_model -> H) with bias, on the attention input; init as the FoX code: weights N(0, 0.02),
bias 0, so f ~ 0.5 at step 0; under `init: grape`, as in the GRAPE runs, the GRAPE code's global init
redraws the weights N(0, 0.5/sqrt(d_model)) and leaves the bias at PyTorch's U(+-1/sqrt(d_model))),
log f = logsigmoid(logit) in fp32, and the bias
    D_ij = sum_{l=j+1..i} log f_l = c_i - c_j,  c = cumsum(log f) (fp32).
No rotary. Fast path: c_i is a per-row constant, so the bias is the rank-1 `LowRankBias` with
q_terms = 1 and k_terms = -c_j (c centred on the window's middle entry to halve magnitudes).

FoX-Pro extras, off by default as in the GRAPE comparison ("we do not use FoX-Pro"):
  * `output_gate`: o <- o * sigmoid(W_g x) per channel of every head before o_proj
    (FoX `ogate_proj`: Linear(d_model -> H * D, no bias), init N(0, 0.02));
  * `output_norm`: per-head RMSNorm of o with a learnable gain of size H * D (FoX GroupNorm,
    is_rms_norm), applied before the gate as in `FusedGroupNormGated`;
  * KV-shift: not duplicated here; use the global add-on `kv_shift=true` (`models.attention.KVShift`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pelab.models.kernels.bias import LowRankBias
from pelab.models.pe import register
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import cache_detached, grape_global_init_
from torch import Tensor, nn


@register("fox")
class FoX(PositionalEncoding):
    before_qk_norm = False

    def __init__(
        self,
        shape,
        output_gate: bool = False,
        output_norm: bool = False,
        init_std: float = 0.02,
        output_norm_eps: float = 1e-5,
        **shared,
    ):
        super().__init__(shape, **shared)
        H, D = self.layout().attn_heads, shape.head_dim
        self.init_std, self.output_norm_eps = float(init_std), float(output_norm_eps)
        self.fgate = nn.Linear(shape.d_model, H, bias=True)
        self.ogate = nn.Linear(shape.d_model, H * D, bias=False) if output_gate else None
        self.onorm_weight = nn.Parameter(torch.empty(H * D)) if output_norm else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "grape":  # what the GRAPE runs trained (the GRAPE presets): see grape_global_init_
            for linear in (self.fgate, self.ogate):
                if linear is not None:
                    grape_global_init_(linear, self.shape.d_model)
        else:
            nn.init.normal_(self.fgate.weight, 0.0, self.init_std)
            nn.init.zeros_(self.fgate.bias)
            if self.ogate is not None:
                nn.init.normal_(self.ogate.weight, 0.0, self.init_std)
        if self.onorm_weight is not None:
            nn.init.ones_(self.onorm_weight)

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.fgate.bias]

    def log_forget(self, x: Tensor) -> Tensor:
        """(B, T, H) fp32 log f_t."""
        return F.logsigmoid(self.fgate(x).float())

    def attention_bias(self, q, k, x, positions):
        log_f = self.log_forget(x)
        cache_detached(self, "_last_log_f", log_f)
        c = log_f.cumsum(dim=1)
        c = c - c[:, c.shape[1] // 2 : c.shape[1] // 2 + 1]  # per-(b, h) constant: free under softmax
        k_terms = (-c).transpose(1, 2)[..., None]  # (B, H, T, 1)
        q_terms = torch.ones(1, *k_terms.shape[1:], device=k_terms.device, dtype=torch.float32)
        return LowRankBias(q_terms, k_terms)

    def transform_output(self, y: Tensor, x: Tensor) -> Tensor:
        if self.onorm_weight is not None:
            H, D = y.shape[2], y.shape[3]
            y = (F.rms_norm(y.float(), (D,), eps=self.output_norm_eps) * self.onorm_weight.float().view(H, D)).to(
                y.dtype
            )
        if self.ogate is not None:
            y = y * torch.sigmoid(self.ogate(x)).view_as(y).to(y.dtype)
        return y

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        log_f = getattr(self, "_last_log_f", None)
        if log_f is None:
            return {}
        mean_log_f = log_f.mean()
        return {
            "forget_gate_mean": log_f.exp().mean(),
            "forget_gate_min": log_f.min().exp(),
            "log_forget_mean": mean_log_f,
            "half_life_tokens": -math.log(2.0) / mean_log_f,
        }
