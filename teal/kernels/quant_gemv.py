"""Fused threshold + dequantize + sparse GEMV on int8 / int4 weights (``teal.quant`` formats).

``quant_sparse_linear(x, qw, thresholds, split_sizes)`` is the same operation as
``teal.kernels.ops.sparse_linear`` with the transposed weight replaced by its quantized codes: the
columns of ``qw`` are cut into segments (q|k|v, gate|up), segment ``j`` keeps ``|x_i| * c[j, i] > t[j]``.
``quant_sparse_linear_reference`` is the plain-torch definition (dequantize, mask, multiply). Two kernels:
``quant_sparse_linear_cuda``, the CUDA C++ sparse GEMV's int8 / int4 variants (``sparse_gemv.cu`` with
``WFMT``; compute capability 9.0+, NVRTC), and ``quant_sparse_linear_triton``, which runs on any CUDA GPU
and under ``TRITON_INTERPRET=1``; both for 1-8 rows. Above 8 rows (prefill, large batches)
``dequant_matmul`` dequantizes the weight in one pass (``dequantize_triton`` on CUDA) and multiplies with
``torch.matmul`` (cuBLAS). ``quant_sparse_linear`` is one custom op (``teal::quant_sparse_linear``, opaque to
``torch.compile`` and captured by CUDA graphs) whose dispatch is, by rows B and device:

- B <= 8 on CUDA: the CUDA kernel where it applies (``$TEAL_QUANT_KERNEL`` chooses), else Triton;
- B > 8 (any device): ``dequant_matmul`` (``$TEAL_QUANT_LARGE_BATCH=reference`` takes the reference instead,
  for before/after measurements);
- B <= 8 elsewhere (CPU): the reference.

``path_counts`` counts the calls of each path ("cuda", "triton", "dequant-matmul", "reference").
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Optional

import torch

from teal.kernels.configs import KernelConfig, quant_cuda_config
from teal.quant import QuantizedWeight

MAX_BATCH = 8


def _check(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor | None, split_sizes: Sequence[int],
           col_scale: torch.Tensor | None) -> None:
    k, n = qw.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [B, {k}], got {list(x.shape)}")
    if sum(split_sizes) != n or any(s <= 0 for s in split_sizes):
        raise ValueError(f"split_sizes {list(split_sizes)} must be positive and sum to N={n}")
    if thresholds is not None and thresholds.numel() != len(split_sizes):
        raise ValueError(f"need one threshold per segment ({len(split_sizes)}), got {thresholds.numel()}")
    if col_scale is not None and tuple(col_scale.shape) != (len(split_sizes), k):
        raise ValueError(f"col_scale must be [{len(split_sizes)}, {k}], got {list(col_scale.shape)}")


def _dense_thresholds(thresholds: torch.Tensor | None, split_sizes: Sequence[int],
                      device: torch.device) -> torch.Tensor:
    """``thresholds``, or -inf per segment where None (dense: every entry kept)."""
    if thresholds is not None:
        return thresholds
    return torch.full((len(split_sizes),), float("-inf"), device=device)


def quant_sparse_linear_reference(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor | None,
                                  split_sizes: Sequence[int], col_scale: torch.Tensor | None = None,
                                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain torch: per segment, mask ``x`` by its rule and multiply by the dequantized columns (``thresholds``
    None: dense)."""
    _check(x, qw, thresholds, split_sizes, col_scale)
    thresholds = _dense_thresholds(thresholds, split_sizes, x.device)
    w = qw.dequantize(compute_dtype)
    xs = x.to(compute_dtype)
    outs, start = [], 0
    for j, width in enumerate(split_sizes):
        score = xs.abs() * (col_scale[j].to(compute_dtype) if col_scale is not None else 1.0)
        xm = torch.where(score > thresholds[j].to(compute_dtype), xs, torch.zeros_like(xs))
        outs.append(xm @ w[:, start:start + width])
        start += width
    return torch.cat(outs, dim=1).to(x.dtype)


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype, *, block_k: int = 32,
                      block_n: int = 256) -> torch.Tensor:
    """The transposed weight [K, N] in ``dtype``, in one Triton pass (``_quant_triton.dequantize_kernel``):
    the same values as ``qw.dequantize(dtype)`` (fp32 arithmetic, one rounding), which takes several torch
    passes with [K, N] fp32 temporaries. Reads the codes (K·N or K·N/2 bytes) and the scales (and zeros),
    writes K·N elements of ``dtype``. ``block_k`` must divide the int4 group (one scale row per program)."""
    import triton

    from teal.kernels._quant_triton import dequantize_kernel

    k, n = qw.shape
    if qw.format == "int4" and qw.group_size % block_k:
        raise ValueError(f"block_k={block_k} must divide the int4 group size {qw.group_size}")
    out = torch.empty(k, n, dtype=dtype, device=qw.device)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qw.codes, qw.scales, zeros, out, k, n, qw.codes.stride(0),
        qw.scales.stride(0) if qw.format == "int4" else 0, out.stride(0),
        INT4=qw.format == "int4", GROUP=max(1, qw.group_size), BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out


