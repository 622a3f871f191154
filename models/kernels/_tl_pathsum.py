"""Triton JIT code for GRAPE-AP (path-integral additive bias) flash attention.

Imported lazily by `models.kernels.triton_pathsum`, which also packs the probes (below).

Per (batch, head h), with z(t, l) = pscale * <qp_t, kp_l> and psi(t, l) = alpha_h * logsigmoid(z):
    bias(t, j) = sum_{l=j+1..t} psi(t, l) = S_t - C(t, j),   C(t, j) = sum_{l<=j} psi(t, l).
S_t is a per-row constant, so the kernels use -C(t, j). Key blocks are swept left to right; C is an
fp32 running carry per query row plus an in-tile prefix sum, done on the tensor cores as
`x @ upper` (upper an exact 0/1 bf16 matrix, x split into bf16 hi + lo: ~2^-16 relative). No T x T
tensor exists, forward or backward.

Probes arrive packed as bf16 (host side, O(T * P)): QZ = [hi(qs) | lo(qs) | hi(qs)] and
KZ = [hi(kp) | hi(kp) | lo(kp)] (qs = pscale * qp, zero-padded to a power of two >= 16), so that one
tensor-core product QZ @ KZ^T gives z to ~2^-16; QB = [hi(qs) | lo(qs)] and KB = [hi(kp) | lo(kp)]
serve the probe gradients (the kernel returns the two halves, the host adds them).

Backward, one fused pass per query block (the potentials are computed once): with
dS = P * (dP - delta) (row sums zero), dL/dpsi(t, l) = E(t, l) = sum_{j<l} dS(t, j), an exclusive
prefix of dS along the row, continued across key blocks by a second running carry; then
dz = E * alpha * sigmoid(-z), dqp = pscale * dz @ kp, dkp = dz^T @ qs, dalpha = sum E * logsigmoid(z).
dQ and dqp accumulate in registers. dK, dV and dkp of a key block receive contributions from every
query block after it, so they are added into fp32 buffers of (B, H, T, .) by TMA bulk reductions
(or per-element atomics; the summation order varies run to run at the fp32 rounding level). The
row scan E is what rules out the usual key-block-major backward: it would need per-(row, key
block) carries, a (T x T / block) table.

Scores are in log2 units: s2 = q.k * scale * log2(e) - C * log2(e); psi2 = psi * log2(e).
logsigmoid(z) = min(z, 0) - ln2 * log2(1 + 2^(-|z| log2 e)): on the GPU log2 is one MUFU instruction
(lg2.approx.ftz, ~2^-22 relative; Triton's `tl.math.log2` is a ~20-instruction libdevice routine).
The backward takes sigmoid(-z) = 1 - 2^(psi2 / alpha) from psi, so no other per-element value stays
live through the tile (the host keeps |alpha| >= 1e-30).

Document masking (HAS_DOC): DOC holds int32 (B, T) document ids, non-decreasing per row; key j is
visible to query t iff j <= t and DOC[j] == DOC[t]. psi is zeroed on links in other documents, so
C(t, .) starts at the row's document start whatever the tiling (the bias within a document is the
same as without documents). A query block starts at its first row's document start (DSTART).
"""

import os

import triton
import triton.language as tl
from pelab.models.kernels._tl_common import load_row_stats, load_rows, query_block

# The CPU interpreter's bf16 tl.dot is wrong (numpy emulation) and it has no inline PTX: there,
# operands are rounded to bf16 and multiplied in fp32 (exact for bf16 x bf16 products, the same
# numbers as the GPU), and log2 is plain.
_EMU = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _bf16(x):
    """Round to bf16 (kept in fp32 under the interpreter, see _EMU)."""
    if _EMU:
        return x.to(tl.bfloat16).to(tl.float32)
    return x.to(tl.bfloat16)


@triton.jit
def _split(x):
    """fp32 -> (hi, lo) bf16 with x ~ hi + lo to ~2^-16 relative."""
    hi = _bf16(x)
    return hi, _bf16(x - hi.to(tl.float32))


@triton.jit
def _op(x):
    """A bf16 tensor-core operand (fp32 under the interpreter)."""
    if _EMU:
        return x.to(tl.float32)
    return x


@triton.jit
def _lg2(x):
    if _EMU:
        return tl.math.log2(x)
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _prefix_cols(x, tri):
    """x @ tri (tri an exact 0/1 bf16 matrix): an in-tile prefix sum along x's columns on the
    tensor cores, x split into bf16 hi + lo."""
    x_hi, x_lo = _split(x)
    return tl.dot(x_lo, tri, tl.dot(x_hi, tri))


