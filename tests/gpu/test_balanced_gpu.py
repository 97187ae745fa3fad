"""The CUDA sparse GEMV's BALANCED build on the GPU (run by ``make test-gpu``): the warps stream equal slices of a
program's concatenated survivor lists (``cuda.launch(balanced=True)``, ``$TEAL_CUDA_BALANCED``). Against float64 and
the default build at odd shapes, s = 0 / 0.5 / 0.9, random and skewed survivors (all in the first rows, where the
default build's warps are most unequal), GLU on and off, 1 and 4 input rows; deterministic, and unchanged by STAMPS
and by a CUDA graph."""

from __future__ import annotations

import zlib

import pytest
import torch

from teal.kernels import KernelConfig, cuda, path_counts, sparse_linear
from teal.kernels.ops import silu_mul, sparse_linear_reference

from cuda_cases import CONFIGS as CASE_CONFIGS, CUDA, K_ODD, SPLITS, cuda_kernel  # noqa: F401

pytestmark = pytest.mark.gpu


TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
CONFIGS = {**CASE_CONFIGS,
           "down-like": KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True)}


def _problem(glu: bool, batch: int, sparsity: float, pattern: str, dtype: torch.dtype, seed: int):
    """x [batch, K] (gate|up [1, 2K] with ``glu``), w_t [K, N], per-segment thresholds around the sparsity's
    quantile of what the threshold sees; ``skewed``: the entries past the first eighth scaled by 1e-3, so the
    survivors sit in the first warps' shares."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    splits = [504] if glu else SPLITS
    w_t = (torch.randn(K_ODD, sum(splits), generator=gen) * K_ODD**-0.5).to(dtype).to(CUDA)
    x = torch.randn(batch, 2 * K_ODD if glu else K_ODD, generator=gen)
    if pattern == "skewed":
        x[:, K_ODD // 8:K_ODD] *= 1e-3  # gate (or the whole input) small past the first eighth
    x = x.to(dtype).to(CUDA)
    scored = silu_mul(x) if glu else x
    t = float(torch.quantile(scored.abs().float().flatten(), sparsity)) if sparsity > 0 else float("-inf")
    thr = torch.tensor([t * (1 + 0.1 * j) for j in range(len(splits))], dtype=torch.float32, device=CUDA)
    return x, scored, w_t, thr, splits


def _launch(x, w_t, thr, splits, cfg, glu, balanced, stamps=None, pdl=0):
    y = torch.full((x.shape[0], w_t.shape[1]), float("nan"), dtype=x.dtype, device=CUDA)
    cuda.launch(x, w_t, y, thr, None, splits, cfg, glu=glu, pdl=pdl, stamps=stamps, balanced=balanced)
    return y


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


CASES = [(glu, batch) for glu in (False, True) for batch in (1, 4) if not (glu and batch > 1)]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("glu,batch", CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("pattern", ["random", "skewed"])
def test_balanced_build_against_float64_and_the_default_build(name, glu, batch, sparsity, pattern):
    cfg, dtype = CONFIGS[name], torch.bfloat16
    x, scored, w_t, thr, splits = _problem(glu, batch, sparsity, pattern, dtype,
                                           zlib.crc32(repr((name, glu, batch, sparsity, pattern)).encode()))
    assert cuda.unsupported_reason(scored, w_t, splits, cfg, balanced=True) is None
    ref = sparse_linear_reference(scored, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
    default = _launch(x, w_t, thr, splits, cfg, glu, False)
    balanced = _launch(x, w_t, thr, splits, cfg, glu, True)
    again = _launch(x, w_t, thr, splits, cfg, glu, True)
    torch.cuda.synchronize()
    assert not balanced.isnan().any(), "output elements left unwritten"
    assert _rel_err(balanced, ref) <= TOL[dtype], _rel_err(balanced, ref)
    assert _rel_err(default, ref) <= TOL[dtype]
    assert torch.equal(balanced, again)  # deterministic: no atomics, the same slices every call
    # the sums differ from the default build's only in fp32 order: within a bf16 rounding or two of it, elementwise
    assert torch.allclose(balanced.float(), default.float(), rtol=2 ** -6, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_balanced_build_in_other_dtypes(dtype):
    cfg = CONFIGS["cluster"]
    for sparsity in (0.0, 0.5, 0.9):
        x, scored, w_t, thr, splits = _problem(False, 1, sparsity, "skewed", dtype, 7)
        ref = sparse_linear_reference(scored, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
        got = _launch(x, w_t, thr, splits, cfg, False, True)
        torch.cuda.synchronize()
        assert not got.isnan().any() and _rel_err(got, ref) <= TOL[dtype], (sparsity, _rel_err(got, ref))


def test_balanced_with_stamps_and_in_a_graph_under_pdl():
    """STAMPS does not change the balanced build's output; eight calls captured in one graph with PDL 2 equal eager
    calls bit for bit."""
    cfg, calls = CONFIGS["down-like"], 8
    problems = [_problem(True, 1, 0.5, "random", torch.bfloat16, seed) for seed in range(calls)]
    x, _, w_t, thr, splits = problems[0]
    stamps = torch.zeros(cuda.stamps_shape(K_ODD, splits, cfg, x.dtype), dtype=torch.int64, device=CUDA)
    assert torch.equal(_launch(x, w_t, thr, splits, cfg, True, True),
                       _launch(x, w_t, thr, splits, cfg, True, True, stamps=stamps))
    ys = [torch.full((1, sum(p[4])), float("nan"), dtype=torch.bfloat16, device=CUDA) for p in problems]

    def sequence():
        for (x, _, w_t, thr, splits), y in zip(problems, ys):
            cuda.launch(x, w_t, y, thr, None, splits, cfg, glu=True, pdl=2, balanced=True)

    sequence()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sequence()
    for y in ys:
        y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for (x, _, w_t, thr, splits), y in zip(problems, ys):
        assert torch.equal(y, _launch(x, w_t, thr, splits, cfg, True, True))


def test_environment_switch_runs_the_balanced_build(monkeypatch):
    """``TEAL_CUDA_BALANCED=1`` through ``sparse_linear`` (the engine's op, its own launch configuration): the CUDA
    path runs with ``balanced=True`` and stays within the bound of float64."""
    monkeypatch.setenv("TEAL_CUDA_BALANCED", "1")
    seen, real = [], cuda.launch

    def launch(*args, **kw):
        seen.append(kw.get("balanced"))
        real(*args, **kw)

    monkeypatch.setattr(cuda, "launch", launch)
    x, scored, w_t, thr, splits = _problem(False, 1, 0.5, "skewed", torch.bfloat16, 11)
    before = path_counts["cuda"]
    got = sparse_linear(x, w_t, thr, splits)
    torch.cuda.synchronize()
    assert path_counts["cuda"] > before and seen and all(seen)
    ref = sparse_linear_reference(scored, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert _rel_err(got, ref) <= TOL[torch.bfloat16]
