"""The CUDA C++ sparse GEMV (teal.kernels.cuda) on the CPU: launch geometry, configuration rules, the
fallback to the Triton kernel, and the source compiled with NVRTC for sm_90 in every variant the tuner
uses (NVRTC needs no GPU; the [dev] extra installs it). Correctness on the GPU: `python -m teal.bench.kernels`
self-check (benchmarks/results/)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (teal.kernels imports it lazily)

import dataclasses  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import CUOBJDUMP, requires_nvrtc  # noqa: E402
from teal.kernels import cuda, ops
from teal.kernels.configs import KernelConfig, get_config, heuristic_cuda_config
from teal.kernels.tune import candidate_configs, cuda_candidates


def _covered(k: int, splits: list[int], cfg: KernelConfig, dtype: torch.dtype,
             batch: int = 1) -> tuple[list[int], list[int]]:
    """Columns written and rows read by the launch geometry, simulated: how often each is covered."""
    geo = cuda.geometry(k, splits, cfg, dtype, batch)
    n = sum(splits)
    cols = [0] * n
    for cb in range(geo.grid[0]):
        seg = sum(cb >= s for s in geo.block_starts)
        seg_col = 0 if seg == 0 else geo.offsets[seg - 1]
        seg_cb = 0 if seg == 0 else geo.block_starts[seg - 1]
        seg_end = geo.offsets[seg] if seg < 3 else geo.n_end
        col0 = seg_col + (cb - seg_cb) * geo.block_n
        for c in range(col0, min(col0 + geo.block_n, seg_end)):
            cols[c] += 1
    rows = [0] * k
    for split in range(geo.grid[1]):
        for warp in range(geo.threads // 32):
            lo = min(k, split * geo.rows_per_split + warp * geo.rows_per_warp)
            hi = min(min(k, (split + 1) * geo.rows_per_split), lo + geo.rows_per_warp)
            for r in range(lo, hi):
                rows[r] += 1
    return cols, rows


@pytest.mark.parametrize(
    "k,splits,cfg,dtype",
    [
        (4096, [4096, 1024, 1024], KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True), torch.bfloat16),
        (1000, [1000, 1008, 1000], KernelConfig(block_n=512, block_r=4, split_k=2, num_warps=4, cuda=True), torch.float16),
        (200, [120, 184], KernelConfig(block_n=256, block_r=16, split_k=1, num_warps=16, cuda=True), torch.float32),
        (14336, [4096], KernelConfig(block_n=256, block_r=4, split_k=8, num_warps=16, cuda=True), torch.bfloat16),
        (100, [8, 16, 24, 32], KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True), torch.bfloat16),
        (1000, [1000, 1008, 1000], KernelConfig(block_n=128, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True),
         torch.bfloat16),
        (4096, [304], KernelConfig(block_n=256, block_r=16, split_k=8, num_warps=4, cuda=True, use_dot=True), torch.float16),
    ],
)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_geometry_covers_every_column_and_row_once(k, splits, cfg, dtype, batch):
    cols, rows = _covered(k, splits, cfg, dtype, batch)
    assert cols == [1] * sum(splits)
    # every row of w_t is owned by exactly one warp of each column block's cluster
    assert rows == [1] * k
    geo = cuda.geometry(k, splits, cfg, dtype, batch)
    assert geo.grid[1] == cfg.split_k and geo.threads == 32 * cfg.num_warps
    lists = 4 * (1 + batch) * cfg.num_warps * geo.rows_per_warp  # index + one value per input row
    assert geo.shared_bytes >= max(lists, 4 * (cfg.num_warps + 1) * batch * geo.block_n)


def test_block_width_follows_the_vector_size():
    cfg = KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=4, cuda=True)
    assert cuda.geometry(512, [512], cfg, torch.bfloat16).block_n == 256  # 8 bf16 per 16-byte vector
    assert cuda.geometry(512, [512], cfg, torch.float32).block_n == 256  # two 4-float vectors per lane
    narrow = KernelConfig(block_n=64, block_r=8, split_k=2, num_warps=4, cuda=True)
    assert cuda.geometry(512, [512], narrow, torch.bfloat16).block_n == 256  # at least one vector per lane
    with pytest.raises(ValueError, match="1..4 segments"):
        cuda.geometry(512, [128] * 5, cfg, torch.bfloat16)


def test_tensor_core_configs():
    """The tensor-core inner product (cuda + use_dot): 64-column slots, 16 rows a step, 16-bit inputs only, and
    a register budget that bounds the warps; every table entry that uses it passes the checks it will meet."""
    from teal.kernels.configs import TUNED_CUDA

    for block_n, slots in ((128, 2), (256, 4)):
        cfg = KernelConfig(block_n=block_n, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True)
        assert cuda.geometry(4096, [4096], cfg, torch.bfloat16, 8).block_n == block_n
        variant = cuda.variant_for(cfg, torch.float16, has_scale=False, glu=False, pdl=2, batch=8)
        assert variant.mma == slots and variant.unroll == cuda.MMA_ROWS and variant.vecs == 1
        assert "-DMMA=%d" % slots in variant.defines()
        assert cuda.register_problem(cfg, torch.bfloat16, 8) is None
        assert "fp32" in cuda.register_problem(cfg, torch.float32, 2)
    assert "fewer warps" in cuda.register_problem(
        KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=16, cuda=True, use_dot=True), torch.bfloat16, 4)
    assert "block_n 128 or 256" in cuda.register_problem(
        KernelConfig(block_n=512, block_r=16, split_k=4, num_warps=4, cuda=True, use_dot=True), torch.bfloat16, 4)
    assert cuda.variant_for(KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True), torch.bfloat16,
                            has_scale=False, glu=False, pdl=2, batch=8).mma == 0
    entries = [(key, cfg) for key, cfg in TUNED_CUDA.items() if cfg.use_dot]
    assert entries and all(key[2] > 1 for key, _ in entries)  # batches only
    for (k, n, bucket, _), cfg in entries:
        for batch in range(bucket // 2 + 1, bucket + 1):
            assert cuda.register_problem(cfg, torch.bfloat16, batch) is None
            assert get_config(k, n, batch, torch.bfloat16, 132, cuda_ok=True) == cfg
        assert cfg in cuda_candidates(k, n, 132, bucket)  # the tuner can reproduce it
    assert not any(c.use_dot for c in cuda_candidates(4096, 4096, 132, 1))  # batch 1 keeps the FMA loop


def test_list_step_covers_a_warp_in_one_round():
    assert [cuda.list_step(r) for r in (1, 32, 33, 64, 100, 224, 256, 1000)] == [1, 1, 2, 2, 4, 8, 8, 8]
    assert [cuda.list_step(224, b) for b in (1, 2, 3, 8)] == [8, 8, 4, 2]  # at most 16 values in registers


def test_rows_per_step_leaves_registers_for_the_batch():
    cfg = KernelConfig(block_n=256, block_r=16, split_k=8, num_warps=16, cuda=True)
    steps = [cuda.rows_per_step(cfg, torch.bfloat16, b) for b in (1, 2, 4, 8)]
    assert steps[0] == 16 and steps == sorted(steps, reverse=True) and steps[-1] >= 1


def test_cuda_config_rules():
    with pytest.raises(ValueError, match="cuda cannot be combined"):
        KernelConfig(cuda=True, gather=True)
    with pytest.raises(ValueError, match="split_k <= 8"):
        KernelConfig(cuda=True, split_k=16)
    with pytest.raises(ValueError, match="block_r <= 32"):
        KernelConfig(cuda=True, block_r=64)


def test_heuristic_cuda_config_fills_the_gpu():
    for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (640, 2048)]:
        cfg = heuristic_cuda_config(k, n, 132)
        assert cfg.cuda and cfg.block_n == 256
        programs = -(-n // 256) * cfg.split_k
        assert cfg.split_k <= 8 and (programs <= 2 * 132 or cfg.split_k == 1)
        assert cfg.split_k * 256 <= max(256, k)
    # untuned shape: CUDA heuristic only when the caller says the device runs it, and only at batch 1
    assert get_config(640, 2048, 1, torch.bfloat16, 132, cuda_ok=True).cuda
    assert not get_config(640, 2048, 1, torch.bfloat16, 132).cuda
    assert not get_config(640, 2048, 2, torch.bfloat16, 132, cuda_ok=True).cuda


def test_tuner_cuda_family():
    cands = candidate_configs(4096, 4096, 1, 132, families="cuda")
    assert any(c.cuda for c in cands) and any(not c.cuda for c in cands)  # timed against Triton
    assert all(c.split_k <= 8 for c in cuda_candidates(4096, 28672, 132))
    assert len(set(cands)) == len(cands)


def test_tuner_cuda_family_for_batches_times_the_dense_fallback():
    cands = candidate_configs(4096, 4096, 4, 132, families="cuda")
    assert KernelConfig(dense=True) in cands and any(c.cuda for c in cands)


def test_cuda_kernel_not_available_off_cuda():
    assert not ops.cuda_kernel_available(torch.device("cpu"))
    x = torch.randn(1, 64)
    reason = cuda.unsupported_reason(x, torch.randn(64, 64), [64], KernelConfig(cuda=True, split_k=2))
    assert reason is not None and "CUDA tensors" in reason


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_cuda_config_on_cpu_falls_back_to_triton_silently():
    gen = torch.Generator().manual_seed(0)
    k, splits = 96, [64, 40]
    x = torch.randn(1, k, generator=gen)
    w_t = torch.randn(k, sum(splits), generator=gen)
    thr = torch.tensor([0.5, 0.8])
    before = dict(ops.path_counts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for CPU tensors
        y = ops.sparse_linear_triton(x, w_t, thr, splits, config=KernelConfig(block_n=256, split_k=2, cuda=True))
    ref = ops.sparse_linear_reference(x, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)
    assert ops.path_counts["triton"] == before.get("triton", 0) + 1
    assert ops.path_counts.get("cuda", 0) == before.get("cuda", 0)


@requires_nvrtc
@pytest.mark.parametrize("elem,scale,glu", [(0, False, False), (1, True, True), (2, True, False)])
def test_source_compiles_for_sm90_without_spills(tmp_path, elem, scale, glu):
    """Every tuner shape of the kernel compiles for sm_90 with no local-memory spills, and the row loads of
    a step are issued before their products (all LDGs of the unrolled step precede the first FFMA)."""
    dtype = {0: torch.bfloat16, 1: torch.float16, 2: torch.float32}[elem]
    batches = (1,) if glu else (1, 3, 8) if elem == 0 else (1, 2)
    variants = {cuda.variant_for(dataclasses.replace(c, split_k=split), dtype, has_scale=scale, glu=glu, pdl=2,
                                 rows_per_warp=cuda.geometry(k, [4096], dataclasses.replace(c, split_k=split),
                                                             dtype, batch).rows_per_warp, batch=batch)
                for k in (4096, 14336)
                for batch in batches
                for c in cuda_candidates(k, 6144 if k == 4096 else 4096, 132, batch)
                for split in ((8,) if elem == 0 else (1,))
                if cuda.register_problem(c, dtype, batch) is None}
    if elem != 2 and not glu:  # the tensor-core inner product is compiled for the batches
        assert any(v.mma for v in variants)
    for variant in sorted(variants, key=repr):
        unroll, vecs = variant.unroll, variant.vecs
        cubin = tmp_path / "k.cubin"
        code, log = cuda.nvrtc_compile_with_log(cuda.source(), cuda.SOURCE_FILE,
                                                [*cuda.nvrtc_options(variant, "sm_90"), "-Xptxas", "-v"])
        cubin.write_bytes(code)
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert spills and all(s == "0" for s in spills), (variant, log)
        if CUOBJDUMP is not None:
            sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            product = "HMMA" if variant.mma else "FFMA"
            ops_seen = re.findall(r"\b(LDG\.E\.NA\.128\S*|FFMA|HMMA)", sass)
            first = ops_seen.index(next(o for o in ops_seen if o.startswith("LDG.E.NA.128")))
            burst = next((i for i, o in enumerate(ops_seen[first:]) if o == product), len(ops_seen) - first)
            if variant.mma:  # a step: 4 rows x (slots) vectors per lane, loaded before the first mma
                assert burst >= 4 * variant.mma and "HMMA" in ops_seen, (variant, ops_seen[first : first + 32])
            elif variant.batch == 1:  # (with several rows the compiler may interleave; timed on the GPU instead)
                assert burst >= unroll * vecs, (variant, ops_seen[first : first + 2 * unroll * vecs])


def test_config_lookup_order(tmp_path, monkeypatch):
    from teal.kernels import configs

    key = (4096, 4096, 1, "bf16")
    assert get_config(4096, 4096, 1, torch.bfloat16, cuda_ok=True) == configs.TUNED_CUDA[key]
    assert get_config(4096, 4096, 1, torch.float16, cuda_ok=True) == configs.TUNED_CUDA[key]  # fp16 shares bf16's
    assert get_config(4096, 4096, 1, torch.bfloat16) == configs.TUNED[key]  # no CUDA kernel: the Triton table
    assert get_config(4096, 4096, 2, torch.bfloat16, cuda_ok=True) == configs.TUNED_CUDA[(4096, 4096, 2, "bf16")]
    assert get_config(4096, 4096, 8, torch.bfloat16, cuda_ok=True).dense  # no entry: the dense fallback
    assert get_config(4096, 4096, 2, torch.bfloat16).dense  # no CUDA kernel: the Triton table's dense fallback
    # an override entry wins, but a CUDA one only where the device runs the CUDA kernel
    table = tmp_path / "table.json"
    override = KernelConfig(block_n=512, block_r=4, split_k=2, num_warps=4, cuda=True)
    table.write_text(__import__("json").dumps(configs.table_to_json({key: override})))
    monkeypatch.setenv(configs.CONFIGS_ENV, str(table))
    assert get_config(4096, 4096, 1, torch.bfloat16, cuda_ok=True) == override
    assert get_config(4096, 4096, 1, torch.bfloat16) == configs.TUNED[key]
    assert configs.load_table(table)[key] == override  # the cuda field round-trips


def test_dense_regime_has_its_own_table(tmp_path, monkeypatch):
    """Calls that use the kernel as a dense product (every threshold -inf) take TUNED_CUDA_DENSE where it has
    an entry, TUNED_CUDA elsewhere; override tables mark their dense entries."""
    from teal.kernels import configs

    key = (4096, 6144, 1, "bf16")
    assert configs.TUNED_CUDA_DENSE[key] != configs.TUNED_CUDA[key]
    assert get_config(4096, 6144, 1, torch.bfloat16, cuda_ok=True, regime="dense") == configs.TUNED_CUDA_DENSE[key]
    assert get_config(4096, 6144, 1, torch.bfloat16, cuda_ok=True) == configs.TUNED_CUDA[key]
    assert get_config(4096, 6144, 1, torch.bfloat16, regime="dense") == configs.TUNED[key]  # no CUDA kernel
    assert (4096, 12288, 1, "bf16") not in configs.TUNED_CUDA_DENSE
    assert (get_config(4096, 12288, 1, torch.bfloat16, cuda_ok=True, regime="dense")
            == configs.TUNED_CUDA[(4096, 12288, 1, "bf16")])
    with pytest.raises(ValueError, match="unknown kernel regime 'fast'"):
        get_config(4096, 6144, 1, torch.bfloat16, regime="fast")
    sparse_cfg = KernelConfig(block_n=256, block_r=4, split_k=2, num_warps=4, cuda=True)
    dense_cfg = KernelConfig(block_n=512, block_r=8, split_k=1, num_warps=8, cuda=True)
    only_sparse = (4096, 4096, 1, "bf16")
    table = tmp_path / "table.json"
    table.write_text(__import__("json").dumps(configs.table_to_json({key: sparse_cfg, only_sparse: sparse_cfg},
                                                                     {key: dense_cfg})))
    assert configs.load_table(table) == {key: sparse_cfg, only_sparse: sparse_cfg}
    assert configs.load_table(table, "dense") == {key: dense_cfg, only_sparse: sparse_cfg}  # unmarked: both
    monkeypatch.setenv(configs.CONFIGS_ENV, str(table))
    assert get_config(4096, 6144, 1, torch.bfloat16, cuda_ok=True, regime="dense") == dense_cfg
    assert get_config(4096, 6144, 1, torch.bfloat16, cuda_ok=True) == sparse_cfg
    bad = tmp_path / "bad.json"
    bad.write_text(__import__("json").dumps({"format": "teal-kernel-configs", "entries": [
        dict(K=1, N=2, bucket=1, dtype="bf16", regime="sometimes", config=sparse_cfg.as_dict())]}))
    with pytest.raises(ValueError, match="entry 0 .*regime 'sometimes'"):
        configs.load_table(bad)


def test_sparse_linear_regime_changes_only_the_launch():
    from teal.kernels.ops import sparse_linear, sparse_linear_glu

    gen = torch.Generator().manual_seed(0)
    x, w_t = torch.randn(1, 64, generator=gen), torch.randn(64, 48, generator=gen)
    thr = torch.tensor([0.3])
    assert torch.equal(sparse_linear(x, w_t, thr, regime="dense"), sparse_linear(x, w_t, thr))
    gate_up = torch.randn(1, 128, generator=gen)
    assert torch.equal(sparse_linear_glu(gate_up, w_t, thr, regime="dense"), sparse_linear_glu(gate_up, w_t, thr))
    with pytest.raises(ValueError, match="unknown kernel regime 'dens'"):
        sparse_linear(x, w_t, thr, regime="dens")


def test_tuner_picks_a_configuration_per_regime():
    """The sparse regime's pick is scored at the sparsities above 0 only; the dense regime's is the fastest
    CUDA C++ candidate at s = 0 (None where that is the sparse pick)."""
    from teal.kernels.tune import pick_best

    fast_dense = KernelConfig(block_n=512, block_r=8, split_k=2, num_warps=8, cuda=True)
    fast_sparse = KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True)
    times = {repr(fast_dense): [57.0, 31.7], repr(fast_sparse): [62.6, 30.1]}
    both = [fast_dense, fast_sparse]
    assert pick_best(both, times, bucket=1) == fast_dense  # the mean over 0 and 0.5 favours the dense one
    assert pick_best(both, {k: v[1:] for k, v in times.items()}, bucket=1) == fast_sparse


def test_pick_best_at_batches_allows_at_most_dense_slack_over_the_fallback():
    from teal.kernels.tune import pick_best

    dense = KernelConfig(dense=True)
    fast_sparse = KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True)
    steady = KernelConfig(block_n=256, block_r=4, split_k=8, num_warps=8, cuda=True)
    times = {repr(dense): [20.0, 20.0, 20.0], repr(fast_sparse): [24.0, 18.0, 5.0], repr(steady): [20.4, 17.0, 9.0]}
    configs = [dense, fast_sparse, steady]
    assert pick_best(configs, times, bucket=1) == fast_sparse  # batch 1: best mean relative time
    assert pick_best(configs, times, bucket=2) == steady  # 20.4: within DENSE_SLACK (3 %); 24 > 1.03 x 20 is not
    times[repr(steady)] = [21.0, 17.0, 9.0]
    assert pick_best(configs, times, bucket=4) == dense


def test_compiled_variants_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda, "nvrtc_version", lambda: "13.0")
    compiled = []

    def fake_compile(variant, arch):
        compiled.append((variant, arch))
        return b"\x7fELF" + repr(variant).encode()

    monkeypatch.setattr(cuda, "compile_cubin", fake_compile)
    variant = cuda.Variant(0, 8, 8, 1, 8, False, False, 2)
    first = cuda.cubin_for(variant, "sm_90")
    assert compiled == [(variant, "sm_90")]
    assert cuda.cubin_for(variant, "sm_90") == first and len(compiled) == 1  # from disk
    path = cuda.cache_path(variant, "sm_90", "13.0")
    assert path.read_bytes() == first and not list(path.parent.glob("*.tmp"))
    # another variant, architecture or compiler version is another entry
    other = cuda.Variant(0, 8, 8, 1, 8, True, False, 2)
    assert cuda.cache_path(other, "sm_90", "13.0") != path
    assert cuda.cache_path(variant, "sm_100", "13.0") != path and cuda.cache_path(variant, "sm_90", "12.8") != path
    # a damaged entry is compiled again and replaced
    path.write_bytes(b"garbage")
    assert cuda.cubin_for(variant, "sm_90") == first and len(compiled) == 2
    assert path.read_bytes() == first
    # a cache that cannot be written is not an error
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a directory")
    assert cuda.cubin_for(variant, "sm_90") == first and len(compiled) == 3


def test_default_kernel_at_zero_follows_the_dense_table(monkeypatch, tmp_path):
    """Dense decode puts q|k|v and o on the kernel where the CUDA C++ kernel runs, and the MLP groups only
    where the dense regime has an entry for their shape (Gemma-3-12B's, measured faster in the graph)."""
    import types

    import teal.engine.model as model
    from teal.engine.config import EngineConfig, shape_hf_config
    from teal.kernels import configs

    monkeypatch.setattr(model.ops, "cuda_kernel_available", lambda device: True)

    def default_for(shape: str, dtype=torch.bfloat16):
        fake = types.SimpleNamespace(config=EngineConfig.from_hf(shape_hf_config(shape)), dtype=dtype,
                                     device=torch.device("cuda"), effective_sparse_path="kernel")
        return model.Engine.default_kernel_at_zero.fget(fake)

    assert default_for("gemma-3-12b") == (True, True, True, True)
    assert default_for("gemma-3-12b", torch.float16) == (True, True, True, True)  # fp16 shares bf16's table
    assert default_for("llama-3-8b") == (True, True, False, False)
    assert default_for("llama-2-7b") == (True, True, False, False)
    assert configs.has_dense_entry(15360, 3840, torch.bfloat16)
    assert not configs.has_dense_entry(14336, 4096, torch.bfloat16)
    # a tuned override table changes launches, not which groups go on the kernel
    table = tmp_path / "table.json"
    entry = KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True)
    table.write_text(__import__("json").dumps(configs.table_to_json({}, {(14336, 4096, 1, "bf16"): entry})))
    monkeypatch.setenv(configs.CONFIGS_ENV, str(table))
    assert not configs.has_dense_entry(14336, 4096, torch.bfloat16)
    assert get_config(14336, 4096, 1, torch.bfloat16, cuda_ok=True, regime="dense") == entry
    cpu = types.SimpleNamespace(config=None, dtype=torch.bfloat16, device=torch.device("cpu"),
                                effective_sparse_path="kernel")
    assert model.Engine.default_kernel_at_zero.fget(cpu) == (False,) * 4


