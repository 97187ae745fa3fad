"""Naive TEAL-style sparse GEMV, the benchmark's baseline (not used by the library).

Split-K over small tiles with per-element masked weight loads, fp32 atomics into a zero-filled buffer,
then a cast to the input dtype: three launches per call. Imports Triton when first called.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch

BLOCK_K = 32
BLOCK_N = 128


@functools.cache
def _kernel() -> ModuleType:
    from teal.kernels import _naive_triton

    return _naive_triton


def naive_sparse_linear(
    x: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor, splits: Sequence[int] | None = None
) -> torch.Tensor:
    """Same result as ``sparse_linear`` (no column scale, at most 3 segments), computed naively."""
    batch, k = x.shape
    n = w_t.shape[1]
    split_list = [n] if splits is None else list(splits)
    if len(split_list) > 3 or sum(split_list) != n:
        raise ValueError(f"naive_sparse_linear: splits {split_list} must be at most 3 widths summing to N={n}")
    ends = [sum(split_list[: i + 1]) for i in range(len(split_list))]
    offs = (ends[:-1] + [n, n])[:2]
    acc = torch.zeros((batch, n), dtype=torch.float32, device=x.device)
    grid = (-(-n // BLOCK_N), -(-k // BLOCK_K), batch)
    _kernel().naive_sparse_gemv_kernel[grid](
        x, w_t, acc, thresholds.reshape(-1).float(), k, n, offs[0], offs[1], BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    return acc.to(x.dtype)
