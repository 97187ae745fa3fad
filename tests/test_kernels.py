"""Sparse GEMV kernels: the Triton kernels run through Triton's CPU interpreter against the reference."""

from __future__ import annotations

import json
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (teal.kernels imports it lazily)

import pytest
import torch

from teal.kernels import (
    KernelConfig,
    fuse_weights,
    get_config,
    path_counts,
    prepare_weight,
    silu_mul,
    sparse_linear,
    sparse_linear_glu,
    sparse_linear_reference,
    sparse_linear_triton,
)
from teal.kernels import ops as kernel_ops
from teal.kernels.ops import sparse_linear_glu_reference, sparse_linear_glu_triton

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)

FMA = KernelConfig(block_n=64, block_r=16, split_k=4)
FMA_ONE_SPLIT = KernelConfig(block_n=128, block_r=32, split_k=1)
COMPACT = KernelConfig(block_n=64, block_r=16, split_k=4, compact=True)  # in-kernel survivor lists, batch 1 only
DOT = KernelConfig(block_n=32, block_r=16, split_k=2, use_dot=True)
FMA_BATCH = KernelConfig(block_n=64, block_r=8, split_k=4)
DENSE = KernelConfig(dense=True)
GATHER = KernelConfig(block_n=64, block_r=16, split_k=4, gather=True)  # hand-prefetched row loop
GATHER_PIPE = KernelConfig(block_n=32, block_r=8, split_k=2, num_stages=3, gather=True)  # tl.range pipelined
GATHER_ONE_SPLIT = KernelConfig(block_n=128, block_r=32, split_k=1, gather=True)


def _thresholds(x: torch.Tensor, sparsity: float, segments: int) -> torch.Tensor:
    """Per-segment thresholds around the |x| quantile (different per segment), -inf for s = 0."""
    if sparsity == 0:
        return torch.full((segments,), float("-inf"))
    base = float(torch.quantile(x.abs().float().flatten(), sparsity))
    return torch.tensor([base * (1.0 + 0.15 * j) for j in range(segments)], dtype=torch.float32)


def _run_and_check(x, w_t, thr, splits, scale, config, tol):
    n = w_t.shape[1]
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)  # poisoned: every element must be written
    returned = sparse_linear_triton(x, w_t, thr, splits, scale, config=config, out=out)
    assert returned.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "kernel left output elements unwritten"
    ref = sparse_linear_reference(x, w_t, thr, splits, scale, compute_dtype=torch.float64, out_dtype=torch.float64)
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err <= tol, f"rel err {err:.2e} > {tol}"
    return out, ref


@needs_interpreter
@pytest.mark.parametrize(
    "config",
    [FMA, FMA_ONE_SPLIT, COMPACT, DOT, FMA_BATCH, DENSE, GATHER, GATHER_PIPE, GATHER_ONE_SPLIT],
    ids=repr,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_odd_shapes(config, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((repr(config), str(dtype))).encode()))
    k, splits = 203, [150, 101, 50]  # no size is a multiple of any block (K = 7 x 29)
    w_t = torch.randn(k, sum(splits), generator=gen).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for batch in (1,) if config.compact else (1, 3, 8):
        for sparsity in (0.0, 0.5, 0.99):
            x = torch.randn(batch, k, generator=gen).to(dtype)
            _run_and_check(x, w_t, _thresholds(x, sparsity, 3), splits, None, config, tol)


@needs_interpreter
@pytest.mark.parametrize("config", [FMA, COMPACT, DOT, GATHER, GATHER_PIPE], ids=repr)
def test_weight_aware_scale_and_single_segment(config):
    gen = torch.Generator().manual_seed(7)
    k, n = 173, 301
    w_t = torch.randn(k, n, generator=gen).to(torch.bfloat16)
    for batch in (1,) if config.compact else (1, 3):
        x = torch.randn(batch, k, generator=gen).to(torch.bfloat16)
        scale = torch.rand(1, k, generator=gen) * 2 + 0.1
        thr = torch.tensor([float(torch.quantile((x.abs().float() * scale).flatten(), 0.5))])
        out, ref = _run_and_check(x, w_t, thr, None, scale, config, 1e-2)
        # The scale changes which entries survive: the unscaled rule gives a different result.
        plain = sparse_linear_reference(x, w_t, thr, None, None, compute_dtype=torch.float64, out_dtype=torch.float64)
        assert float((plain - ref).norm() / ref.norm()) > 0.05