def dequant_matmul(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor | None,
                   split_sizes: Sequence[int], col_scale: torch.Tensor | None = None, *,
                   triton: bool | None = None) -> torch.Tensor:
    """The large-batch path (B > 8 rows: prefill, batched decode): dequantize, then a cuBLAS GEMM.

    The weight is dequantized to ``x``'s dtype in one pass (``dequantize_triton`` on CUDA or where ``triton``
    says so, as tests do under ``TRITON_INTERPRET=1``; else ``qw.dequantize``; the same values HF's ``teal.quant.QuantLinear`` multiplies by) into a temporary of this call
    only (no dequantized copy is kept: that would erase the memory saving). Thresholded inputs are masked
    first, per segment (``|x_i| * c[j, i] > t[j]``), and each segment multiplies its columns; ``thresholds``
    None is dense, one GEMM.

    Expected cost of one call on a [K, N] weight and B rows, e bytes per element of ``x``'s dtype (2 for bf16):
    the dequantize reads the codes (K·N int8, K·N/2 int4) plus scales (and zeros: 2·e·N·K/group int4) and
    writes K·N·e; the GEMM reads K·N·e and B·K·e and writes B·N·e. Per weight element that is 1 + 2e = 5
    bytes (int8) or 0.5 + 2e (+ 2e/group) = 4.53 bytes (int4, group 128), against e = 2 for the bf16 GEMM,
    at the same 2·B·K·N flops: up to B of a few hundred rows an H100 GEMM is bandwidth-bound, so about 2.3-2.5x
    the bf16 GEMM's time, still a GEMM's, not a loop of small ops. torch's ``_weight_int8pack_mm`` wants the
    weight as [N, K] and ``_weight_int4pack_mm`` its own tiled packing with zero-as-offset, neither our
    transposed row layout: using them would mean a second copy of the codes.
    """
    _check(x, qw, thresholds, split_sizes, col_scale)
    use_triton = x.is_cuda if triton is None else triton
    w = dequantize_triton(qw, x.dtype) if use_triton else qw.dequantize(x.dtype)
    if thresholds is None:
        return x @ w
    score = x.abs().float()
    thr = thresholds.to(device=x.device, dtype=torch.float32)
    outs, start = [], 0
    for j, width in enumerate(split_sizes):
        keep = (score * col_scale[j].to(device=x.device, dtype=torch.float32) if col_scale is not None
                else score) > thr[j]
        outs.append(torch.where(keep, x, 0) @ w[:, start:start + width])
        start += width
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


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


def quant_sparse_linear_cuda(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor,
                             split_sizes: Sequence[int], col_scale: torch.Tensor | None = None, *,
                             config: KernelConfig | None = None) -> torch.Tensor:
    """The CUDA C++ kernel (``teal.kernels.cuda.launch_quant``); x [B <= 8, K]. Raises ValueError naming why
    where it does not apply (``cuda.unsupported_quant_reason``)."""
    from teal.kernels import cuda, ops

    _check(x, qw, thresholds, split_sizes, col_scale)
    x = x.contiguous()
    k, n = qw.shape
    config = config or quant_cuda_config(k, n, x.shape[0], ops.sm_count(x.device), qw.format)
    reason = cuda.unsupported_quant_reason(x, qw, list(split_sizes), config)
    if reason is not None:
        raise ValueError(f"the CUDA quantized kernel does not apply: {reason}")
    return _launch_cuda(x, qw, thresholds, split_sizes, col_scale, config)


def _launch_cuda(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor, split_sizes: Sequence[int],
                 col_scale: torch.Tensor | None, config: KernelConfig) -> torch.Tensor:
    """The launch of ``quant_sparse_linear_cuda`` once ``cuda.unsupported_quant_reason`` said None (x contiguous)."""
    from teal.kernels import cuda, ops

    n = qw.shape[1]
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    thr = thresholds.to(device=x.device, dtype=torch.float32).contiguous()
    cs = col_scale.to(device=x.device, dtype=torch.float32).contiguous() if col_scale is not None else None
    cuda.launch_quant(x, qw, y, thr, cs, list(split_sizes), config, pdl=ops.cuda_pdl_mode(x.device))
    return y


