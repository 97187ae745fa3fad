"""Triton kernels of ``teal::decode_attention`` (split-KV "flash-decoding"). Imported lazily: imports Triton.

One query token attends to the first ``n_valid`` positions of a static KV cache [Hkv, L, D]. Grid
(Hkv, SPLITS) of ``decode_attention_kernel``: program (h, s) handles the G = Hq / Hkv query heads that
share kv head h, over its slice of positions. The slice length is set in the kernel from ``n_valid`` (a
device tensor), so every program has work at any context length and nothing depends on the host:
``chunk = BLOCK_L * ceil(ceil(n_valid / SPLITS) / BLOCK_L)``, slice ``[s * chunk, min((s + 1) * chunk,
n_valid))``; positions at or past ``n_valid`` are never read (every load past the slice is masked off).
Each program runs an online softmax in fp32 over ``BLOCK_L`` positions per step (scores ``q . k * scale
+ mask`` in fp32, exponentials rounded to the cache's dtype before the product with V, as the reference
rounds its probabilities). The products are ``tl.dot`` (G rows padded to 16; IEEE fp32 with ``DOT_FP32``).

With SPLITS == 1 the program writes ``acc / l`` itself. Otherwise it writes its partial (running max m,
sum l, unnormalised acc [G, D]; an empty slice writes m = -inf, l = 0, acc = 0, which merge as nothing)
to a workspace, and ``combine_partials_kernel``, launched right after (grid Hq: one program per query
head, no atomics), merges the partials of each kv head in split order (deterministic).

The output is ``acc / l`` rounded to the output's dtype, 0 where l == 0 (no visible position).
"""

from __future__ import annotations

import triton
import triton.language as tl

from teal.kernels._pdl_triton import pdl_release, pdl_wait
from teal.kernels._triton import _round_to


@triton.jit
def _slice_bounds(nv_ptr, pid_s, L, SPLITS: tl.constexpr, BLOCK_L: tl.constexpr):
    """(lo, hi): this program's positions; the visible length n_valid is clamped to [0, L]."""
    n = tl.minimum(tl.maximum(tl.load(nv_ptr).to(tl.int32), 0), L)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_L) * BLOCK_L, BLOCK_L)
    lo = pid_s * chunk
    return lo, tl.minimum(lo + chunk, n)


@triton.jit
def _mm(a, b, DOT_FP32: tl.constexpr):
    """a [M, K] @ b [K, N] with fp32 accumulation by ``tl.dot`` (IEEE fp32 if DOT_FP32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_block(k_base, v_base, mask_ptr, start, hi, D, offs_d, d_ok, BLOCK_L: tl.constexpr):
    """K and V [BLOCK_L, BLOCK_D] and the mask [BLOCK_L] of positions start .. start + BLOCK_L - 1; positions
    at or past ``hi`` are not read (K, V 0 and mask -inf there)."""
    offs_l = start + tl.arange(0, BLOCK_L)
    l_ok = offs_l < hi
    ok = l_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_l[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    v = tl.load(v_base + offs_l[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    bias = tl.load(mask_ptr + offs_l, mask=l_ok, other=float("-inf"))
    return k, v, bias


@triton.jit
def _softmax_step(q, k, v, bias, m_i, l_i, acc, scale, DOT_FP32: tl.constexpr):
    """One block of the online softmax: (m, l, acc) updated with positions of scores ``q . k * scale + bias``."""
    scores = _mm(q, tl.trans(k), DOT_FP32) * scale + bias[None, :]
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible position yet: avoid -inf - -inf
    alpha = tl.exp(m_i - m_ref)
    p = _round_to(tl.exp(scores - m_ref[:, None]), v.dtype)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    acc = acc * alpha[:, None] + _mm(p, v, DOT_FP32)
    return m_new, l_i, acc


@triton.jit
def _attend_slice(q, k_base, v_base, mask_ptr, lo, hi, scale, D, offs_d, d_ok, BLOCK_G: tl.constexpr,
                  BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax of q [BLOCK_G, BLOCK_D] over positions [lo, hi): returns (m, l, acc) in fp32."""
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_L):
        k, v, bias = _load_block(k_base, v_base, mask_ptr, start, hi, D, offs_d, d_ok, BLOCK_L)
        m_i, l_i, acc = _softmax_step(q, k, v, bias, m_i, l_i, acc, scale, DOT_FP32)
    return m_i, l_i, acc


@triton.jit
def _store_output(ptrs, acc, l, ok):
    """``acc / l`` (0 where l == 0: no visible position) rounded to the output's dtype."""
    out = tl.where(l > 0.0, acc / tl.where(l > 0.0, l, 1.0), 0.0)
    tl.store(ptrs, _round_to(out, ptrs.dtype.element_ty), mask=ok)