@triton.jit
def _potentials(z, alpha2):
    """psi2 = alpha log2(e) logsigmoid(z)."""
    e = tl.math.exp2(-tl.abs(z) * LOG2E)
    return alpha2 * (tl.minimum(z, 0.0) - LN2 * _lg2(1.0 + e))


@triton.jit
def _same_doc(doc_rows, doc_base, cols, col_ok):
    """(M, N) bool: key column in the query row's document (keys past T: no document)."""
    doc_cols = tl.load(doc_base + cols, mask=col_ok, other=-2)
    return doc_rows[:, None] == doc_cols[None, :]


@triton.jit
def _row_setup(DOC, DSTART, b, T, start_m, offs_m, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """Document ids of the rows (padded rows take the last row's) and the first key block to visit."""
    doc_base, doc_rows, lo = DOC + b * T, offs_m, 0
    if HAS_DOC:
        doc_rows = tl.load(doc_base + tl.minimum(offs_m, T - 1))
        lo = tl.load(DSTART + b * T + start_m) // BLOCK_N * BLOCK_N
    return doc_base, doc_rows, lo


@triton.jit
def _add_block(desc, ptrs, row, start_n, col_ok, x, USE_TMA: tl.constexpr):
    """Add x (N, C) into rows start_n.. of slab `row` of an fp32 (slabs, T, C) buffer: one TMA
    reduction (desc; rows past T are dropped by the copy engine) or per-element atomics (ptrs)."""
    if USE_TMA:
        desc.atomic_add([row, start_n, 0], x.reshape(1, x.shape[0], x.shape[1]))
    else:
        tl.atomic_add(ptrs, x, mask=col_ok[:, None], sem="relaxed")


# ---- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    carry,
    q,
    qz,
    alpha2,
    upper,
    k_base,
    v_base,
    kz_base,
    s_kt,
    s_vt,
    doc_rows,
    doc_base,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    offs_z,
    T,
    sm_scale2,
    KZ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        col_ok = cols < T
        k = load_rows(k_base, cols, s_kt, offs_d, col_ok, EVEN_T)
        kz = load_rows(kz_base, cols, KZ, offs_z, col_ok, EVEN_T)
        qk = tl.dot(q, tl.trans(k))
        z = tl.dot(qz, tl.trans(_op(kz)))
        psi2 = _potentials(z, alpha2)
        if HAS_DOC:
            same = _same_doc(doc_rows, doc_base, cols, col_ok)
            psi2 = tl.where(same, psi2, 0.0)
        c = carry[:, None] + _prefix_cols(psi2, upper)
        carry += tl.sum(psi2, 1)
        s = qk * sm_scale2 - c
        if MASK:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        if HAS_DOC:
            s = tl.where(same, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if HAS_DOC:  # rows with no visible key so far: exp2(-inf - 0) = 0 instead of NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        rescale = tl.math.exp2(m_i - m_ref)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None]
        v = load_rows(v_base, cols, s_vt, offs_d, col_ok, EVEN_T)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i, carry


@triton.jit
def pathsum_fwd_kernel(
    Q,
    K,
    V,
    QZ,
    KZP,
    ALPHA,
    O,
    L,
    DOC,
    DSTART,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_ob,
    s_oh,
    s_ot,
    H,
    T,
    GROUP,
    sm_scale2,
    D: tl.constexpr,
    KZ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, row_ok = query_block(H, GROUP, T, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_z = tl.arange(0, KZ)
    q = load_rows(Q + b * s_qb + h * s_qh, offs_m, s_qt, offs_d, row_ok, EVEN_T)
    qz = _op(load_rows(QZ + pid_bh * T * KZ, offs_m, KZ, offs_z, row_ok, EVEN_T))
    alpha2 = tl.load(ALPHA + h) * LOG2E
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    kz_base = KZP + pid_bh * T * KZ
    doc_base, doc_rows, lo = _row_setup(DOC, DSTART, b, T, start_m, offs_m, BLOCK_N, HAS_DOC)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    carry = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    tri = tl.arange(0, BLOCK_N)
    upper = _bf16((tri[:, None] <= tri[None, :]).to(tl.float32))  # x @ upper = inclusive prefix along columns
    # key blocks wholly below the diagonal block, then the diagonal block(s) with the causal mask
    acc, l_i, m_i, carry = _fwd_inner(
        acc,
        l_i,
        m_i,
        carry,
        q,
        qz,
        alpha2,
        upper,
        k_base,
        v_base,
        kz_base,
        s_kt,
        s_vt,
        doc_rows,
        doc_base,
        lo,
        start_m,
        offs_m,
        offs_n,
        offs_d,
        offs_z,
        T,
        sm_scale2,
        KZ,
        BLOCK_N,
        False,
        EVEN_T,
        HAS_DOC,
    )
    acc, l_i, m_i, carry = _fwd_inner(
        acc,
        l_i,
        m_i,
        carry,
        q,
        qz,
        alpha2,
        upper,
        k_base,
        v_base,
        kz_base,
        s_kt,
        s_vt,
        doc_rows,
        doc_base,
        start_m,
        tl.minimum(start_m + BLOCK_M, T),
        offs_m,
        offs_n,
        offs_d,
        offs_z,
        T,
        sm_scale2,
        KZ,
        BLOCK_N,
        True,
        EVEN_T,
        HAS_DOC,
    )
    acc = acc / l_i[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(L + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ---- backward: one pass per query block ---------------------------------------------------------


@triton.jit
def _bwd_inner(
    dq,
    dqp,
    dal,
    carry_c,
    carry_e,
    q,
    do,
    lse,
    delta,
    qz,
    qb,
    alpha2,
    alpha,
    inv_alpha,
    upper,
    supper,
    k_base,
    v_base,
    kz_base,
    kb_base,
    dk_base,
    dv_base,
    dkp_base,
    DK_DESC,
    DV_DESC,
    DKP_DESC,
    kv_row,
    q_row,
    s_kt,
    s_vt,
    s_dkt,
    s_dvt,
    doc_rows,
    doc_base,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    offs_z,
    offs_b,
    T,
    sm_scale2,
    KZ: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
    HAS_DOC: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        col_ok = cols < T
        k = load_rows(k_base, cols, s_kt, offs_d, col_ok, EVEN_T)
        v = load_rows(v_base, cols, s_vt, offs_d, col_ok, EVEN_T)
        kz = load_rows(kz_base, cols, KZ, offs_z, col_ok, EVEN_T)
        kb = load_rows(kb_base, cols, KB, offs_b, col_ok, EVEN_T)
        z = tl.dot(qz, tl.trans(_op(kz)))
        psi2 = _potentials(z, alpha2)
        if HAS_DOC:
            same = _same_doc(doc_rows, doc_base, cols, col_ok)
            psi2 = tl.where(same, psi2, 0.0)
        c = carry_c[:, None] + _prefix_cols(psi2, upper)
        carry_c += tl.sum(psi2, 1)
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * sm_scale2 - c - lse[:, None])
        if MASK:
            causal = offs_m[:, None] >= cols[None, :]
            p = tl.where(causal, p, 0.0)
        if HAS_DOC:
            p = tl.where(same, p, 0.0)
        pb = p.to(k.dtype)
        dv_part = tl.dot(tl.trans(pb), do)
        _add_block(
            DV_DESC, dv_base + cols[:, None] * s_dvt + offs_d[None, :], kv_row, start_n, col_ok, dv_part, USE_TMA
        )
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dsb = ds.to(k.dtype)
        dq = tl.dot(dsb, k, dq)
        dk_part = tl.dot(tl.trans(dsb), q)
        _add_block(
            DK_DESC, dk_base + cols[:, None] * s_dkt + offs_d[None, :], kv_row, start_n, col_ok, dk_part, USE_TMA
        )
        # dL/dpsi: exclusive prefix of dS along the row (0 where nothing is visible yet)
        e_tile = carry_e[:, None] + _prefix_cols(ds, supper)
        carry_e += tl.sum(ds, 1)
        if MASK:
            e_tile = tl.where(causal, e_tile, 0.0)
        # dpsi/dz = alpha sigmoid(-z) = alpha (1 - exp(logsigmoid(z)))
        dz = e_tile * (1.0 - tl.math.exp2(psi2 * inv_alpha)) * alpha
        if NEED_DALPHA:
            dal += tl.sum(e_tile * psi2, 1)  # / (alpha log2 e) on the host
        dz_hi, dz_lo = _split(dz)
        dqp = tl.dot(dz_hi, _op(kb), dqp)
        dqp = tl.dot(dz_lo, _op(kb), dqp)
        dkp_part = tl.dot(tl.trans(dz_hi), qb)
        dkp_part = tl.dot(tl.trans(dz_lo), qb, dkp_part)
        _add_block(DKP_DESC, dkp_base + cols[:, None] * KB + offs_b[None, :], q_row, start_n, col_ok, dkp_part, USE_TMA)
    return dq, dqp, dal, carry_c, carry_e


@triton.jit
def pathsum_bwd_kernel(
    Q,
    K,
    V,
    QZ,
    KZP,
    QBP,
    KBP,
    ALPHA,
    DO,
    L,
    DELTA,
    DQ,
    DK32,
    DV32,
    DQP,
    DKP,
    DAL,
    DK_DESC,
    DV_DESC,
    DKP_DESC,
    DOC,
    DSTART,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_dob,
    s_doh,
    s_dot,
    s_dqb,
    s_dqh,
    s_dqt,
    s_dkb,
    s_dkh,
    s_dkt,
    s_dvb,
    s_dvh,
    s_dvt,
    H,
    T,
    GROUP,
    sm_scale,
    sm_scale2,
    D: tl.constexpr,
    KZ: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    HAS_DOC: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, row_ok = query_block(H, GROUP, T, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_z = tl.arange(0, KZ)
    offs_b = tl.arange(0, KB)
    q = load_rows(Q + b * s_qb + h * s_qh, offs_m, s_qt, offs_d, row_ok, EVEN_T)
    do = load_rows(DO + b * s_dob + h * s_doh, offs_m, s_dot, offs_d, row_ok, EVEN_T)
    lse, delta = load_row_stats(L + pid_bh * T + offs_m, DELTA + pid_bh * T + offs_m, row_ok, EVEN_T)
    qz = _op(load_rows(QZ + pid_bh * T * KZ, offs_m, KZ, offs_z, row_ok, EVEN_T))
    qb = _op(load_rows(QBP + pid_bh * T * KB, offs_m, KB, offs_b, row_ok, EVEN_T))
    alpha = tl.load(ALPHA + h)
    alpha2 = alpha * LOG2E
    inv_alpha = 1.0 / alpha
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    dk_base = DK32 + b * s_dkb + hk * s_dkh
    dv_base = DV32 + b * s_dvb + hk * s_dvh
    kz_base = KZP + pid_bh * T * KZ
    kb_base = KBP + pid_bh * T * KB
    dkp_base = DKP + pid_bh * T * KB
    doc_base, doc_rows, lo = _row_setup(DOC, DSTART, b, T, start_m, offs_m, BLOCK_N, HAS_DOC)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dqp = tl.zeros([BLOCK_M, KB], tl.float32)
    dal = tl.zeros([BLOCK_M], tl.float32)
    carry_c = tl.zeros([BLOCK_M], tl.float32)
    carry_e = tl.zeros([BLOCK_M], tl.float32)
    tri = tl.arange(0, BLOCK_N)
    upper = _bf16((tri[:, None] <= tri[None, :]).to(tl.float32))
    supper = _bf16((tri[:, None] < tri[None, :]).to(tl.float32))  # strictly upper: exclusive prefix
    dq, dqp, dal, carry_c, carry_e = _bwd_inner(
        dq,
        dqp,
        dal,
        carry_c,
        carry_e,
        q,
        do,
        lse,
        delta,
        qz,
        qb,
        alpha2,
        alpha,
        inv_alpha,
        upper,
        supper,
        k_base,
        v_base,
        kz_base,
        kb_base,
        dk_base,
        dv_base,
        dkp_base,
        DK_DESC,
        DV_DESC,
        DKP_DESC,
        b * (H // GROUP) + hk,
        pid_bh,
        s_kt,
        s_vt,
        s_dkt,
        s_dvt,
        doc_rows,
        doc_base,
        lo,
        start_m,
        offs_m,
        offs_n,
        offs_d,
        offs_z,
        offs_b,
        T,
        sm_scale2,
        KZ,
        KB,
        BLOCK_N,
        False,
        EVEN_T,
        HAS_DOC,
        NEED_DALPHA,
        USE_TMA,
    )
    dq, dqp, dal, carry_c, carry_e = _bwd_inner(
        dq,
        dqp,
        dal,
        carry_c,
        carry_e,
        q,
        do,
        lse,
        delta,
        qz,
        qb,
        alpha2,
        alpha,
        inv_alpha,
        upper,
        supper,
        k_base,
        v_base,
        kz_base,
        kb_base,
        dk_base,
        dv_base,
        dkp_base,
        DK_DESC,
        DV_DESC,
        DKP_DESC,
        b * (H // GROUP) + hk,
        pid_bh,
        s_kt,
        s_vt,
        s_dkt,
        s_dvt,
        doc_rows,
        doc_base,
        start_m,
        tl.minimum(start_m + BLOCK_M, T),
        offs_m,
        offs_n,
        offs_d,
        offs_z,
        offs_b,
        T,
        sm_scale2,
        KZ,
        KB,
        BLOCK_N,
        True,
        EVEN_T,
        HAS_DOC,
        NEED_DALPHA,
        USE_TMA,
    )
    tl.store(
        DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(DQP + pid_bh * T * KB + offs_m[:, None] * KB + offs_b[None, :], dqp, mask=row_ok[:, None])
    if NEED_DALPHA:
        tl.store(DAL + pid_bh * T + offs_m, dal, mask=row_ok)