def test_benchmark_json_records_the_stated_source_commit(monkeypatch, tmp_path):
    """A GPU copy of the tree may carry a stale or no git history: $TEAL_SOURCE_COMMIT names the source;
    without it the commit comes from git, marked -dirty when tracked files differ from it."""
    from teal.bench import results as bench_results

    monkeypatch.setenv("TEAL_SOURCE_COMMIT", "abc1234")
    assert bench_results.git_commit() == "abc1234"
    monkeypatch.delenv("TEAL_SOURCE_COMMIT")
    root = Path(bench_results.__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                          cwd=root).stdout.strip()
    monkeypatch.chdir(tmp_path)  # the checkout holding teal, not the caller's directory
    found = bench_results.git_commit()
    if head:  # a checkout with history (CI's clone has it)
        assert found is not None and found.split("-")[0] == head
    else:
        assert found is None
    from teal.cli import environment

    env = environment()
    assert env["commit"] == found and env["date"].endswith("Z")


@requires_nvrtc
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_variants_compile_for_sm90_without_spills(tmp_path, weights):
    """The int8 / int4 variants of the CUDA kernel (``WFMT``) at the configurations the dispatch picks, for 1-8
    rows, bf16 and fp16, compile for sm_90 with no spills; at batch 1 a step's code loads (8 or 4 bytes per lane
    and row) come before the first FFMA in the SASS."""
    from teal.kernels.configs import quant_cuda_config

    variants = set()
    for dtype in (torch.bfloat16, torch.float16):
        for k, n in ((14336, 4096), (1000, 792)):
            for batch in ((1, 2, 8) if dtype == torch.bfloat16 else (1,)):
                cfg = quant_cuda_config(k, n, batch, 132, weights)
                assert cuda.register_problem(cfg, dtype, batch, weights) is None
                geo = cuda.geometry(k, [n], cfg, dtype, batch)
                variants.add(cuda.variant_for(cfg, dtype, has_scale=batch == 2, glu=False, pdl=2,
                                              rows_per_warp=geo.rows_per_warp, batch=batch, weights=weights,
                                              group=32 if k == 1000 else 128))
    assert {v.weights for v in variants} == {cuda.WEIGHT_CODES[weights]}
    load = "LDG.E.NA.64.CONSTANT" if weights == "int8" else "LDG.E.NA.CONSTANT"
    for variant in sorted(variants, key=repr):
        code, log = cuda.nvrtc_compile_with_log(cuda.source(), cuda.SOURCE_FILE,
                                                [*cuda.nvrtc_options(variant, "sm_90"), "-Xptxas", "-v"])
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert spills and all(s == "0" for s in spills), (variant, log)
        if CUOBJDUMP is not None and variant.batch == 1:
            cubin = tmp_path / "q.cubin"
            cubin.write_bytes(code)
            sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            # code loads: LDG.E.NA(.64).CONSTANT (the 128-bit scale loads are LDG.E.NA.128.CONSTANT)
            ops_seen = re.findall(r"\b(LDG\.E\.NA(?:\.64)?\.CONSTANT|FFMA)\b", sass)
            codes = [i for i, o in enumerate(ops_seen) if o.startswith(load)]
            assert codes, (variant, sorted(set(ops_seen)))
            first = codes[0]
            burst = next((i for i, o in enumerate(ops_seen[first:]) if o == "FFMA"), len(ops_seen) - first)
            assert burst >= variant.unroll * variant.vecs, (variant, ops_seen[first : first + 2 * variant.unroll])


