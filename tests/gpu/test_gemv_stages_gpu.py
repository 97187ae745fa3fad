"""The CUDA sparse GEMV's STAMPS build on the GPU (run by ``make test-gpu``): it computes exactly what the default
build computes, and its per-stage stamps ascend in every program, eagerly and in a CUDA graph of back-to-back
calls under PDL (``teal.kernels.cuda.launch(stamps=...)``, ``teal.bench.gemv_stages``;
benchmarks/scripts/gemv_stages_gpu.py times the Llama-3-8B shapes with it)."""

from __future__ import annotations

import zlib

import pytest
import torch

from teal.bench import gemv_stages
from teal.kernels import cuda, ops

from cuda_cases import CONFIGS, CUDA, K_ODD, SPLITS, cuda_kernel  # noqa: F401 (module-level skip)

pytestmark = pytest.mark.gpu


def _problem(glu: bool, sparsity: float, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    splits = [504] if glu else SPLITS
    w_t = (torch.randn(K_ODD, sum(splits), generator=gen) * K_ODD**-0.5).to(torch.bfloat16).to(CUDA)
    x = torch.randn(1, 2 * K_ODD if glu else K_ODD, generator=gen).to(torch.bfloat16).to(CUDA)
    scored = ops.silu_mul(x) if glu else x
    t = float(torch.quantile(scored.abs().float(), sparsity)) if sparsity > 0 else float("-inf")
    thr = torch.tensor([t * (1 + 0.1 * j) for j in range(len(splits))], dtype=torch.float32, device=CUDA)
    return x, w_t, thr, splits


def _launch(x, w_t, thr, splits, cfg, glu, pdl, stamps=None):
    y = torch.full((1, w_t.shape[1]), float("nan"), dtype=x.dtype, device=CUDA)
    cuda.launch(x, w_t, y, thr, None, splits, cfg, glu=glu, pdl=pdl, stamps=stamps)
    return y


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("pdl", [0, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_stamps_build_computes_the_default_output_and_ascends(name, glu, pdl, sparsity):
    cfg = CONFIGS[name]
    x, w_t, thr, splits = _problem(glu, sparsity, seed=zlib.crc32(repr((name, glu, pdl, sparsity)).encode()))
    plain = _launch(x, w_t, thr, splits, cfg, glu, pdl)
    stamps = torch.zeros(cuda.stamps_shape(K_ODD, splits, cfg, x.dtype), dtype=torch.int64, device=CUDA)
    stamped = _launch(x, w_t, thr, splits, cfg, glu, pdl, stamps)
    torch.cuda.synchronize()
    assert not plain.isnan().any()
    assert torch.equal(plain, stamped)
    stamps = stamps.cpu()
    assert gemv_stages.monotone(stamps).all(), stamps
    b = gemv_stages.program_boundaries(stamps)
    assert int(b["end"].max() - b["start"].min()) < 10**9  # one launch: well under a second of globaltimer


def test_stamps_in_a_graph_of_back_to_back_calls_under_pdl():
    """Eight calls captured in one graph with PDL 2 (the engine's launch), each with its own stamps: every output
    equals an eager default-build call, every program's stamps ascend, and each call ends after the one before."""
    cfg, calls = CONFIGS["cluster"], 8
    problems = [_problem(False, 0.5, seed) for seed in range(calls)]
    shape = cuda.stamps_shape(K_ODD, SPLITS, cfg, torch.bfloat16)
    stamps = torch.zeros((calls, *shape), dtype=torch.int64, device=CUDA)
    ys = [torch.full((1, sum(SPLITS)), float("nan"), dtype=torch.bfloat16, device=CUDA) for _ in range(calls)]

    def sequence():
        for j, (x, w_t, thr, splits) in enumerate(problems):
            cuda.launch(x, w_t, ys[j], thr, None, splits, cfg, pdl=2, stamps=stamps[j])

    sequence()  # compiles and loads before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sequence()
    for y in ys:
        y.fill_(float("nan"))
    stamps.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for (x, w_t, thr, splits), y in zip(problems, ys):
        assert torch.equal(y, _launch(x, w_t, thr, splits, cfg, False, 0))
    acct = gemv_stages.sequence_account(stamps.cpu())
    assert acct["all_monotone"] and acct["calls"] == calls - 1
    ends = [int(gemv_stages.program_boundaries(s)["end"].max()) for s in stamps.cpu()]
    assert ends == sorted(ends) and acct["median"]["period_us"] > 0
