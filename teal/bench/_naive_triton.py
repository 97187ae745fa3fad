"""Triton kernel of the naive baseline (``teal.bench.naive``). Importing it imports Triton.

One program multiplies a [BLOCK_K] slice of one input row by a [BLOCK_K, BLOCK_N] weight tile of one
segment: the rows whose input entry survives the segment's threshold (``|x_k| > t``) are loaded, the
others are masked off (not read), and the fp32 partial sum over k is added atomically into the fp32
accumulator. ``naive_sparse_gemv_kernel`` takes fixed tiles (the Triton interpreter);
``naive_sparse_gemv_autotuned`` picks them with ``triton.autotune`` (CUDA).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def naive_sparse_gemv_kernel(x_ptr, w_ptr, acc_ptr, thr_ptr, K, N, stride_x, stride_w, stride_acc,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc[b, n] += sum_k [|x[b, k]| > t] x[b, k] w[k, n] over this program's k slice (one segment)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    n_mask = offs_n < N
    t = tl.load(thr_ptr)
    xv = tl.load(x_ptr + b * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    keep = (tl.abs(xv) > t) & k_mask  # 1-D row mask: dropped rows of the weight tile are not read
    w = tl.load(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], mask=keep[:, None] & n_mask[None, :],
                other=0.0)
    part = tl.sum(tl.where(keep, xv, 0.0)[:, None] * w.to(tl.float32), axis=0)
    tl.atomic_add(acc_ptr + b * stride_acc + offs_n, part, mask=n_mask, sem="relaxed")


def _configs() -> list[triton.Config]:
    """Tiles for a memory-bound split-K GEMV: 64 or 128 weight elements per thread."""
    shapes = [
        (16, 256, 2), (16, 512, 4),
        (32, 128, 2), (32, 256, 4), (32, 512, 4), (32, 512, 8),
        (64, 64, 2), (64, 128, 4), (64, 256, 4), (64, 256, 8), (64, 512, 8),
        (128, 64, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8),
    ]
    return [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=warps) for bk, bn, warps in shapes]


# The accumulator passed is the segment's column slice of the fp32 buffer: reset_to_zero clears that
# slice only (the other segments' sums survive), and the autotuning runs leave it zero again.
naive_sparse_gemv_autotuned = triton.autotune(configs=_configs(), key=["K", "N"], reset_to_zero=["acc_ptr"])(
    naive_sparse_gemv_kernel
)
