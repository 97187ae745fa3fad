"""One projection group of a decoder layer as one object: its weight, bias, thresholds, column scales and
how it is multiplied.

A `Projection` is a NamedTuple of tensors and hashable Python constants, so `torch.compile` specializes on
the constants (one graph per distinct combination) and CUDA graphs capture the tensors, whose values
(`thresholds`) the engine rewrites in place. The engine builds them from its weights and thresholds
(`Engine.decode_layer_args`); the functions below are the only places that multiply by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from teal.engine.collectives import all_reduce_sum
from teal.kernels import ops, producer
from teal.kernels.producer import rms_norm_reference as rms_norm  # the producer kernel's roundings
from teal.kernels.quant_gemv import quant_sparse_linear
from teal.quant import QuantizedWeight

#: How sparse groups are multiplied: "kernel" (`teal.kernels.sparse_linear`, thresholding inside the
#: GEMV) or "producer" (for q|k|v and gate|up: survivor lists written by the add + RMSNorm kernel, then
#: `gather_linear`; batch 1, on CUDA or under TRITON_INTERPRET=1, elsewhere "kernel").
SPARSE_PATHS = ("kernel", "producer")


class Projection(NamedTuple):
    """A fused projection group (q|k|v, o, gate|up or down): y = x W^T + b, W's input entries thresholded.

    Tensors: `weight` in the layout used ([K, N] contiguous when `transposed`, the sparse kernel's; else
    nn.Linear's [N, K]); `bias` [N] or None; `thresholds` fp32 [S], one per output segment (None: dense);
    `col_scale` fp32 [S, K], the weight-aware score's column norms (None: |x| alone).
    Constants: `splits`, the S output segment widths (q, k, v sizes; gate, up); `transposed`; `sparse`: through
    the sparse kernel (with every threshold -inf that is a dense product on the kernel); `regime`: the
    kernel's tuned table ("sparse", or "dense" for a group on the kernel with every threshold -inf,
    `teal.kernels.configs.REGIMES`); `producer`: the input's producer kernel lists the survivors and
    `gather_linear` multiplies (sparse path "producer"); `group` and `all_reduce`: tensor-parallel role.
    A row-parallel projection (o, down split by input channel over the ranks of `group`) sums the ranks'
    partial products with `all_reduce` ("nccl" or "symm_mem", `teal.engine.collectives`) before the bias;
    column-parallel and unsharded projections have `group` None.
    Quantized weights (`weights` "int8" or "int4", `teal.quant`): `weight` holds the codes in the transposed
    layout, `scales` and `zeros` the rest of the format; every product goes through
    `teal.kernels.quant_gemv.quant_sparse_linear` (thresholds None where the group is dense: the fused kernels
    take -inf, the large-batch path of prefill one GEMM).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    thresholds: torch.Tensor | None
    col_scale: torch.Tensor | None
    splits: tuple[int, ...]
    transposed: bool
    sparse: bool = False
    regime: str = "sparse"
    producer: bool = False
    group: Any = None
    all_reduce: str = "nccl"
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    weights: str = "bf16"
    group_size: int = 0


def quantized_weight(p: Projection) -> QuantizedWeight:
    """The quantized weight of a projection whose `weights` is "int8" or "int4"."""
    return QuantizedWeight(p.weights, p.weight, p.scales, p.zeros, (p.weight.shape[0], sum(p.splits)), p.group_size)


def project(p: Projection, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T (+ b) for x [T, K]: dense, or through the sparse kernel (its `regime`'s tuned launch); summed
    over the ranks of a row-parallel projection's `group`, the bias added once, after the sum."""
    if p.weights != "bf16":
        y = quant_sparse_linear(x, quantized_weight(p), p.thresholds if p.sparse else None, p.splits,
                                p.col_scale if p.sparse else None)
    elif p.sparse:
        y = ops.sparse_linear(x, p.weight, p.thresholds, list(p.splits) if len(p.splits) > 1 else None,
                              p.col_scale, regime=p.regime)
    elif p.transposed:
        y = x @ p.weight
    elif p.group is None:
        return F.linear(x, p.weight, p.bias)
    else:
        y = F.linear(x, p.weight)
    return _finish(p, y)


def _finish(p: Projection, y: torch.Tensor) -> torch.Tensor:
    if p.group is not None:
        y = all_reduce_sum(y, p.group, p.all_reduce)
    return y if p.bias is None else y + p.bias


def norm_project(p: Projection, x: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor, eps: float,
                 norm_offset: float, observe: Callable[[torch.Tensor], None] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, RMSNorm, and `p` of the normalised input. Returns (x + delta, y).

    On the producer path one kernel adds, normalises and lists the survivors, then `gather_linear`
    multiplies (the same result up to fp32 summation order). `observe` sees the normalised input.
    """
    if p.producer:
        x, h, lists = producer.add_rmsnorm_compact(x, delta, norm, eps, p.thresholds, p.col_scale, norm_offset)
        if observe is not None:
            observe(h)
        return x, _finish(p, producer.gather_linear(lists, p.weight, list(p.splits)))
    x = x + delta
    h = rms_norm(x, norm, eps, norm_offset)
    if observe is not None:
        observe(h)
    return x, project(p, h)


def glu_project(p: Projection, gate_up: torch.Tensor) -> torch.Tensor:
    """down(SiLU(gate) * up) from the gate|up row [T, 2K] through the sparse kernel, the SiLU product computed
    inside the GEMV at batch 1 on CUDA (`teal.kernels.sparse_linear_glu`). `p` is sparse. Quantized weights
    take the SiLU product first (the quantized kernel has no fused GLU input)."""
    if p.weights != "bf16":
        gate, up = gate_up.chunk(2, dim=-1)
        return project(p, F.silu(gate) * up)
    return _finish(p, ops.sparse_linear_glu(gate_up, p.weight, p.thresholds, p.col_scale, regime=p.regime))
