"""Triton JIT code for GRAPE-AP (path-integral additive bias) flash attention.

Imported lazily by `models.kernels.triton_pathsum`.

Per (batch, head h), with x(t, l) = scale * <qp_t, kp_l> and psi(t, l) = alpha_h * logsigmoid(x):
    bias(t, j) = sum_{l=j+1..t} psi(t, l) = S_t - C(t, j),   C(t, j) = sum_{l<=j} psi(t, l).
S_t is a per-row constant, so the kernels use -C(t, j). Key blocks are swept left to right and
C is a running prefix per query row plus an in-tile cumsum; no T x T tensor exists.

Backward: with dS = P * (dP - delta) (row sums zero), dL/dpsi(t, l) = E(t, l) = sum_{j<l} dS(t, j),
an exclusive prefix of dS along the row; dL/dx = E * alpha * sigmoid(-x); dqp = scale * dx @ kp,
dkp = scale * dx^T @ qp, dalpha = sum E * logsigmoid(x).
The dQ kernel sweeps key blocks (like the forward) and records, at the start of each key block
of the dK/dV kernel's width TB, the running prefixes C(t, n*TB) and E(t, n*TB) in two transient
(B, H, T, T/TB) fp32 tables (T/TB = 32 at T=4096, 1/TB of a dense bias); the dK/dV kernel (one
program per key block) starts its in-tile prefixes from them.

Scores are in log2 units: s2 = q.k * scale * log2(e) - C * log2(e); psi2 = psi * log2(e).
logsigmoid(x) = min(x, 0) - ln2 * log2(1 + 2^(-|x| log2 e)).
"""

import os

import triton
import triton.language as tl
from pelab.models.kernels._tl_common import key_block, load_row_stats, load_rows, query_block

# The CPU interpreter's bf16 tl.dot is wrong (numpy emulation): there, operands are rounded to
# bf16 and multiplied in fp32, which is exact for bf16 x bf16 products (same numbers as the GPU).
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
def _dot3(a, b):
    """a @ b for fp32 operands on bf16 tensor cores, ~fp32 accurate (three bf16 products)."""
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    acc = tl.dot(a_hi, b_hi)
    acc = tl.dot(a_lo, b_hi, acc)
    return tl.dot(a_hi, b_lo, acc)


@triton.jit
def _prefix_cols(x, tri):
    """x @ tri (tri an exact 0/1 bf16 matrix): an in-tile prefix sum along x's columns on the
    tensor cores, x split into bf16 hi + lo."""
    x_hi, x_lo = _split(x)
    return tl.dot(x_lo, tri, tl.dot(x_hi, tri))


@triton.jit
def _psi(z, alpha2):
    """psi2 = alpha * log2(e) * logsigmoid(z) (alpha2 = alpha*log2e), plus e = exp(-|z|)."""
    e = tl.math.exp2(-tl.abs(z) * LOG2E)
    l1p = tl.math.log2(1.0 + e)  # log2(1 + e)
    psi2 = alpha2 * tl.minimum(z, 0.0) - (alpha2 * LN2) * l1p
    return psi2, e, l1p


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    carry,
    q,
    qp,
    alpha2,
    upper,
    k_base,
    v_base,
    kp_base,
    s_kt,
    s_vt,
    s_pt,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    offs_p,
    T,
    P,
    sm_scale2,
    pscale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        col_ok = cols < T
        kp = tl.load(
            kp_base + cols[:, None] * s_pt + offs_p[None, :], mask=col_ok[:, None] & (offs_p[None, :] < P), other=0.0
        )
        z = _dot3(qp, tl.trans(kp)) * pscale
        psi2, e, l1p = _psi(z, alpha2)
        c_tile = carry[:, None] + _prefix_cols(psi2, upper)
        carry += tl.sum(psi2, 1)
        k = load_rows(k_base, cols, s_kt, offs_d, col_ok, EVEN_T)
        s = tl.dot(q, tl.trans(k)) * sm_scale2 - c_tile
        if MASK:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_rows(v_base, cols, s_vt, offs_d, col_ok, EVEN_T)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i, carry


