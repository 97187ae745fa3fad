"""Fused threshold + dequantize + sparse GEMV on int8 / int4 weights (``teal.quant`` formats).

``quant_sparse_linear(x, qw, thresholds, split_sizes)`` is the same operation as
``teal.kernels.ops.sparse_linear`` with the transposed weight replaced by its quantized codes: the
columns of ``qw`` are cut into segments (q|k|v, gate|up), segment ``j`` keeps ``|x_i| * c[j, i] > t[j]``.
``quant_sparse_linear_reference`` is the plain-torch definition (dequantize, mask, multiply); the Triton
entry ``quant_sparse_linear_triton`` runs on GPUs and under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from teal.quant import QuantizedWeight

MAX_BATCH = 8


def _check(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor, split_sizes: Sequence[int],
           col_scale: torch.Tensor | None) -> None:
    k, n = qw.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [B, {k}], got {list(x.shape)}")
    if sum(split_sizes) != n or any(s <= 0 for s in split_sizes):
        raise ValueError(f"split_sizes {list(split_sizes)} must be positive and sum to N={n}")
    if thresholds.numel() != len(split_sizes):
        raise ValueError(f"need one threshold per segment ({len(split_sizes)}), got {thresholds.numel()}")
    if col_scale is not None and tuple(col_scale.shape) != (len(split_sizes), k):
        raise ValueError(f"col_scale must be [{len(split_sizes)}, {k}], got {list(col_scale.shape)}")


def quant_sparse_linear_reference(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor,
                                  split_sizes: Sequence[int], col_scale: torch.Tensor | None = None,
                                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain torch: per segment, mask ``x`` by its rule and multiply by the dequantized columns."""
    _check(x, qw, thresholds, split_sizes, col_scale)
    w = qw.dequantize(compute_dtype)
    xs = x.to(compute_dtype)
    outs, start = [], 0
    for j, width in enumerate(split_sizes):
        score = xs.abs() * (col_scale[j].to(compute_dtype) if col_scale is not None else 1.0)
        xm = torch.where(score > thresholds[j].to(compute_dtype), xs, torch.zeros_like(xs))
        outs.append(xm @ w[:, start:start + width])
        start += width
    return torch.cat(outs, dim=1).to(x.dtype)


@functools.lru_cache(maxsize=256)
def _block_table(split_sizes: tuple[int, ...], block_n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per column block its segment and first column, and each segment's end (cached: a CUDA graph capture
    may not copy from the host)."""
    seg, col, ends, start = [], [], [], 0
    for j, width in enumerate(split_sizes):
        for c in range(start, start + width, block_n):
            seg.append(j)
            col.append(c)
        start += width
        ends.append(start)
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_i32(seg), as_i32(col), as_i32(ends)


def quant_sparse_linear_triton(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor,
                               split_sizes: Sequence[int], col_scale: torch.Tensor | None = None, *,
                               block_r: int = 32, block_n: int = 64, split_k: int | None = None) -> torch.Tensor:
    """The Triton kernel (``teal.kernels._quant_triton``); x [B <= 8, K] contiguous."""
    import triton

    from teal.kernels._quant_triton import quant_sparse_gemv_kernel

    _check(x, qw, thresholds, split_sizes, col_scale)
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"the quantized kernel takes at most {MAX_BATCH} rows, got {x.shape[0]}")
    x = x.contiguous()
    k, n = qw.shape
    seg, col, ends = _block_table(tuple(split_sizes), block_n, x.device)
    if split_k is None:  # enough programs to cover the GPU at batch 1; one split in the interpreter
        split_k = 1 if x.device.type == "cpu" else max(1, min(16, 4 * 132 // max(1, seg.numel()), k // 256))
    rows_per_split = -(-k // split_k)
    rows_per_split = -(-rows_per_split // block_r) * block_r
    split_k = -(-k // rows_per_split)
    y = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    thr = thresholds.to(device=x.device, dtype=torch.float32).contiguous()
    cs = col_scale.to(device=x.device, dtype=torch.float32).contiguous() if col_scale is not None else thr
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    quant_sparse_gemv_kernel[(seg.numel(), split_k)](
        x, qw.codes, qw.scales, zeros, y, thr, cs, seg, col, ends,
        x.shape[0], k, rows_per_split, x.stride(0), qw.codes.stride(0),
        qw.scales.stride(0) if qw.format == "int4" else 0, y.stride(0),
        INT4=qw.format == "int4", GROUP=max(1, qw.group_size), HAS_SCALE=col_scale is not None,
        BLOCK_B=max(2, triton.next_power_of_2(x.shape[0])), BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return y.to(x.dtype)


def quant_sparse_linear(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor,
                        split_sizes: Sequence[int], col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA for 1-8 rows, else the reference (prefill, CPU)."""
    if x.is_cuda and x.shape[0] <= MAX_BATCH:
        return quant_sparse_linear_triton(x, qw, thresholds, split_sizes, col_scale)
    return quant_sparse_linear_reference(x, qw, thresholds, split_sizes, col_scale)
