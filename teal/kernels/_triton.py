"""Triton kernels of the fused threshold + sparse GEMV. Imported lazily: importing it imports Triton.

``y[b, n] = sum_i x[b, i] * keep_j(b, i) * w_t[i, n]`` for column ``n`` of segment ``j``, where
``keep_j(b, i) = |x[b, i]| * c[j, i] > t[j]`` (``c = 1`` without a column scale; ties are dropped).

Grid: (column blocks, row splits). A column block lies inside one segment, so one threshold (and one
scale row) applies to the whole block. Each program walks its share of the rows ``BLOCK_R`` at a time
and loads a weight row only if some batch row keeps that input entry (the union); each batch row
still multiplies by its own masked input. The loop is software-pipelined by hand: the loads of the
next chunk (input, then the weight rows it keeps) are issued before the current chunk is multiplied,
so a program always has two weight tiles in flight and the input load is off the critical path (the
compiler's pipeliner cannot pipeline a load whose mask depends on another load of the same step).

With ``SPLIT_K > 1`` each program writes an fp32 partial to a workspace and takes a ticket from a
per-block counter; the program that draws the last ticket sums the partials in a fixed order, writes
the output in the input's dtype and resets the counter for the next launch, so one launch writes
every output element, deterministically, with no zero-fill.
"""

from __future__ import annotations

import triton
import triton.language as tl

from teal.kernels._pdl_triton import pdl_release, pdl_wait


@triton.jit
def _keep(xv, cv, thr, valid):
    """Entries that survive: |x| * c > t (fp32, ties dropped), restricted to ``valid``."""
    return (tl.abs(xv).to(tl.float32) * cv > thr) & valid


@triton.jit
def _col_scale(row_ptr, offs, valid, HAS_SCALE: tl.constexpr, N: tl.constexpr):
    """The column scales ``c[offs]`` of one segment's scale row (fp32, 0 where not valid), or ones without a
    scale (the magnitude rule)."""
    cv = tl.full([N], 1.0, tl.float32)
    if HAS_SCALE:
        cv = tl.load(row_ptr + offs, mask=valid, other=0.0)
    return cv


@triton.jit
def _load_input(x_ptr, offs, valid, K, GLU: tl.constexpr):
    """Batch-1 input entries ``offs``: ``x[offs]``, or with GLU ``silu(x[offs]) * x[K + offs]`` (x the gate|up
    row, rounded as ``_silu_mul``); 0 where not valid."""
    if GLU:
        xv = _silu_mul(tl.load(x_ptr + offs, mask=valid, other=0.0), tl.load(x_ptr + K + offs, mask=valid, other=0.0))
    else:
        xv = tl.load(x_ptr + offs, mask=valid, other=0.0)
    return xv


