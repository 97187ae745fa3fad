"""Triton kernel of the naive baseline (``teal.kernels.naive``). Importing it imports Triton."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def naive_sparse_gemv_kernel(x_ptr, w_ptr, acc_ptr, thr_ptr, K, N, off1, off2,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    n_mask = offs_n < N
    seg = (offs_n >= off1).to(tl.int32) + (offs_n >= off2).to(tl.int32)
    thr = tl.load(thr_ptr + seg, mask=n_mask, other=0.0)
    xv = tl.load(x_ptr + b * K + offs_k, mask=k_mask, other=0.0)
    keep = (tl.abs(xv).to(tl.float32)[:, None] > thr[None, :]) & k_mask[:, None] & n_mask[None, :]
    w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep, other=0.0)
    part = tl.sum(tl.where(keep, xv.to(tl.float32)[:, None], 0.0) * w.to(tl.float32), axis=0)
    tl.atomic_add(acc_ptr + b * N + offs_n, part, mask=n_mask)