@needs_interpreter
@pytest.mark.parametrize("config", [FMA, COMPACT, DOT, DENSE, GATHER, GATHER_PIPE], ids=repr)
def test_masks_are_exact_with_ties_and_per_row_masks(config):
    """Exactly representable data: the kernel must equal the reference bit for bit.

    Each batch row has its own mask (a row keeps entries another row drops), and entries equal to a
    threshold are dropped (ties are zeroed).
    """
    gen = torch.Generator().manual_seed(3)
    k, splits = 96, [40, 24]
    levels = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    w_t = torch.randint(-3, 4, (k, sum(splits)), generator=gen).to(torch.bfloat16)
    signs = torch.where(torch.rand(3, k, generator=gen) < 0.5, -1.0, 1.0)
    x = levels[torch.randint(0, 6, (3, k), generator=gen)] * signs
    x = x.to(torch.bfloat16)
    x[0, :48] = 0.25  # row 0 drops its whole first half at the 0.75 threshold, other rows keep entries there
    thr = torch.tensor([0.75, 1.0])  # exactly equal to some |x|: those entries must be dropped
    for batch_rows in ([0],) if config.compact else ([0], [0, 1, 2]):
        xb = x[batch_rows]
        out = torch.full((xb.shape[0], sum(splits)), float("nan"), dtype=torch.bfloat16)
        sparse_linear_triton(xb, w_t, thr, splits, None, config=config, out=out)
        expect = sparse_linear_reference(xb, w_t, thr, splits, compute_dtype=torch.float64)
        torch.testing.assert_close(out, expect, rtol=0, atol=0)
        dense_ties = sparse_linear_reference(xb, w_t, thr - 1e-3, splits, compute_dtype=torch.float64)
        assert not torch.equal(dense_ties, expect), "ties must be dropped"


@needs_interpreter
@pytest.mark.parametrize("config", [FMA, COMPACT, DOT, GATHER, GATHER_PIPE], ids=repr)
def test_all_entries_dropped_gives_exact_zeros(config):
    x = torch.randn(2 if config.use_dot else 1, 120).to(torch.bfloat16)
    w_t = torch.randn(120, 70).to(torch.bfloat16)
    out = torch.full((x.shape[0], 70), float("nan"), dtype=torch.bfloat16)
    sparse_linear_triton(x, w_t, torch.tensor([1e6]), None, None, config=config, out=out)
    assert torch.equal(out, torch.zeros_like(out))


@needs_interpreter
@pytest.mark.parametrize("config", [FMA, GATHER], ids=repr)
def test_more_segments_than_one_launch_holds(config):
    gen = torch.Generator().manual_seed(11)
    splits = [30, 17, 64, 5, 40, 22]
    w_t = torch.randn(90, sum(splits), generator=gen).to(torch.float16)
    x = torch.randn(1, 90, generator=gen).to(torch.float16)
    _run_and_check(x, w_t, _thresholds(x, 0.4, len(splits)), splits, None, config, 2e-3)



@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_naive_baseline_matches_reference(dtype):
    """The bench's naive baseline (one row-masked split-K launch per segment) computes ``sparse_linear``."""
    from teal.bench.naive import naive_sparse_linear

    gen = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()))
    k, splits = 200, [150, 101, 50]  # N = 301: no size is a multiple of a block
    w_t = torch.randn(k, sum(splits), generator=gen).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for batch in (1, 3):
        for sparsity in (0.0, 0.5):
            x = torch.randn(batch, k, generator=gen).to(dtype)
            for segs in (splits, None):
                thr = _thresholds(x, sparsity, 1 if segs is None else len(segs))
                out = naive_sparse_linear(x, w_t, thr, segs)
                assert out.dtype == dtype and out.shape == (batch, sum(splits))
                ref = sparse_linear_reference(x, w_t, thr, segs, compute_dtype=torch.float64, out_dtype=torch.float64)
                err = float((out.double() - ref).norm() / ref.norm())
                assert err <= tol, (batch, sparsity, segs, err)


