"""The flagged gate|up -> down pair (teal/kernels/slice_flags.py, ``SLICE_FLAGS`` in sparse_gemv.cu) on the GPU.

Odd shapes (no width a multiple of a column block) and the Llama-3-8B MLP widths, bf16 and fp16, s = 0, 0.5
and 0.9: the pair's gate|up row and output equal today's two launches with the same configurations bit for
bit (the flags change when down reads, not what it computes), and lie within the float64 bound; calls back
to back and CUDA graph replays with fresh inputs (nothing reset in between); outputs NaN-poisoned first. A
consumer launched without its producer is reported by the bounded spin instead of hanging, and ``reset``
restores the pair.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from teal.kernels import cuda
from teal.kernels import slice_flags as S
from teal.kernels.configs import KernelConfig, get_config
from teal.kernels.ops import cuda_kernel_available, sparse_linear_reference

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
ODD = (520, 1000, 776)  # H, I, N: widths multiples of 8 only
LLAMA = (4096, 14336, 4096)
ODD_CONFIGS = {
    "split2": (KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=8, cuda=True),
               KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True)),
    "split1-16w": (KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True),
                   KernelConfig(block_n=512, block_r=8, split_k=8, num_warps=8, cuda=True)),
}


def _requires_cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not cuda_kernel_available(CUDA):
        pytest.skip(f"the CUDA C++ kernel does not run here: {cuda.device_problem(torch.cuda.current_device())}")


def _gen(*parts) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(zlib.crc32(repr(parts).encode()))


def _randn(*size, gen, dtype) -> torch.Tensor:
    return torch.randn(*size, generator=gen, device=CUDA).to(dtype)


def _operands(shape, dtype, gen):
    h_dim, inter, n = shape
    w_gu = (torch.randn(h_dim, 2 * inter, generator=gen, device=CUDA) * h_dim**-0.5).to(dtype)
    w_d = (torch.randn(inter, n, generator=gen, device=CUDA) * inter**-0.5).to(dtype)
    return w_gu, w_d


def _thresholds(h, w_gu, s):
    if s == 0:
        return torch.full((3,), float("-inf"), device=CUDA)
    inter = w_gu.shape[1] // 2
    t = float(torch.quantile(h.abs().float().flatten(), s))
    gu = sparse_linear_reference(h, w_gu, torch.tensor([t, t], device=CUDA), [inter, inter])
    mid = (F.silu(gu[:, :inter]) * gu[:, inter:]).float().flatten()
    return torch.tensor([t, t, float(torch.quantile(mid.abs(), s))], device=CUDA)


def _today(h, w_gu, w_d, thr, producer, consumer):
    inter = w_gu.shape[1] // 2
    gu = torch.full((1, 2 * inter), float("nan"), dtype=h.dtype, device=CUDA)
    y = torch.full((1, w_d.shape[1]), float("nan"), dtype=h.dtype, device=CUDA)
    cuda.launch(h, w_gu, gu, thr[0:2], None, [inter, inter], producer, pdl=2)
    cuda.launch(gu, w_d, y, thr[2:3], None, [w_d.shape[1]], consumer, glu=True, pdl=2)
    return gu, y


def _rel_err(got, ref):
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _check_pair(h, w_gu, w_d, thr, producer, consumer, flags, gu, y):
    """gu and y (the flagged pair's) against today's launches (bit for bit) and float64."""
    inter = w_gu.shape[1] // 2
    torch.cuda.synchronize()
    assert flags.error() is None, flags.error()
    assert not torch.isnan(gu).any() and not torch.isnan(y).any(), "output elements left unwritten"
    gu_today, y_today = _today(h, w_gu, w_d, thr, producer, consumer)
    torch.cuda.synchronize()
    assert torch.equal(gu, gu_today), "gate|up differs from today's launch"
    assert torch.equal(y, y_today), f"down differs from today's launch (rel {_rel_err(y, y_today):.2e})"
    gu64 = sparse_linear_reference(h, w_gu, thr[0:2], [inter, inter], compute_dtype=torch.float64,
                                   out_dtype=torch.float64)
    assert _rel_err(gu, gu64) <= TOL[h.dtype]
    mid = F.silu(gu[:, :inter]) * gu[:, inter:]  # the eager roundings the kernel reproduces, from its own row
    y64 = sparse_linear_reference(mid, w_d, thr[2:3], None, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert _rel_err(y, y64) <= TOL[h.dtype]


def _configs(name, shape, dtype, s):
    if name != "tuned":
        return ODD_CONFIGS[name]
    h_dim, inter, n = shape
    regime = "dense" if s == 0 else "sparse"
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    return (get_config(h_dim, 2 * inter, 1, dtype, sms, cuda_ok=True, regime=regime),
            get_config(inter, n, 1, dtype, sms, cuda_ok=True, regime=regime))


@pytest.mark.parametrize("shape,name", [(ODD, "split2"), (ODD, "split1-16w"), (LLAMA, "tuned")],
                         ids=["odd-split2", "odd-split1", "llama-3-8b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("producer_pdl", [0, 1, 2])
def test_flag_pair_equals_todays_launches_and_float64(shape, name, dtype, producer_pdl):
    _requires_cuda_kernel()
    gen = _gen(shape, name, str(dtype))
    w_gu, w_d = _operands(shape, dtype, gen)
    inter = shape[1]
    for s in (0.0, 0.5, 0.9):
        producer, consumer = _configs(name, shape, dtype, s)
        h = _randn(1, shape[0], gen=gen, dtype=dtype)
        thr = _thresholds(h, w_gu, s)
        flags = S.SliceFlags(inter, producer, dtype, CUDA, spin_limit=1 << 22)
        assert S.pair_problem(h, w_gu, w_d, producer, consumer, flags) is None
        for _ in range(3):  # back to back on one buffer, fresh inputs each call
            h = _randn(1, shape[0], gen=gen, dtype=dtype)
            gu = torch.full((1, 2 * inter), float("nan"), dtype=dtype, device=CUDA)
            y = torch.full((1, shape[2]), float("nan"), dtype=dtype, device=CUDA)
            S.launch_pair(h, w_gu, w_d, thr, gu, y, producer, consumer, flags, producer_pdl=producer_pdl)
            _check_pair(h, w_gu, w_d, thr, producer, consumer, flags, gu, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flag_pair_in_cuda_graph_replays(dtype):
    """Captured once (two pairs on one buffer, as two layers would), replayed with fresh inputs: nothing is
    reset between replays, each replay's outputs equal today's launches."""
    _requires_cuda_kernel()
    gen = _gen("graph", str(dtype))
    producer, consumer = ODD_CONFIGS["split2"]
    w_gu, w_d = _operands(ODD, dtype, gen)
    inter = ODD[1]
    flags = S.SliceFlags(inter, producer, dtype, CUDA, spin_limit=1 << 22)
    h = _randn(1, ODD[0], gen=gen, dtype=dtype)
    thr = _thresholds(h, w_gu, 0.5)
    gu = [torch.empty(1, 2 * inter, dtype=dtype, device=CUDA) for _ in range(2)]
    y = [torch.empty(1, ODD[2], dtype=dtype, device=CUDA) for _ in range(2)]
    h2 = torch.empty_like(h)

    def step():
        S.launch_pair(h, w_gu, w_d, thr, gu[0], y[0], producer, consumer, flags)
        h2.copy_(y[0][:, : ODD[0]])  # the second pair reads the first one's output, as the next layer would
        S.launch_pair(h2, w_gu, w_d, thr, gu[1], y[1], producer, consumer, flags)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(4):
        h.copy_(_randn(1, ODD[0], gen=gen, dtype=dtype))
        for t in gu + y:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_pair(h, w_gu, w_d, thr, producer, consumer, flags, gu[0], y[0])
        _check_pair(h2, w_gu, w_d, thr, producer, consumer, flags, gu[1], y[1])


def test_consumer_without_its_producer_reports_instead_of_hanging():
    """down launched alone waits for flags no producer will release: its bounded spin records the slice and
    target and the kernel returns (a hang would time the test out); after ``reset`` the pair works again."""
    _requires_cuda_kernel()
    dtype = torch.bfloat16
    gen = _gen("lone consumer")
    producer, consumer = ODD_CONFIGS["split2"]
    w_gu, w_d = _operands(ODD, dtype, gen)
    inter = ODD[1]
    flags = S.SliceFlags(inter, producer, dtype, CUDA, spin_limit=2000)
    gu = _randn(1, 2 * inter, gen=gen, dtype=dtype)
    y = torch.empty(1, ODD[2], dtype=dtype, device=CUDA)
    thr = torch.full((3,), float("-inf"), device=CUDA)
    cuda.launch_flagged(gu, w_d, y, thr[2:3], None, [ODD[2]], consumer, flags.launch_args(2), pdl=0)
    torch.cuda.synchronize()
    report = flags.error()
    assert report is not None and report["target"] == flags.arrivals and report["flag_seen"] == 0
    assert 0 <= report["slice"] < flags.slices
    flags.reset()
    h = _randn(1, ODD[0], gen=gen, dtype=dtype)
    gu = torch.full((1, 2 * inter), float("nan"), dtype=dtype, device=CUDA)
    y = torch.full((1, ODD[2]), float("nan"), dtype=dtype, device=CUDA)
    S.launch_pair(h, w_gu, w_d, thr, gu, y, producer, consumer, flags)
    _check_pair(h, w_gu, w_d, thr, producer, consumer, flags, gu, y)
