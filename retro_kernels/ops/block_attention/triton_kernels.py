"""Triton kernels for block-local attention: row block g of the queries attends to key group g
under one softmax. Chunked cross-attention, neighbour self-attention and neighbour cross-attention
are all this problem (layouts.py maps each onto it), so one forward and one backward kernel serve
all three.

Tensors, in elements, the head dimension contiguous:
  q, out, do, dq   row r of batch b, head h at  b*stride_qb + r*stride_qr + h*stride_qh
                   row r = g * q_rows + i belongs to group g; rows >= q_valid do not exist
  k, v             key j of group g at          b*stride_kb + g*stride_kg + j*stride_kr + h*stride_kh
  mask             (b, g, j) at                 b*stride_mb + g*stride_mg + j*stride_mr  (1 = real key)
  lse              (b, h, r) at                 b*stride_lb + h*stride_lh + r   (natural log)
Rows [-prefix_rows, 0) exist too and attend to nothing (chunked cross-attention's positions
0 .. m-2): the forward writes 0 and lse = +inf there, the backward writes dq = 0.

Forward (online softmax, base-2 exponent; s = scale * log2(e) * q.k):
  m' = max(m, max_j s_j);  l = l 2^(m - m') + sum_j 2^(s_j - m');  acc = acc 2^(m - m') + P V
  out = acc / l (0 when no key is real);  lse = ln 2 * (m + log2 l)  (+inf when no key is real)
Backward, per program one block of query rows against all keys of its group:
  p = 2^(s - lse * log2 e);  dv = p^T do;  dp = do v^T;  delta = rowsum(do * out)
  ds = p (dp - delta);  dq = scale * ds k;  dk = scale * ds^T q
Query rows and keys belong to one group each, so a program is the only writer of its dq rows and,
when a group's rows fit one block, of its dk/dv rows: no atomics, deterministic. When they do not
fit, each row block writes its own float32 dk/dv partial and the launcher sums them.
"""
import triton
import triton.language as tl