@needs_interpreter
def test_naive_baseline_masks_are_exact_per_segment_and_row():
    """Exact data: each segment uses its own threshold, each batch row its own mask, ties are dropped."""
    from teal.bench import _naive_triton
    from teal.bench.naive import naive_sparse_linear

    gen = torch.Generator().manual_seed(5)
    k, splits = 96, [40, 24, 33]
    levels = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    w_t = torch.randint(-3, 4, (k, sum(splits)), generator=gen).to(torch.bfloat16)
    signs = torch.where(torch.rand(3, k, generator=gen) < 0.5, -1.0, 1.0)
    x = (levels[torch.randint(0, 6, (3, k), generator=gen)] * signs).to(torch.bfloat16)
    thr = torch.tensor([0.75, 1.0, float("-inf")])
    for rows in ([0], [0, 1, 2]):
        expect = sparse_linear_reference(x[rows], w_t, thr, splits, compute_dtype=torch.float64)
        torch.testing.assert_close(naive_sparse_linear(x[rows], w_t, thr, splits), expect, rtol=0, atol=0)
    # On CUDA the tiles are autotuned per (K, N); the accumulator slice is zeroed between tuning runs.
    tuner = _naive_triton.naive_sparse_gemv_autotuned
    assert tuner.keys == ["K", "N"] and tuner.reset_to_zero == ["acc_ptr"] and 10 <= len(tuner.configs) <= 16