@triton.jit
def pathsum_fwd_kernel(
    Q,
    K,
    V,
    QP,
    KP,
    ALPHA,
    O,
    L,
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
    s_pb,
    s_ph,
    s_pt,
    s_kpb,
    s_kph,
    s_kpt,
    H,
    T,
    GROUP,
    P,
    sm_scale2,
    pscale,
    D: tl.constexpr,
    PP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, row_ok = query_block(H, GROUP, T, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, PP)
    q = load_rows(Q + b * s_qb + h * s_qh, offs_m, s_qt, offs_d, row_ok, EVEN_T)
    qp = tl.load(
        QP + b * s_pb + h * s_ph + offs_m[:, None] * s_pt + offs_p[None, :],
        mask=row_ok[:, None] & (offs_p[None, :] < P),
        other=0.0,
    )
    alpha2 = tl.load(ALPHA + h) * LOG2E
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    kp_base = KP + b * s_kpb + h * s_kph
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    carry = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    tri = tl.arange(0, BLOCK_N)
    upper = _bf16((tri[:, None] <= tri[None, :]).to(tl.float32))  # x @ upper = inclusive prefix along columns
    acc, l_i, m_i, carry = _fwd_inner(
        acc,
        l_i,
        m_i,
        carry,
        q,
        qp,
        alpha2,
        upper,
        k_base,
        v_base,
        kp_base,
        s_kt,
        s_vt,
        s_kpt,
        0,
        start_m,
        offs_m,
        offs_n,
        offs_d,
        offs_p,
        T,
        P,
        sm_scale2,
        pscale,
        BLOCK_N,
        False,
        EVEN_T,
    )
    hi = tl.minimum(start_m + BLOCK_M, T)
    acc, l_i, m_i, carry = _fwd_inner(
        acc,
        l_i,
        m_i,
        carry,
        q,
        qp,
        alpha2,
        upper,
        k_base,
        v_base,
        kp_base,
        s_kt,
        s_vt,
        s_kpt,
        start_m,
        hi,
        offs_m,
        offs_n,
        offs_d,
        offs_p,
        T,
        P,
        sm_scale2,
        pscale,
        BLOCK_N,
        True,
        EVEN_T,
    )
    acc = acc / l_i[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(L + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ---- backward: dQ sweep (also dqp, dalpha and the prefix tables) -------------------------------


@triton.jit
def _dq_inner(
    dq,
    dqp,
    dal,
    carry_c,
    carry_e,
    q,
    do,
    lse,
    delta,
    qp,
    alpha2,
    upper,
    supper,
    k_base,
    v_base,
    kp_base,
    ct_base,
    et_base,
    s_kt,
    s_vt,
    s_pt,
    NT,
    lo,
    hi,
    offs_m,
    offs_n0,
    offs_d,
    offs_p,
    T,
    P,
    sm_scale2,
    pscale,
    alpha,
    BLOCK_N: tl.constexpr,
    TB: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
):
    row_ok = offs_m < T
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if start_n % TB == 0:  # record the running prefixes for the dK/dV kernel
            tl.store(ct_base + offs_m * NT + start_n // TB, carry_c, mask=row_ok)
            tl.store(et_base + offs_m * NT + start_n // TB, carry_e, mask=row_ok)
        cols = start_n + offs_n0
        col_ok = cols < T
        kp = tl.load(
            kp_base + cols[:, None] * s_pt + offs_p[None, :], mask=col_ok[:, None] & (offs_p[None, :] < P), other=0.0
        )
        z = _dot3(qp, tl.trans(kp)) * pscale
        psi2, e, l1p = _psi(z, alpha2)
        c_tile = carry_c[:, None] + _prefix_cols(psi2, upper)
        carry_c += tl.sum(psi2, 1)
        k = load_rows(k_base, cols, s_kt, offs_d, col_ok, EVEN_T)
        v = load_rows(v_base, cols, s_vt, offs_d, col_ok, EVEN_T)
        s = tl.dot(q, tl.trans(k)) * sm_scale2 - c_tile
        p = tl.math.exp2(s - lse[:, None])
        causal = offs_m[:, None] >= cols[None, :]
        if MASK:
            p = tl.where(causal, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
        e_tile = carry_e[:, None] + _prefix_cols(ds, supper)  # exclusive prefix of dS: dL/dpsi
        carry_e += tl.sum(ds, 1)
        # sigmoid(-z) = (z >= 0 ? e : 1) / (1 + e)
        sig = tl.where(z >= 0, e, 1.0) / (1.0 + e)
        dz = e_tile * sig * (alpha * pscale)
        if MASK:
            dz = tl.where(causal, dz, 0.0)
        dqp += _dot3(dz, kp)
        if NEED_DALPHA:
            ls = tl.minimum(z, 0.0) - LN2 * l1p
            if MASK:
                ls = tl.where(causal, ls, 0.0)
            dal += tl.sum(e_tile * ls, 1)
    return dq, dqp, dal, carry_c, carry_e


@triton.jit
def pathsum_bwd_dq_kernel(
    Q,
    K,
    V,
    QP,
    KP,
    ALPHA,
    DO,
    L,
    DELTA,
    DQ,
    DQP,
    DAL,
    CT,
    ET,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_pb,
    s_ph,
    s_pt,
    s_kpb,
    s_kph,
    s_kpt,
    s_dob,
    s_doh,
    s_dot,
    s_dqb,
    s_dqh,
    s_dqt,
    H,
    T,
    GROUP,
    P,
    NT,
    sm_scale,
    sm_scale2,
    pscale,
    D: tl.constexpr,
    PP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TB: tl.constexpr,
    EVEN_T: tl.constexpr,
    NEED_DALPHA: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, row_ok = query_block(H, GROUP, T, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, PP)
    q = load_rows(Q + b * s_qb + h * s_qh, offs_m, s_qt, offs_d, row_ok, False)
    do = load_rows(DO + b * s_dob + h * s_doh, offs_m, s_dot, offs_d, row_ok, False)
    lse, delta = load_row_stats(L + pid_bh * T + offs_m, DELTA + pid_bh * T + offs_m, row_ok, False)
    qp = tl.load(
        QP + b * s_pb + h * s_ph + offs_m[:, None] * s_pt + offs_p[None, :],
        mask=row_ok[:, None] & (offs_p[None, :] < P),
        other=0.0,
    )
    alpha = tl.load(ALPHA + h)
    alpha2 = alpha * LOG2E
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    kp_base = KP + b * s_kpb + h * s_kph
    ct_base = CT + pid_bh * T * NT
    et_base = ET + pid_bh * T * NT
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dqp = tl.zeros([BLOCK_M, PP], tl.float32)
    dal = tl.zeros([BLOCK_M], tl.float32)
    carry_c = tl.zeros([BLOCK_M], tl.float32)
    carry_e = tl.zeros([BLOCK_M], tl.float32)
    tri = tl.arange(0, BLOCK_N)
    upper = _bf16((tri[:, None] <= tri[None, :]).to(tl.float32))
    supper = _bf16((tri[:, None] < tri[None, :]).to(tl.float32))  # strictly upper: exclusive prefix
    dq, dqp, dal, carry_c, carry_e = _dq_inner(
        dq,
        dqp,
        dal,
        carry_c,
        carry_e,
        q,
        do,
        lse,
        delta,
        qp,
        alpha2,
        upper,
        supper,
        k_base,
        v_base,
        kp_base,
        ct_base,
        et_base,
        s_kt,
        s_vt,
        s_kpt,
        NT,
        0,
        start_m,
        offs_m,
        offs_n0,
        offs_d,
        offs_p,
        T,
        P,
        sm_scale2,
        pscale,
        alpha,
        BLOCK_N,
        TB,
        False,
        EVEN_T,
        NEED_DALPHA,
    )
    hi = tl.minimum(start_m + BLOCK_M, T)
    dq, dqp, dal, carry_c, carry_e = _dq_inner(
        dq,
        dqp,
        dal,
        carry_c,
        carry_e,
        q,
        do,
        lse,
        delta,
        qp,
        alpha2,
        upper,
        supper,
        k_base,
        v_base,
        kp_base,
        ct_base,
        et_base,
        s_kt,
        s_vt,
        s_kpt,
        NT,
        start_m,
        hi,
        offs_m,
        offs_n0,
        offs_d,
        offs_p,
        T,
        P,
        sm_scale2,
        pscale,
        alpha,
        BLOCK_N,
        TB,
        True,
        EVEN_T,
        NEED_DALPHA,
    )
    tl.store(
        DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(
        DQP + pid_bh * T * P + offs_m[:, None] * P + offs_p[None, :], dqp, mask=row_ok[:, None] & (offs_p[None, :] < P)
    )
    if NEED_DALPHA:
        tl.store(DAL + pid_bh * T + offs_m, dal, mask=row_ok)


# ---- backward: dK/dV (and dkp), one program per (KV head, key block) -----------------------------


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    dkp,
    k,
    v,
    kp,
    alpha2,
    alpha,
    upper,
    supper,
    q_base,
    do_base,
    qp_base,
    l_base,
    dl_base,
    ct_base,
    et_base,
    s_qt,
    s_dot,
    s_pt,
    NT,
    n_tab,
    lo,
    hi,
    offs_n,
    offs_m0,
    offs_d,
    offs_p,
    T,
    P,
    sm_scale2,
    pscale,
    BLOCK_M: tl.constexpr,
    MASK: tl.constexpr,
):
    # Every load is masked (no EVEN_T variant). Tiles are laid out (query rows, key columns) as in
    # the dQ sweep, and dK/dV/dkp take transposed products. (A (key, query) layout with the prefix as
    # lower-triangular @ x was exact in the interpreter but made illegal memory accesses on the H200.)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m0
        row_ok = rows < T
        q = load_rows(q_base, rows, s_qt, offs_d, row_ok, False)
        do = load_rows(do_base, rows, s_dot, offs_d, row_ok, False)
        lse, delta = load_row_stats(l_base + rows, dl_base + rows, row_ok, False)
        qp = tl.load(
            qp_base + rows[:, None] * s_pt + offs_p[None, :], mask=row_ok[:, None] & (offs_p[None, :] < P), other=0.0
        )
        c0 = tl.load(ct_base + rows * NT + n_tab, mask=row_ok, other=0.0)
        e0 = tl.load(et_base + rows * NT + n_tab, mask=row_ok, other=0.0)
        z = _dot3(qp, tl.trans(kp)) * pscale  # (M, N)
        psi2, e, l1p = _psi(z, alpha2)
        c_tile = c0[:, None] + _prefix_cols(psi2, upper)
        s = tl.dot(q, tl.trans(k)) * sm_scale2 - c_tile
        p = tl.math.exp2(s - lse[:, None])
        causal = rows[:, None] >= offs_n[None, :]
        if MASK:
            p = tl.where(causal, p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
        e_tile = e0[:, None] + _prefix_cols(ds, supper)
        sig = tl.where(z >= 0, e, 1.0) / (1.0 + e)
        dz = e_tile * sig * (alpha * pscale)
        if MASK:
            dz = tl.where(causal, dz, 0.0)
        dkp += _dot3(tl.trans(dz), qp)
    return dk, dv, dkp


@triton.jit
def pathsum_bwd_dkdv_kernel(
    Q,
    K,
    V,
    QP,
    KP,
    ALPHA,
    DO,
    L,
    DELTA,
    DK,
    DV,
    DKP,
    CT,
    ET,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_kt,
    s_vb,
    s_vh,
    s_vt,
    s_pb,
    s_ph,
    s_pt,
    s_kpb,
    s_kph,
    s_kpt,
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
    P,
    NT,
    sm_scale,
    sm_scale2,
    pscale,
    D: tl.constexpr,
    PP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, b, hk, pid_n, start_n, offs_n, col_ok = key_block(HKV, T, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, PP)
    k = load_rows(K + b * s_kb + hk * s_kh, offs_n, s_kt, offs_d, col_ok, False)
    v = load_rows(V + b * s_vb + hk * s_vh, offs_n, s_vt, offs_d, col_ok, False)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    hi_diag = tl.minimum(start_n + BLOCK_N, T)
    tri = tl.arange(0, BLOCK_N)
    upper = _bf16((tri[:, None] <= tri[None, :]).to(tl.float32))
    supper = _bf16((tri[:, None] < tri[None, :]).to(tl.float32))
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        alpha = tl.load(ALPHA + h)
        alpha2 = alpha * LOG2E
        kp = tl.load(
            KP + b * s_kpb + h * s_kph + offs_n[:, None] * s_kpt + offs_p[None, :],
            mask=col_ok[:, None] & (offs_p[None, :] < P),
            other=0.0,
        )
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_dob + h * s_doh
        qp_base = QP + b * s_pb + h * s_ph
        l_base = L + bh * T
        dl_base = DELTA + bh * T
        ct_base = CT + bh * T * NT
        et_base = ET + bh * T * NT
        dkp = tl.zeros([BLOCK_N, PP], tl.float32)
        dk, dv, dkp = _dkdv_inner(
            dk,
            dv,
            dkp,
            k,
            v,
            kp,
            alpha2,
            alpha,
            upper,
            supper,
            q_base,
            do_base,
            qp_base,
            l_base,
            dl_base,
            ct_base,
            et_base,
            s_qt,
            s_dot,
            s_pt,
            NT,
            pid_n,
            start_n,
            hi_diag,
            offs_n,
            offs_m0,
            offs_d,
            offs_p,
            T,
            P,
            sm_scale2,
            pscale,
            BLOCK_M,
            True,
        )
        dk, dv, dkp = _dkdv_inner(
            dk,
            dv,
            dkp,
            k,
            v,
            kp,
            alpha2,
            alpha,
            upper,
            supper,
            q_base,
            do_base,
            qp_base,
            l_base,
            dl_base,
            ct_base,
            et_base,
            s_qt,
            s_dot,
            s_pt,
            NT,
            pid_n,
            start_n + BLOCK_N,
            T,
            offs_n,
            offs_m0,
            offs_d,
            offs_p,
            T,
            P,
            sm_scale2,
            pscale,
            BLOCK_M,
            False,
        )
        tl.store(
            DKP + bh * T * P + offs_n[:, None] * P + offs_p[None, :], dkp, mask=col_ok[:, None] & (offs_p[None, :] < P)
        )
    tl.store(
        DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkt + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None],
    )