@triton.jit
def _load_rows(base, rows, row_ok, stride_r, offs_d, d_ok):
    """(BLOCK_M, BLOCK_D) tile of rows `rows` (0 where a row or column does not exist)."""
    return tl.load(base + rows[:, None] * stride_r + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _key_mask(mask_base, keys, n_keys, stride_mr, HAS_MASK: tl.constexpr):
    """Which of the keys `keys` exist and are real."""
    ok = keys < n_keys
    if HAS_MASK:
        ok = ok & (tl.load(mask_base + keys * stride_mr, mask=keys < n_keys, other=0) != 0)
    return ok


@triton.jit
def _program(heads):
    """(program index over row blocks, batch index as int64, head)."""
    bh = tl.program_id(1)
    return tl.program_id(0), (bh // heads).to(tl.int64), bh % heads


@triton.jit
def _group_rows(pid, row_blocks, q_rows, q_valid, BLOCK_M: tl.constexpr):
    """The group g and row block rb of program pid, its rows, and which of them exist."""
    g = pid // row_blocks
    rb = pid % row_blocks
    i = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = g * q_rows + i
    return g, rb, rows, (i < q_rows) & (rows < q_valid)


@triton.jit
def _prefix_rows(pid, group_programs, prefix_rows, BLOCK_M: tl.constexpr):
    """Rows before group 0 handled by program pid (>= group_programs), and which exist."""
    rows = (pid - group_programs) * BLOCK_M + tl.arange(0, BLOCK_M) - prefix_rows
    return rows, rows < 0


@triton.jit
def block_attention_fwd_kernel(
    Q, K, V, MASK, OUT, LSE,
    stride_qb, stride_qr, stride_qh,
    stride_kb, stride_kg, stride_kr, stride_kh,
    stride_mb, stride_mg, stride_mr,
    stride_lb, stride_lh,
    heads, q_rows, q_valid, n_keys, head_dim, prefix_rows, row_blocks, group_programs, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, b, h = _program(heads)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_base = Q + b * stride_qb + h * stride_qh
    o_base = OUT + b * stride_qb + h * stride_qh
    l_base = LSE + b * stride_lb + h * stride_lh

    if pid >= group_programs:  # rows that attend to nothing
        rows, ok = _prefix_rows(pid, group_programs, prefix_rows, BLOCK_M)
        zero = tl.zeros((BLOCK_M, BLOCK_D), dtype=OUT.dtype.element_ty)
        tl.store(o_base + rows[:, None] * stride_qr + offs_d[None, :], zero, mask=ok[:, None] & d_ok[None, :])
        tl.store(l_base + rows, tl.full((BLOCK_M,), float("inf"), tl.float32), mask=ok)
        return

    g, _, rows, row_ok = _group_rows(pid, row_blocks, q_rows, q_valid, BLOCK_M)
    q = _load_rows(q_base, rows, row_ok, stride_qr, offs_d, d_ok)
    k_base = K + b * stride_kb + g * stride_kg + h * stride_kh
    v_base = V + b * stride_kb + g * stride_kg + h * stride_kh
    m_base = MASK + b * stride_mb + g * stride_mg
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(0, n_keys, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        key_ok = _key_mask(m_base, keys, n_keys, stride_mr, HAS_MASK)
        k = _load_rows(k_base, keys, keys < n_keys, stride_kr, offs_d, d_ok)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real key yet: keep 0s, not NaNs
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, keys, keys < n_keys, stride_kr, offs_d, d_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    out = tl.where(has_key[:, None], out, 0.0)
    tl.store(o_base + rows[:, None] * stride_qr + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(l_base + rows, lse, mask=row_ok)


@triton.jit
def block_attention_bwd_kernel(
    Q, K, V, MASK, OUT, DO, LSE, DQ, DK, DV,
    stride_qb, stride_qr, stride_qh,
    stride_kb, stride_kg, stride_kr, stride_kh,
    stride_dp, stride_db, stride_dg, stride_dr, stride_dh,
    stride_mb, stride_mg, stride_mr,
    stride_lb, stride_lh,
    heads, q_rows, q_valid, n_keys, head_dim, prefix_rows, row_blocks, group_programs, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, b, h = _program(heads)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_off = b * stride_qb + h * stride_qh

    if pid >= group_programs:  # rows that attend to nothing get no gradient
        rows, ok = _prefix_rows(pid, group_programs, prefix_rows, BLOCK_M)
        zero = tl.zeros((BLOCK_M, BLOCK_D), dtype=DQ.dtype.element_ty)
        tl.store(DQ + row_off + rows[:, None] * stride_qr + offs_d[None, :], zero, mask=ok[:, None] & d_ok[None, :])
        return

    g, rb, rows, row_ok = _group_rows(pid, row_blocks, q_rows, q_valid, BLOCK_M)
    q = _load_rows(Q + row_off, rows, row_ok, stride_qr, offs_d, d_ok)
    do = _load_rows(DO + row_off, rows, row_ok, stride_qr, offs_d, d_ok)
    o = _load_rows(OUT + row_off, rows, row_ok, stride_qr, offs_d, d_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=float("inf"))
    lse2 = lse * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634

    k_base = K + b * stride_kb + g * stride_kg + h * stride_kh
    v_base = V + b * stride_kb + g * stride_kg + h * stride_kh
    m_base = MASK + b * stride_mb + g * stride_mg
    d_off = rb * stride_dp + b * stride_db + g * stride_dg + h * stride_dh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(0, n_keys, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        key_ok = _key_mask(m_base, keys, n_keys, stride_mr, HAS_MASK)
        k = _load_rows(k_base, keys, keys < n_keys, stride_kr, offs_d, d_ok)
        v = _load_rows(v_base, keys, keys < n_keys, stride_kr, offs_d, d_ok)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])  # lse = +inf (no real key) gives 0
        p = tl.where(key_ok[None, :] & row_ok[:, None], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
        key_store = (keys < n_keys)[:, None] & d_ok[None, :]
        d_ptrs = d_off + keys[:, None] * stride_dr + offs_d[None, :]
        tl.store(DK + d_ptrs, dk.to(DK.dtype.element_ty), mask=key_store)
        tl.store(DV + d_ptrs, dv.to(DV.dtype.element_ty), mask=key_store)
    tl.store(DQ + row_off + rows[:, None] * stride_qr + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