@needs_interpreter
@pytest.mark.parametrize("config", [GATHER, GATHER_PIPE], ids=repr)
def test_gather_branch_is_chosen_on_device_from_the_survivor_count(config):
    """Each segment takes the dense branch iff more than ``dense_above`` of its entries survive."""
    from teal.kernels.ops import last_gather_branches

    gen = torch.Generator().manual_seed(31)
    k, splits = 160, [70, 45]
    w_t = torch.randn(k, sum(splits), generator=gen).to(torch.bfloat16)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    blocks = [-(-w // config.block_n) for w in splits]
    cases = [
        # (dense_above, thresholds as |x| quantiles per segment, expected dense flag per segment)
        (0.5, (0.0, 0.0), (True, True)),
        (0.5, (0.75, 0.75), (False, False)),
        (0.5, (0.25, 0.75), (True, False)),  # one launch, one segment per branch
        (0.0, (0.5, 0.9), (True, True)),  # always dense while anything survives: the masked stream
        (1.0, (0.0, 0.0), (False, False)),  # never dense: gathers every row
    ]
    for dense_above, quantiles, expect in cases:
        cfg = KernelConfig(**{**config.as_dict(), "dense_above": dense_above})
        thr = torch.tensor(
            [float("-inf") if q == 0 else float(torch.quantile(x.abs().float(), q)) for q in quantiles]
        )
        _run_and_check(x, w_t, thr, splits, None, cfg, 1e-2)
        flags = last_gather_branches(x.device).tolist()
        assert flags == [expect[0]] * blocks[0] + [expect[1]] * blocks[1], (dense_above, quantiles, flags)


def test_gather_branch_record_accepts_cuda_with_or_without_index(monkeypatch):
    from teal.kernels import ops

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ops._device_key(torch.device("cuda")) == ops._device_key(torch.device("cuda:0")) == ("cuda", 0)
    assert ops._device_key(torch.device("cpu")) == ("cpu", None)


@needs_interpreter
def test_gather_lists_are_rebuilt_every_call():
    """A call with fewer survivors than the previous one must not read the previous call's list."""
    gen = torch.Generator().manual_seed(37)
    w_t = torch.randn(256, 96, generator=gen).to(torch.bfloat16)
    for config in (GATHER, GATHER_PIPE):
        for sparsity in (0.1, 0.9, 0.5, 0.99, 0.0):
            x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
            _run_and_check(x, w_t, _thresholds(x, sparsity, 2), [50, 46], None, config, 1e-2)


@needs_interpreter
def test_fp32_inputs():
    gen = torch.Generator().manual_seed(5)
    w_t = torch.randn(64, 50, generator=gen)
    for config in (FMA, DOT, GATHER):
        x = torch.randn(3, 64, generator=gen)
        _run_and_check(x, w_t, _thresholds(x, 0.5, 1), None, None, config, 1e-5)


@needs_interpreter
def test_dense_fallback_taken_for_large_batches_and_dense_configs():
    gen = torch.Generator().manual_seed(13)
    w_t = torch.randn(64, 48, generator=gen).to(torch.bfloat16)
    before = dict(path_counts)
    x = torch.randn(9, 64, generator=gen).to(torch.bfloat16)  # union of 9 rows: over MAX_KERNEL_BATCH
    _run_and_check(x, w_t, _thresholds(x, 0.5, 1), None, None, FMA, 1e-2)
    assert path_counts["dense"] == before.get("dense", 0) + 1
    assert path_counts["triton"] == before.get("triton", 0)
    x1 = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
    _run_and_check(x1, w_t, _thresholds(x1, 0.5, 1), None, None, FMA, 1e-2)
    assert path_counts["triton"] == before.get("triton", 0) + 1
    assert get_config(4096, 4096, 16, torch.bfloat16).dense


@needs_interpreter
def test_dense_fallback_multiplies_each_segment_only_by_its_columns_for_long_inputs(monkeypatch):
    """Many rows (a sparse prefill): per-segment products give the same result as the stacked one, and the
    switch follows rows x narrowest segment width. Checked by the work each path hands to matmul."""
    gen = torch.Generator().manual_seed(29)
    splits = [24, 16, 8]
    w_t = torch.randn(64, sum(splits), generator=gen).to(torch.bfloat16)
    x = torch.randn(12, 64, generator=gen).to(torch.bfloat16)
    thr = _thresholds(x, 0.5, 3) * torch.tensor([1.0, 1.1, 1.2])
    ref = sparse_linear_reference(x, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
    shapes: list[tuple[int, ...]] = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: shapes.append(tuple(b.shape)) or real_matmul(a, b))
    outs = {}
    for work, expect in ((12 * 8 + 1, [(64, 48)]), (12 * 8, [(64, 24), (64, 16), (64, 8)])):
        monkeypatch.setattr(kernel_ops, "PER_SEGMENT_MIN_WORK", work)
        shapes.clear()
        outs[work] = kernel_ops.dense_masked_linear(x, w_t, thr, splits, None)
        assert shapes == expect
        rel = float((outs[work].double() - ref).norm() / ref.norm())
        assert rel <= 1e-2, rel
    torch.testing.assert_close(outs[12 * 8], outs[12 * 8 + 1], rtol=1e-2, atol=1e-2)


def test_reference_semantics_and_zero_sparsity_is_dense():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(4, 32, generator=gen)
    w_t = torch.randn(32, 12, generator=gen)
    y = sparse_linear_reference(x, w_t, torch.tensor([float("-inf")]))
    torch.testing.assert_close(y, x @ w_t)
    thr = torch.tensor([0.5, 1.0])
    y2 = sparse_linear_reference(x, w_t, thr, [5, 7])
    expect = torch.cat([(x * (x.abs() > 0.5)) @ w_t[:, :5], (x * (x.abs() > 1.0)) @ w_t[:, 5:]], dim=1)
    torch.testing.assert_close(y2, expect)


def test_op_on_cpu_uses_reference_and_fake_impl_shapes():
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(2, 3, 32, generator=gen).to(torch.bfloat16)
    w_t = torch.randn(32, 20, generator=gen).to(torch.bfloat16)
    thr = torch.tensor([0.3, 0.6])
    y = sparse_linear(x, w_t, thr, [12, 8])
    assert y.shape == (2, 3, 20) and y.dtype == torch.bfloat16
    expect = sparse_linear_reference(x.reshape(6, 32), w_t, thr, [12, 8]).reshape(2, 3, 20)
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(5, 32, dtype=torch.float16)
        fw = torch.empty(32, 20, dtype=torch.float16)
        fy = torch.ops.teal.sparse_linear(fx, fw, torch.empty(2), [12, 8], torch.empty(2, 32))
        assert fy.shape == (5, 20) and fy.dtype == torch.float16


def test_op_passes_torch_library_opcheck():
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3, 16, generator=gen)
    w_t = torch.randn(16, 10, generator=gen)
    torch.library.opcheck(torch.ops.teal.sparse_linear.default, (x, w_t, torch.tensor([0.2, 0.4]), [4, 6], None))


def test_torch_compile_fullgraph_traces_the_op():
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(2, 16, generator=gen)
    w_t = torch.randn(16, 10, generator=gen)
    thr = torch.tensor([0.5])

    def f(a):
        return sparse_linear(a, w_t, thr) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # a failure to trace is a failure
    torch.testing.assert_close(compiled(x), f(x))


def test_argument_errors_name_the_problem():
    x = torch.randn(2, 16)
    w_t = torch.randn(16, 10)
    with pytest.raises(ValueError, match="splits"):
        sparse_linear(x, w_t, torch.tensor([0.1, 0.2]), [4, 5])
    with pytest.raises(ValueError, match="one value per segment"):
        sparse_linear(x, w_t, torch.tensor([0.1, 0.2]), None)
    with pytest.raises(ValueError, match="prepare_weight"):
        sparse_linear(x, torch.randn(10, 16), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="must match"):
        sparse_linear(x, w_t.double(), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="col_scale"):
        sparse_linear(x, w_t, torch.tensor([0.1]), None, torch.ones(2, 16))
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(block_n=96)
    with pytest.raises(ValueError, match="gather cannot be combined"):
        KernelConfig(gather=True, compact=True)
    with pytest.raises(ValueError, match="dense_above"):
        KernelConfig(gather=True, dense_above=1.5)


def test_weight_helpers():
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    w_t, splits = fuse_weights([q, k, v])
    assert splits == [8, 4, 4] and w_t.shape == (6, 16) and w_t.is_contiguous()
    torch.testing.assert_close(w_t, torch.cat([q, k, v]).t())
    assert torch.equal(prepare_weight(q), q.t().contiguous())
    with pytest.raises(ValueError, match="same input size"):
        fuse_weights([q, torch.randn(4, 5)])


def test_config_table_lookup_uses_buckets():
    cfg_small = get_config(4096, 4096, 1, torch.bfloat16)
    assert get_config(4096, 4096, 1, torch.float16) == cfg_small
    assert not cfg_small.dense
    unknown = get_config(1000, 3001, 1, torch.bfloat16)
    assert unknown.block_n <= 256 and unknown.split_k >= 1


def test_config_table_file_overrides_the_builtin_table(tmp_path, monkeypatch):
    from teal.kernels import configs

    chosen = KernelConfig(block_n=256, block_r=16, split_k=4, num_stages=4, gather=True, dense_above=0.85)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(configs.table_to_json({(4096, 4096, 1, "bf16"): chosen})))
    assert configs.load_table(path) == {(4096, 4096, 1, "bf16"): chosen}
    builtin = get_config(4096, 4096, 1, torch.bfloat16)
    assert builtin != chosen
    monkeypatch.setenv(configs.CONFIGS_ENV, str(path))
    assert get_config(4096, 4096, 1, torch.float16) == chosen
    assert get_config(4096, 6144, 1, torch.bfloat16) == configs.TUNED[(4096, 6144, 1, "bf16")]  # not listed
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "teal-kernel-configs", "entries": [{"K": 1, "N": 2, "bucket": 1,
                                                                             "dtype": "bf16", "config": {"x": 1}}]}))
    with pytest.raises(ValueError, match="entry 0"):
        configs.load_table(bad)
    with pytest.raises(ValueError, match="not a teal kernel configuration table"):
        configs.load_table(_write(tmp_path / "other.json", "{}"))


