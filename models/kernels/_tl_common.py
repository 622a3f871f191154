"""Triton JIT helpers shared by the low-rank and GRAPE-AP kernels (inlined at compile time)."""
import triton
import triton.language as tl


@triton.jit
def load_rows(base, idx, stride, offs_d, ok, EVEN: tl.constexpr):
    """The rows `idx` of a row-major (T, D) slab at `base`; rows where `ok` is false read as 0
    (EVEN: every row is in range, no mask)."""
    ptrs = base + idx[:, None] * stride + offs_d[None, :]
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    return x


@triton.jit
def load_row_stats(l_ptrs, delta_ptrs, ok, EVEN: tl.constexpr):
    """Per query row: the forward's log-sum-exp (inf out of range, so p = 0 there) and delta."""
    if EVEN:
        lse = tl.load(l_ptrs)
        delta = tl.load(delta_ptrs)
    else:
        lse = tl.load(l_ptrs, mask=ok, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=ok, other=0.0)
    return lse, delta
