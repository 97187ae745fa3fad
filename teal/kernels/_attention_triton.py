"""Triton kernel of ``teal::decode_attention`` (split-KV "flash-decoding"). Imported lazily: imports Triton.

One query token attends to the first ``n_valid`` positions of a static KV cache [Hkv, L, D]. Grid
(Hkv, SPLITS): program (h, s) handles the G = Hq / Hkv query heads that share kv head h, over its slice
of positions. The slice length is set in the kernel from ``n_valid`` (a device tensor), so every
program has work at any context length and nothing depends on the host:
``chunk = BLOCK_L * ceil(ceil(n_valid / SPLITS) / BLOCK_L)``, slice ``[s * chunk, min((s + 1) * chunk,
n_valid))``; positions at or past ``n_valid`` are never read. Each program runs an online softmax in
fp32 over ``BLOCK_L`` positions per step (scores ``q . k * scale + mask`` in fp32, exponentials
rounded to the cache's dtype before the product with V, as the reference rounds its probabilities)
and writes its partial (running max m, sum l, unnormalised acc [G, D]) to a workspace; programs
whose slice is empty write nothing. Every program then draws a ticket from its kv head's counter; the
one that draws the last ticket merges the partials of the non-empty slices in a fixed order (so the
result is deterministic), writes ``acc / l`` (0 where l == 0: no visible position) and resets the
counter for the next launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from teal.kernels._triton import _round_to


@triton.jit
def _slice_bounds(nv_ptr, pid_s, L, SPLITS: tl.constexpr, BLOCK_L: tl.constexpr):
    """(n, chunk, lo, hi): visible length n (clamped to [0, L]), positions per slice, this slice."""
    n = tl.minimum(tl.maximum(tl.load(nv_ptr).to(tl.int32), 0), L)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_L) * BLOCK_L, BLOCK_L)
    lo = pid_s * chunk
    return n, chunk, lo, tl.minimum(lo + chunk, n)


@triton.jit
def _attend_slice(q, k_base, v_base, mask_ptr, lo, hi, scale, D,
                  offs_d, d_ok, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    """Online softmax of q [BLOCK_G, BLOCK_D] over positions [lo, hi): returns (m, l, acc) in fp32."""
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < hi
        kt = tl.load(k_base + offs_l[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & l_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_l[:, None] * D + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        bias = tl.load(mask_ptr + offs_l, mask=l_ok, other=float("-inf"))
        if DOT_FP32:
            raw = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            raw = tl.dot(q, kt)
        scores = raw * scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible position yet: avoid -inf - -inf
        alpha = tl.exp(m_i - m_ref)
        p = _round_to(tl.exp(scores - m_ref[:, None]), v.dtype)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
        if DOT_FP32:
            pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _merge_partials(ws_m, ws_l, ws_acc, first, count, G, D,
                    BLOCK_GD: tl.constexpr, RED_S: tl.constexpr):
    """Merges partials ``first .. first + count - 1`` (in order) of the G*D outputs of one kv head.

    Columns c = g * D + d; returns (acc [BLOCK_GD], l [BLOCK_GD]) relative to a common max.
    """
    offs_c = tl.arange(0, BLOCK_GD)
    c_ok = offs_c < G * D
    g_of_c = offs_c // D
    m_run = tl.full([BLOCK_GD], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_GD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_GD], dtype=tl.float32)
    for s0 in range(0, count, RED_S):
        offs_s = s0 + tl.arange(0, RED_S)
        ok = (offs_s < count)[:, None] & c_ok[None, :]
        part = first + offs_s[:, None]
        m_t = tl.load(ws_m + part * G + g_of_c[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_t = tl.load(ws_l + part * G + g_of_c[None, :], mask=ok, other=0.0, cache_modifier=".cg")
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
    tick_ptr,
    scale,
    L,
    G,
    D,
    SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_GD: tl.constexpr,
    RED_S: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Program (kv head h, split s); see the module docstring. q [Hq*D], caches [Hkv, L, D], out [Hq*D]."""
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    n, chunk, lo, hi = _slice_bounds(nv_ptr, pid_s, L, SPLITS, BLOCK_L)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    gd_ok = g_ok[:, None] & d_ok[None, :]
    head_off = pid_h * G * D  # this kv head's G query heads are contiguous in q and out
    if lo < hi:
        q = tl.load(q_ptr + head_off + offs_g[:, None] * D + offs_d[None, :], mask=gd_ok, other=0.0)
        kv_off = pid_h.to(tl.int64) * L * D
        m_i, l_i, acc = _attend_slice(q, k_ptr + kv_off, v_ptr + kv_off, mask_ptr, lo, hi, scale, D, offs_d, d_ok,
                                      BLOCK_G, BLOCK_L, BLOCK_D, DOT_FP32)
        part = pid_h * SPLITS + pid_s
        tl.store(ws_m + part * G + offs_g, m_i, mask=g_ok)
        tl.store(ws_l + part * G + offs_g, l_i, mask=g_ok)
        tl.store(ws_acc + part * G * D + offs_g[:, None] * D + offs_d[None, :], acc, mask=gd_ok)
    # Every thread's partial is stored before the ticket is drawn (acq_rel, device scope).
    tl.debug_barrier()
    ticket = tl.atomic_add(tick_ptr + pid_h, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLITS - 1:
        acc_c, l_c = _merge_partials(ws_m, ws_l, ws_acc, pid_h * SPLITS, tl.cdiv(n, chunk), G, D, BLOCK_GD, RED_S)
        out = tl.where(l_c > 0.0, acc_c / tl.where(l_c > 0.0, l_c, 1.0), 0.0)
        offs_c = tl.arange(0, BLOCK_GD)
        tl.store(out_ptr + head_off + offs_c, _round_to(out, out_ptr.dtype.element_ty), mask=offs_c < G * D)
        tl.atomic_xchg(tick_ptr + pid_h, 0, sem="relaxed", scope="gpu")