def test_compact_is_refused_beyond_batch_one(tmp_path):
    """In-kernel survivor lists (``compact``) are a batch-1 path: a direct call with more rows, a table entry
    for a larger batch bucket and ``compact`` with ``use_dot`` each fail in one line naming the problem."""
    from teal.kernels import configs

    x = torch.randn(3, 64).to(torch.bfloat16)
    w_t = torch.randn(64, 40).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"compact=True, which runs batch 1 only, but x has 3 rows; use a config "
                                         r"without compact"):
        sparse_linear_triton(x, w_t, torch.tensor([0.5]), config=COMPACT)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(configs.table_to_json({(64, 40, 1, "bf16"): COMPACT, (64, 40, 2, "bf16"): COMPACT})))
    with pytest.raises(ValueError, match=r"entry 1 is not a valid configuration: compact=True runs batch 1 only, "
                                         r"but its bucket is 2"):
        configs.load_table(table)
    table.write_text(json.dumps(configs.table_to_json({(64, 40, 1, "bf16"): COMPACT})))
    assert configs.load_table(table) == {(64, 40, 1, "bf16"): COMPACT}
    with pytest.raises(ValueError, match="compact .batch 1. cannot be combined with use_dot"):
        KernelConfig(compact=True, use_dot=True)


def _write(path, text):
    path.write_text(text)
    return path


