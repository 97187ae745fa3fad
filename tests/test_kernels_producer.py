"""Producer ops (add + RMSNorm / SiLU * up that also list survivors) and the gather GEMV on those lists:
Triton kernels through the CPU interpreter against the plain-torch references, and the engine's
producer path against its default path."""

from __future__ import annotations

import json
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (teal.kernels imports it lazily)

import pytest
import torch

from teal.kernels import KernelConfig, SurvivorLists, add_rmsnorm_compact, gather_linear, get_gather_config
from teal.kernels import configs, producer
from teal.kernels.ops import compact_input, last_gather_branches
from teal.kernels.producer import (
    NORM_CHUNK,
    SILU_CHUNK,
    SILU_PREFIX,
    add_rmsnorm_compact_reference,
    add_rmsnorm_compact_triton,
    gather_linear_reference,
    gather_linear_triton,
    silu_mul_compact_reference,
    silu_mul_compact_triton,
    survivor_lists_reference,
)

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)

EPS = 1e-5
K_ODD = 1000  # not a multiple of any block
SPARSITIES = (0.0, 0.5, 0.99, 1.0)  # 1.0: nothing survives (threshold +inf)


def _thresholds(act: torch.Tensor, sparsity: float, segments: int) -> torch.Tensor:
    """Per-segment thresholds around the |act| quantile (-inf keeps everything, +inf drops everything)."""
    if sparsity == 0:
        return torch.full((segments,), float("-inf"))
    if sparsity >= 1:
        return torch.full((segments,), float("inf"))
    base = float(torch.quantile(act.abs().float().flatten(), sparsity))
    return torch.tensor([base * (1.0 + 0.15 * j) for j in range(segments)], dtype=torch.float32)


def _poisoned_lists(k: int, segments: int) -> SurvivorLists:
    return SurvivorLists(torch.full((segments * k,), -7, dtype=torch.int32),
                         torch.full((segments * k,), float("nan")),
                         torch.full((segments * k,), float("nan")),
                         torch.full((segments,), -1, dtype=torch.int32))


def _assert_lists_equal(got: SurvivorLists, ref: SurvivorLists, k: int) -> None:
    """Counts, masked inputs and every listed entry equal (global layout: segment j's survivors at
    ``j*K + rank``); entries past a segment's count are not specified."""
    assert torch.equal(got.counts, ref.counts)
    assert torch.equal(got.xm, ref.xm), "masked input differs (or was left unwritten)"
    for j, ((idx, val), (ref_idx, ref_val)) in enumerate(zip(got.survivors(k), ref.survivors(k))):
        assert torch.equal(idx, ref_idx), f"segment {j} indices"
        assert torch.equal(val, ref_val), f"segment {j} values"


