"""Triton JIT helpers shared by the low-rank and GRAPE-AP kernels (inlined at compile time)."""

import triton
import triton.language as tl


@triton.jit
def query_block(H, GROUP, T, BLOCK_M: tl.constexpr):
    """This program's (batch x head, query block) for a grid (B * H, cdiv(T, BLOCK_M)): the longest
    (last, most keys) query blocks are launched first. Returns pid_bh, b, h, the KV head, the block's
    first row, its row indices and which of them are < T."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return pid_bh, b, h, h // GROUP, start_m, offs_m, offs_m < T


@triton.jit
def key_block(HKV, T, BLOCK_N: tl.constexpr):
    """This program's (batch x KV head, key block) for a grid (B * HKV, cdiv(T, BLOCK_N)). Returns
    pid_bh, b, the KV head, the block index, its first column, its column indices and which are < T."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return pid_bh, pid_bh // HKV, pid_bh % HKV, pid_n, start_n, offs_n, offs_n < T


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