def test_bench_targets_json_and_plot(tmp_path):
    from teal.bench.kernels import check_targets, plot
    from teal.bench.results import write_json

    def row(proj, s, us, cublas_us, k=4096, n=14336):
        kept = (1 - s) * k * n * 2
        return dict(model="m", proj=proj, K=k, N=n, batch=1, sparsity=s, us=us, naive_us=3 * us, cublas_us=cublas_us,
                    weight_bytes=k * n * 2, rel_err=1e-3, eff_bw_frac=kept / (us * 1e-6) / 4e12,
                    speedup_vs_cublas=cublas_us / us)

    rows = [row("up", 0.0, 40.0, 41.0), row("up", 0.5, 20.0, 41.0), row("up", 0.65, 30.0, 41.0)]
    checks = {(c["check"], c["case"]): c["ok"] for c in check_targets(rows)}
    assert checks[("not_slower_than_cublas", "m/up s=0.0")]
    assert checks[("speedup_vs_cublas_at_0.5", "m/up s=0.5")]
    assert not checks[("eff_bw_frac", "m/up s=0.65")]  # 41 MB in 30 us is ~34% of 4 TB/s
    data = {"device": "test", "dtype": "bf16", "copy_bandwidth_Bps": 4e12, "results": rows}
    write_json(data, tmp_path / "k.json")
    assert (tmp_path / "k.json").read_text().startswith("{")
    plot(data, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_importing_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, teal.kernels; assert 'triton' not in sys.modules, 'teal.kernels imported triton'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ SiLU-gated input inside the kernel
@needs_interpreter
@pytest.mark.parametrize("config", [FMA, FMA_ONE_SPLIT, COMPACT], ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_glu_kernel_equals_silu_mul_then_kernel(config, dtype, monkeypatch):
    """One fused launch thresholds and multiplies the SiLU product the two-step path builds."""
    launches = _record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((repr(config), str(dtype), "glu")).encode()))
    k, n = 300, 131
    w_t = torch.randn(k, n, generator=gen).to(dtype)
    for sparsity, with_scale in ((0.0, False), (0.5, False), (0.5, True), (0.99, False)):
        gate_up = (2 * torch.randn(1, 2 * k, generator=gen)).to(dtype)
        mid = silu_mul(gate_up)
        thr = _thresholds(mid, sparsity, 1)
        scale = torch.rand(1, k, generator=gen) + 0.5 if with_scale else None
        out = torch.full((1, n), float("nan"), dtype=dtype)
        launches.clear()
        y = sparse_linear_glu_triton(gate_up, w_t, thr, scale, config=config, out=out)
        assert y is out and not torch.isnan(out).any()
        assert launches == [True]
        two_step = sparse_linear_triton(mid, w_t, thr, None, scale, config=config)
        ref = sparse_linear_glu_reference(gate_up, w_t, thr, scale, compute_dtype=torch.float64,
                                          out_dtype=torch.float64)
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        for name, want in (("two-step", two_step), ("float64", ref)):
            # the kernel's exp may differ from PyTorch's by an ulp: a product can round the other way
            err = float((out.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            assert err <= tol, (name, sparsity, with_scale, err)


def _record_launches(monkeypatch) -> list[bool]:
    """The ``glu`` flag of every ``sparse_gemv_kernel`` launch from now on."""
    launches: list[bool] = []
    real = kernel_ops._launch

    def spy(*args, glu=False, **kwargs):
        launches.append(glu)
        return real(*args, glu=glu, **kwargs)

    monkeypatch.setattr(kernel_ops, "_launch", spy)
    return launches


@needs_interpreter
def test_glu_falls_back_to_two_steps_where_the_kernel_cannot_fuse(monkeypatch):
    launches = _record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(41)
    k, n = 96, 40
    w_t = torch.randn(k, n, generator=gen).to(torch.bfloat16)
    gate_up = torch.randn(3, 2 * k, generator=gen).to(torch.bfloat16)  # batch 3: no fused launch
    thr = _thresholds(silu_mul(gate_up), 0.5, 1)
    for config in (None, GATHER, DENSE):
        y = sparse_linear_glu_triton(gate_up if config is None else gate_up[:1], w_t, thr, config=config)
        x = silu_mul(gate_up if config is None else gate_up[:1])
        assert torch.equal(y, sparse_linear_triton(x, w_t, thr, None, None, config=config))
    assert True not in launches


def test_glu_op_reference_fake_and_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(42)
    w_t = torch.randn(64, 24, generator=gen)
    gate_up = torch.randn(2, 128, generator=gen)
    thr = torch.tensor([0.2])
    y = sparse_linear_glu(gate_up, w_t, thr)
    assert torch.equal(y, sparse_linear(silu_mul(gate_up), w_t, thr))
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul(gate_up), torch.nn.functional.silu(gate) * up)
    torch.library.opcheck(torch.ops.teal.sparse_linear_glu.default, (gate_up, w_t, thr, None))
    traced = torch.compile(lambda g: sparse_linear_glu(g * 1.0, w_t, thr), backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(gate_up), y)
    with pytest.raises(ValueError, match=r"gate_up must be \[B, 2K\] with K=64"):
        sparse_linear_glu(gate_up[:, :100], w_t, thr)
    with pytest.raises(ValueError, match="thresholds must be a float tensor with one value per segment"):
        sparse_linear_glu(gate_up, w_t, torch.tensor([0.1, 0.2]))


# ------------------------------------------------------------------ programmatic dependent launch switch
def test_pdl_mode_reads_the_environment_and_is_off_off_hopper(monkeypatch):
    monkeypatch.delenv("TEAL_PDL", raising=False)
    assert kernel_ops.pdl_mode(torch.device("cpu")) == 0  # never on the CPU / interpreter
    assert kernel_ops.pdl_launch(0) == {"PDL": 0}
    assert kernel_ops.pdl_launch(1) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setenv("TEAL_PDL", "2")
    assert kernel_ops.pdl_mode(torch.device("cpu")) == 0
    monkeypatch.setattr(kernel_ops, "_interpreting", lambda: False)
    monkeypatch.setattr(kernel_ops, "_pdl_supported", lambda index: index == 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert kernel_ops.pdl_mode(torch.device("cuda")) == 2
    assert kernel_ops.pdl_mode(torch.device("cuda", 1)) == 0  # a device without PDL support
    monkeypatch.setenv("TEAL_PDL", "0")
    assert kernel_ops.pdl_mode(torch.device("cuda")) == 0
    monkeypatch.delenv("TEAL_PDL")
    assert kernel_ops.pdl_mode(torch.device("cuda")) == kernel_ops.DEFAULT_PDL
    monkeypatch.setenv("TEAL_PDL", "yes")
    with pytest.raises(ValueError, match="TEAL_PDL must be one of 0, 1, 2"):
        kernel_ops.pdl_mode(torch.device("cuda"))


@needs_interpreter
@pytest.mark.parametrize("weight_aware", [False, True])
def test_teal_linear_kernel_path_matches_its_masked_path(monkeypatch, weight_aware):
    """TealLinear's single-token kernel path (taken on CUDA) run here through the interpreted Triton kernel:
    the transposed weight shares storage with the nn.Linear, the output (bias added) and the zero
    counters equal the masked dense path's."""
    from teal.nn import TealLinear

    torch.manual_seed(11)
    lin = torch.nn.Linear(200, 72, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 1, 200).to(torch.bfloat16)  # batch 3, one token each: the kernel's case
    scale = torch.rand(200) + 0.5 if weight_aware else None
    thr = float(torch.quantile((x.abs().float() * (scale if scale is not None else 1.0)).flatten(), 0.5))
    masked = TealLinear(lin, thr, col_scale=scale)
    with torch.no_grad():
        expected = masked(x)
    kernel = TealLinear(lin, thr, col_scale=scale)
    kernel.enable_kernel()
    assert kernel.w_t.is_contiguous() and kernel.w_t.shape == (200, 72)
    assert kernel.linear.weight.data_ptr() == kernel.w_t.data_ptr()  # one copy of the weights
    calls = []

    def interpreted(x2, w_t, thresholds, splits=None, col_scale=None, **kw):
        calls.append(tuple(x2.shape))
        return sparse_linear_triton(x2, w_t, thresholds, splits, col_scale, config=FMA)

    monkeypatch.setattr("teal.kernels.sparse_linear", interpreted)
    with torch.no_grad():
        got = kernel._kernel_forward(x)
    assert calls == [(3, 200)]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err = float((got.double() - expected.double()).norm() / expected.double().norm())
    assert err < 1e-2
    assert int(kernel.zeros) == int(masked.zeros) and int(kernel.total) == int(masked.total) == x.numel()
    assert 0.4 < int(kernel.zeros) / int(kernel.total) < 0.6