def _seed(*parts) -> int:
    """A seed that is the same in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _assert_within_one_ulp(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, most: int = 4) -> None:
    """No NaN, every entry within one ulp of ``ref`` (bf16 / fp16), at most ``most`` entries differing."""
    diff = (got.float() - ref.float()).abs()
    ulp = ref.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) + 1e-30
    assert not torch.isnan(got).any() and bool((diff <= ulp).all()) and int((diff > 0).sum()) <= most


def _row_inputs(gen: torch.Generator, k: int, dtype: torch.dtype):
    x = torch.randn(1, k, generator=gen).to(dtype)
    delta = torch.randn(1, k, generator=gen).to(dtype)
    weight = (1.0 + 0.2 * torch.randn(k, generator=gen)).to(dtype)
    return x, delta, weight


# ------------------------------------------------------------------ add + RMSNorm producer
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("segments, chunk", [(1, NORM_CHUNK), (3, 128)])
@pytest.mark.parametrize("scaled", [False, True], ids=["magnitude", "weight-aware"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama-norm", "gemma-norm"])
def test_add_rmsnorm_compact_matches_reference(dtype, segments, chunk, scaled, offset):
    """K = 1000 in chunks of 512 (a full chunk and a partial one) or of 128 (8 programs per segment, each
    counting the survivors of all earlier chunks); Llama's norm, or Gemma's (1 + w) rounded once."""
    from teal.engine.model import rms_norm  # the engine's norm: the producer's reference itself

    gen = torch.Generator().manual_seed(_seed(str(dtype), segments, scaled, offset))
    x, delta, weight = _row_inputs(gen, K_ODD, dtype)
    scale = (torch.rand(segments, K_ODD, generator=gen) + 0.5) if scaled else None
    h_engine = rms_norm(x + delta, weight, EPS, offset)
    for sparsity in SPARSITIES:
        thr = _thresholds(h_engine, sparsity, segments)
        out = (torch.full_like(x, float("nan")), torch.full_like(x, float("nan")), _poisoned_lists(K_ODD, segments))
        x_new, h, lists = add_rmsnorm_compact_triton(x, delta, weight, EPS, thr, scale, segments, offset,
                                                     chunk=chunk, out=out)
        assert x_new.data_ptr() == out[0].data_ptr() and lists.idx.data_ptr() == out[2].idx.data_ptr()
        assert lists.counts.shape == (segments,)
        assert torch.equal(x_new, x + delta)
        # the kernel sums squares in another order than PyTorch: a rare one-ulp difference in h is allowed
        # (seen on 1 of 120 random rows, 4 entries); the lists must be exact for the kernel's own h
        _assert_within_one_ulp(h, h_engine, dtype)
        _assert_lists_equal(lists, survivor_lists_reference(h, thr, scale, segments), K_ODD)
        expected_none = sparsity >= 1
        assert (lists.counts == 0).all() == expected_none
        if sparsity == 0:
            assert (lists.counts == K_ODD).all()


@needs_interpreter
def test_add_rmsnorm_compact_fp32_and_op_dispatch():
    gen = torch.Generator().manual_seed(3)
    x, delta, weight = _row_inputs(gen, 300, torch.float32)
    thr = torch.tensor([0.4, 0.8])
    x_new, h, lists = add_rmsnorm_compact(x, delta, weight, EPS, thr)  # the custom op: Triton under interpret
    ref_x, ref_h, ref_lists = add_rmsnorm_compact_reference(x, delta, weight, EPS, thr, None, 2)
    assert torch.equal(x_new, ref_x) and torch.equal(h, ref_h)
    _assert_lists_equal(lists, ref_lists, 300)


# ------------------------------------------------------------------ SiLU * up producer
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["magnitude", "weight-aware"])
@pytest.mark.parametrize("chunk, prefix", [(SILU_CHUNK, SILU_PREFIX), (256, 128)], ids=["default", "small"])
def test_silu_mul_compact_matches_reference(dtype, scaled, chunk, prefix):
    """K = 2500: three chunks of 1024 (the last one partial), or ten of 256 whose programs count the
    earlier survivors in steps of 128 (up to 18 steps, the last one partial)."""
    gen = torch.Generator().manual_seed(_seed(str(dtype), scaled, "silu"))
    k = 2500
    gate_up = (2 * torch.randn(1, 2 * k, generator=gen)).to(dtype)
    scale = (torch.rand(1, k, generator=gen) + 0.5) if scaled else None
    mid_ref, _ = silu_mul_compact_reference(gate_up, torch.tensor([0.0]), scale)
    for sparsity in SPARSITIES:
        thr = _thresholds(mid_ref, sparsity, 1)
        out = (torch.full((1, k), float("nan"), dtype=dtype), _poisoned_lists(k, 1))
        mid, lists = silu_mul_compact_triton(gate_up, thr, scale, chunk=chunk, prefix=prefix, out=out)
        assert mid.data_ptr() == out[0].data_ptr()
        # exp may round differently from PyTorch's: allow a rare one-ulp difference in mid
        _assert_within_one_ulp(mid, mid_ref, dtype)
        assert lists.counts.shape == (1,)
        _assert_lists_equal(lists, survivor_lists_reference(mid, thr, scale, 1), k)


# ------------------------------------------------------------------ gather GEMV on precomputed lists
GATHER_HAND = KernelConfig(block_n=64, block_r=16, split_k=4, gather=True)
GATHER_PIPE = KernelConfig(block_n=32, block_r=8, split_k=2, num_stages=3, gather=True)
GATHER_ONE_SPLIT = KernelConfig(block_n=128, block_r=32, split_k=1, gather=True)


@needs_interpreter
@pytest.mark.parametrize("config", [GATHER_HAND, GATHER_PIPE, GATHER_ONE_SPLIT], ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gather_linear_matches_float64(config, dtype):
    gen = torch.Generator().manual_seed(_seed(repr(config), str(dtype)))
    k, splits = 200, [150, 101, 50]
    x, delta, weight = _row_inputs(gen, k, dtype)
    w_t = torch.randn(k, sum(splits), generator=gen).to(dtype)
    scale = torch.rand(3, k, generator=gen) + 0.5
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for sparsity in SPARSITIES:
        _, h, lists = add_rmsnorm_compact_reference(x, delta, weight, EPS, torch.zeros(3), None, 3)
        thr = _thresholds(h, sparsity, 3)
        lists = survivor_lists_reference(h, thr, scale, 3)
        out = torch.full((1, sum(splits)), float("nan"), dtype=dtype)
        y = gather_linear_triton(*lists, w_t, splits, config=config, out=out)
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any(), "output left unwritten"
        ref = gather_linear_reference(*lists, w_t, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
        if sparsity >= 1:
            assert (y == 0).all()
            continue
        err = float((y.double() - ref).norm() / ref.norm())
        assert err <= tol, f"s={sparsity}: rel err {err:.2e}"


@needs_interpreter
def test_producer_then_gather_equals_sparse_linear():
    from teal.kernels import sparse_linear_reference

    gen = torch.Generator().manual_seed(11)
    k, splits = 256, [96, 64]
    x, delta, weight = _row_inputs(gen, k, torch.bfloat16)
    w_t = torch.randn(k, sum(splits), generator=gen).to(torch.bfloat16)
    thr, scale = torch.tensor([0.6, 0.9]), torch.rand(2, k, generator=gen) + 0.5
    _, h, lists = add_rmsnorm_compact(x, delta, weight, EPS, thr, scale)
    y = gather_linear(lists, w_t, splits)
    ref = sparse_linear_reference(h, w_t, thr, splits, scale, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert float((y.double() - ref).norm() / ref.norm()) <= 1e-2


UNEVEN_HAND = KernelConfig(block_n=32, block_r=8, split_k=4, gather=True)
UNEVEN_PIPE = KernelConfig(block_n=32, block_r=8, split_k=4, num_stages=3, gather=True)
# survivors per chunk of 256 entries (K = 1000: chunks 0-2 full, chunk 3 has 232 entries)
UNEVEN_PATTERNS = {
    "last-chunk-only": (0, 0, 0, 150),
    "first-chunk-only": (200, 0, 0, 0),
    "one-empty-all-three": (1, 0, 256, 3),
    "all-but-one-chunk": (256, 256, 0, 232),
}


@needs_interpreter
@pytest.mark.parametrize("pattern", list(UNEVEN_PATTERNS))
@pytest.mark.parametrize("config", [UNEVEN_HAND, UNEVEN_PIPE], ids=["hand", "pipelined"])
def test_lists_and_gather_with_survivors_crowded_in_few_chunks(pattern, config):
    """Survivors crowded into few chunks (empty chunks between them): SiLU * up's programs count the
    survivors before their chunk (steps of 64 entries) and list theirs at the right global ranks, and the
    gather's even split over split_k = 4 holds."""
    gen = torch.Generator().manual_seed(_seed(pattern, repr(config)))
    k, chunk, n = 1000, 256, 40
    per_chunk = UNEVEN_PATTERNS[pattern]
    keep = torch.zeros(k, dtype=torch.bool)
    for c, count in enumerate(per_chunk):
        width = min(chunk, k - c * chunk)
        keep[c * chunk + torch.randperm(width, generator=gen)[:count]] = True
    gate = torch.where(keep, 3.0, torch.randn(k, generator=gen))
    up = torch.where(keep, 1.0 + torch.rand(k, generator=gen), 0.0) * torch.sign(torch.randn(k, generator=gen))
    gate_up = torch.cat([gate, up])[None].to(torch.bfloat16)
    thr = torch.tensor([0.5])
    mid, lists = silu_mul_compact_triton(gate_up, thr, None, chunk=chunk, prefix=64,
                                         out=(torch.empty(1, k, dtype=torch.bfloat16), _poisoned_lists(k, 1)))
    assert lists.counts.tolist() == [sum(per_chunk)]
    _assert_lists_equal(lists, survivor_lists_reference(mid, thr, None, 1), k)
    w_t = torch.randn(k, n, generator=gen).to(torch.bfloat16)
    y = gather_linear_triton(*lists, w_t, None, config=config, out=torch.full((1, n), float("nan"),
                                                                              dtype=torch.bfloat16))
    assert not last_gather_branches(w_t.device).any(), "the gather branch must run"
    ref = gather_linear_reference(*lists, w_t, None, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert not torch.isnan(y).any()
    assert float((y.double() - ref).norm() / ref.norm()) <= 1e-2
    # two segments with different survivors: the second keeps only the largest half
    scale = torch.ones(2, k)
    two = survivor_lists_reference(mid, torch.tensor([0.5, float(mid.abs().float()[0, keep].median())]), scale, 2)
    assert two.counts.shape == (2,) and int(two.counts[0]) != int(two.counts[1])
    w2 = torch.randn(k, 2 * n, generator=gen).to(torch.bfloat16)
    y2 = gather_linear_triton(*two, w2, [n, n], config=config)
    ref2 = gather_linear_reference(*two, w2, [n, n], compute_dtype=torch.float64, out_dtype=torch.float64)
    assert float((y2.double() - ref2).norm() / ref2.norm()) <= 1e-2


@needs_interpreter
def test_compact_input_writes_the_producers_layout():
    """Phase A (``sparse_linear``'s own gather path) writes the same lists as the producers."""
    gen = torch.Generator().manual_seed(13)
    k = 2500  # chunks of 1024, the last one partial
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    thr, scale = torch.tensor([0.3, 1.2]), torch.rand(2, k, generator=gen) + 0.5
    idx, val, xm, counts = (t.clone() for t in compact_input(x, thr, scale, 2))
    lists = SurvivorLists(idx[: 2 * k], val[: 2 * k], xm[: 2 * k], counts[:2])
    _assert_lists_equal(lists, survivor_lists_reference(x, thr, scale, 2), k)


# ------------------------------------------------------------------ ops: CPU reference, fake impls, errors
def test_ops_without_interpreter_use_the_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(5)
    x, delta, weight = _row_inputs(gen, 40, torch.float32)
    thr = torch.tensor([0.3, 0.5, 0.7])
    x_new, h, lists = add_rmsnorm_compact(x, delta, weight, EPS, thr)
    ref = add_rmsnorm_compact_reference(x, delta, weight, EPS, thr, None, 3)
    assert torch.equal(x_new, ref[0]) and torch.equal(h, ref[1])
    assert all(torch.equal(a, b) for a, b in zip(lists, ref[2]))
    w_t = torch.randn(40, 12, generator=gen)
    y = gather_linear(lists, w_t, [4, 4, 4])
    expect = torch.cat([lists.xm[j * 40 : (j + 1) * 40] @ w_t[:, 4 * j : 4 * j + 4] for j in range(3)])
    torch.testing.assert_close(y, expect[None])
    mid, mid_lists = producer.silu_mul_compact(torch.randn(1, 24, generator=gen), torch.tensor([0.1]))
    assert mid.shape == (1, 12) and int(mid_lists.counts.sum()) == int((mid.abs() > 0.1).sum())


def test_ops_pass_torch_library_opcheck(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the references: list entries past the counts are then defined
    gen = torch.Generator().manual_seed(23)
    x, delta, weight = _row_inputs(gen, 48, torch.float32)
    thr = torch.tensor([0.2, 0.4])
    torch.library.opcheck(torch.ops.teal.add_rmsnorm_compact.default, (x, delta, weight, EPS, thr, None, 2))
    lists = add_rmsnorm_compact_reference(x, delta, weight, EPS, thr, None, 2)[2]
    w_t = torch.randn(48, 10, generator=gen)
    torch.library.opcheck(torch.ops.teal.gather_linear.default, (*lists, w_t, [6, 4]))
    torch.library.opcheck(torch.ops.teal.silu_mul_compact.default, (torch.randn(1, 64, generator=gen),
                                                                    torch.tensor([0.1]), None))


def test_fake_impls_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1, 96, dtype=torch.bfloat16)
        outs = torch.ops.teal.add_rmsnorm_compact(x, x, torch.empty(96, dtype=torch.bfloat16), EPS,
                                                  torch.empty(3), torch.empty(3, 96), 3)
        assert [tuple(o.shape) for o in outs] == [(1, 96), (1, 96), (288,), (288,), (288,), (3,)]
        assert [o.dtype for o in outs[2:]] == [torch.int32, torch.float32, torch.float32, torch.int32]
        y = torch.ops.teal.gather_linear(*outs[2:], torch.empty(96, 30, dtype=torch.bfloat16), [10, 10, 10])
        assert y.shape == (1, 30) and y.dtype == torch.bfloat16
        mid = torch.ops.teal.silu_mul_compact(torch.empty(1, 64, dtype=torch.float16), torch.empty(1), None)
        assert mid[0].shape == (1, 32) and mid[1].shape == (32,) and mid[4].shape == (1,)
        big = torch.ops.teal.add_rmsnorm_compact(torch.empty(1, 4096, dtype=torch.bfloat16),
                                                 torch.empty(1, 4096, dtype=torch.bfloat16),
                                                 torch.empty(4096, dtype=torch.bfloat16), EPS, torch.empty(2), None, 2)
        assert big[5].shape == (2,)


def test_argument_errors_name_the_problem():
    x = torch.zeros(1, 16)
    w = torch.ones(16)
    with pytest.raises(ValueError, match="batch 1"):
        add_rmsnorm_compact_reference(torch.zeros(2, 16), torch.zeros(2, 16), w, EPS, torch.zeros(1), None, 1)
    with pytest.raises(ValueError, match="delta must match x"):
        add_rmsnorm_compact_reference(x, torch.zeros(1, 16, dtype=torch.float16), w, EPS, torch.zeros(1), None, 1)
    with pytest.raises(ValueError, match="norm_weight"):
        add_rmsnorm_compact_reference(x, x, torch.ones(15), EPS, torch.zeros(1), None, 1)
    with pytest.raises(ValueError, match="one value per segment"):
        add_rmsnorm_compact_reference(x, x, w, EPS, torch.zeros(2), None, 3)
    with pytest.raises(ValueError, match="segments must be"):
        add_rmsnorm_compact_reference(x, x, w, EPS, torch.zeros(5), None, 5)
    with pytest.raises(ValueError, match="col_scale"):
        add_rmsnorm_compact_reference(x, x, w, EPS, torch.zeros(1), torch.ones(2, 16), 1)
    with pytest.raises(ValueError, match="even width"):
        silu_mul_compact_reference(torch.zeros(1, 15), torch.zeros(1), None)
    lists = survivor_lists_reference(x, torch.zeros(2), None, 2)
    with pytest.raises(ValueError, match="summing to N"):
        gather_linear_reference(*lists, torch.zeros(16, 8), [3, 4])
    with pytest.raises(ValueError, match="idx must be"):
        gather_linear_reference(*lists, torch.zeros(16, 8), [8])  # lists of two segments, one split
    with pytest.raises(ValueError, match="counts must be"):
        gather_linear_reference(lists.idx, lists.val, lists.xm, lists.counts[None], torch.zeros(16, 8), [4, 4])
    with pytest.raises(ValueError, match="counts must be"):  # one count per segment
        gather_linear_reference(lists.idx, lists.val, lists.xm, torch.zeros(3, dtype=torch.int32), torch.zeros(16, 8),
                                [4, 4])
    with pytest.raises(ValueError, match="out lists must be shaped"):
        silu_mul_compact_triton(torch.zeros(1, 32), torch.zeros(1), None,
                                out=(torch.zeros(1, 16), _poisoned_lists(8, 1)))
    with pytest.raises(ValueError, match="gather configuration"):
        gather_linear_triton(*lists, torch.zeros(16, 8), [4, 4], config=KernelConfig())


def test_gather_config_table_heuristic_and_override(tmp_path, monkeypatch):
    assert get_gather_config(4096, 28672, torch.bfloat16) == configs.TUNED_GATHER[(4096, 28672, "bf16")]
    assert get_gather_config(4096, 6144, torch.float16) == configs.TUNED_GATHER[(4096, 6144, "bf16")]
    guess = get_gather_config(1000, 3001, torch.bfloat16, sm_count=132)
    assert guess.gather and guess.block_n == 128 and 1 <= guess.split_k <= 64
    assert get_gather_config(64, 96, torch.float32).split_k == 1  # tiny K: one split
    chosen = KernelConfig(block_n=256, block_r=16, split_k=4, num_stages=3, gather=True)
    path = tmp_path / "table.json"
    table = {(4096, 6144, 1, "bf16"): chosen, (4096, 28672, 1, "bf16"): KernelConfig(block_n=64)}
    path.write_text(json.dumps(configs.table_to_json(table)))
    monkeypatch.setenv(configs.CONFIGS_ENV, str(path))  # the sparse_linear table: not read here
    assert get_gather_config(4096, 6144, torch.bfloat16) == configs.TUNED_GATHER[(4096, 6144, "bf16")]
    monkeypatch.setenv(configs.GATHER_CONFIGS_ENV, str(path))
    assert get_gather_config(4096, 6144, torch.bfloat16) == chosen
    # a non-gather override entry (for sparse_linear) does not replace the gather table's
    assert get_gather_config(4096, 28672, torch.bfloat16) == configs.TUNED_GATHER[(4096, 28672, "bf16")]


# ------------------------------------------------------------------ the engine's producer path
@needs_interpreter
@pytest.mark.parametrize("weight_aware", [False, True], ids=["magnitude", "weight-aware"])
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3"])
def test_engine_producer_path_matches_default_path(weight_aware, shape):
    """Gemma 3's (1 + w) norms take the producer too; down keeps sparse_linear."""
    from teal.engine import Generator, engine_random
    from teal.engine.reference import activation_thresholds

    engine = engine_random(shape, dtype=torch.float32, device="cpu", max_seq_len=48, transposed=True)
    with torch.no_grad():  # non-trivial norms (Gemma's are used as 1 + w)
        for w in engine.layers:
            for norm in (w.attn_norm, w.mlp_norm, w.q_norm, w.k_norm, w.post_attn_norm, w.post_mlp_norm):
                if norm is not None:
                    norm.uniform_(0.5, 1.5)
    ids = torch.randint(0, engine.config.vocab_size, (8,), generator=torch.Generator().manual_seed(0))
    scales = engine.weight_column_norms() if weight_aware else None
    th = activation_thresholds(engine, ids, 0.5, scales)
    # per-projection thresholds: q, k and v (and gate, up) of one layer differ
    th = {key: value * (1.0 + 0.1 * (zlib.crc32(key.encode()) % 3)) for key, value in th.items()}
    engine.set_thresholds(th, scales)
    results, logits = {}, {}
    for path in ("kernel", "producer"):
        gen = Generator(engine, sparse_path=path)
        assert engine.sparse_path == path
        flags = tuple(p.producer for p in engine.projections(0))
        assert flags == ((True, False, True, False) if path == "producer" else (False,) * 4)
        results[path] = gen.generate(ids, max_new_tokens=5, stop=[]).tokens
        with torch.no_grad():
            engine.prefill(ids)
            logits[path] = engine.decode(ids[-1:], torch.tensor([8]))
    assert results["producer"] == results["kernel"]
    torch.testing.assert_close(logits["producer"], logits["kernel"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown sparse path"):
        engine.set_sparse_path("fast")


@needs_interpreter
def test_bench_decode_times_both_sparse_paths(tmp_path):
    from teal.bench import decode

    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=8, new_tokens=4, repeats=1,
                      json_path=tmp_path / "decode.json", hf_baselines=False, device="cpu", dtype=torch.float32,
                      log=lambda _: None, sparse_paths=("kernel", "producer"))
    assert not data["errors"], data["errors"]
    rows = {(r["sparsity"], r["op"], r["sparse_path"]) for r in data["results"]}
    assert rows == {(0.0, "kernel", "kernel"), (0.0, "kernel", "producer"), (0.0, "x @ w_t", None),
                    (0.0, "mixed", None), (0.5, "kernel", "kernel"), (0.5, "kernel", "producer")}
    with pytest.raises(ValueError, match="sparse paths"):
        decode.run(shape="tiny-llama", device="cpu", sparse_paths=("fast",))
