"""The int8 / int4 fused threshold + dequantize + sparse GEMV (Triton) on the GPU against float64, and the
engine with quantized weights against the same engine's fp32 eager decode (run by ``make test-gpu``)."""

from __future__ import annotations

import pytest
import torch

from teal.kernels.quant_gemv import quant_sparse_linear_triton
from teal.quant import quantize

pytestmark = pytest.mark.gpu


def _float64_reference(x, qw, thresholds, splits, col_scale=None):
    w = qw.dequantize(torch.float64)
    xd = x.double()
    outs, start = [], 0
    for j, width in enumerate(splits):
        score = xd.abs() * (col_scale[j].double() if col_scale is not None else 1.0)
        outs.append(torch.where(score > thresholds[j].double(), xd, 0.0) @ w[:, start:start + width])
        start += width
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("fmt,group", [("int8", 128), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("weight_aware", [False, True])
def test_quant_kernel_matches_float64(fmt, group, dtype, batch, sparsity, weight_aware):
    gen = torch.Generator(device="cuda").manual_seed(batch + 17 * int(sparsity * 100))
    k, splits = 1000, [520, 136, 136]  # odd widths; K not a multiple of the group
    w_t = (torch.randn(k, sum(splits), device="cuda", generator=gen) * k**-0.5).to(dtype)
    qw = quantize(w_t, fmt, group_size=group)
    x = torch.randn(batch, k, device="cuda", generator=gen).to(dtype)
    scale = (torch.rand(len(splits), k, device="cuda", generator=gen) + 0.5) if weight_aware else None
    score = x[0].float().abs() * (scale if scale is not None else 1.0)
    thr = (torch.quantile(score.reshape(-1, k).float(), sparsity, dim=1) if sparsity > 0
           else torch.full((len(splits),), -1.0, device="cuda"))
    thr = thr.expand(len(splits)).contiguous() if thr.numel() == 1 else thr
    out = quant_sparse_linear_triton(x, qw, thr, splits, scale)
    ref = _float64_reference(x, qw, thr, splits, scale)
    assert not torch.isnan(out).any()
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert err <= 1e-2, f"relative error {err:.2e}"


def test_quantized_generator_on_cuda_matches_its_eager_steps():
    from teal.engine import Generator

    gen = Generator.from_pretrained("tiny-llama", device="cuda", dtype=torch.float32, max_seq_len=64,
                                    weights="int4", group_size=32, compile=False)
    eager = Generator.from_pretrained("tiny-llama", device="cuda", dtype=torch.float32, max_seq_len=64,
                                      weights="int4", group_size=32, compile="eager")
    ids = torch.arange(1, 9)
    assert gen.generate(ids, max_new_tokens=12, stop=[]).tokens == eager.generate(ids, max_new_tokens=12,
                                                                                   stop=[]).tokens
