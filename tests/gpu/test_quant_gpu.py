"""The int8 / int4 fused threshold + dequantize + sparse GEMV (CUDA C++ and Triton) on the GPU against float64,
and the engine with quantized weights against the same engine's fp32 eager decode (run by ``make test-gpu``)."""

from __future__ import annotations

import pytest
import torch

from teal.kernels import ops
from teal.kernels.quant_gemv import quant_sparse_linear_cuda, quant_sparse_linear_triton
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


def _kernel(name):
    """"cuda" (the CUDA C++ kernel) or "triton"."""
    if name == "cuda" and not ops.cuda_kernel_available(torch.device("cuda")):
        pytest.skip("the CUDA C++ kernel needs compute capability 9.0+ and NVRTC")
    return quant_sparse_linear_cuda if name == "cuda" else quant_sparse_linear_triton


@pytest.mark.parametrize("kernel,fmt,group", [(kern, fmt, group) for kern in ("cuda", "triton")
                                              for fmt, group in (("int8", 128), ("int4", 32), ("int4", 128))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("weight_aware", [False, True])
def test_quant_kernel_matches_float64(kernel, fmt, group, dtype, batch, sparsity, weight_aware):
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
    out = _kernel(kernel)(x, qw, thr, splits, scale)
    ref = _float64_reference(x, qw, thr, splits, scale)
    assert not torch.isnan(out).any()
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert err <= 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("fmt,group", [("int8", 128), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_every_sweep_candidate_matches_float64(fmt, group, sparsity):
    """Each configuration `--quant-configs sweep` may time at batch 1 and 4 (`configs.quant_cuda_candidates`
    that fit the registers; 512-column blocks at batch 1) on odd widths against float64."""
    from teal.kernels import cuda
    from teal.kernels.configs import quant_cuda_candidates

    _kernel("cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    k, splits = 1000, [520, 136, 136]
    qw = quantize((torch.randn(k, sum(splits), device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16), fmt,
                  group_size=group)
    for batch in (1, 4):
        x = torch.randn(batch, k, device="cuda", generator=gen).to(torch.bfloat16)
        thr = torch.full((len(splits),), float(torch.quantile(x.float().abs(), sparsity)) if sparsity else -1.0,
                         device="cuda")
        ref = _float64_reference(x, qw, thr, splits)
        for cfg in quant_cuda_candidates(k, sum(splits), 132, batch):
            if cuda.register_problem(cfg, torch.bfloat16, batch, fmt) is not None:
                continue
            out = quant_sparse_linear_cuda(x, qw, thr, splits, config=cfg)
            err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
            assert not torch.isnan(out).any() and err <= 1e-2, (cfg, batch, err)


def test_quantized_generator_on_cuda_matches_its_eager_steps():
    from teal.engine import Generator

    gen = Generator.from_pretrained("tiny-llama", device="cuda", dtype=torch.float32, max_seq_len=64,
                                    weights="int4", group_size=32, compile=False)
    eager = Generator.from_pretrained("tiny-llama", device="cuda", dtype=torch.float32, max_seq_len=64,
                                      weights="int4", group_size=32, compile="eager")
    ids = torch.arange(1, 9)
    assert gen.generate(ids, max_new_tokens=12, stop=[]).tokens == eager.generate(ids, max_new_tokens=12,
                                                                                   stop=[]).tokens


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_quant_kernel_at_real_shapes_and_skipped_groups(fmt):
    """The CUDA kernel at Llama-3-8B's q|k|v and down shapes (split into clusters, many warps), at a sparsity
    that leaves whole int4 groups without a survivor in a warp's share (the group reload branch)."""
    run = _kernel("cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    for k, splits in ((4096, [4096, 1024, 1024]), (14336, [4096])):
        w_t = (torch.randn(k, sum(splits), device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
        qw = quantize(w_t, fmt, group_size=32)
        x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
        x[:, : k // 2] *= 1e-3  # the first half's groups are all below the threshold
        for t in (float("-inf"), 0.5, 2.5):
            thr = torch.full((len(splits),), t, device="cuda")
            out = run(x, qw, thr, splits)
            ref = _float64_reference(x, qw, thr, splits)
            err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
            assert err <= 1e-2, f"{fmt} K={k} t={t}: relative error {err:.2e}"


def test_dispatch_takes_the_cuda_kernel_where_it_applies(monkeypatch):
    from teal.kernels import quant_gemv

    if not ops.cuda_kernel_available(torch.device("cuda")):
        pytest.skip("the CUDA C++ kernel needs compute capability 9.0+ and NVRTC")
    qw = quantize(torch.randn(512, 256, device="cuda").to(torch.bfloat16), "int4", 128)
    x = torch.randn(1, 512, device="cuda").to(torch.bfloat16)
    thr = torch.tensor([0.5], device="cuda")
    before = dict(quant_gemv.path_counts)
    quant_gemv.quant_sparse_linear(x, qw, thr, [256])
    assert quant_gemv.path_counts.get("cuda", 0) == before.get("cuda", 0) + 1
    monkeypatch.setenv("TEAL_QUANT_KERNEL", "triton")
    quant_gemv.quant_sparse_linear(x, qw, thr, [256])
    assert quant_gemv.path_counts.get("triton", 0) == before.get("triton", 0) + 1


@pytest.mark.parametrize("fmt,group", [("int8", 128), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_batch_dequant_matmul_on_cuda(fmt, group, dtype):
    """Above 8 rows the dispatch takes `dequant_matmul`: the Triton dequantize equals `teal.quant.dequantize` bit
    for bit (bf16 rounded to nearest on the GPU), and the product matches float64, dense and thresholded."""
    from teal.kernels import quant_gemv

    gen = torch.Generator(device="cuda").manual_seed(11)
    k, splits = 1000, [520, 136, 136]
    qw = quantize((torch.randn(k, sum(splits), device="cuda", generator=gen) * k**-0.5).to(dtype), fmt, group)
    assert torch.equal(quant_gemv.dequantize_triton(qw, dtype), qw.dequantize(dtype))
    x = torch.randn(128, k, device="cuda", generator=gen).to(dtype)
    scale = torch.rand(len(splits), k, device="cuda", generator=gen) + 0.5
    for thr, cs in ((None, None), (torch.tensor([0.3, 0.6, 0.9], device="cuda"), scale)):
        before = quant_gemv.path_counts.get("dequant-matmul", 0)
        out = quant_gemv.quant_sparse_linear(x, qw, thr, splits, cs)
        assert quant_gemv.path_counts.get("dequant-matmul", 0) == before + 1
        ref = _float64_reference(x, qw, thr if thr is not None else torch.full((3,), float("-inf"), device="cuda"),
                                 splits, cs)
        err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
        assert not torch.isnan(out).any() and err <= 1e-2, f"relative error {err:.2e}"
