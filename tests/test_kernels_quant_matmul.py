"""The large-batch path of ``teal::quant_sparse_linear`` (``teal.kernels.quant_gemv.dequant_matmul``): the weight
dequantized in one pass (the Triton ``dequantize_kernel``, called directly under TRITON_INTERPRET=1), the input
masked per segment, one GEMM per segment; checked against an independent float64 dequantize-then-multiply
reference at odd shapes, batches 9-130, int8 and int4 (group 32/64/128), dense, thresholded and weight-aware;
and the dispatch: more than 8 rows take it, 1-8 rows the existing paths, each counted in ``path_counts``."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

from teal.kernels import quant_gemv
from teal.kernels.quant_gemv import dequant_matmul, dequantize_triton, quant_sparse_linear
from teal.quant import quantize

from test_quant import _float64_reference

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)

FORMATS = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
K, SPLITS = 300, [40, 24, 13]  # K not a multiple of any int4 group (partial last group), odd N = 77


def _case(fmt, group, batch, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed + batch)
    w_t = (torch.randn(K, sum(SPLITS), generator=gen) * K**-0.5).to(dtype)
    qw = quantize(w_t, fmt, group_size=group or 128)
    x = torch.randn(batch, K, generator=gen).to(dtype)
    return gen, qw, x


def _rules(gen, x, rule):
    """(thresholds, col_scale) for "dense" (None), "magnitude" (about half of each segment's |x| below its
    threshold) or "weight-aware" (|x| * c, c in [0.5, 1.5))."""
    if rule == "dense":
        return None, None
    cs = torch.rand(len(SPLITS), K, generator=gen) + 0.5 if rule == "weight-aware" else None
    score = x.float().abs()[None] * (cs[:, None, :] if cs is not None else 1.0)  # [S, B, K]
    thr = torch.stack([torch.quantile(score[min(j, score.shape[0] - 1)].flatten(), 0.3 + 0.2 * j)
                       for j in range(len(SPLITS))])
    return thr, cs


def _rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------- the dequantize kernel
@interpreted
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_k,block_n", [(32, 256), (16, 32)])
def test_triton_dequantize_reproduces_dequantize(fmt, group, dtype, block_k, block_n):
    """Every element equals ``teal.quant.dequantize`` (fp32 arithmetic, one rounding) bit for bit in fp32 and
    fp16; in bf16 the interpreter truncates where the GPU rounds to nearest, so there each element is one of
    the two bf16 neighbours of the fp32 value (tests/gpu/test_quant_gpu.py checks bf16 bit for bit on the GPU)."""
    _, qw, _ = _case(fmt, group, 1, torch.bfloat16 if dtype != torch.float16 else torch.float16)
    out = dequantize_triton(qw, dtype, block_k=block_k, block_n=block_n)
    assert out.shape == qw.shape and out.dtype == dtype
    if dtype != torch.bfloat16:
        assert torch.equal(out, qw.dequantize(dtype))
        return
    exact = qw.dequantize(torch.float32)
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.all((out == qw.dequantize(torch.bfloat16)) | (out == truncated))
    assert torch.all((out.float() - exact).abs() <= exact.abs() * 2**-7)  # and within one bf16 unit


@interpreted
def test_triton_dequantize_refuses_a_block_across_int4_groups():
    _, qw, _ = _case("int4", 32, 1)
    with pytest.raises(ValueError, match="must divide the int4 group size 32"):
        dequantize_triton(qw, torch.bfloat16, block_k=64)


# ------------------------------------------------------------------------------- dequant_matmul
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("batch", [9, 33, 130])
@pytest.mark.parametrize("rule", ["dense", "magnitude", "weight-aware"])
def test_dequant_matmul_matches_float64(fmt, group, batch, rule):
    gen, qw, x = _case(fmt, group, batch)
    thr, cs = _rules(gen, x, rule)
    out = dequant_matmul(x, qw, thr, SPLITS, cs)
    ref = _float64_reference(x, qw, thr if thr is not None else torch.full((3,), float("-inf")), SPLITS, cs)
    assert out.shape == (batch, sum(SPLITS)) and out.dtype == x.dtype and not torch.isnan(out).any()
    assert _rel(out, ref) < 1e-2, f"relative error {_rel(out, ref):.2e}"
    if rule != "dense":  # the rule matters here: the dense product is another answer
        dense = _float64_reference(x, qw, torch.full((3,), float("-inf")), SPLITS)
        assert _rel(out, dense) > 0.1


@interpreted
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rule", ["dense", "weight-aware"])
def test_dequant_matmul_through_the_triton_dequantize_matches_float64(fmt, group, rule):
    """The CUDA composition (Triton dequantize, then the GEMM), run on the CPU under the interpreter."""
    gen, qw, x = _case(fmt, group, 17, seed=5)
    thr, cs = _rules(gen, x, rule)
    out = dequant_matmul(x, qw, thr, SPLITS, cs, triton=True)
    ref = _float64_reference(x, qw, thr if thr is not None else torch.full((3,), float("-inf")), SPLITS, cs)
    assert _rel(out, ref) < 1e-2, f"relative error {_rel(out, ref):.2e}"


def test_dequant_matmul_takes_minus_inf_thresholds_as_dense():
    gen, qw, x = _case("int4", 64, 12)
    assert torch.equal(dequant_matmul(x, qw, torch.full((3,), float("-inf")), SPLITS),
                       torch.cat([x @ qw.dequantize(x.dtype)[:, a:b] for a, b in ((0, 40), (40, 64), (64, 77))], 1))
    assert _rel(dequant_matmul(x, qw, None, SPLITS), _float64_reference(x, qw, torch.full((3,), -1e30), SPLITS)) < 1e-2


# ------------------------------------------------------------------------------- the dispatch
def _path_of(fn):
    before = dict(quant_gemv.path_counts)
    out = fn()
    ran = [p for p, n in quant_gemv.path_counts.items() if n != before.get(p, 0)]
    assert len(ran) == 1 and quant_gemv.path_counts[ran[0]] == before.get(ran[0], 0) + 1, ran
    return ran[0], out


@pytest.mark.parametrize("batch, path", [(1, "reference"), (8, "reference"), (9, "dequant-matmul"),
                                         (130, "dequant-matmul")])
def test_dispatch_takes_dequant_matmul_above_eight_rows(batch, path):
    """On the CPU, 1-8 rows take the reference (on CUDA: the fused kernels, tests/gpu), more than 8 rows
    ``dequant_matmul``; the answer is the float64 product either way."""
    gen, qw, x = _case("int4", 32, batch)
    thr, cs = _rules(gen, x, "weight-aware")
    ran, out = _path_of(lambda: quant_sparse_linear(x, qw, thr, SPLITS, cs))
    assert ran == path
    assert _rel(out, _float64_reference(x, qw, thr, SPLITS, cs)) < 1e-2


def test_dispatch_dense_none_and_the_reference_by_environment(monkeypatch):
    gen, qw, x = _case("int8", 0, 64)
    ran, out = _path_of(lambda: quant_sparse_linear(x, qw, None, SPLITS))
    assert ran == "dequant-matmul" and torch.equal(out, x @ qw.dequantize(x.dtype))
    monkeypatch.setenv("TEAL_QUANT_LARGE_BATCH", "reference")
    ran, ref = _path_of(lambda: quant_sparse_linear(x, qw, None, SPLITS))
    assert ran == "reference" and _rel(out, _float64_reference(x, qw, torch.full((3,), -1e30), SPLITS)) < 1e-2
    monkeypatch.setenv("TEAL_QUANT_LARGE_BATCH", "fast")
    with pytest.raises(ValueError, match="TEAL_QUANT_LARGE_BATCH must be dequant-matmul or reference"):
        quant_sparse_linear(x, qw, None, SPLITS)


def test_op_with_dense_thresholds_compiles_whole():
    qw = quantize(torch.randn(64, 24), "int4", group_size=32)
    x = torch.randn(20, 64)
    fn = torch.compile(lambda v: quant_sparse_linear(v, qw, None, [16, 8]), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), dequant_matmul(x, qw, None, [16, 8]))


def test_engine_prefill_takes_dequant_matmul():
    """A quantized engine's prefill of 12 tokens sends every projection group through ``dequant_matmul``."""
    from teal.engine import engine_random

    engine = engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=64)
    engine.quantize_weights("int4", 32)
    ids = torch.arange(12) % engine.config.vocab_size
    with torch.inference_mode():
        before = dict(quant_gemv.path_counts)
        engine.prefill(ids)
        calls = {p: n - before.get(p, 0) for p, n in quant_gemv.path_counts.items() if n != before.get(p, 0)}
    groups = len(engine.projections(0)._asdict())  # q|k|v, o, gate|up, down
    assert calls == {"dequant-matmul": groups * engine.config.n_layers}, calls
