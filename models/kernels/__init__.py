"""One entry point for causal attention: `attend(q, k, v, bias, backend=...)`.

Kernels register here with a `supports` predicate and a priority; `backend="auto"` runs the
highest-priority kernel that supports the inputs (device, dtype, bias type, grad needs) and, where it
registered an `auto` predicate, was measured fastest for them; an explicit name runs that kernel or
fails with the list of kernels that would work. Kernels know bias *types* (`LowRankBias`,
`PathSumBias`), never positional-encoding names. The first use of each (kernel, input kind) is
logged, and `kernels_used()` reports them for benchmarks.

Document masking (`attend(..., doc_ids=...)`, see `models.kernels.documents`) is a separate
capability: a kernel registered with a `doc_supports` predicate takes `run(..., doc_ids=ids)`; the
others are never chosen for such calls, and naming one explicitly is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pelab.models.kernels.bias import AttentionBias, LowRankBias, PathSumBias
from pelab.models.kernels.documents import doc_ids_from_cu_seqlens, doc_ids_from_tokens
from pelab.models.kernels.reference import chunked_attention, dense_attention
from torch import Tensor

log = logging.getLogger("pelab.attention")

# (q, k, v, bias, scale) -> out, all (B, H, T, D); kernels with doc_supports also take doc_ids=.
KernelFn = Callable[[Tensor, Tensor, Tensor, "AttentionBias | None", float], Tensor]
SupportsFn = Callable[[Tensor, Tensor, Tensor, "AttentionBias | None"], bool]


@dataclass(frozen=True)
class Kernel:
    name: str
    priority: int
    supports: SupportsFn
    run: KernelFn
    doc_supports: SupportsFn | None = None  # None: cannot mask documents
    auto: SupportsFn | None = None  # None: `auto` may pick it wherever it runs
    missing: Callable[[], str | None] | None = None  # why it cannot run on this machine (an extra not installed)

    def can_run(self, q, k, v, bias, docs: bool) -> bool:
        if docs:
            return self.doc_supports is not None and self.doc_supports(q, k, v, bias)
        return self.supports(q, k, v, bias)


_KERNELS: dict[str, Kernel] = {}
_USED: dict[tuple[str, str], str] = {}


def register_kernel(name: str, priority: int, supports, run, doc_supports=None, auto=None, missing=None) -> None:
    _KERNELS[name] = Kernel(name, priority, supports, run, doc_supports, auto, missing)


def kernel_names() -> list[str]:
    return sorted(_KERNELS)


def check_backend(backend: str) -> None:
    """ValueError unless `backend` is `auto` or a registered kernel (what `trainer.attention_backend` takes)."""
    if backend != "auto" and backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose auto or one of {kernel_names()}")


def kernels_used() -> dict[str, str]:
    """{input kind: kernel name} for every attention call made so far in this process; calls without
    gradients (validation, evaluation) count as their own kind, since `auto` may choose differently there."""
    return {kind: name for (kind, _), name in _USED.items()}


def _kind(q: Tensor, bias: AttentionBias | None, docs: bool = False) -> str:
    name = type(bias).__name__ if bias is not None else "causal"
    kind = f"{name}/{q.device.type}/{str(q.dtype).replace('torch.', '')}"
    return kind + "+docs" if docs else kind


def select_kernel(
    q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None, backend: str = "auto", docs: bool = False
) -> Kernel:
    """The kernel for these inputs; docs=True: the call carries document ids."""
    if backend != "auto":
        check_backend(backend)
        kernel = _KERNELS[backend]
        if not kernel.can_run(q, k, v, bias, docs):
            ok = sorted(n.name for n in _KERNELS.values() if n.can_run(q, k, v, bias, docs))
            if docs and kernel.supports(q, k, v, bias):
                raise ValueError(
                    f"attention backend {backend!r} cannot apply document masking (doc_ids) to "
                    f"{_kind(q, bias)} inputs; backends that can: {ok}"
                )
            why = kernel.missing() if kernel.missing else None
            if why:
                raise ValueError(f"attention backend {backend!r} cannot run here: {why}; backends that can: {ok}")
            raise ValueError(
                f"attention backend {backend!r} cannot run {_kind(q, bias, docs)} inputs "
                f"(head_dim {q.shape[-1]}); backends that can: {ok}"
            )
        return kernel
    for kernel in sorted(_KERNELS.values(), key=lambda x: -x.priority):
        if kernel.can_run(q, k, v, bias, docs) and (kernel.auto is None or kernel.auto(q, k, v, bias)):
            return kernel
    raise RuntimeError(f"no attention kernel supports {_kind(q, bias, docs)}")


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: AttentionBias | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """Causal attention. q: (B, T, Hq, D); k, v: (B, T, Hkv, D), Hq % Hkv == 0 (query head h uses
    KV head h // (Hq/Hkv)). doc_ids: optional int32 (B, T) document ids, non-decreasing along each
    row; then query i sees key j only if j <= i and both lie in the same document
    (`models.kernels.documents`). Returns (B, T, Hq, D)."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    docs = doc_ids is not None
    kernel = select_kernel(qh, kh, vh, bias, backend, docs)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (_kind(q, bias, docs) + ("" if grad else " no-grad"), kernel.name)
    if key not in _USED and not torch.compiler.is_compiling():
        log.info("attention kernel: %s for %s inputs", kernel.name, key[0])
    _USED[key] = kernel.name
    if not docs:
        return kernel.run(qh, kh, vh, bias, scale).transpose(1, 2)
    return kernel.run(qh, kh, vh, bias, scale, doc_ids=doc_ids).transpose(1, 2)


# ---- built-in kernels -------------------------------------------------------------------------


def _is_cuda_half(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _sdpa(backends):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, bias, scale):
        with sdpa_kernel(backends, set_priority=True):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def _register_builtin() -> None:
    from torch.nn.attention import SDPBackend as B

    hopper = lambda q: q.is_cuda and torch.cuda.get_device_capability(q.device) >= (9, 0)  # noqa: E731
    # cuDNN's fused attention measured 1.6-1.9x faster than SDPA's FlashAttention-2 on Hopper.
    register_kernel(
        "cudnn",
        70,
        lambda q, k, v, b: b is None and _is_cuda_half(q) and hopper(q),
        _sdpa([B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION]),
    )
    register_kernel(
        "sdpa_flash",
        50,
        lambda q, k, v, b: b is None and _is_cuda_half(q),
        _sdpa([B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION]),
    )
    register_kernel("sdpa", 40, lambda q, k, v, b: b is None, _sdpa([B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH]))
    anything = lambda q, k, v, b: True  # noqa: E731
    register_kernel("chunked", 10, anything, chunked_attention, doc_supports=anything)
    # Never chosen automatically: O(T^2) memory. The numerical reference for tests.
    register_kernel("eager", -1, anything, dense_attention, doc_supports=anything)
    # The official GRAPE approach: a dense fp32 bias through SDPA (mem-efficient kernel). Reference row in benchmarks.
    register_kernel("sdpa_dense_bias", -1, lambda q, k, v, b: b is not None, _sdpa_dense_bias)
    # Own Triton kernels for the additive biases (LowRankBias: FoX, GRAPE-A-Q/K/QK, ALiBi when asked;
    # PathSumBias: GRAPE-AP). Never auto on CPU; there they run under TRITON_INTERPRET=1 in tests.
    from pelab.models.kernels import flex, triton_lowrank, triton_pathsum

    def _triton_supports(q, k, v, b):
        if isinstance(b, PathSumBias):
            return triton_pathsum.supports(q, k, v, b)
        return b is not None and triton_lowrank.supports(q, k, v, b)

    def _triton_run(q, k, v, b, scale, doc_ids=None):
        if isinstance(b, PathSumBias):
            return triton_pathsum.run(q, k, v, b, scale, doc_ids=doc_ids)
        return triton_lowrank.run(q, k, v, b, scale, doc_ids=doc_ids)

    # With documents the low-rank kernel also takes plain causal attention (rank 0): the SDPA and
    # flash_attn kernels cannot mask documents. The path-sum kernel masks them too.
    def _triton_doc_supports(q, k, v, b):
        if isinstance(b, PathSumBias):
            return triton_pathsum.supports(q, k, v, b)
        return triton_lowrank.supports(q, k, v, b)

    register_kernel("triton", 55, _triton_supports, _triton_run, doc_supports=_triton_doc_supports)
    # FlexAttention with a score_mod for LowRankBias (CUDA only): "flex" takes any low-rank bias when
    # asked for; "flex_const" is the same kernel, preferred automatically for biases without gradients
    # (ALiBi), where it measured faster than the triton kernel (bench/NOTES.md).
    register_kernel("flex", 52, flex.supports, flex.run, doc_supports=flex.supports_docs)
    register_kernel("flex_const", 56, flex.supports_constant, flex.run, doc_supports=flex.supports_constant_docs)
    # FlashAttention-4 (extra [flash]): plain causal, constant biases and the low-rank biases whose factor
    # gradients it computes exactly (models/kernels/fa4.py); `auto` takes it where the H200 measured it
    # fastest (fa4.AUTO: plain causal and constant biases).
    from pelab.models.kernels import fa4

    register_kernel("fa4", 75, fa4.supports, fa4.run, auto=fa4.auto_preferred, missing=fa4.missing)
    try:
        from pelab.models.kernels import flash_attn_kernel  # noqa: F401  (FlashAttention-2, if installed)
    except ImportError:
        pass


def _sdpa_dense_bias(q, k, v, bias, scale):
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    dense = bias.dense().masked_fill(~mask, float("-inf")).to(q.dtype)
    if q.shape[1] != k.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)


_register_builtin()

__all__ = [
    "AttentionBias",
    "LowRankBias",
    "PathSumBias",
    "attend",
    "check_backend",
    "doc_ids_from_cu_seqlens",
    "doc_ids_from_tokens",
    "kernel_names",
    "kernels_used",
    "register_kernel",
    "select_kernel",
]
