"""Naive TEAL-style sparse GEMV, `teal bench kernels`' baseline (not used by the library).

The naive design the project's issue describes (and our kernel must beat): a plain Triton split-K
kernel as TEAL's own code has it, with masked row loads and fp32 atomics into a zeroed buffer. Made a
fair baseline rather than a weak one:

* one launch per segment (TEAL multiplies q, k and v separately) with that segment's scalar
  threshold, so the mask is a 1-D row mask ``|x_k| > t`` over the tile's BLOCK_K input entries and
  the weight rows it drops are not read;
* on CUDA the tiles (BLOCK_K, BLOCK_N, num_warps) are picked by ``triton.autotune`` per (K, N, dtypes)
  from a short list of configs sensible for a memory-bound GEMV; under the Triton interpreter
  (``TRITON_INTERPRET=1``, the CPU tests) one fixed small config.

A call is a zero-fill of the fp32 [B, N] accumulator, one launch per segment (a grid dimension over
the batch rows), then one cast to x's dtype. Imports Triton when first called.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch

from teal.kernels.ops import _check_args, _interpreting

#: Tiles of the fixed config used under the Triton interpreter (CUDA autotunes).
INTERPRET_BLOCK_K = 32
INTERPRET_BLOCK_N = 64


@functools.cache
def _kernel() -> ModuleType:
    from teal.bench import _naive_triton

    return _naive_triton


def naive_sparse_linear(
    x: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor, splits: Sequence[int] | None = None
) -> torch.Tensor:
    """Same result as ``sparse_linear`` (no column scale), computed naively: one launch per segment."""
    split_list = _check_args(x, w_t, thresholds, splits, None)
    batch, k = x.shape
    n = w_t.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    thr = thresholds.reshape(-1).float()
    acc = torch.zeros((batch, n), dtype=torch.float32, device=x.device)
    kernel = _kernel()
    autotune = x.device.type == "cuda" and not _interpreting()
    start = 0
    for j, width in enumerate(split_list):
        # Column slices (views): the kernel indexes them with the full row strides.
        args = (x, w_t[:, start : start + width], acc[:, start : start + width], thr[j : j + 1], k, width,
                x.stride(0), w_t.stride(0), acc.stride(0))
        if autotune:
            def grid(meta, width=width):
                return (_cdiv(width, meta["BLOCK_N"]), _cdiv(k, meta["BLOCK_K"]), batch)

            kernel.naive_sparse_gemv_autotuned[grid](*args)
        else:
            grid = (_cdiv(width, INTERPRET_BLOCK_N), _cdiv(k, INTERPRET_BLOCK_K), batch)
            kernel.naive_sparse_gemv_kernel[grid](*args, BLOCK_K=INTERPRET_BLOCK_K, BLOCK_N=INTERPRET_BLOCK_N,
                                                  num_warps=4)
        start += width
    return acc.to(x.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
