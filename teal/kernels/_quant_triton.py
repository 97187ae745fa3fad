"""Triton kernels on int8 / int4 weights: the fused threshold + dequantize + sparse GEMV (1-8 rows), and the
one-pass dequantize that the large-batch path (``quant_gemv.dequant_matmul``) multiplies with cuBLAS.

``y[b, n] = sum_i x[b, i] * keep_j(b, i) * W(i, n)`` for column ``n`` of segment ``j``, where ``W`` is the
dequantized transposed weight (``teal.quant``) and ``keep_j(b, i) = |x[b, i]| * c[j, i] > t[j]``.

Grid: (column blocks, row splits). Every column block lies inside one segment (the host tiles each
segment on its own and passes a block → (segment, first column) table), so one threshold and one scale
row apply to a whole block. A program walks its rows ``BLOCK_R`` at a time and loads a row's codes
(and the scale/zero row of its group) only where some batch row keeps that input entry; each batch row
multiplies by its own masked input. Row splits add fp32 partials into a zeroed buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def quant_sparse_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, y_ptr, thr_ptr, cscale_ptr, blk_seg_ptr, blk_col_ptr, seg_end_ptr,
    B, K, rows_per_split, stride_xb, stride_codes, stride_scales, stride_yb,
    INT4: tl.constexpr, GROUP: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg = tl.load(blk_seg_ptr + pid_n)
    col0 = tl.load(blk_col_ptr + pid_n)
    seg_end = tl.load(seg_end_ptr + seg)
    thr = tl.load(thr_ptr + seg)

    cols = col0 + tl.arange(0, BLOCK_N)
    n_mask = cols < seg_end
    b = tl.arange(0, BLOCK_B)
    b_valid = b < B
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)

    r_start = pid_k * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, K)
    for r0 in range(r_start, r_stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_valid = rows < r_stop
        xv = tl.load(x_ptr + b[:, None] * stride_xb + rows[None, :], mask=b_valid[:, None] & r_valid[None, :],
                     other=0.0).to(tl.float32)
        if HAS_SCALE:
            cv = tl.load(cscale_ptr + seg * K + rows, mask=r_valid, other=0.0)
        else:
            cv = tl.full([BLOCK_R], 1.0, tl.float32)
        keep = (tl.abs(xv) * cv[None, :] > thr) & b_valid[:, None] & r_valid[None, :]
        xm = tl.where(keep, xv, 0.0)
        live = tl.max(keep.to(tl.int32), axis=0) > 0  # the union over batch rows: rows whose codes are read
        wmask = live[:, None] & n_mask[None, :]
        if INT4:
            byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (cols // 2)[None, :], mask=wmask, other=0)
            q = ((byte.to(tl.int32) >> ((cols % 2) * 4)[None, :]) & 0xF).to(tl.float32)
            g = rows // GROUP
            s = tl.load(scales_ptr + g[:, None] * stride_scales + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g[:, None] * stride_scales + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
            w = (q - z) * s
        else:
            q = tl.load(codes_ptr + rows[:, None] * stride_codes + cols[None, :], mask=wmask, other=0).to(tl.float32)
            w = q  # the per-column scale is applied once, after the sum
        acc += tl.sum(xm[:, :, None] * w[None, :, :], axis=1)

    if not INT4:
        acc = acc * tl.load(scales_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + b[:, None] * stride_yb + cols[None, :]
    tl.atomic_add(out, acc, mask=b_valid[:, None] & n_mask[None, :])


@triton.jit
def dequantize_kernel(
    codes_ptr, scales_ptr, zeros_ptr, out_ptr, K, N, stride_codes, stride_scales, stride_out,
    INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[i, n] = W(i, n)`` (``teal.quant.dequantize``: fp32 arithmetic, one rounding to nearest into ``out``'s
    dtype; Triton 3.9's interpreter truncates fp32 -> bf16 instead, so there bf16 may differ by one unit).

    Grid: (row blocks, column blocks). ``BLOCK_K`` divides ``GROUP``, so a program's rows share one int4
    group and it loads one scale row (and zero row) for its columns. int4 lanes of a code byte's two columns
    load that byte alike (adjacent lanes: one transaction)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < K
    n_mask = cols < N
    mask = r_mask[:, None] & n_mask[None, :]
    if INT4:
        g = (pid_k * BLOCK_K) // GROUP
        s = tl.load(scales_ptr + g * stride_scales + cols, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g * stride_scales + cols, mask=n_mask, other=0.0).to(tl.float32)
        byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (cols // 2)[None, :], mask=mask, other=0)
        q = ((byte.to(tl.int32) >> ((cols % 2) * 4)[None, :]) & 0xF).to(tl.float32)
        w = (q - z[None, :]) * s[None, :]
    else:
        s = tl.load(scales_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
        q = tl.load(codes_ptr + rows[:, None] * stride_codes + cols[None, :], mask=mask, other=0).to(tl.float32)
        w = q * s[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
