"""Triton JIT code for causal flash attention with an fp32 low-rank additive bias.

Imported lazily by `models.kernels.triton_lowrank` (so that `TRITON_INTERPRET=1` set by a test
before the first call takes effect, and so that a CPU install without triton never imports it).

Bias, per (batch, attention head):  bias[i, j] = sum_r a[i, r] * b[j, r], r < R <= 4, fp32.
The kernels evaluate the row-shifted form sum_r a[i, r] * (b[j, r] - b[i, r]): it differs from
the bias by a per-row constant (softmax ignores it; the row sums of dS are zero so no gradient
changes) and keeps the numbers near the diagonal small, so FoX cumulative sums of thousands or
ALiBi/GRAPE-A position terms lose no precision. All bias arithmetic is explicit fp32 FMAs
(never tl.dot, which would round through tf32). Scores live in the log2 domain
(s2 = (q.k * scale + bias) * log2(e)); the saved LSE is in log2 units too.

Document masking (HAS_DOC): DOC holds int32 (B, T) document ids, non-decreasing along each row;
key j is visible to query i iff j <= i and DOC[j] == DOC[i]. DSTART / DEND hold each token's
document start and end (exclusive): a query block only loops over keys from its first row's
document start, a key block only over queries up to its last key's document end, so fully masked
blocks are never visited. Every row sees itself, but a row may see nothing in the blocks before its
diagonal one: the forward then keeps its running max away from -inf - -inf.

Grid layouts put the heaviest causal blocks first (LPT order): forward and dQ programs run the
last query blocks first; dK/dV programs the first key blocks first. GQA: a KV head's dK/dV
program loops over the query heads of its group and accumulates in registers, so repeated K/V
are never materialised and no atomics are used.
"""

import triton
import triton.language as tl
from pelab.models.kernels._tl_common import key_block, load_row_stats, load_rows, query_block

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_cols(base, offs, s_t, mask, R: tl.constexpr):
    """Columns r = 0..R-1 of an fp32 (T, R) factor (r stride 1), padded with c0 past R."""
    c0 = tl.load(base + offs * s_t, mask=mask, other=0.0)
    c1 = c0
    c2 = c0
    c3 = c0
    if R > 1:
        c1 = tl.load(base + offs * s_t + 1, mask=mask, other=0.0)
    if R > 2:
        c2 = tl.load(base + offs * s_t + 2, mask=mask, other=0.0)
    if R > 3:
        c3 = tl.load(base + offs * s_t + 3, mask=mask, other=0.0)
    return c0, c1, c2, c3


@triton.jit
def _bias_rows(a0, a1, a2, a3, d0, d1, d2, d3, b0, b1, b2, b3, R: tl.constexpr):
    """(M, N) tile sum_r a_r[i] * (b_r[j] - d_r[i]); a, d indexed by query rows, b by keys."""
    acc = a0[:, None] * (b0[None, :] - d0[:, None])
    if R > 1:
        acc += a1[:, None] * (b1[None, :] - d1[:, None])
    if R > 2:
        acc += a2[:, None] * (b2[None, :] - d2[:, None])
    if R > 3:
        acc += a3[:, None] * (b3[None, :] - d3[:, None])
    return acc


@triton.jit
def _bias_cols(a0, a1, a2, a3, d0, d1, d2, d3, b0, b1, b2, b3, R: tl.constexpr):
    """Transposed (N, M) tile: keys on rows, queries on columns."""
    acc = a0[None, :] * (b0[:, None] - d0[None, :])
    if R > 1:
        acc += a1[None, :] * (b1[:, None] - d1[None, :])
    if R > 2:
        acc += a2[None, :] * (b2[:, None] - d2[None, :])
    if R > 3:
        acc += a3[None, :] * (b3[:, None] - d3[None, :])
    return acc


# ---- forward ----------------------------------------------------------------------------------


