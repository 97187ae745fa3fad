"""Sparse GEMV kernels: fused activation threshold + matrix-vector product that skips zeroed rows.

``sparse_linear`` is the torch.library op ``teal::sparse_linear`` (Triton on CUDA, plain torch
elsewhere). Triton is imported only when a kernel first runs.
"""

from teal.kernels.configs import MAX_KERNEL_BATCH, KernelConfig, batch_bucket, get_config, heuristic_config
from teal.kernels.ops import (
    dense_masked_linear,
    fuse_weights,
    path_counts,
    prepare_weight,
    sparse_linear,
    sparse_linear_reference,
    sparse_linear_triton,
)

__all__ = [
    "MAX_KERNEL_BATCH",
    "KernelConfig",
    "batch_bucket",
    "dense_masked_linear",
    "fuse_weights",
    "get_config",
    "heuristic_config",
    "path_counts",
    "prepare_weight",
    "sparse_linear",
    "sparse_linear_reference",
    "sparse_linear_triton",
]