@triton.jit
def _batch_product(acc, xm, w, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc [BB, BN] + xm [BB, BR] @ w [BR, BN]`` in fp32: tensor cores (``tl.dot``; exact fp32 products with
    DOT_FP32) or FMAs."""
    if USE_DOT:
        if DOT_FP32:
            acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xm, w, acc)
    else:
        acc += tl.sum(xm.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def sparse_gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    thr_ptr,
    scale_ptr,
    ws_ptr,
    cnt_ptr,
    sidx_ptr,
    sval_ptr,
    B,
    K,
    N,
    stride_xb,
    stride_wk,
    stride_yb,
    rows_per_split,
    off1,
    off2,
    off3,
    cb1,
    cb2,
    cb3,
    HAS_SCALE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    RED_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    RED_CHUNK: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    COMPACT: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
    GLU: tl.constexpr,
):
    """See the module docstring. GLU (batch 1 only): x is the gate|up row [2K] and the input entry i is
    ``silu(x[i]) * x[K + i]`` (the SiLU-gated product, computed where it is loaded). COMPACT: batch 1
    only (``ops._launch`` rejects it for batches)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    # Which segment this column block belongs to, and its column range.
    seg = (pid_n >= cb1).to(tl.int32) + (pid_n >= cb2).to(tl.int32) + (pid_n >= cb3).to(tl.int32)
    first_block = tl.where(seg == 0, 0, tl.where(seg == 1, cb1, tl.where(seg == 2, cb2, cb3)))
    col_start = tl.where(seg == 0, 0, tl.where(seg == 1, off1, tl.where(seg == 2, off2, off3)))
    col_end = tl.where(seg == 0, off1, tl.where(seg == 1, off2, tl.where(seg == 2, off3, N)))
    offs_n = col_start + (pid_n - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_end
    thr = tl.load(thr_ptr + seg)
    pdl_wait(PDL)

    k_start = pid_k * rows_per_split
    k_end = tl.minimum(k_start + rows_per_split, K)
    n_chunks = tl.cdiv(k_end - k_start, BLOCK_R)
    w_cols = w_ptr + offs_n[None, :]

    if BLOCK_B == 1 and COMPACT:
        # Batch 1, compacted: list this program's surviving rows (index, value) in its scratch slot,
        # then gather only those weight rows, BLOCK_R at a time: work and bytes scale with (1 - s).
        slot = (pid_k * tl.num_programs(0) + pid_n) * rows_per_split
        count = k_start * 0  # int32 scalar
        for c0 in range(k_start, k_end, CHUNK):
            offs_c = c0 + tl.arange(0, CHUNK)
            valid = offs_c < k_end
            cv = _col_scale(scale_ptr + seg * K, offs_c, valid, HAS_SCALE, CHUNK)
            xv = _load_input(x_ptr, offs_c, valid, K, GLU)
            keep = _keep(xv, cv, thr, valid)
            pos = count + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(sidx_ptr + slot + pos, offs_c, mask=keep)
            tl.store(sval_ptr + slot + pos, xv.to(tl.float32), mask=keep)
            count += tl.sum(keep.to(tl.int32), axis=0)
        tl.debug_barrier()  # the list is read back by other threads of this program
        q = tl.arange(0, BLOCK_R)
        live = q < count
        row_cur = tl.load(sidx_ptr + slot + q, mask=live, other=0, cache_modifier=".cg")
        val_cur = tl.load(sval_ptr + slot + q, mask=live, other=0.0, cache_modifier=".cg")
        w_cur = tl.load(w_cols + row_cur[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        q += BLOCK_R
        live = q < count
        row_nxt = tl.load(sidx_ptr + slot + q, mask=live, other=0, cache_modifier=".cg")
        val_nxt = tl.load(sval_ptr + slot + q, mask=live, other=0.0, cache_modifier=".cg")
        acc2 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for _ in range(0, tl.cdiv(count, BLOCK_R)):
            w_nxt = tl.load(w_cols + row_nxt[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
            q += BLOCK_R
            live2 = q < count
            row_nxt2 = tl.load(sidx_ptr + slot + q, mask=live2, other=0, cache_modifier=".cg")
            val_nxt2 = tl.load(sval_ptr + slot + q, mask=live2, other=0.0, cache_modifier=".cg")
            acc2 += val_cur[:, None] * w_cur.to(tl.float32)
            val_cur = val_nxt
            w_cur = w_nxt
            row_nxt = row_nxt2
            val_nxt = val_nxt2
            live = live2
        acc = tl.sum(acc2, axis=0)[None, :]
    elif BLOCK_B == 1 and not USE_DOT:
        # Batch 1: accumulate a [BLOCK_R, BLOCK_N] tile of products; reduce over rows once at the end.
        offs_r = k_start + tl.arange(0, BLOCK_R)
        valid = offs_r < k_end
        c_cur = _col_scale(scale_ptr + seg * K, offs_r, valid, HAS_SCALE, BLOCK_R)
        x_cur = _load_input(x_ptr, offs_r, valid, K, GLU)
        keep = _keep(x_cur, c_cur, thr, valid)
        w_cur = tl.load(w_cols + offs_r[:, None] * stride_wk, mask=keep[:, None] & n_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        xm_cur = tl.where(keep, x_cur.to(tl.float32), 0.0)
        offs_r += BLOCK_R
        valid = offs_r < k_end
        x_nxt = _load_input(x_ptr, offs_r, valid, K, GLU)
        c_nxt = c_cur
        if HAS_SCALE:
            c_nxt = tl.load(scale_ptr + seg * K + offs_r, mask=valid, other=0.0)
        acc2 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for _ in range(0, n_chunks):
            # Issue the next chunk's loads first...
            valid = offs_r < k_end
            keep = _keep(x_nxt, c_nxt, thr, valid)
            w_nxt = tl.load(w_cols + offs_r[:, None] * stride_wk, mask=keep[:, None] & n_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
            offs_r += BLOCK_R
            valid2 = offs_r < k_end
            x_nxt2 = _load_input(x_ptr, offs_r, valid2, K, GLU)
            if HAS_SCALE:
                c_nxt = tl.load(scale_ptr + seg * K + offs_r, mask=valid2, other=0.0)
            # ...then multiply the chunk that has already arrived.
            acc2 += xm_cur[:, None] * w_cur.to(tl.float32)
            xm_cur = tl.where(keep, x_nxt.to(tl.float32), 0.0)
            w_cur = w_nxt
            x_nxt = x_nxt2
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        offs_b = tl.arange(0, BLOCK_B)
        b_valid = (offs_b < B)[:, None]
        x_rows = x_ptr + offs_b[:, None] * stride_xb
        offs_r = k_start + tl.arange(0, BLOCK_R)
        valid = offs_r < k_end
        c_cur = _col_scale(scale_ptr + seg * K, offs_r, valid, HAS_SCALE, BLOCK_R)
        x_cur = tl.load(x_rows + offs_r[None, :], mask=b_valid & valid[None, :], other=0.0)
        keep = _keep(x_cur, c_cur[None, :], thr, b_valid & valid[None, :])
        union = tl.max(keep.to(tl.int32), axis=0) > 0
        w_cur = tl.load(w_cols + offs_r[:, None] * stride_wk, mask=union[:, None] & n_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        xm_cur = tl.where(keep, x_cur, tl.zeros_like(x_cur))
        offs_r += BLOCK_R
        valid = offs_r < k_end
        x_nxt = tl.load(x_rows + offs_r[None, :], mask=b_valid & valid[None, :], other=0.0)
        c_nxt = c_cur
        if HAS_SCALE:
            c_nxt = tl.load(scale_ptr + seg * K + offs_r, mask=valid, other=0.0)
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for _ in range(0, n_chunks):
            valid = offs_r < k_end
            keep = _keep(x_nxt, c_nxt[None, :], thr, b_valid & valid[None, :])
            union = tl.max(keep.to(tl.int32), axis=0) > 0
            w_nxt = tl.load(w_cols + offs_r[:, None] * stride_wk, mask=union[:, None] & n_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
            offs_r += BLOCK_R
            valid2 = offs_r < k_end
            x_nxt2 = tl.load(x_rows + offs_r[None, :], mask=b_valid & valid2[None, :], other=0.0)
            if HAS_SCALE:
                c_nxt = tl.load(scale_ptr + seg * K + offs_r, mask=valid2, other=0.0)
            acc = _batch_product(acc, xm_cur, w_cur, USE_DOT, DOT_FP32)
            xm_cur = tl.where(keep, x_nxt, tl.zeros_like(x_nxt))
            w_cur = w_nxt
            x_nxt = x_nxt2

    pdl_release(PDL)
    offs_ob = tl.arange(0, BLOCK_B)
    if SPLIT_K == 1:
        tl.store(
            y_ptr + offs_ob[:, None] * stride_yb + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(offs_ob < B)[:, None] & n_mask[None, :],
        )
    else:
        tl.store(
            ws_ptr + (pid_k * B + offs_ob[:, None]) * N + offs_n[None, :],
            acc,
            mask=(offs_ob < B)[:, None] & n_mask[None, :],
        )
        # Every thread's partial is stored before the ticket is drawn (acq_rel, device scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            offs_rb = tl.arange(0, RED_B)
            rb_mask = offs_rb < B
            total = tl.zeros([RED_B, BLOCK_N], dtype=tl.float32)
            for c in tl.static_range(0, SPLIT_K, RED_CHUNK):
                offs_s = c + tl.arange(0, RED_CHUNK)
                part = tl.load(
                    ws_ptr + ((offs_s[:, None, None] * B + offs_rb[None, :, None]) * N + offs_n[None, None, :]),
                    mask=rb_mask[None, :, None] & n_mask[None, None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                total += tl.sum(part, axis=0)
            tl.store(
                y_ptr + offs_rb[:, None] * stride_yb + offs_n[None, :],
                total.to(y_ptr.dtype.element_ty),
                mask=rb_mask[:, None] & n_mask[None, :],
            )
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def mask_input_kernel(x_ptr, xm_ptr, thr_ptr, scale_ptr, B, K, HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense fallback's input: ``xm[j * B + b, :] = x[b, :] * (|x[b, :]| * c[j, :] > t[j])``."""
    row = tl.program_id(0)
    seg = row // B
    b = row % B
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = offs < K
    xv = tl.load(x_ptr + b * K + offs, mask=valid, other=0.0)
    cv = _col_scale(scale_ptr + seg * K, offs, valid, HAS_SCALE, BLOCK_K)
    keep = _keep(xv, cv, tl.load(thr_ptr + seg), valid)
    tl.store(xm_ptr + row * K + offs, tl.where(keep, xv, tl.zeros_like(xv)), mask=valid)


# ----------------------------------------------------------------------------------------------
# Batch 1, two phases: one global compaction of the input per call, then a balanced gather GEMV.


@triton.jit
def compact_input_kernel(
    x_ptr,
    thr_ptr,
    scale_ptr,
    idx_ptr,
    val_ptr,
    xm_ptr,
    cnt_ptr,
    K,
    HAS_SCALE: tl.constexpr,
    CHUNK: tl.constexpr,
    PREFIX: tl.constexpr,
    PDL: tl.constexpr,
):
    """Phase A. Program (segment j, chunk c) lists the surviving entries of its chunk of ``x[0]``.

    Survivors of segment j are written in ascending order to ``idx[j*K + rank]`` (index) and
    ``val[j*K + rank]`` (fp32 value), where rank counts the survivors before them; the program
    first counts the survivors of all earlier chunks (``PREFIX`` entries per step), so chunks are
    independent. ``xm[j*K + i]`` receives the masked input in fp32 (the dense branch's input) and
    the last chunk writes the survivor count ``cnt[j]``.
    """
    seg = tl.program_id(0)
    chunk = tl.program_id(1)
    thr = tl.load(thr_ptr + seg)
    pdl_wait(PDL)
    pdl_release(PDL)
    start = chunk * CHUNK
    before = start * 0
    for p0 in range(0, start, PREFIX):
        offs_p = p0 + tl.arange(0, PREFIX)
        valid_p = offs_p < start
        cv_p = _col_scale(scale_ptr + seg * K, offs_p, valid_p, HAS_SCALE, PREFIX)
        xv_p = tl.load(x_ptr + offs_p, mask=valid_p, other=0.0)
        before += tl.sum(_keep(xv_p, cv_p, thr, valid_p).to(tl.int32), axis=0)
    offs = start + tl.arange(0, CHUNK)
    valid = offs < K
    cv = _col_scale(scale_ptr + seg * K, offs, valid, HAS_SCALE, CHUNK)
    xv = tl.load(x_ptr + offs, mask=valid, other=0.0)
    keep = _keep(xv, cv, thr, valid)
    kept = keep.to(tl.int32)
    rank = before + tl.cumsum(kept, axis=0) - 1
    xf = xv.to(tl.float32)
    base = seg * K
    tl.store(idx_ptr + base + rank, offs, mask=keep)
    tl.store(val_ptr + base + rank, xf, mask=keep)
    tl.store(xm_ptr + base + offs, tl.where(keep, xf, 0.0), mask=valid)
    if chunk == tl.num_programs(1) - 1:
        tl.store(cnt_ptr + seg, before + tl.sum(kept, axis=0))


@triton.jit
def gather_gemv_kernel(
    w_ptr,
    y_ptr,
    idx_ptr,
    val_ptr,
    xm_ptr,
    cnt_ptr,
    ws_ptr,
    tick_ptr,
    branch_ptr,
    K,
    N,
    stride_wk,
    split_k,
    rows_per_split,
    off1,
    off2,
    off3,
    cb1,
    cb2,
    cb3,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RED_CHUNK: tl.constexpr,
    DENSE_NUM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """Phase B. Program (column block, split p) multiplies its share of its segment's rows.

    Gather branch (survivor count ``cnt <= K * DENSE_NUM / 64``): split p takes survivors
    ``[p * per, (p + 1) * per)`` of the segment's list (``per = ceil(cnt / split_k)`` rounded up to
    ``BLOCK_R``), loads their indices and values (contiguous), then the weight rows ``w_t[idx, cols]``;
    no load's mask depends on loaded data, so the loop pipelines (``tl.range`` with ``NUM_STAGES``;
    ``NUM_STAGES == 1``: one tile prefetched by hand). Dense branch (more survivors): split p streams
    rows ``[p * rows_per_split, ...)`` of every input entry against the masked input ``xm``.
    Partials of ``split_k > 1`` are summed by the program that draws the last ticket, in a fixed order.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    seg = (pid_n >= cb1).to(tl.int32) + (pid_n >= cb2).to(tl.int32) + (pid_n >= cb3).to(tl.int32)
    first_block = tl.where(seg == 0, 0, tl.where(seg == 1, cb1, tl.where(seg == 2, cb2, cb3)))
    col_start = tl.where(seg == 0, 0, tl.where(seg == 1, off1, tl.where(seg == 2, off2, off3)))
    col_end = tl.where(seg == 0, off1, tl.where(seg == 1, off2, tl.where(seg == 2, off3, N)))
    offs_n = col_start + (pid_n - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_end
    w_cols = w_ptr + offs_n[None, :]
    base = seg * K
    pdl_wait(PDL)
    count = tl.load(cnt_ptr + seg)
    dense = count * 64 > K * DENSE_NUM
    if pid_k == 0:
        tl.store(branch_ptr + pid_n, dense.to(tl.int32))

    acc2 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    q_offs = tl.arange(0, BLOCK_R)
    if dense:
        lo = pid_k * rows_per_split
        hi = tl.minimum(lo + rows_per_split, K)
        if NUM_STAGES > 1:
            for r0 in tl.range(lo, hi, BLOCK_R, num_stages=NUM_STAGES):
                rows = r0 + q_offs
                live = rows < hi
                xv = tl.load(xm_ptr + base + rows, mask=live, other=0.0)
                w = tl.load(w_cols + rows[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
                acc2 += xv[:, None] * w.to(tl.float32)
        else:
            rows = lo + q_offs
            live = rows < hi
            xv = tl.load(xm_ptr + base + rows, mask=live, other=0.0)
            w = tl.load(w_cols + rows[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            for _ in range(lo, hi, BLOCK_R):
                rows += BLOCK_R
                live = rows < hi
                xv_next = tl.load(xm_ptr + base + rows, mask=live, other=0.0)
                w_next = tl.load(w_cols + rows[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :],
                                 other=0.0, eviction_policy="evict_first")
                acc2 += xv[:, None] * w.to(tl.float32)
                xv = xv_next
                w = w_next
    else:
        per = tl.cdiv(tl.cdiv(count, split_k), BLOCK_R) * BLOCK_R
        lo = pid_k * per
        hi = tl.minimum(lo + per, count)
        if NUM_STAGES > 1:
            for q0 in tl.range(lo, hi, BLOCK_R, num_stages=NUM_STAGES):
                q = q0 + q_offs
                live = q < hi
                rows = tl.load(idx_ptr + base + q, mask=live, other=0)
                xv = tl.load(val_ptr + base + q, mask=live, other=0.0)
                w = tl.load(w_cols + rows[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
                acc2 += xv[:, None] * w.to(tl.float32)
        else:
            q = lo + q_offs
            live = q < hi
            rows = tl.load(idx_ptr + base + q, mask=live, other=0)
            xv = tl.load(val_ptr + base + q, mask=live, other=0.0)
            w = tl.load(w_cols + rows[:, None] * stride_wk, mask=live[:, None] & n_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            q += BLOCK_R
            live_next = q < hi
            rows_next = tl.load(idx_ptr + base + q, mask=live_next, other=0)
            xv_next = tl.load(val_ptr + base + q, mask=live_next, other=0.0)
            for _ in range(lo, hi, BLOCK_R):
                w_next = tl.load(w_cols + rows_next[:, None] * stride_wk, mask=live_next[:, None] & n_mask[None, :],
                                 other=0.0, eviction_policy="evict_first")
                q += BLOCK_R
                live_after = q < hi
                rows_after = tl.load(idx_ptr + base + q, mask=live_after, other=0)
                xv_after = tl.load(val_ptr + base + q, mask=live_after, other=0.0)
                acc2 += xv[:, None] * w.to(tl.float32)
                xv = xv_next
                w = w_next
                xv_next = xv_after
                rows_next = rows_after
                live_next = live_after
    pdl_release(PDL)
    acc = tl.sum(acc2, axis=0)

    if split_k == 1:
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(ws_ptr + pid_k * N + offs_n, acc, mask=n_mask)
        # Every thread's partial is stored before the ticket is drawn (acq_rel, device scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(tick_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == split_k - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c in range(0, split_k, RED_CHUNK):
                offs_s = c + tl.arange(0, RED_CHUNK)
                part = tl.load(ws_ptr + offs_s[:, None] * N + offs_n[None, :],
                               mask=(offs_s < split_k)[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
                total += tl.sum(part, axis=0)
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(tick_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# ----------------------------------------------------------------------------------------------
# Producers: the kernel that computes an activation also writes its survivor lists in phase A's layout
# (``compact_input_kernel``: segment j's survivors ascending at ``idx/val[j*K + rank]``, the masked
# input at ``xm[j*K + i]``, the count at ``cnt[j]``), so the gather GEMV (phase B) needs no separate
# compaction launch. One program per (segment, chunk); a program finds its chunk's first rank by
# counting the survivors before its chunk itself (no cross-program communication).


@triton.jit
def _round_to(xf, dtype: tl.constexpr):
    """fp32 ``xf`` rounded to nearest-even in ``dtype``, as a PyTorch cast does.

    bf16 is rounded with integer arithmetic: Triton's CPU interpreter truncates fp32 -> bf16 casts, so
    the same code gives PyTorch's bits on the GPU and under ``TRITON_INTERPRET=1`` (finite values).
    """
    if dtype == tl.bfloat16:
        bits = xf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return xf.to(dtype)


@triton.jit
def _residual_add(x_ptr, delta_ptr, offs, valid):
    """``x + delta`` at ``offs``: added in fp32, rounded to x's dtype (the engine's ``x + delta``)."""
    xv = tl.load(x_ptr + offs, mask=valid, other=0.0)
    dv = tl.load(delta_ptr + offs, mask=valid, other=0.0)
    return _round_to(xv.to(tl.float32) + dv.to(tl.float32), xv.dtype)


@triton.jit
def _add_rmsnorm(x_ptr, delta_ptr, w_ptr, offs, valid, inv_rms, OFFSET: tl.constexpr):
    """``(x_new, h)`` at ``offs``: ``x_new = x + delta``, ``h = rms_norm(x_new) * w`` with the engine's roundings
    (OFFSET 0, Llama's: normalise in fp32, round to x's dtype; multiply by the weight in fp32, round. Otherwise
    Gemma's: multiply the fp32 norm by (OFFSET + w) in fp32, round once)."""
    x_new = _residual_add(x_ptr, delta_ptr, offs, valid)
    wv = tl.load(w_ptr + offs, mask=valid, other=0.0)
    if OFFSET == 0.0:
        normed = _round_to(x_new.to(tl.float32) * inv_rms, x_new.dtype)
        h = _round_to(normed.to(tl.float32) * wv.to(tl.float32), x_new.dtype)
    else:
        h = _round_to(x_new.to(tl.float32) * inv_rms * (OFFSET + wv.to(tl.float32)), x_new.dtype)
    return x_new, h


@triton.jit
def _list_chunk(xv, cv, thr, offs, valid, before, base, is_last, cnt_slot, idx_ptr, val_ptr, xm_ptr):
    """Lists one chunk's survivors in the global layout: ``idx/val[base + before + r]`` (ascending; ``before``
    survivors precede the chunk), ``xm[base + offs]`` the masked input (fp32); the last chunk stores the
    segment's count to ``*cnt_slot``."""
    keep = _keep(xv, cv, thr, valid)
    kept = keep.to(tl.int32)
    rank = before + tl.cumsum(kept, axis=0) - 1
    xf = xv.to(tl.float32)
    tl.store(idx_ptr + base + rank, offs, mask=keep)
    tl.store(val_ptr + base + rank, xf, mask=keep)
    tl.store(xm_ptr + base + offs, tl.where(keep, xf, 0.0), mask=valid)
    if is_last:
        tl.store(cnt_slot, before + tl.sum(kept, axis=0))


@triton.jit
def add_rmsnorm_compact_kernel(
    x_ptr,
    delta_ptr,
    w_ptr,
    thr_ptr,
    scale_ptr,
    xnew_ptr,
    h_ptr,
    idx_ptr,
    val_ptr,
    xm_ptr,
    cnt_ptr,
    K,
    eps,
    HAS_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
    OFFSET: tl.constexpr = 0.0,
):
    """Residual add + RMSNorm of one token, and the survivor lists of the normalised input (global layout).
    OFFSET: the norm weight is used as (OFFSET + w) with Gemma's rounding (see ``_add_rmsnorm``).

    Program (segment j, chunk c) loads the whole row once (one block, ``BLOCK_K >= K``): the sum of
    squares of ``x_new = x + delta``, then ``h`` of the whole row, of which it counts the entries below
    its chunk's start that survive segment j's rule (a masked sum; with a column scale it loads the
    part of segment j's scale row before its chunk). It then recomputes ``h`` on its chunk (same
    operations, same bits) and lists the chunk's survivors at ranks ``before + local rank``; the last
    chunk stores ``cnt[j]``. Programs of segment 0 also store ``x_new`` and ``h`` of their chunk.
    """
    seg = tl.program_id(0)
    chunk = tl.program_id(1)
    thr = tl.load(thr_ptr + seg)
    start = chunk * CHUNK
    offs_row = tl.arange(0, BLOCK_K)
    pdl_wait(PDL)
    pdl_release(PDL)
    row_valid = offs_row < K
    xf_row = _residual_add(x_ptr, delta_ptr, offs_row, row_valid).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf_row * xf_row, axis=0) / K + eps)
    _, h_row = _add_rmsnorm(x_ptr, delta_ptr, w_ptr, offs_row, row_valid, inv_rms, OFFSET)
    earlier = offs_row < start
    cv_row = _col_scale(scale_ptr + seg * K, offs_row, earlier, HAS_SCALE, BLOCK_K)
    before = tl.sum(_keep(h_row, cv_row, thr, earlier).to(tl.int32), axis=0)
    offs = start + tl.arange(0, CHUNK)
    valid = offs < K
    x_new, h = _add_rmsnorm(x_ptr, delta_ptr, w_ptr, offs, valid, inv_rms, OFFSET)
    if seg == 0:
        tl.store(xnew_ptr + offs, x_new, mask=valid)
        tl.store(h_ptr + offs, h, mask=valid)
    cv = _col_scale(scale_ptr + seg * K, offs, valid, HAS_SCALE, CHUNK)
    _list_chunk(h, cv, thr, offs, valid, before, seg * K, chunk == tl.num_programs(1) - 1, cnt_ptr + seg,
                idx_ptr, val_ptr, xm_ptr)


@triton.jit
def _silu_mul(g, u):
    """``silu(g) * u`` with eager PyTorch's roundings: silu in fp32 rounded to g's dtype, product in fp32,
    rounded (fp32 inputs: exp may differ from PyTorch's by an ulp)."""
    gf = g.to(tl.float32)
    act = _round_to(gf / (1.0 + tl.exp(-gf)), g.dtype)
    return _round_to(act.to(tl.float32) * u.to(tl.float32), g.dtype)


@triton.jit
def silu_mul_compact_kernel(
    gu_ptr,
    mid_ptr,
    thr_ptr,
    scale_ptr,
    idx_ptr,
    val_ptr,
    xm_ptr,
    cnt_ptr,
    K,
    HAS_SCALE: tl.constexpr,
    CHUNK: tl.constexpr,
    PREFIX: tl.constexpr,
    PDL: tl.constexpr,
):
    """SiLU-gated product of one token, ``mid = silu(gate) * up`` from ``gu = gate | up`` [2K], and the
    survivor list of ``mid`` (one segment, global layout).

    Program c first counts the survivors of the entries before its chunk, recomputing ``mid`` there
    ``PREFIX`` entries per step (each thread evaluates ``PREFIX / (32 * num_warps)`` exponentials per
    step), then computes and stores ``mid`` on its chunk and lists the chunk's survivors at ranks
    ``before + local rank``; the last chunk stores ``cnt[0]``. Same operations in both places, so the
    prefix sees the same bits as the chunk that lists them.
    """
    chunk = tl.program_id(0)
    thr = tl.load(thr_ptr)
    pdl_wait(PDL)
    pdl_release(PDL)
    start = chunk * CHUNK
    before = start * 0
    for p0 in range(0, start, PREFIX):
        offs_p = p0 + tl.arange(0, PREFIX)
        valid_p = offs_p < start
        cv_p = _col_scale(scale_ptr, offs_p, valid_p, HAS_SCALE, PREFIX)
        mid_p = _silu_mul(tl.load(gu_ptr + offs_p, mask=valid_p, other=0.0),
                          tl.load(gu_ptr + K + offs_p, mask=valid_p, other=0.0))
        before += tl.sum(_keep(mid_p, cv_p, thr, valid_p).to(tl.int32), axis=0)
    offs = start + tl.arange(0, CHUNK)
    valid = offs < K
    cv = _col_scale(scale_ptr, offs, valid, HAS_SCALE, CHUNK)
    mid = _silu_mul(tl.load(gu_ptr + offs, mask=valid, other=0.0), tl.load(gu_ptr + K + offs, mask=valid, other=0.0))
    tl.store(mid_ptr + offs, mid, mask=valid)
    _list_chunk(mid, cv, thr, offs, valid, before, 0, chunk == tl.num_programs(0) - 1, cnt_ptr, idx_ptr, val_ptr,
                xm_ptr)