@triton.jit
def _visible(rows, cols, doc_rows, doc_base, col_ok, MASK: tl.constexpr, HAS_DOC: tl.constexpr):
    """(M, N) bool: causal (if MASK) and same document (if HAS_DOC); keys past T belong to no document."""
    if HAS_DOC:
        doc_cols = tl.load(doc_base + cols, mask=col_ok, other=-2)
        ok = doc_rows[:, None] == doc_cols[None, :]
        if MASK:
            ok = ok & (rows[:, None] >= cols[None, :])
    else:
        ok = rows[:, None] >= cols[None, :]
    return ok


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    a0,
    a1,
    a2,
    a3,
    d0,
    d1,
    d2,
    d3,
    k_base,
    v_base,
    bk_base,
    s_kt,
    s_vt,
    s_bt,
    doc_rows,
    doc_base,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    T,
    sm_scale2,
    R: tl.constexpr,
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
        s = tl.dot(q, tl.trans(k)) * sm_scale2
        if R > 0:
            b0, b1, b2, b3 = _load_cols(bk_base, cols, s_bt, col_ok, R)
            s += _bias_rows(a0, a1, a2, a3, d0, d1, d2, d3, b0, b1, b2, b3, R)
        if MASK or HAS_DOC:
            s = tl.where(_visible(offs_m, cols, doc_rows, doc_base, col_ok, MASK, HAS_DOC), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if HAS_DOC:  # rows with no visible key so far: exp2(-inf - 0) = 0 instead of NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_rows(v_base, cols, s_vt, offs_d, col_ok, EVEN_T)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def lowrank_fwd_kernel(
    Q,
    K,
    V,
    A,
    Bk,
    O,
    L,
    OLO,
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
    s_ab,
    s_ah,
    s_at,
    s_bb,
    s_bh,
    s_bt,
    H,
    T,
    GROUP,
    sm_scale2,
    R: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    STORE_LO: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, row_ok = query_block(H, GROUP, T, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = load_rows(Q + b * s_qb + h * s_qh, offs_m, s_qt, offs_d, row_ok, EVEN_T)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    a_base = A + b * s_ab + h * s_ah
    bk_base = Bk + b * s_bb + h * s_bh
    a0, a1, a2, a3 = _load_cols(a_base, offs_m, s_at, row_ok, R)
    d0, d1, d2, d3 = _load_cols(bk_base, offs_m, s_bt, row_ok, R)
    a0 = a0 * LOG2E
    a1 = a1 * LOG2E
    a2 = a2 * LOG2E
    a3 = a3 * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    doc_base, doc_rows, lo = DOC + b * T, offs_m, 0
    if HAS_DOC:  # padded rows (never stored) take the last row's id, so no row is empty
        doc_rows = tl.load(doc_base + tl.minimum(offs_m, T - 1))
        lo = tl.load(DSTART + b * T + start_m) // BLOCK_N * BLOCK_N
    # keys strictly left of this query block: no causal mask
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        a0,
        a1,
        a2,
        a3,
        d0,
        d1,
        d2,
        d3,
        k_base,
        v_base,
        bk_base,
        s_kt,
        s_vt,
        s_bt,
        doc_rows,
        doc_base,
        lo,
        start_m,
        offs_m,
        offs_n,
        offs_d,
        T,
        sm_scale2,
        R,
        BLOCK_N,
        False,
        EVEN_T,
        HAS_DOC,
    )
    # the diagonal block: causal mask
    hi = tl.minimum(start_m + BLOCK_M, T)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        a0,
        a1,
        a2,
        a3,
        d0,
        d1,
        d2,
        d3,
        k_base,
        v_base,
        bk_base,
        s_kt,
        s_vt,
        s_bt,
        doc_rows,
        doc_base,
        start_m,
        hi,
        offs_m,
        offs_n,
        offs_d,
        T,
        sm_scale2,
        R,
        BLOCK_N,
        True,
        EVEN_T,
        HAS_DOC,
    )
    acc = acc / l_i[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :]
    l_ptrs = L + pid_bh * T + offs_m
    if STORE_LO:  # rounding residual of o, so delta = rowsum(do * o) can be formed in fp32
        o_hi = acc.to(O.dtype.element_ty)
        tl.store(
            OLO + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :],
            (acc - o_hi.to(tl.float32)).to(O.dtype.element_ty),
            mask=row_ok[:, None],
        )
    if EVEN_T:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty))
        tl.store(l_ptrs, m_i + tl.math.log2(l_i))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(l_ptrs, m_i + tl.math.log2(l_i), mask=row_ok)