#: ``$TEAL_QUANT_KERNEL``: "auto" (default: CUDA C++ where it applies, else Triton), "cuda" or "triton".
QUANT_KERNEL_ENV = "TEAL_QUANT_KERNEL"


def quant_kernel_choice() -> str:
    choice = os.environ.get(QUANT_KERNEL_ENV, "auto")
    if choice not in ("auto", "cuda", "triton"):
        raise ValueError(f"${QUANT_KERNEL_ENV} must be auto, cuda or triton, got {choice!r}")
    return choice


#: ``$TEAL_QUANT_LARGE_BATCH``: the path above ``MAX_BATCH`` rows, "dequant-matmul" (default) or "reference"
#: (the plain-torch float32 definition: several [K, N] fp32 passes and an fp32 GEMM; for before/after timings).
QUANT_LARGE_BATCH_ENV = "TEAL_QUANT_LARGE_BATCH"


def large_batch_choice() -> str:
    choice = os.environ.get(QUANT_LARGE_BATCH_ENV, "dequant-matmul")
    if choice not in ("dequant-matmul", "reference"):
        raise ValueError(f"${QUANT_LARGE_BATCH_ENV} must be dequant-matmul or reference, got {choice!r}")
    return choice


#: How many calls took each path (tests and benchmarks read it): "cuda", "triton" (1-8 rows on CUDA),
#: "dequant-matmul" (more than 8 rows), "reference" (1-8 rows off CUDA, or forced by $TEAL_QUANT_LARGE_BATCH).
path_counts: dict[str, int] = {}


def _dispatch(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor | None, split_sizes: Sequence[int],
              col_scale: torch.Tensor | None) -> torch.Tensor:
    large = x.shape[0] > MAX_BATCH
    if large and large_batch_choice() == "dequant-matmul":
        path = "dequant-matmul"
        y = dequant_matmul(x, qw, thresholds, split_sizes, col_scale)
    elif large or not x.is_cuda:
        path = "reference"
        y = quant_sparse_linear_reference(x, qw, thresholds, split_sizes, col_scale)
    else:
        thresholds = _dense_thresholds(thresholds, split_sizes, x.device)
        from teal.kernels import cuda, ops

        choice = quant_kernel_choice()
        path = "triton"
        x = x.contiguous()
        if choice != "triton" and ops.cuda_kernel_available(x.device):
            config = quant_cuda_config(qw.shape[0], qw.shape[1], x.shape[0], ops.sm_count(x.device), qw.format)
            reason = cuda.unsupported_quant_reason(x, qw, list(split_sizes), config)
            if reason is None:
                path = "cuda"
            elif choice == "cuda":
                raise ValueError(f"${QUANT_KERNEL_ENV}=cuda but the CUDA quantized kernel does not apply: {reason}")
            else:
                cuda.warn_fallback(reason)
        elif choice == "cuda":
            raise ValueError(f"${QUANT_KERNEL_ENV}=cuda but the CUDA C++ kernel does not run on {x.device}")
        if path == "cuda":  # checked just above: launch without checking again
            y = _launch_cuda(x, qw, thresholds, split_sizes, col_scale, config)
        else:
            y = quant_sparse_linear_triton(x, qw, thresholds, split_sizes, col_scale)
    path_counts[path] = path_counts.get(path, 0) + 1
    return y


@torch.library.custom_op("teal::quant_sparse_linear", mutates_args=())
def _quant_sparse_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                            thresholds: Optional[torch.Tensor], col_scale: Optional[torch.Tensor],
                            split_sizes: list[int], fmt: str, k: int, group_size: int) -> torch.Tensor:
    qw = QuantizedWeight(fmt, codes, scales, zeros, (k, sum(split_sizes)), group_size)
    return _dispatch(x, qw, thresholds, split_sizes, col_scale)


@_quant_sparse_linear_op.register_fake
def _quant_sparse_linear_fake(x, codes, scales, zeros, thresholds, col_scale, split_sizes, fmt, k, group_size):
    return x.new_empty(x.shape[0], sum(split_sizes))


def quant_sparse_linear(x: torch.Tensor, qw: QuantizedWeight, thresholds: torch.Tensor | None,
                        split_sizes: Sequence[int], col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fused threshold + dequantize + sparse GEMV (``thresholds`` None: dense): for 1-8 rows on CUDA the
    CUDA C++ kernel where it applies (``$TEAL_QUANT_KERNEL`` chooses), else Triton; above 8 rows
    ``dequant_matmul``; else (CPU) the reference. The module docstring lists the dispatch."""
    _check(x, qw, thresholds, split_sizes, col_scale)
    return _quant_sparse_linear_op(x, qw.codes, qw.scales, qw.zeros, thresholds, col_scale, list(split_sizes),
                                   qw.format, qw.shape[0], qw.group_size)