@triton.jit
def _merge_partials(ws_m, ws_l, ws_acc, first, c0, n_cols, G, D, SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
                    RED_S: tl.constexpr):
    """Merges the SPLITS partials ``first ..`` (in order) over the columns ``c0 .. c0 + n_cols - 1`` of one kv
    head's G*D outputs (column c = g * D + d), those of one query head, whose max and sum are loaded once per
    partial. Returns (acc [BLOCK_C], l [BLOCK_C]) relative to a common max."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = tl.arange(0, BLOCK_C) < n_cols
    g_of_c = c0 // D + tl.zeros([1], dtype=tl.int32)
    m_run = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, SPLITS, RED_S):
        offs_s = s0 + tl.arange(0, RED_S)
        s_ok = (offs_s < SPLITS)[:, None]
        ok = s_ok & c_ok[None, :]
        stat_ok = s_ok
        part = first + offs_s[:, None]
        m_t = tl.load(ws_m + part * G + g_of_c[None, :], mask=stat_ok, other=float("-inf"), cache_modifier=".cg")
        l_t = tl.load(ws_l + part * G + g_of_c[None, :], mask=stat_ok, other=0.0, cache_modifier=".cg")
        a_t = tl.load(ws_acc + part * (G * D) + offs_c[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m_t, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_ref)
        w = tl.exp(m_t - m_ref[None, :])
        l_run = l_run * alpha + tl.sum(w * l_t, axis=0)
        acc = acc * alpha + tl.sum(w * a_t, axis=0)
        m_run = m_new
    return acc, l_run


@triton.jit
def _head_norm(x, x_rot, norm_ptr, offs_d, partner, d_ok, eps, norm_offset, D, OFFSET: tl.constexpr):
    """The engine's RMSNorm of each row (one head) of x [R, BLOCK_D], and the same rows at the rotary partner
    columns (x_rot): fp32 ``x * rsqrt(mean(x^2) + eps)``, then rounded and scaled by the weight (Llama / Qwen3
    order) or scaled by ``norm_offset + weight`` in fp32 and rounded (OFFSET: Gemma 3's order)."""
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    w = tl.load(norm_ptr + offs_d, mask=d_ok, other=0.0)
    w_rot = tl.load(norm_ptr + partner, mask=d_ok, other=0.0)
    if OFFSET:
        y = _round_to(xf * r * (norm_offset + w.to(tl.float32))[None, :], x.dtype)
        y_rot = _round_to(x_rot.to(tl.float32) * r * (norm_offset + w_rot.to(tl.float32))[None, :], x.dtype)
    else:
        y = _round_to(_round_to(xf * r, x.dtype).to(tl.float32) * w.to(tl.float32)[None, :], x.dtype)
        y_rot = _round_to(_round_to(x_rot.to(tl.float32) * r, x.dtype).to(tl.float32) * w_rot.to(tl.float32)[None, :],
                          x.dtype)
    return y, y_rot


@triton.jit
def _rope_rows(base, cos_ptr, sin_ptr, offs_r, r_ok, offs_d, d_ok, D, norm_ptr, eps, norm_offset,
               QK_NORM: tl.constexpr, OFFSET: tl.constexpr):
    """Rows ``base[r * D + d]`` (r in offs_r) with the half-split rotary embedding of this position applied:
    ``x * cos + rotate_half(x) * sin`` in fp32 (``rotate_half(x)[d] = -x[d + D/2]`` below D/2, ``x[d - D/2]``
    above), rounded once to the rows' dtype, as the compiled engine rounds it. QK_NORM: each row is first
    normalised (``_head_norm`` with the weight at ``norm_ptr``), as Qwen3 and Gemma 3 do before the rope."""
    half = D // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0)
    ok = r_ok[:, None] & d_ok[None, :]
    x = tl.load(base + offs_r[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    x_rot = tl.load(base + offs_r[:, None] * D + partner[None, :], mask=ok, other=0.0)
    if QK_NORM:
        x, x_rot = _head_norm(x, x_rot, norm_ptr, offs_d, partner, d_ok, eps, norm_offset, D, OFFSET)
    cos = tl.load(cos_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    y = x.to(tl.float32) * cos[None, :] + (sign[None, :] * x_rot.to(tl.float32)) * sin[None, :]
    return _round_to(y, x.dtype)


@triton.jit
def _attend_new(q, k_new, v_new, bias, m_i, l_i, acc, scale):
    """The online softmax step of one position held in registers (k_new, v_new [BLOCK_D]), same roundings
    as ``_softmax_step``."""
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale + bias
    m_new = tl.maximum(m_i, s_new)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    p = _round_to(tl.exp(s_new - m_ref), v_new.dtype)
    l_i = l_i * alpha + p.to(tl.float32)
    acc = acc * alpha[:, None] + p.to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    nv_ptr,
    out_ptr,
    ws_m,
    ws_l,
    ws_acc,
    cos_ptr,
    sin_ptr,
    qn_ptr,
    kn_ptr,
    eps,
    norm_offset,
    scale,
    L,
    G,
    D,
    knew_off,
    vnew_off,
    SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PDL: tl.constexpr,
    ROPE: tl.constexpr,
    QK_NORM: tl.constexpr = False,
    OFFSET: tl.constexpr = False,
):
    """Program (kv head h, split s); see the module docstring. q [Hq*D], caches [Hkv, L, D], out [Hq*D].

    ROPE: ``q_ptr`` is this token's un-rotated q|k|v row (q at 0, k at ``knew_off``, v at ``vnew_off``);
    the program applies the rotary embedding (``cos_ptr``, ``sin_ptr`` [D]) to q and to kv head h's new
    key, attends to cache positions below pos = n_valid - 1 and, if its slice holds pos, to the new key
    and value from registers; program (h, 0) writes them to the caches at pos. No program reads the
    caches at pos, so the write races with nothing. QK_NORM (with ROPE): q's heads and the new key are
    RMS-normalised per head first (weights ``qn_ptr`` / ``kn_ptr`` [D], ``eps``; OFFSET: scaled by
    ``norm_offset + w``), as Qwen3 and Gemma 3 do."""
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    gd_ok = g_ok[:, None] & d_ok[None, :]
    head_off = pid_h * G * D  # this kv head's G query heads are contiguous in q and out
    pdl_wait(PDL)
    lo, hi = _slice_bounds(nv_ptr, pid_s, L, SPLITS, BLOCK_L)
    kv_off = pid_h.to(tl.int64) * L * D
    if ROPE:
        q = _rope_rows(q_ptr + head_off, cos_ptr, sin_ptr, offs_g, g_ok, offs_d, d_ok, D, qn_ptr, eps, norm_offset,
                       QK_NORM, OFFSET)
        one = tl.arange(0, 1)
        k_new = tl.sum(_rope_rows(q_ptr + knew_off + pid_h * D, cos_ptr, sin_ptr, one, one < 1, offs_d, d_ok, D,
                                  kn_ptr, eps, norm_offset, QK_NORM, OFFSET), axis=0)
        v_new = tl.load(q_ptr + vnew_off + pid_h * D + offs_d, mask=d_ok, other=0.0)
        pos = hi * 0 + tl.minimum(tl.maximum(tl.load(nv_ptr).to(tl.int32), 0), L) - 1
        if pid_s == 0:
            if pos >= 0:
                tl.store(k_ptr + kv_off + pos * D + offs_d, k_new, mask=d_ok)
                tl.store(v_ptr + kv_off + pos * D + offs_d, v_new, mask=d_ok)
        m_i, l_i, acc = _attend_slice(q, k_ptr + kv_off, v_ptr + kv_off, mask_ptr, lo, tl.minimum(hi, pos), scale, D,
                                      offs_d, d_ok, BLOCK_G, BLOCK_L, BLOCK_D, DOT_FP32)
        if (pos >= lo) & (pos < hi):
            m_i, l_i, acc = _attend_new(q, k_new, v_new, tl.load(mask_ptr + pos), m_i, l_i, acc, scale)
    else:
        q = tl.load(q_ptr + head_off + offs_g[:, None] * D + offs_d[None, :], mask=gd_ok, other=0.0)
        m_i, l_i, acc = _attend_slice(q, k_ptr + kv_off, v_ptr + kv_off, mask_ptr, lo, hi, scale, D, offs_d, d_ok,
                                      BLOCK_G, BLOCK_L, BLOCK_D, DOT_FP32)
    pdl_release(PDL)
    if SPLITS == 1:
        _store_output(out_ptr + head_off + offs_g[:, None] * D + offs_d[None, :], acc, l_i[:, None], gd_ok)
    else:
        part = pid_h * SPLITS + pid_s
        tl.store(ws_m + part * G + offs_g, m_i, mask=g_ok)
        tl.store(ws_l + part * G + offs_g, l_i, mask=g_ok)
        tl.store(ws_acc + part * G * D + offs_g[:, None] * D + offs_d[None, :], acc, mask=gd_ok)


@triton.jit
def combine_partials_kernel(ws_m, ws_l, ws_acc, out_ptr, G, D, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                            RED_S: tl.constexpr, PDL: tl.constexpr):
    """Program p = query head h * G + g: merges the SPLITS partials of kv head h for query head g into
    out[p * D .. p * D + D - 1] (the partials are those ``decode_attention_kernel`` wrote just before)."""
    pid = tl.program_id(0)
    h = pid // G
    pdl_wait(PDL)
    pdl_release(PDL)
    acc, l = _merge_partials(ws_m, ws_l, ws_acc, h * SPLITS, (pid - h * G) * D, D, G, D, SPLITS, BLOCK_D, RED_S)
    offs_d = tl.arange(0, BLOCK_D)
    _store_output(out_ptr + pid * D + offs_d, acc, l, offs_d < D)