# ---- backward ---------------------------------------------------------------------------------


@triton.jit
def bwd_delta_kernel(
    O,
    DO,
    DELTA,
    OLO,
    s_ob,
    s_oh,
    s_ot,
    s_db,
    s_dh,
    s_dt,
    H,
    T,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_LO: tl.constexpr,
):
    """delta[b, h, t] = sum_d o * do (fp32); o = o_hi + o_lo when the residual was stored."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = offs < T
    o = tl.load(O + b * s_ob + h * s_oh + offs[:, None] * s_ot + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs[:, None] * s_dt + offs_d[None, :], mask=ok[:, None], other=0.0)
    of = o.to(tl.float32)
    if HAS_LO:
        of += tl.load(
            OLO + b * s_ob + h * s_oh + offs[:, None] * s_ot + offs_d[None, :], mask=ok[:, None], other=0.0
        ).to(tl.float32)
    tl.store(DELTA + pid_bh * T + offs, tl.sum(of * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    db0,
    db1,
    db2,
    db3,
    k,
    v,
    b0,
    b1,
    b2,
    b3,
    q_base,
    do_base,
    a_base,
    bk_base,
    l_base,
    dl_base,
    s_qt,
    s_dot,
    s_at,
    s_bt,
    doc_cols,
    doc_base,
    lo,
    hi,
    offs_n,
    offs_m0,
    offs_d,
    T,
    sm_scale2,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
    NEED_DB: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m0
        row_ok = rows < T
        q = load_rows(q_base, rows, s_qt, offs_d, row_ok, EVEN_T)
        do = load_rows(do_base, rows, s_dot, offs_d, row_ok, EVEN_T)
        lse, delta = load_row_stats(l_base + rows, dl_base + rows, row_ok, EVEN_T)
        sT = tl.dot(k, tl.trans(q)) * sm_scale2  # (N, M)
        if R > 0:
            a0, a1, a2, a3 = _load_cols(a_base, rows, s_at, row_ok, R)
            d0, d1, d2, d3 = _load_cols(bk_base, rows, s_bt, row_ok, R)
            sT += _bias_cols(a0 * LOG2E, a1 * LOG2E, a2 * LOG2E, a3 * LOG2E, d0, d1, d2, d3, b0, b1, b2, b3, R)
        pT = tl.math.exp2(sT - lse[None, :])
        if HAS_DOC:  # (N, M): keys on rows; padded query rows have lse = inf, so pT = 0 there anyway
            doc_rows = tl.load(doc_base + tl.minimum(rows, T - 1))
            ok = doc_cols[:, None] == doc_rows[None, :]
            if MASK:
                ok = ok & (rows[None, :] >= offs_n[:, None])
            pT = tl.where(ok, pT, 0.0)
        elif MASK:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
        if NEED_DB:
            db0 += tl.sum(dsT * a0[None, :], 1)
            if R > 1:
                db1 += tl.sum(dsT * a1[None, :], 1)
            if R > 2:
                db2 += tl.sum(dsT * a2[None, :], 1)
            if R > 3:
                db3 += tl.sum(dsT * a3[None, :], 1)
    return dk, dv, db0, db1, db2, db3


@triton.jit
def _store_cols(base, offs, mask, c0, c1, c2, c3, R: tl.constexpr):
    tl.store(base + offs * R, c0, mask=mask)
    if R > 1:
        tl.store(base + offs * R + 1, c1, mask=mask)
    if R > 2:
        tl.store(base + offs * R + 2, c2, mask=mask)
    if R > 3:
        tl.store(base + offs * R + 3, c3, mask=mask)


@triton.jit
def lowrank_bwd_dkdv_kernel(
    Q,
    K,
    V,
    A,
    Bk,
    DO,
    L,
    DELTA,
    DK,
    DV,
    DB,
    DOC,
    DEND,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_ab,
    s_ah,
    s_at,
    s_bb,
    s_bh,
    s_bt,
    s_dob,
    s_doh,
    s_dot,
    s_dkb,
    s_dkh,
    s_dkt,
    s_dvb,
    s_dvh,
    s_dvt,
    H,
    HKV,
    T,
    GROUP,
    sm_scale,
    sm_scale2,
    R: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    NEED_DB: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    pid_bh, b, hk, pid_n, start_n, offs_n, col_ok = key_block(HKV, T, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    k = load_rows(K + b * s_kb + hk * s_kh, offs_n, s_kt, offs_d, col_ok, EVEN_T)
    v = load_rows(V + b * s_vb + hk * s_vh, offs_n, s_vt, offs_d, col_ok, EVEN_T)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    hi_diag = tl.minimum(start_n + BLOCK_N, T)
    doc_base, doc_cols, hi = DOC + b * T, offs_n, T
    if HAS_DOC:  # padded keys get id -2: no query row matches them
        doc_cols = tl.load(doc_base + offs_n, mask=col_ok, other=-2)
        hi = tl.load(DEND + b * T + hi_diag - 1)  # queries past the last key's document see no key here
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_dob + h * s_doh
        a_base = A + b * s_ab + h * s_ah
        bk_base = Bk + b * s_bb + h * s_bh
        l_base = L + bh * T
        dl_base = DELTA + bh * T
        b0, b1, b2, b3 = _load_cols(bk_base, offs_n, s_bt, col_ok, R)
        db0 = tl.zeros([BLOCK_N], tl.float32)
        db1 = db0
        db2 = db0
        db3 = db0
        dk, dv, db0, db1, db2, db3 = _dkdv_inner(
            dk,
            dv,
            db0,
            db1,
            db2,
            db3,
            k,
            v,
            b0,
            b1,
            b2,
            b3,
            q_base,
            do_base,
            a_base,
            bk_base,
            l_base,
            dl_base,
            s_qt,
            s_dot,
            s_at,
            s_bt,
            doc_cols,
            doc_base,
            start_n,
            hi_diag,
            offs_n,
            offs_m0,
            offs_d,
            T,
            sm_scale2,
            R,
            BLOCK_M,
            True,
            EVEN_T,
            NEED_DB,
            HAS_DOC,
        )
        dk, dv, db0, db1, db2, db3 = _dkdv_inner(
            dk,
            dv,
            db0,
            db1,
            db2,
            db3,
            k,
            v,
            b0,
            b1,
            b2,
            b3,
            q_base,
            do_base,
            a_base,
            bk_base,
            l_base,
            dl_base,
            s_qt,
            s_dot,
            s_at,
            s_bt,
            doc_cols,
            doc_base,
            start_n + BLOCK_N,
            hi,
            offs_n,
            offs_m0,
            offs_d,
            T,
            sm_scale2,
            R,
            BLOCK_M,
            False,
            EVEN_T,
            NEED_DB,
            HAS_DOC,
        )
        if NEED_DB:
            _store_cols(DB + bh * T * R, offs_n, col_ok, db0, db1, db2, db3, R)
    dk_ptrs = DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkt + offs_d[None, :]
    dv_ptrs = DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_inner(
    dq,
    da0,
    da1,
    da2,
    da3,
    q,
    do,
    lse,
    delta,
    a0,
    a1,
    a2,
    a3,
    d0,
    d1,
    d2,
    d3,
    k_base,
    v_base,
    bk_base,
    s_kt,
    s_vt,
    s_bt,
    doc_rows,
    doc_base,
    lo,
    hi,
    offs_m,
    offs_n0,
    offs_d,
    T,
    sm_scale2,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
    NEED_DA: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n0
        col_ok = cols < T
        k = load_rows(k_base, cols, s_kt, offs_d, col_ok, EVEN_T)
        v = load_rows(v_base, cols, s_vt, offs_d, col_ok, EVEN_T)
        s = tl.dot(q, tl.trans(k)) * sm_scale2
        if R > 0:
            b0, b1, b2, b3 = _load_cols(bk_base, cols, s_bt, col_ok, R)
            s += _bias_rows(a0 * LOG2E, a1 * LOG2E, a2 * LOG2E, a3 * LOG2E, d0, d1, d2, d3, b0, b1, b2, b3, R)
        p = tl.math.exp2(s - lse[:, None])
        if MASK or HAS_DOC:
            p = tl.where(_visible(offs_m, cols, doc_rows, doc_base, col_ok, MASK, HAS_DOC), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
        if NEED_DA:
            # row sums of ds are zero, so (b_j - b_i) instead of b_j: same gradient, less cancellation
            da0 += tl.sum(ds * (b0[None, :] - d0[:, None]), 1)
            if R > 1:
                da1 += tl.sum(ds * (b1[None, :] - d1[:, None]), 1)
            if R > 2:
                da2 += tl.sum(ds * (b2[None, :] - d2[:, None]), 1)
            if R > 3:
                da3 += tl.sum(ds * (b3[None, :] - d3[:, None]), 1)
    return dq, da0, da1, da2, da3


@triton.jit
def lowrank_bwd_dq_kernel(
    Q,
    K,
    V,
    A,
    Bk,
    DO,
    L,
    DELTA,
    DQ,
    DA,
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
    s_ab,
    s_ah,
    s_at,
    s_bb,
    s_bh,
    s_bt,
    s_dob,
    s_doh,
    s_dot,
    s_dqb,
    s_dqh,
    s_dqt,
    H,
    T,
    GROUP,
    sm_scale,
    sm_scale2,
    R: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
    NEED_DA: tl.constexpr,
    HAS_DOC: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, row_ok = query_block(H, GROUP, T, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = load_rows(Q + b * s_qb + h * s_qh, offs_m, s_qt, offs_d, row_ok, EVEN_T)
    do = load_rows(DO + b * s_dob + h * s_doh, offs_m, s_dot, offs_d, row_ok, EVEN_T)
    lse, delta = load_row_stats(L + pid_bh * T + offs_m, DELTA + pid_bh * T + offs_m, row_ok, EVEN_T)
    a_base = A + b * s_ab + h * s_ah
    bk_base = Bk + b * s_bb + h * s_bh
    a0, a1, a2, a3 = _load_cols(a_base, offs_m, s_at, row_ok, R)
    d0, d1, d2, d3 = _load_cols(bk_base, offs_m, s_bt, row_ok, R)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    da0 = tl.zeros([BLOCK_M], tl.float32)
    da1 = da0
    da2 = da0
    da3 = da0
    doc_base, doc_rows, lo = DOC + b * T, offs_m, 0
    if HAS_DOC:  # as in the forward
        doc_rows = tl.load(doc_base + tl.minimum(offs_m, T - 1))
        lo = tl.load(DSTART + b * T + start_m) // BLOCK_N * BLOCK_N
    dq, da0, da1, da2, da3 = _dq_inner(
        dq,
        da0,
        da1,
        da2,
        da3,
        q,
        do,
        lse,
        delta,
        a0,
        a1,
        a2,
        a3,
        d0,
        d1,
        d2,
        d3,
        k_base,
        v_base,
        bk_base,
        s_kt,
        s_vt,
        s_bt,
        doc_rows,
        doc_base,
        lo,
        start_m,
        offs_m,
        offs_n0,
        offs_d,
        T,
        sm_scale2,
        R,
        BLOCK_N,
        False,
        EVEN_T,
        NEED_DA,
        HAS_DOC,
    )
    hi = tl.minimum(start_m + BLOCK_M, T)
    dq, da0, da1, da2, da3 = _dq_inner(
        dq,
        da0,
        da1,
        da2,
        da3,
        q,
        do,
        lse,
        delta,
        a0,
        a1,
        a2,
        a3,
        d0,
        d1,
        d2,
        d3,
        k_base,
        v_base,
        bk_base,
        s_kt,
        s_vt,
        s_bt,
        doc_rows,
        doc_base,
        start_m,
        hi,
        offs_m,
        offs_n0,
        offs_d,
        T,
        sm_scale2,
        R,
        BLOCK_N,
        True,
        EVEN_T,
        NEED_DA,
        HAS_DOC,
    )
    dq_ptrs = DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if NEED_DA:
        _store_cols(DA + pid_bh * T * R, offs_m, row_ok, da0, da1, da2, da3, R)
