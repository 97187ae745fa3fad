"""The persistent sparse MLP block (teal/kernels/persistent.py, persistent_mlp.cu).

CPU: the reference of the fused computation against its parts, the work list's coverage and ordering (what
keeps ticket claiming free of deadlock), a simulation of programs claiming tickets, and the kernel's
decomposition (per-slice lists, per-tile partials, in-order finishers) emulated in torch against the
reference. The source compiles with nvcc for sm_90 where nvcc is installed. The kernel itself: the
``gpu``-marked test (and benchmarks/scripts/persistent_mlp_gpu.py, which checks before it times).
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import CUOBJDUMP, requires_nvrtc
from teal.kernels import cuda as _cuda
from teal.kernels import persistent as P
from teal.kernels.ops import sparse_linear_reference


def _block(k=256, inter=512, hidden=512, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(k, generator=g) * 3).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    w_gu = (torch.randn(k, 2 * inter, generator=g) * k**-0.5).to(dtype)
    w_d = (torch.randn(inter, hidden, generator=g) * inter**-0.5).to(dtype)
    return x, norm_w, w_gu, w_d


def _thresholds(x, norm_w, w_gu, s, eps=1e-5):
    if s == 0:
        return torch.full((3,), float("-inf"))
    h = P.rms_norm_reference(x.reshape(1, -1), norm_w, eps).float()
    t = float(torch.quantile(h.abs().flatten(), s))
    inter = w_gu.shape[1] // 2
    gu = sparse_linear_reference(h.to(x.dtype), w_gu, torch.tensor([t, t]), [inter, inter])
    mid = (F.silu(gu[:, :inter]) * gu[:, inter:]).float()
    return torch.tensor([t, t, float(torch.quantile(mid.abs().flatten(), s))])


@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_reference_matches_its_parts(s):
    x, norm_w, w_gu, w_d = _block()
    thr = _thresholds(x, norm_w, w_gu, s)
    h, gu, y = P.mlp_block_reference(x, norm_w, w_gu, w_d, thr, 1e-5, compute_dtype=torch.float64)
    # written out by hand: float64 norm, masks, products
    xd = x.double()
    hd = xd * torch.rsqrt((xd * xd).mean() + 1e-5) * norm_w.double()
    assert torch.allclose(h.double(), hd, rtol=1e-5, atol=1e-6)
    inter = w_gu.shape[1] // 2
    g = (hd * (hd.abs() > thr[0])) @ w_gu[:, :inter].double()
    u = (hd * (hd.abs() > thr[1])) @ w_gu[:, inter:].double()
    a = F.silu(g) * u
    yd = (a * (a.abs() > thr[2])) @ w_d.double()
    assert torch.allclose(gu.double(), torch.cat([g, u]), rtol=1e-4, atol=1e-5)
    assert (y.double() - yd).norm() / yd.norm() < 1e-4
    if s > 0:  # the thresholds matter: dense products differ
        dense = (F.silu(hd @ w_gu[:, :inter].double()) * (hd @ w_gu[:, inter:].double())) @ w_d.double()
        assert (y.double() - dense).norm() / dense.norm() > 1e-2


def test_reference_rounds_like_the_per_projection_path_in_bf16():
    x, norm_w, w_gu, w_d = _block(dtype=torch.bfloat16)
    thr = _thresholds(x, norm_w, w_gu, 0.5)
    h, gu, y = P.mlp_block_reference(x, norm_w, w_gu, w_d, thr, 1e-5)
    assert h.dtype == gu.dtype == y.dtype == torch.bfloat16
    inter = w_gu.shape[1] // 2
    h2 = (F.rms_norm(x.float().reshape(1, -1), (x.numel(),), eps=1e-5).to(torch.bfloat16) * norm_w)
    assert torch.equal(h, h2.reshape(-1))
    gu2 = sparse_linear_reference(h2, w_gu, thr[:2], [inter, inter])
    mid = F.silu(gu2[:, :inter]) * gu2[:, inter:]
    assert torch.equal(y, sparse_linear_reference(mid, w_d, thr[2:3]).reshape(-1))


@pytest.mark.parametrize("ks,ncb,ncd,group,lag", [(8, 56, 8, 2, 4), (4, 7, 3, 3, 0), (1, 1, 1, 1, 0), (2, 5, 2, 8, 9)])
def test_schedule_covers_the_work_in_dependency_order(ks, ncb, ncd, group, lag):
    items = P.build_schedule(ks, ncb, ncd, group, lag)
    P.check_schedule(items, ks, ncb, ncd, group)
    groups = -(-ncb // group)
    assert len(items) == ks + ncb * ks + groups * ncd
    assert items[:ks] == [(P.OP_NORM, i, 0) for i in range(ks)]


def test_check_schedule_rejects_a_consumer_before_its_producer():
    items = P.build_schedule(2, 4, 2, 2, 0)
    first_down = next(i for i, it in enumerate(items) if it[0] == P.OP_DOWN)
    broken = items[:]
    broken.insert(P.build_schedule(2, 4, 2, 2, 0).index((P.OP_GATE_UP, 0, 0)), broken.pop(first_down))
    with pytest.raises(ValueError, match="waits for"):
        P.check_schedule(broken, 2, 4, 2, 2)
    with pytest.raises(ValueError, match="twice"):
        P.check_schedule(items + items[-1:], 2, 4, 2, 2)
    with pytest.raises(ValueError, match="does not cover"):
        P.check_schedule(items[:-1], 2, 4, 2, 2)


def _simulate(items, deps, programs, seed):
    """Programs claim the next ticket when free; an item finishes once its dependencies have finished (and a
    random amount of work). True when every item finishes."""
    rng = random.Random(seed)
    next_ticket, done, busy = 0, set(), {}
    for _ in range(100 * len(items) + 100):
        for p in range(programs):
            if p not in busy and next_ticket < len(items):
                busy[p] = [items[next_ticket], rng.randint(1, 3)]
                next_ticket += 1
        progressed = False
        for p, state in list(busy.items()):
            item, work = state
            if all(d in done for d in deps(item)):
                state[1] -= 1
                progressed = True
                if state[1] <= 0:
                    done.add(item)
                    del busy[p]
        if len(done) == len(items):
            return True
        if not progressed:
            return False
    return False


@pytest.mark.parametrize("programs", [1, 2, 7, 300])
def test_ticket_claiming_finishes_for_any_number_of_programs(programs):
    ks, ncb, ncd, group = 4, 9, 3, 2
    items = P.build_schedule(ks, ncb, ncd, group, 2)
    deps = lambda it: P.dependencies(it, ks, ncb, group)  # noqa: E731
    assert _simulate(items, deps, programs, seed=programs)
    # the same simulation detects a deadlock: the down tiles first, with one program
    bad = [it for it in items if it[0] == P.OP_DOWN] + [it for it in items if it[0] != P.OP_DOWN]
    assert not _simulate(bad, deps, 1, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [0.0, 0.5])
def test_emulated_decomposition_equals_the_reference(dtype, s):
    x, norm_w, w_gu, w_d = _block(dtype=dtype)
    thr = _thresholds(x, norm_w, w_gu, s)
    config = P.PersistentConfig(norm_slices=4, d_group=3, lag=1)
    if dtype == torch.float32:  # 4 elements per vector: blocks of 128 / 256
        assert config.gu_block(dtype) == 128 and config.d_block(dtype) == 256
    y = P.emulate_schedule(x, norm_w, w_gu, w_d, thr, 1e-5, config)
    _, _, ref = P.mlp_block_reference(x, norm_w, w_gu, w_d, thr, 1e-5, compute_dtype=torch.float64)
    err = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_shape_problems_are_named():
    c = P.PersistentConfig()
    assert P.shape_problem(4096, 14336, 4096, torch.bfloat16, c) is None
    assert "norm_slices" in P.shape_problem(4100, 14336, 4096, torch.bfloat16, c)
    assert "gate|up block" in P.shape_problem(4096, 14000, 4096, torch.bfloat16, c)
    assert "down block" in P.shape_problem(4096, 14336, 4000, torch.bfloat16, c)


@requires_nvrtc
@pytest.mark.parametrize("elem", [0, 1, 2])
def test_source_compiles_for_sm90(tmp_path: Path, elem: int):
    """Compiles for sm_90 (with stamps); 16-bit elements without spills at 2 programs per SM, and each weight
    loop issues a step's loads (UNROLL rows x vectors) before its first product (gate|up, then down)."""
    dtype = {0: torch.bfloat16, 1: torch.float16, 2: torch.float32}[elem]
    config = P.PersistentConfig(timing=True)
    cubin = tmp_path / "k.cubin"
    code, log = _cuda.nvrtc_compile_with_log(P.source(), P.SOURCE_FILE, [
        "--gpu-architecture=sm_90", "-std=c++17", "--device-as-default-execution-space", "-Xptxas", "-v",
        *P.defines(config, dtype)])
    cubin.write_bytes(code)
    if elem == 2:
        return
    assert "0 bytes spill stores" in log, log
    if CUOBJDUMP is None:
        return
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    seen = re.findall(r"\b(LDG\.E\.NA\.128\S*|FFMA)\b", sass)
    bursts = []  # weight loads between two runs of products
    run = 0
    for op in seen:
        if op == "FFMA":
            if run:
                bursts.append(run)
            run = 0
        else:
            run += 1
    assert config.unroll * config.gu_vecs in bursts and config.unroll * config.d_vecs in bursts, bursts


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_kernel_matches_float64_reference(dtype, s):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a CUDA device of compute capability 9.0+")
    dev = torch.device("cuda")
    x, norm_w, w_gu, w_d = (t.to(dev) for t in _block(k=512, inter=1024, hidden=512, dtype=dtype))
    thr = _thresholds(x.cpu(), norm_w.cpu(), w_gu.cpu(), s).to(dev)
    block = P.PersistentMLP(512, 1024, 512, dtype, dev, P.PersistentConfig(norm_slices=4, d_group=2))
    for _ in range(3):  # repeated calls: the control words must be reset by the kernel
        y = block.run(x, norm_w, w_gu, w_d, thr).clone()
    assert block.error() is None
    h, gu, ref = P.mlp_block_reference(x, norm_w, w_gu, w_d, thr, 1e-5, compute_dtype=torch.float64)
    if dtype == torch.float32:
        assert float((block.h.double() - h.double()).norm() / h.double().norm()) < 1e-6
    else:  # the engine's roundings; the norm's sum order may move a last bit
        assert float((block.h != h).float().mean()) < 0.01
    err = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
