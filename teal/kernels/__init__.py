"""Sparse GEMV kernels: fused activation threshold + matrix-vector product that skips zeroed rows.

``sparse_linear`` is the torch.library op ``teal::sparse_linear`` (Triton on CUDA, plain torch
elsewhere); ``sparse_linear_glu`` is the same from a gate|up row (SiLU * up computed inside the
kernel); ``add_rmsnorm_compact`` / ``silu_mul_compact`` + ``gather_linear`` split it between the
kernel that produces the activation and the gather GEMV (``teal.kernels.producer``);
``decode_attention`` and ``decode_attention_rope`` (``teal.kernels.attention``) are the decode step's
split-KV attention, the second with the rotary embedding and cache write inside. Kernels launched
one after another on Hopper overlap their launches (programmatic dependent launch, ``$TEAL_PDL``).
Triton is imported only when a kernel first runs.
"""

from teal.kernels.attention import decode_attention, decode_attention_rope
from teal.kernels.configs import (
    MAX_KERNEL_BATCH,
    KernelConfig,
    batch_bucket,
    get_config,
    get_gather_config,
    heuristic_config,
)
from teal.kernels.ops import (
    dense_masked_linear,
    fuse_weights,
    path_counts,
    prepare_weight,
    silu_mul,
    sparse_linear,
    sparse_linear_glu,
    sparse_linear_reference,
    sparse_linear_triton,
)
from teal.kernels.producer import SurvivorLists, add_rmsnorm_compact, gather_linear, silu_mul_compact

__all__ = [
    "MAX_KERNEL_BATCH",
    "KernelConfig",
    "SurvivorLists",
    "add_rmsnorm_compact",
    "batch_bucket",
    "decode_attention",
    "decode_attention_rope",
    "dense_masked_linear",
    "fuse_weights",
    "gather_linear",
    "get_config",
    "get_gather_config",
    "heuristic_config",
    "path_counts",
    "prepare_weight",
    "silu_mul",
    "silu_mul_compact",
    "sparse_linear",
    "sparse_linear_glu",
    "sparse_linear_reference",
    "sparse_linear_triton",
]
