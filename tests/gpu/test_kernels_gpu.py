"""Every sparse GEMV, producer and attention entry on the GPU against float64 (run by ``make test-gpu``).

Odd shapes (no size a multiple of a block), bf16 and fp16, sparsity 0 / 0.5 / 0.99, batches 1..8, each launch
into a NaN-poisoned output; each test also asserts which path ran (``path_counts``), so a configuration that
silently fell back to another kernel does not count as tested.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from teal.kernels import (
    KernelConfig,
    add_rmsnorm_compact,
    decode_attention,
    decode_attention_rope,
    dense_masked_linear,
    gather_linear,
    path_counts,
    silu_mul,
    silu_mul_compact,
    sparse_linear,
    sparse_linear_glu,
    sparse_linear_reference,
    sparse_linear_triton,
)
from teal.kernels.attention import decode_attention_reference, decode_attention_rope_reference
from teal.kernels.ops import cuda_kernel_available, sparse_linear_glu_reference, sparse_linear_glu_triton
from teal.kernels.producer import (
    add_rmsnorm_compact_reference,
    gather_linear_reference,
    silu_mul_compact_reference,
    survivor_lists_reference,
)

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
SPARSITIES = (0.0, 0.5, 0.99)
BATCHES = (1, 2, 3, 5, 8)
CUDA = torch.device("cuda")

# Triton configurations: every kernel family (FMA, tensor-core, compact and gather at batch 1, dense fallback)
TRITON_CONFIGS = {
    "fma": KernelConfig(block_n=64, block_r=16, split_k=4),
    "fma-one-split": KernelConfig(block_n=128, block_r=32, split_k=1),
    "dot": KernelConfig(block_n=32, block_r=16, split_k=2, use_dot=True),
    "compact": KernelConfig(block_n=64, block_r=16, split_k=4, compact=True),
    "gather": KernelConfig(block_n=64, block_r=16, split_k=4, gather=True),
    "gather-pipelined": KernelConfig(block_n=32, block_r=8, split_k=2, num_stages=3, gather=True),
    "dense": KernelConfig(dense=True),
}
# CUDA C++ configurations: FMA at two vector widths, several clusters, and the tensor-core (mma) variant
CUDA_CONFIGS = {
    "cuda-fma": KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True),
    "cuda-fma-narrow": KernelConfig(block_n=128, block_r=16, split_k=2, num_warps=4, cuda=True),
    "cuda-one-split": KernelConfig(block_n=256, block_r=4, split_k=1, num_warps=16, cuda=True),
    "cuda-mma": KernelConfig(block_n=128, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True),
}
K_ODD, SPLITS_ODD = 203, [150, 101, 50]  # Triton: nothing a multiple of a block (K = 7 x 29)
K_CUDA, SPLITS_CUDA = 1003, [1000, 504, 248]  # CUDA C++: widths multiples of its 8-element vectors, K odd


def _gen(*parts) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(repr(parts).encode()))


def _thresholds(x: torch.Tensor, sparsity: float, segments: int) -> torch.Tensor:
    """Per-segment thresholds around the |x| quantile (each segment its own), -inf for s = 0."""
    if sparsity == 0:
        return torch.full((segments,), float("-inf"), device=x.device)
    base = float(torch.quantile(x.abs().float().flatten(), sparsity))
    return torch.tensor([base * (1.0 + 0.15 * j) for j in range(segments)], dtype=torch.float32, device=x.device)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _check(run, x, w_t, thr, splits, scale, dtype, path):
    """``run(out)`` writes into a NaN-poisoned output; checked against float64 and the path it took."""
    before = path_counts[path]
    out = torch.full((x.shape[0], w_t.shape[1]), float("nan"), dtype=dtype, device=CUDA)
    got = run(out)
    torch.cuda.synchronize()
    assert path_counts[path] > before, f"the {path} path did not run (fell back to {dict(path_counts)})"
    assert not torch.isnan(got).any(), "output elements left unwritten"
    ref = sparse_linear_reference(x, w_t, thr, splits, scale, compute_dtype=torch.float64, out_dtype=torch.float64)
    err = _rel_err(got, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]}"
    return got


@pytest.mark.parametrize("name", list(TRITON_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_sparse_linear_against_float64(name, dtype):
    config = TRITON_CONFIGS[name]
    gen = _gen(name, str(dtype))
    w_t = torch.randn(K_ODD, sum(SPLITS_ODD), generator=gen).to(dtype).to(CUDA)
    for batch in (1,) if config.gather or config.compact else BATCHES:
        for sparsity in SPARSITIES:
            x = torch.randn(batch, K_ODD, generator=gen).to(dtype).to(CUDA)
            thr = _thresholds(x, sparsity, 3)
            path = "dense" if config.dense else "triton"
            _check(lambda out: sparse_linear_triton(x, w_t, thr, SPLITS_ODD, None, config=config, out=out),
                   x, w_t, thr, SPLITS_ODD, None, dtype, path)
    # weight-aware rule (one segment, scale per input channel)
    x = torch.randn(1, K_ODD, generator=gen).to(dtype).to(CUDA)
    scale = (torch.rand(1, K_ODD, generator=gen) * 2 + 0.1).to(CUDA)
    thr = _thresholds(x.float() * scale, 0.5, 1)
    w_one = w_t[:, :SPLITS_ODD[0]].contiguous()
    _check(lambda out: sparse_linear_triton(x, w_one, thr, None, scale, config=config, out=out),
           x, w_one, thr, None, scale, dtype, "dense" if config.dense else "triton")


@pytest.fixture(scope="module")
def cuda_kernel():
    if not cuda_kernel_available(CUDA):
        from teal.kernels import cuda

        pytest.fail(f"the CUDA C++ kernel does not run on this GPU: {cuda.device_problem(torch.cuda.current_device())}")


@pytest.mark.parametrize("name", list(CUDA_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sparse_linear_against_float64(cuda_kernel, name, dtype):
    config = CUDA_CONFIGS[name]
    gen = _gen(name, str(dtype))
    w_t = torch.randn(K_CUDA, sum(SPLITS_CUDA), generator=gen).to(dtype).to(CUDA)
    for batch in BATCHES:
        for sparsity in SPARSITIES:
            x = torch.randn(batch, K_CUDA, generator=gen).to(dtype).to(CUDA)
            thr = _thresholds(x, sparsity, 3)
            _check(lambda out: sparse_linear_triton(x, w_t, thr, SPLITS_CUDA, None, config=config, out=out),
                   x, w_t, thr, SPLITS_CUDA, None, dtype, "cuda")
    x = torch.randn(1, K_CUDA, generator=gen).to(dtype).to(CUDA)
    scale = (torch.rand(3, K_CUDA, generator=gen) * 2 + 0.1).to(CUDA)
    thr = _thresholds(x, 0.5, 3)
    _check(lambda out: sparse_linear_triton(x, w_t, thr, SPLITS_CUDA, scale, config=config, out=out),
           x, w_t, thr, SPLITS_CUDA, scale, dtype, "cuda")


@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_with_table_configs_against_float64(regime, dtype):
    """``sparse_linear`` (the custom op, as TealLinear and the engine call it) with the tuned tables of both
    regimes, at a model-like shape (Llama q|k|v at 1/8 width) and at an odd one; more than 4 segments too."""
    gen = _gen(regime, str(dtype))
    for k, splits in ((512, [512, 128, 128]), (K_ODD, SPLITS_ODD), (96, [16, 24, 8, 40, 8])):
        w_t = torch.randn(k, sum(splits), generator=gen).to(dtype).to(CUDA)
        for batch in BATCHES + (16,):
            for sparsity in SPARSITIES:
                x = torch.randn(batch, k, generator=gen).to(dtype).to(CUDA)
                thr = _thresholds(x, sparsity, len(splits))
                got = sparse_linear(x, w_t, thr, splits, regime=regime)
                assert not torch.isnan(got).any()
                ref = sparse_linear_reference(x, w_t, thr, splits, compute_dtype=torch.float64,
                                              out_dtype=torch.float64)
                assert _rel_err(got, ref) <= TOL[dtype], (k, batch, sparsity)
                # a leading batch shape, as TealLinear passes it
                y3 = sparse_linear(x.reshape(batch, 1, k), w_t, thr, splits, regime=regime)
                assert y3.shape == (batch, 1, sum(splits)) and _rel_err(y3.reshape(batch, -1), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_fallback_against_float64(dtype):
    gen = _gen("dense-fallback", str(dtype))
    w_t = torch.randn(K_ODD, sum(SPLITS_ODD), generator=gen).to(dtype).to(CUDA)
    for batch in (1, 8, 33, 5300):  # 5300 rows x 50 columns > PER_SEGMENT_MIN_WORK: one product per segment
        x = torch.randn(batch, K_ODD, generator=gen).to(dtype).to(CUDA)
        thr = _thresholds(x, 0.5, 3)
        got = dense_masked_linear(x, w_t, thr, SPLITS_ODD, None)
        ref = sparse_linear_reference(x, w_t, thr, SPLITS_ODD, compute_dtype=torch.float64, out_dtype=torch.float64)
        assert _rel_err(got, ref) <= TOL[dtype], batch


@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_entries_against_float64(regime, dtype):
    """``sparse_linear_glu`` (SiLU * up inside the kernel at batch 1) and its Triton entry with a fused config."""
    gen = _gen("glu", regime, str(dtype))
    k, n = 1003, 248
    w_t = torch.randn(k, n, generator=gen).to(dtype).to(CUDA)
    fused = TRITON_CONFIGS["fma"]
    for batch in (1, 3, 8):
        for sparsity in SPARSITIES:
            gate_up = (2 * torch.randn(batch, 2 * k, generator=gen)).to(dtype).to(CUDA)
            thr = _thresholds(silu_mul(gate_up), sparsity, 1)
            ref = sparse_linear_glu_reference(gate_up, w_t, thr, compute_dtype=torch.float64, out_dtype=torch.float64)
            got = sparse_linear_glu(gate_up, w_t, thr, regime=regime)
            assert not torch.isnan(got).any() and _rel_err(got, ref) <= TOL[dtype], (batch, sparsity)
            if batch == 1:
                out = torch.full((1, n), float("nan"), dtype=dtype, device=CUDA)
                got = sparse_linear_glu_triton(gate_up, w_t, thr, config=fused, out=out, regime=regime)
                assert not torch.isnan(got).any() and _rel_err(got, ref) <= TOL[dtype], ("fused", sparsity)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_producers_and_gather_against_references(dtype):
    """add + RMSNorm and SiLU * up producers (survivor lists exact; values within one rounding), then the
    gather GEMV from their lists against float64."""
    gen = _gen("producer", str(dtype))
    k = 1003
    x = torch.randn(1, k, generator=gen).to(dtype).to(CUDA)
    delta = torch.randn(1, k, generator=gen).to(dtype).to(CUDA)
    weight = (1.0 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(CUDA)
    splits = [504, 248, 248]
    w_t = torch.randn(k, sum(splits), generator=gen).to(dtype).to(CUDA)
    for offset in (0.0, 1.0):
        for sparsity in SPARSITIES:
            _, h_ref, _ = add_rmsnorm_compact_reference(x, delta, weight, 1e-5, torch.full((3,), -1.0, device=CUDA),
                                                        None, 3, offset)
            thr = _thresholds(h_ref, sparsity, 3)
            x_new, h, lists = add_rmsnorm_compact(x, delta, weight, 1e-5, thr, None, offset)
            assert torch.equal(x_new, x + delta)
            assert _rel_err(h, h_ref) <= TOL[dtype]
            ref_lists = survivor_lists_reference(h, thr, None, 3)
            assert torch.equal(lists.counts, ref_lists.counts) and torch.equal(lists.xm, ref_lists.xm)
            y = gather_linear(lists, w_t, splits)
            exact = sparse_linear_reference(h, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
            assert _rel_err(y, exact) <= TOL[dtype], (offset, sparsity)
            listed = gather_linear_reference(*lists, w_t, splits, compute_dtype=torch.float64)
            assert _rel_err(y, listed) <= TOL[dtype]
    gate_up = (2 * torch.randn(1, 2 * k, generator=gen)).to(dtype).to(CUDA)
    w_down = torch.randn(k, 504, generator=gen).to(dtype).to(CUDA)
    for sparsity in SPARSITIES:
        thr = _thresholds(silu_mul(gate_up), sparsity, 1)
        mid, lists = silu_mul_compact(gate_up, thr)
        ref_mid, ref_lists = silu_mul_compact_reference(gate_up, thr, None)
        assert _rel_err(mid, ref_mid) <= TOL[dtype]
        assert torch.equal(lists.counts, survivor_lists_reference(mid, thr, None, 1).counts)
        y = gather_linear(lists, w_down)
        exact = sparse_linear_reference(mid, w_down, thr, compute_dtype=torch.float64, out_dtype=torch.float64)
        assert _rel_err(y, exact) <= TOL[dtype], sparsity


ATT_TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_attention_against_float64(dtype, group):
    """The split-KV decode attention op at odd lengths and positions, with a sliding-window mask too."""
    gen = _gen("attention", str(dtype), group)
    n_kv, d, length = 2, 64, 1001
    q = (2 * torch.randn(1, n_kv * group, d, generator=gen)).to(dtype).to(CUDA)
    k = torch.randn(n_kv, length, d, generator=gen).to(dtype).to(CUDA)
    v = torch.randn(n_kv, length, d, generator=gen).to(dtype).to(CUDA)
    for pos, window in ((0, None), (37, None), (999, None), (999, 128)):
        p = torch.arange(length, device=CUDA)
        visible = (p <= pos) & ((p > pos - window) if window else True)
        mask = torch.where(visible, 0.0, -math.inf).float()
        n_valid = torch.tensor([pos + 1], device=CUDA)
        y = decode_attention(q, k, v, mask, n_valid, 1 / math.sqrt(d))
        ref = decode_attention_reference(q, k, v, mask, n_valid, 1 / math.sqrt(d), compute_dtype=torch.float64)
        assert not torch.isnan(y).any() and _rel_err(y, ref) <= ATT_TOL[dtype], (pos, window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norms", [None, 0.0, 1.0], ids=["no-norm", "qwen3-norm", "gemma-norm"])
def test_decode_attention_rope_against_reference(dtype, norms):
    """Rotary embedding, per-head norms and the cache write inside the attention kernel."""
    gen = _gen("rope", str(dtype), norms)
    n_heads, n_kv, d, length = 8, 2, 64, 517
    k = torch.randn(n_kv, length, d, generator=gen).to(dtype).to(CUDA)
    v = torch.randn(n_kv, length, d, generator=gen).to(dtype).to(CUDA)
    qkv = torch.randn(1, (n_heads + 2 * n_kv) * d, generator=gen).to(dtype).to(CUDA)
    angle = torch.rand(d // 2, generator=gen) * 6
    cos = torch.cat([angle.cos(), angle.cos()]).to(dtype).to(CUDA)
    sin = torch.cat([angle.sin(), angle.sin()]).to(dtype).to(CUDA)
    q_norm = k_norm = None
    if norms is not None:
        q_norm = (1.0 + 0.2 * torch.randn(d, generator=gen)).to(dtype).to(CUDA)
        k_norm = (1.0 + 0.2 * torch.randn(d, generator=gen)).to(dtype).to(CUDA)
    for pos in (0, 300, length - 1):
        mask = torch.where(torch.arange(length, device=CUDA) <= pos, 0.0, -math.inf).float()
        n_valid = torch.tensor([pos + 1], device=CUDA)
        k_ref, v_ref = k.clone(), v.clone()
        ref = decode_attention_rope_reference(qkv, cos, sin, k_ref, v_ref, mask, n_valid, 0.125, n_heads, q_norm,
                                              k_norm, 1e-6, norms or 0.0, compute_dtype=torch.float64)
        y = decode_attention_rope(qkv, cos, sin, k, v, mask, n_valid, 0.125, n_heads, q_norm, k_norm, 1e-6,
                                  norms or 0.0)
        assert torch.equal(k[:, pos], k_ref[:, pos]) and torch.equal(v[:, pos], v_ref[:, pos]), "cache write"
        assert not torch.isnan(y).any() and _rel_err(y, ref) <= ATT_TOL[dtype], pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_configs_at_llama3_8b_widths_against_float64(dtype):
    """The configurations the engine takes at Llama-3-8B's widths (tuned tables or heuristics, both regimes;
    fp32 too, which the engine's fp32 twin checks run and no other GPU test covers): q|k|v, o, gate|up, down
    and the SiLU-fused down, batch 1 and 4, sparsity 0 and 0.5."""
    gen = _gen("llama3-widths", str(dtype))
    for k, splits in ((4096, [4096, 1024, 1024]), (4096, [4096]), (4096, [14336, 14336]), (14336, [4096])):
        w_t = (torch.randn(k, sum(splits), generator=gen) * k**-0.5).to(dtype).to(CUDA)
        for batch in (1, 4):
            for sparsity in (0.0, 0.5):
                x = torch.randn(batch, k, generator=gen).to(dtype).to(CUDA)
                thr = _thresholds(x, sparsity, len(splits))
                ref = sparse_linear_reference(x, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
                for regime in ("sparse", "dense"):
                    got = sparse_linear(x, w_t, thr, splits if len(splits) > 1 else None, regime=regime)
                    err = _rel_err(got, ref)
                    assert not torch.isnan(got).any() and err <= TOL[dtype], (k, splits, batch, sparsity, regime, err)
    k, n = 14336, 4096
    w_t = (torch.randn(k, n, generator=gen) * k**-0.5).to(dtype).to(CUDA)
    for sparsity in (0.0, 0.5):
        gate_up = (2 * torch.randn(1, 2 * k, generator=gen)).to(dtype).to(CUDA)
        thr = _thresholds(silu_mul(gate_up), sparsity, 1)
        ref = sparse_linear_glu_reference(gate_up, w_t, thr, compute_dtype=torch.float64, out_dtype=torch.float64)
        got = sparse_linear_glu(gate_up, w_t, thr)
        err = _rel_err(got, ref)
        assert not torch.isnan(got).any() and err <= TOL[dtype], ("glu", sparsity, err)