@requires_nvrtc
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quant_sweep_candidates_that_fit_compile_without_spills(weights):
    """Every configuration a `--quant-configs sweep` would time at Llama-3-8B gate|up (`configs.quant_cuda_candidates`
    that `register_problem` accepts, batch 1 and 4) compiles for sm_90 with no spills, so a GPU sweep spends no
    time on a build that cannot run well; 512-column blocks are among them at batch 1."""
    from teal.kernels.configs import quant_cuda_candidates

    k, n = 4096, 28672
    seen = set()
    for batch in (1, 4):
        for cfg in quant_cuda_candidates(k, n, 132, batch):
            if cuda.register_problem(cfg, torch.bfloat16, batch, weights) is not None:
                continue
            geo = cuda.geometry(k, [n // 2, n // 2], cfg, torch.bfloat16, batch, weights)
            variant = cuda.variant_for(cfg, torch.bfloat16, has_scale=False, glu=False, pdl=2,
                                       rows_per_warp=geo.rows_per_warp, batch=batch, weights=weights, group=128)
            if variant in seen:
                continue
            seen.add(variant)
            _, log = cuda.nvrtc_compile_with_log(cuda.source(), cuda.SOURCE_FILE,
                                                 [*cuda.nvrtc_options(variant, "sm_90"), "-Xptxas", "-v"])
            spills = re.findall(r"(\d+) bytes spill stores", log)
            assert spills and all(x == "0" for x in spills), (variant, log)
    assert any(v.vecs == 2 and v.batch == 1 for v in seen), seen
    assert any(v.warps == 16 and v.batch == 1 for v in seen), seen  # the 16-warp int4 / int8 programs fit
    assert any(v.qpipe for v in seen) == (weights == "int4"), seen  # the cp.async ring: int4 only


@requires_nvrtc
def test_int4_ring_compiles_and_streams_through_shared_memory(tmp_path):
    """The int4 loop with the cp.async ring (``QPIPE``) compiles for sm_90 without spills in bf16 and fp16, with and
    without column scales, at groups 32 and 128; in the SASS the code words arrive by LDGSTS in committed groups
    (LDGDEPBAR), the loop waits with DEPBAR.LE SB0, S - 1 (step t complete, S - 1 steps still in flight) and reads
    them back from shared memory, and no code word is loaded into registers (no 32-bit LDG.E.NA.CONSTANT). The
    launch geometry puts the ring after the lists, 16-byte aligned, as the kernel computes it."""
    from teal.kernels.configs import KernelConfig

    for warps, stages in ((8, 3), (16, 2)):
        cfg = KernelConfig(block_n=256, block_r=32, split_k=4, num_warps=warps, num_stages=stages, cuda=True)
        geo = cuda.geometry(14336, [4096], cfg, torch.bfloat16, 1, "int4")
        plain = cuda.geometry(14336, [4096], dataclasses.replace(cfg, num_stages=1), torch.bfloat16, 1, "int4")
        lists = 4 * 2 * warps * geo.rows_per_warp
        assert geo.shared_bytes == max(-(-lists // 16) * 16 + 4 * warps * stages * 32 * 32, plain.shared_bytes)
        assert geo.shared_bytes <= cuda.SM90_SHARED_LIMIT
        assert cuda.geometry(14336, [4096], cfg, torch.bfloat16, 1, "int8").shared_bytes == plain.shared_bytes
        for dtype, scale, group in ((torch.bfloat16, False, 128), (torch.float16, True, 32)):
            variant = cuda.variant_for(cfg, dtype, has_scale=scale, glu=False, pdl=2, rows_per_warp=geo.rows_per_warp,
                                       batch=1, weights="int4", group=group)
            assert variant.qpipe == stages and f"-DQPIPE={stages}" in variant.defines()
            code = _compile_sm90_without_spills(variant)
            if CUOBJDUMP is None:
                continue
            cubin = tmp_path / "ring.cubin"
            cubin.write_bytes(code)
            sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            assert re.search(r"\bLDGSTS\.E\b", sass) and "LDGDEPBAR" in sass, variant
            assert re.search(rf"DEPBAR\.LE SB0, 0x{stages - 1}\b", sass), variant
            assert not re.search(r"\bLDG\.E\.NA\.CONSTANT\b", sass), variant  # no code word through registers
    assert cuda.variant_for(dataclasses.replace(cfg, num_stages=1), torch.bfloat16, has_scale=False, glu=False,
                            pdl=2, weights="int4", group=128).qpipe == 0


def test_quantized_rows_per_step_and_registers():
    """bf16 variants keep their rows per step; int4 at 5-8 rows takes at most 16 per step; a block too wide for
    the quantized sums is refused with the numbers, and fp32 inputs are refused for quantized weights."""
    cfg = KernelConfig(block_n=256, block_r=32, split_k=8, num_warps=8, cuda=True)
    assert cuda.rows_per_step(cfg, torch.bfloat16, 1) == 32
    assert cuda.rows_per_step(cfg, torch.bfloat16, 1, cuda.WEIGHT_CODES["int4"]) == 32
    assert cuda.rows_per_step(cfg, torch.bfloat16, 8, cuda.WEIGHT_CODES["int4"]) == 16
    wide = KernelConfig(block_n=512, block_r=16, split_k=4, num_warps=8, cuda=True)
    assert "int4" in (cuda.register_problem(wide, torch.bfloat16, 8, "int4") or "")
    assert "fp32" in (cuda.register_problem(cfg, torch.float32, 1, "int8") or "") or \
        "float32" in (cuda.register_problem(cfg, torch.float32, 1, "int8") or "")


def _isa_script():
    """benchmarks/scripts/quant_kernel_isa.py (the static instruction counter), imported from its path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "quant_kernel_isa.py"
    spec = importlib.util.spec_from_file_location("quant_kernel_isa", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_NVDISASM_MISSING = "nvdisasm not found (Triton's wheel ships it under triton/backends/nvidia/bin)"


#: Bounds on the int4 loop's hot-path instructions per code byte at Llama-3-8B gate|up's configuration (sm_90,
#: the script's counter): the loop measured 6.91 at batch 1 and 14.06 at batch 4, the int4 loop it replaced
#: (a group check per listed row, git history) 12.41 and 20.63
#: (benchmarks/results/2026-12-07-cpu-quant-kernel-isa-llama-3-8b.json).
INT4_HOT_PER_CODE_BYTE_MAX = {1: 9.0, 4: 17.0}


@requires_nvrtc
@pytest.mark.parametrize("batch", sorted(INT4_HOT_PER_CODE_BYTE_MAX))
def test_int4_loop_instructions_per_code_byte(batch):
    """The int4 loop's hot path (sm_90 SASS, the script's counter) stays under ``INT4_HOT_PER_CODE_BYTE_MAX``
    (which the replaced loop exceeds), with no spills, one group-change region per step, one byte permute per
    code and one FFMA per code and input row (no FADD per code)."""
    isa = _isa_script()
    dis = isa.find_disassembler()
    if dis is None:
        pytest.skip(_NVDISASM_MISSING)
    row = isa.count_variant(isa.variant_of("int4", batch), dis)
    assert row["spill_store_bytes"] == 0 and row["group_change_regions"] == 1, row
    assert row["hot_per_code_byte"] <= INT4_HOT_PER_CODE_BYTE_MAX[batch], (row["hot_per_code_byte"], row["hot_opcodes"])
    codes = row["code_bytes_per_step"] * 2
    assert row["hot_opcodes"]["PRMT"] == codes and row["hot_opcodes"]["FFMA"] == codes * batch, row["hot_opcodes"]


@requires_nvrtc
def test_isa_counter_finds_the_loop_and_its_group_change():
    """The counter on the int8 and int4 loops: int8 has no group change and one code load per row and vector;
    int4 one group-change region (between steps) holding the scale/zero loads of the group the list skipped to
    and of the next one, and one code load per row and vector."""
    isa = _isa_script()
    dis = isa.find_disassembler()
    if dis is None:
        pytest.skip(_NVDISASM_MISSING)
    int8 = isa.count_variant(isa.variant_of("int8", 1), dis)
    int4 = isa.count_variant(isa.variant_of("int4", 1), dis)
    assert int8["group_change_regions"] == 0 and int8["code_loads_per_step"] == int8["unroll"] * int8["vecs"]
    assert int4["group_change_regions"] == 1 and int4["code_loads_per_step"] == int4["unroll"] * int4["vecs"]
    assert int4["group_change_opcodes"]["LDG"] == 4 * int4["vecs"]  # scale and zero, twice


# ---- the STAMPS build (per-stage timeline, measuring only) --------------------------------------------------

#: %globaltimer reads of the STAMPS build: a warp's start, waited, listed, first (list empty), first (in the weight
#: loop, once the step's first load is back), streamed; the program's met, summed, clustered, end.
STAMP_SITES = 10
#: Kernel parameters of the default build (the host passes these 21; the STAMPS build takes `stamps` as a 22nd).
DEFAULT_PARAMS = 21


def _ptx(variant: cuda.Variant) -> str:
    """The variant's PTX (NVRTC for the virtual architecture compute_90)."""
    import ctypes

    nv = cuda.nvrtc_library()
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), cuda.source().encode(), cuda.SOURCE_FILE.encode(), 0, None,
                                 None) == 0
    try:
        options = [o.encode() for o in cuda.nvrtc_options(variant, "compute_90")]
        result = nv.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        assert result == 0, f"NVRTC error {result} for {variant}"
        size = ctypes.c_size_t()
        assert nv.nvrtcGetPTXSize(prog, ctypes.byref(size)) == 0
        buf = ctypes.create_string_buffer(size.value)
        assert nv.nvrtcGetPTX(prog, buf) == 0
        return buf.value.decode()
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


def _llama3_8b_variants() -> list[cuda.Variant]:
    """The batch-1 bf16 builds the Llama-3-8B projections launch (both regimes' tables; down with SiLU·up
    inside), PDL 2 (the engine's), and one with PDL 0."""
    variants = set()
    for k, n, glu in ((4096, 6144, False), (4096, 4096, False), (4096, 28672, False), (14336, 4096, True)):
        for regime in ("sparse", "dense"):
            cfg = get_config(k, n, 1, torch.bfloat16, 132, cuda_ok=True, regime=regime)
            rows = cuda.geometry(k, [n], cfg, torch.bfloat16).rows_per_warp
            for pdl in (2, 0) if glu and regime == "sparse" else (2,):
                variants.add(cuda.variant_for(cfg, torch.bfloat16, has_scale=False, glu=glu, pdl=pdl, rows_per_warp=rows))
    return sorted(variants, key=repr)


def _params(ptx: str) -> int:
    """Parameters the kernel's PTX entry declares."""
    return len(re.findall(r"^\s*\.param\b[^\n]*\bteal_sparse_gemv_param_\d+", ptx, flags=re.M))


@requires_nvrtc
def test_default_build_takes_no_stamps():
    """Without STAMPS (every build the engine runs) the kernel reads no timer or SM id and takes its 21 parameters;
    ``Variant.defines`` names STAMPS only when it is on (so the compile options and cache keys of the default
    builds are unchanged)."""
    for variant in _llama3_8b_variants():
        assert not variant.stamps and not any("STAMPS" in d for d in variant.defines())
        ptx = _ptx(variant)
        assert "globaltimer" not in ptx and "%smid" not in ptx, variant
        assert _params(ptx) == DEFAULT_PARAMS, variant
    assert "-DSTAMPS=1" in dataclasses.replace(_llama3_8b_variants()[0], stamps=True).defines()


def _compile_sm90_without_spills(variant: cuda.Variant) -> bytes:
    """The variant's sm_90 cubin, after asserting that ptxas reported no spill stores."""
    code, log = cuda.nvrtc_compile_with_log(cuda.source(), cuda.SOURCE_FILE,
                                            [*cuda.nvrtc_options(variant, "sm_90"), "-Xptxas", "-v"])
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(s == "0" for s in spills), (variant, log)
    return code


def _sass_lines(code: bytes, tmp_path: Path) -> list[str]:
    cubin = tmp_path / "stamps.cubin"
    cubin.write_bytes(code)
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", sass)]


@requires_nvrtc
def test_stamps_build_reads_the_timer_at_every_stage(tmp_path):
    """The STAMPS build of every Llama-3-8B batch-1 variant: %globaltimer read at STAMP_SITES places (PTX and SASS),
    %smid once, `stamps` as a 22nd parameter, no spills; in the SASS a step's weight loads still precede its
    first product, and the in-loop stamp's timer read comes after a compare of the step's loaded register (so
    it cannot issue before that load is back)."""
    for base in _llama3_8b_variants():
        variant = dataclasses.replace(base, stamps=True)
        ptx = _ptx(variant)
        assert ptx.count("%globaltimer") == STAMP_SITES and ptx.count("%smid") == 1, variant
        assert _params(ptx) == DEFAULT_PARAMS + 1, variant
        code = _compile_sm90_without_spills(variant)
        if CUOBJDUMP is None:
            continue
        lines = _sass_lines(code, tmp_path)
        timer = [i for i, line in enumerate(lines) if "SR_GLOBALTIMER" in line]
        assert len(timer) == STAMP_SITES, (variant, [lines[i] for i in timer])
        loads = [i for i, line in enumerate(lines) if "LDG.E.NA.128" in line]
        first_load = loads[0]
        first_product = next(i for i in range(first_load, len(lines)) if lines[i].split()[0].endswith("FFMA")
                             or " FFMA " in f" {lines[i]} ")
        burst = [i for i in loads if i < first_product]
        assert len(burst) >= variant.unroll * variant.vecs, (variant, lines[first_load:first_product])
        in_step = [i for i in timer if first_load < i < first_product]
        assert len(in_step) == 1, (variant, lines[first_load:first_product])
        loaded = {}
        for i in burst:
            dst = int(re.search(r"LDG\.E\.NA\.128\S*\s+R(\d+)", lines[i]).group(1))
            loaded.update({f"R{dst + j}": i for j in range(4)})
        guards = [i for i in range(first_load, in_step[0])
                  if re.search(r"ISETP\.NE\.U32\.AND P\d+, PT, (R\d+), -0x1", lines[i])
                  and loaded.get(re.search(r"ISETP\.NE\.U32\.AND P\d+, PT, (R\d+)", lines[i]).group(1), len(lines)) < i]
        assert guards, (variant, lines[first_load:in_step[0] + 1])


def test_stamps_launch_rejects_a_wrong_buffer():
    """`launch(stamps=...)` names the shape it needs, and refuses the tensor-core loop (no stamps there); checked
    before anything reaches the device."""
    cfg = KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True)
    x, w_t, y = torch.zeros(1, 1000, dtype=torch.bfloat16), torch.zeros(1000, 512, dtype=torch.bfloat16), None
    shape = cuda.stamps_shape(1000, [512], cfg, torch.bfloat16)
    assert shape == (2 * 4, 8 + 1, 5)
    with pytest.raises(ValueError, match=r"int64 tensor of shape \(8, 9, 5\)"):
        cuda.launch(x, w_t, y, torch.zeros(1), None, [512], cfg, stamps=torch.zeros(8, 9, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="FMA loop only"):
        cuda.launch(x, w_t, y, torch.zeros(1), None, [512], dataclasses.replace(cfg, use_dot=True, block_r=16),
                    stamps=torch.zeros(shape, dtype=torch.int64))
