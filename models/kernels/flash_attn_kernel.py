"""Optional FlashAttention-2 package kernel, registered when `flash_attn` (2.x) is installed by hand; never
required (the `[flash]` extra installs FlashAttention-4, models/kernels/fa4.py).

On Hopper cuDNN (through SDPA) is faster and keeps priority; elsewhere flash_attn is preferred
over SDPA's bundled FlashAttention-2 when installed. Plain causal attention only.
"""

from flash_attn import flash_attn_func  # noqa: F401  (ImportError -> not registered)
from pelab.models.kernels import _is_cuda_half, register_kernel


def _run(q, k, v, bias, scale):
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    return out.transpose(1, 2)


def _supports(q, k, v, b):
    return b is None and _is_cuda_half(q) and q.shape[-1] <= 256


register_kernel("flash_attn", 60, _supports, _run)
