"""``teal::decode_attention`` (split-KV decode attention): the Triton kernel through the CPU interpreter
against float64 and against the engine's math, the op's reference / fake / checks, and the engine with
the op forced on against its default attention."""

from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (teal.kernels imports it lazily)

import pytest
import torch

from teal.engine.model import decode_attention as engine_decode_attention
from teal.kernels import decode_attention
from teal.kernels import attention as attention_module
from teal.kernels.attention import (
    AttentionConfig,
    apply_rope_rounded,
    attention_splits,
    decode_attention_rope,
    decode_attention_rope_reference,
    decode_attention_rope_triton,
    head_rms_norm,
    default_config,
    decode_attention_reference,
    decode_attention_triton,
)

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)

N_KV, HEAD_DIM, LENGTH = 2, 64, 100  # LENGTH: not a multiple of any block
SCALE = 1.0 / math.sqrt(HEAD_DIM)
WINDOW = 16
# Relative error (2-norm) of the kernel against float64 that each dtype must meet. bf16: the inputs are
# rounded to bf16 already; the kernel adds the rounding of exp(s - m) (2^-9 relative) before the PV product
# and of the output (2^-9): 1e-3 to 2.5e-3 on these sizes (fp16: 2e-4 to 3e-4), 1e-2 leaves room. The
# engine's math is worse in bf16 (it also rounds q . k to bf16 before scaling: 3e-3 to 6e-3 here), see
# test_kernel_is_at_least_as_accurate_as_the_engine.
MAX_REL_ERR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The configs the production table selects (`attention.CONFIG_TABLE`).
VARIANTS = {f"block_l{config.block_l}": config for _, config in attention_module.CONFIG_TABLE}
variants = pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))


def _mask(pos: int, window: int | None = None, length: int = LENGTH) -> torch.Tensor:
    """The engine's additive mask for a query at ``pos`` (`Engine.decode_masks`)."""
    p = torch.arange(length)
    visible = p <= pos
    if window is not None:
        visible &= p > pos - window
    return torch.where(visible, 0.0, -math.inf)


def _inputs(group: int, dtype: torch.dtype, seed: int = 0, length: int = LENGTH):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(1, N_KV * group, HEAD_DIM, generator=gen)).to(dtype)  # scores of a few units
    k = torch.randn(N_KV, length, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(N_KV, length, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _run_poisoned(q, k, v, mask, n_valid, **kwargs) -> torch.Tensor:
    """The kernel into a NaN-filled output; checks that every entry was written."""
    out = torch.full((1, q.shape[1] * q.shape[2]), float("nan"), dtype=q.dtype)
    y = decode_attention_triton(q, k, v, mask, n_valid, SCALE, out=out, **kwargs)
    assert y is out and not torch.isnan(y).any(), "output left unwritten (or NaN)"
    return y


# ------------------------------------------------------------------ the kernel (interpreted)
@needs_interpreter
@variants
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("n_valid, window", [(1, None), (37, None), (LENGTH, None), (LENGTH, WINDOW), (70, WINDOW)],
                         ids=["n1", "n37", "full", "full-window", "n70-window"])
def test_kernel_matches_float64_and_the_engine(dtype, group, n_valid, window, variant):
    q, k, v = _inputs(group, dtype)
    mask = _mask(n_valid - 1, window)
    nv = torch.tensor([n_valid])
    # 4 splits of 32 positions: some empty, some fully masked
    y = _run_poisoned(q, k, v, mask, nv, splits=4, config=variant)
    exact = decode_attention_reference(q, k, v, mask, nv, SCALE, compute_dtype=torch.float64)
    assert _rel_err(y, exact) <= MAX_REL_ERR[dtype]
    engine = engine_decode_attention(q, k, v, mask, SCALE)  # the whole cache, masked
    assert _rel_err(y, engine) <= 2 * MAX_REL_ERR[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(y, engine, rtol=1e-5, atol=1e-6)


@needs_interpreter
@variants
@pytest.mark.parametrize("splits", [1, 2, 3, 7, None])
def test_split_counts_agree(splits, variant):
    """Any number of splits (None: `attention_splits`) gives the same result up to fp32 summation order."""
    q, k, v = _inputs(4, torch.float32, seed=1)
    mask, nv = _mask(88, WINDOW), torch.tensor([89], dtype=torch.int32)
    y = _run_poisoned(q, k, v, mask, nv, splits=splits, config=variant)
    torch.testing.assert_close(y, decode_attention_reference(q, k, v, mask, nv, SCALE), rtol=1e-5, atol=1e-6)


@needs_interpreter
@variants
@pytest.mark.parametrize("block_l, splits", [(16, 3), (64, 3), (16, 1)])
def test_positions_past_n_valid_are_never_read(block_l, splits, variant):
    """NaN in the cache and a zero mask past n_valid do not reach the output."""
    q, k, v = _inputs(4, torch.bfloat16, seed=2)
    nv = torch.tensor([37])
    mask = torch.zeros(LENGTH)  # visible everywhere: only n_valid bounds the positions
    config = variant._replace(block_l=block_l)
    clean = _run_poisoned(q, k, v, mask, nv, splits=splits, config=config)
    ref = decode_attention_reference(q, k, v, mask, nv, SCALE, compute_dtype=torch.float64)
    assert _rel_err(clean, ref) <= MAX_REL_ERR[torch.bfloat16]
    k[:, 37:], v[:, 37:] = float("nan"), float("nan")
    poisoned = _run_poisoned(q, k, v, mask, nv, splits=splits, config=config)
    assert torch.equal(poisoned, clean)


@needs_interpreter
@variants
def test_kernel_is_at_least_as_accurate_as_the_engine(variant):
    """In bf16 the engine rounds q . k to bf16 before scaling; the kernel keeps fp32 scores."""
    q, k, v = _inputs(4, torch.bfloat16, seed=3)
    q = q * 4  # large scores: the engine's score rounding matters
    mask, nv = _mask(LENGTH - 1), torch.tensor([LENGTH])
    exact = decode_attention_reference(q, k, v, mask, nv, SCALE, compute_dtype=torch.float64)
    kernel_err = _rel_err(_run_poisoned(q, k, v, mask, nv, config=variant), exact)
    engine_err = _rel_err(engine_decode_attention(q, k, v, mask, SCALE), exact)
    assert kernel_err <= engine_err


@needs_interpreter
@variants
@pytest.mark.parametrize("n_valid, mask_value", [(0, 0.0), (37, -math.inf)], ids=["n0", "all-masked"])
def test_query_that_sees_nothing_gives_zeros(n_valid, mask_value, variant):
    """No visible position: zeros from the kernel and the op's reference (the engine's softmax gives NaN)."""
    q, k, v = _inputs(4, torch.float16, seed=4)
    mask, nv = torch.full((LENGTH,), mask_value), torch.tensor([n_valid])
    assert torch.equal(_run_poisoned(q, k, v, mask, nv, splits=3, config=variant), torch.zeros(1, 4 * N_KV * HEAD_DIM,
                                                                              dtype=torch.float16))
    assert not decode_attention_reference(q, k, v, mask, nv, SCALE).any()


@needs_interpreter
@variants
def test_repeated_launches_overwrite_stale_partials(variant):
    """Back-to-back launches with other n_valid stay correct (the workspace's stale partials are overwritten)."""
    q, k, v = _inputs(1, torch.float32, seed=5)
    for n_valid in (100, 5, 64, 100):
        mask, nv = _mask(n_valid - 1), torch.tensor([n_valid])
        torch.testing.assert_close(_run_poisoned(q, k, v, mask, nv, splits=5, config=variant),
                                   decode_attention_reference(q, k, v, mask, nv, SCALE), rtol=1e-5, atol=1e-6)


def test_splits_depend_on_the_shape_only():
    assert attention_splits(8, 4096, 132) == 33  # 2 waves of 132 SMs over 8 kv heads
    assert attention_splits(32, 4096, 132) == 9
    assert attention_splits(8, 100, 132) == 4  # at most one per block_l (32) positions
    assert attention_splits(8, 100, 132, AttentionConfig(block_l=64)) == 2
    assert attention_splits(64, 16, 132) == 1
    assert default_config(4096) == attention_module.CONFIG_TABLE[-1][1]


def test_default_config_follows_the_table(monkeypatch):
    short, long = AttentionConfig(block_l=16), AttentionConfig(block_l=64)
    monkeypatch.setattr(attention_module, "CONFIG_TABLE", ((512, short), (2048, long)))
    assert default_config(384) == default_config(512) == short
    assert default_config(1024) == long
    assert default_config(8192) == long  # past the table: its last row
    assert attention_splits(8, 384, 132) == 24  # the table's config for L = 384 (block_l 16)


# ------------------------------------------------------------------ the op: dispatch, reference, fake, errors
@needs_interpreter
def test_op_runs_the_kernel_under_the_interpreter():
    q, k, v = _inputs(4, torch.bfloat16, seed=6)
    mask, nv = _mask(40), torch.tensor([41])
    assert torch.equal(decode_attention(q, k, v, mask, nv, SCALE), decode_attention_triton(q, k, v, mask, nv, SCALE))


def test_op_without_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(4, torch.bfloat16, seed=7)
    mask, nv = _mask(40, WINDOW), torch.tensor([41])
    y = decode_attention(q, k, v, mask, nv, SCALE)
    assert torch.equal(y, decode_attention_reference(q, k, v, mask, nv, SCALE))
    # the reference is the engine's math exactly where the mask already hides the positions past n_valid
    assert torch.equal(y, engine_decode_attention(q, k, v, mask, SCALE))


def test_op_passes_torch_library_opcheck(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(2, torch.float32, seed=8, length=24)
    torch.library.opcheck(torch.ops.teal.decode_attention.default, (q, k, v, _mask(9, length=24),
                                                                   torch.tensor([10]), SCALE))


def test_fake_impl_gives_the_output_shape_and_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 32, 128, dtype=torch.bfloat16)
        cache = torch.empty(8, 4096, 128, dtype=torch.bfloat16)
        y = torch.ops.teal.decode_attention(q, cache, cache, torch.empty(4096), torch.empty(1, dtype=torch.long), 0.1)
        assert y.shape == (1, 4096) and y.dtype == torch.bfloat16
    q, k, v = _inputs(2, torch.float32, seed=9, length=24)

    def step(q, k, v, pos):
        return decode_attention(q * 1.0, k, v, torch.zeros(24), pos + 1, SCALE)

    traced = torch.compile(step, backend="eager", fullgraph=True)  # dynamo traces through the fake impl
    pos = torch.tensor([11])
    torch.testing.assert_close(traced(q, k, v, pos), step(q, k, v, pos))


def test_argument_errors_name_the_problem():
    q, k, v = _inputs(2, torch.float32, seed=10, length=24)
    mask, nv = _mask(5, length=24), torch.tensor([6])
    cases = [
        ((q[0], k, v, mask, nv), "q must be one token's heads"),
        ((q.to(torch.int32), k, v, mask, nv), "bf16, fp16 or fp32"),
        ((q, k.half(), v, mask, nv), "k_cache must be a contiguous torch.float32 cache"),
        ((q, k.transpose(0, 1).contiguous().transpose(0, 1), v, mask, nv), r"not contiguous"),
        ((q, k, v[:, :12].contiguous(), mask, nv), "v_cache .* must match k_cache"),
        ((q[:, :3], k, v, mask, nv), "must split evenly"),
        ((q, k, v, mask[:10], nv), "mask must be an additive fp32 vector"),
        ((q, k, v, mask.half(), nv), "mask must be an additive fp32 vector"),
        ((q, k, v, mask, nv.float()), "n_valid must be an int32/int64 tensor of one element"),
        ((q, k, v, mask, torch.tensor([1, 2])), "n_valid must be"),
        ((q, k, v, mask, torch.tensor([6], device="meta")), "n_valid is on meta"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            decode_attention_reference(*args, SCALE)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        decode_attention_triton(q, k, v, mask, nv, SCALE, out=torch.empty(1, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="splits must be at least 1"):
        decode_attention_triton(q, k, v, mask, nv, SCALE, splits=0)


# ------------------------------------------------------------------ rope + cache write fused in (decode_attention_rope)
def _rope_inputs(group: int, dtype: torch.dtype, seed: int, length: int = LENGTH):
    """The q|k|v row of one token (un-rotated), this position's cos/sin, and caches."""
    gen = torch.Generator().manual_seed(seed)
    n_heads = N_KV * group
    qkv = torch.randn(1, (n_heads + 2 * N_KV) * HEAD_DIM, generator=gen)
    qkv[:, : n_heads * HEAD_DIM] *= 2  # scores of a few units
    angle = torch.rand(HEAD_DIM // 2, generator=gen) * 6.0
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    k = torch.randn(N_KV, length, HEAD_DIM, generator=gen)
    v = torch.randn(N_KV, length, HEAD_DIM, generator=gen)
    return n_heads, *(t.to(dtype) for t in (qkv, cos, sin, k, v))


def _run_rope_poisoned(qkv, cos, sin, k, v, mask, nv, n_heads, *norms, **kwargs) -> torch.Tensor:
    out = torch.full((1, n_heads * HEAD_DIM), float("nan"), dtype=qkv.dtype)
    y = decode_attention_rope_triton(qkv, cos, sin, k, v, mask, nv, SCALE, n_heads, *norms, out=out, **kwargs)
    assert y is out and not torch.isnan(y).any(), "output left unwritten (or NaN)"
    return y


@needs_interpreter
@variants
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("n_valid, window", [(1, None), (37, None), (LENGTH, WINDOW)], ids=["n1", "n37", "full-window"])
def test_rope_kernel_matches_the_unfused_steps(dtype, group, n_valid, window, variant):
    """One kernel = rotary embedding of q and k, k/v written at pos = n_valid - 1, attention over 0..pos."""
    n_heads, qkv, cos, sin, k, v = _rope_inputs(group, dtype, seed=20 + n_valid)
    mask, nv = _mask(n_valid - 1, window), torch.tensor([n_valid])
    k_ref, v_ref = k.clone(), v.clone()
    exact = decode_attention_rope_reference(qkv, cos, sin, k_ref, v_ref, mask, nv, SCALE, n_heads,
                                            compute_dtype=torch.float64)
    y = _run_rope_poisoned(qkv, cos, sin, k, v, mask, nv, n_heads, splits=4, config=variant)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)  # the new entries exactly, the rest untouched
    assert not torch.equal(k[:, n_valid - 1], _rope_inputs(group, dtype, seed=20 + n_valid)[4][:, n_valid - 1])
    assert _rel_err(y, exact) <= MAX_REL_ERR[dtype]
    # the same as rotating q by hand and calling decode_attention on the updated caches
    q = apply_rope_rounded(qkv[:, : n_heads * HEAD_DIM].view(1, n_heads, HEAD_DIM), cos, sin)
    unfused = decode_attention_triton(q, k, v, mask, nv, SCALE, splits=4, config=variant)
    torch.testing.assert_close(y, unfused, **({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}))


@needs_interpreter
@variants
@pytest.mark.parametrize("splits", [1, 3, 7])
def test_rope_kernel_never_reads_the_cache_at_or_past_pos(splits, variant):
    """NaN in the caches from pos on (pos itself comes from the q|k|v row) does not reach the output."""
    n_heads, qkv, cos, sin, k, v = _rope_inputs(4, torch.bfloat16, seed=30)
    mask, nv = torch.zeros(LENGTH), torch.tensor([37])
    clean = _run_rope_poisoned(qkv, cos, sin, k.clone(), v.clone(), mask, nv, n_heads, splits=splits, config=variant)
    k[:, 36:], v[:, 36:] = float("nan"), float("nan")
    poisoned = _run_rope_poisoned(qkv, cos, sin, k, v, mask, nv, n_heads, splits=splits, config=variant)
    assert torch.equal(poisoned, clean)
    assert not torch.isnan(k[:, 36]).any() and torch.isnan(k[:, 37:]).all()


@needs_interpreter
def test_rope_op_runs_the_kernel_and_without_interpreter_the_reference(monkeypatch):
    n_heads, qkv, cos, sin, k, v = _rope_inputs(4, torch.bfloat16, seed=31)
    mask, nv = _mask(40), torch.tensor([41])
    caches = [(k.clone(), v.clone()) for _ in range(3)]
    y_op = decode_attention_rope(qkv, cos, sin, *caches[0], mask, nv, SCALE, n_heads)
    y_kernel = decode_attention_rope_triton(qkv, cos, sin, *caches[1], mask, nv, SCALE, n_heads)
    assert torch.equal(y_op, y_kernel) and torch.equal(caches[0][0], caches[1][0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    y_ref = decode_attention_rope(qkv, cos, sin, *caches[2], mask, nv, SCALE, n_heads)
    assert torch.equal(caches[2][0], caches[1][0]) and torch.equal(caches[2][1], caches[1][1])
    assert _rel_err(y_ref, y_kernel) <= MAX_REL_ERR[torch.bfloat16]


def test_rope_op_passes_opcheck_and_traces(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n_heads, qkv, cos, sin, k, v = _rope_inputs(2, torch.float32, seed=32, length=24)
    torch.library.opcheck(torch.ops.teal.decode_attention_rope.default,
                          (qkv, cos, sin, k, v, _mask(9, length=24), torch.tensor([10]), SCALE, n_heads, None, None,
                           1e-6, 0.0))
    gen = torch.Generator().manual_seed(5)
    q_norm, k_norm = (1.0 + 0.1 * torch.randn(HEAD_DIM, generator=gen) for _ in range(2))
    torch.library.opcheck(torch.ops.teal.decode_attention_rope.default,
                          (qkv, cos, sin, k, v, _mask(9, length=24), torch.tensor([10]), SCALE, n_heads, q_norm, k_norm,
                           1e-6, 1.0))

    def step(qkv, k, v, pos):
        return decode_attention_rope(qkv * 1.0, cos, sin, k, v, torch.zeros(24), pos + 1, SCALE, n_heads)

    traced = torch.compile(step, backend="eager", fullgraph=True)
    pos = torch.tensor([11])
    k2, v2 = k.clone(), v.clone()
    torch.testing.assert_close(traced(qkv, k, v, pos), step(qkv, k2, v2, pos))
    assert torch.equal(k, k2) and torch.equal(v, v2)  # the traced call mutated the caches too


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3-order", "gemma-order"])
def test_rope_kernel_with_qk_norms_matches_the_unfused_steps(dtype, group, offset):
    """Per-head RMSNorm of q and k (Qwen3 / Gemma 3) inside the kernel: the same as normalising with the
    engine's roundings, rotating and attending separately; the new key is written normalised and rotated."""
    n_heads, qkv, cos, sin, k, v = _rope_inputs(group, dtype, seed=40 + group)
    gen = torch.Generator().manual_seed(41)
    q_norm, k_norm = ((0.8 + 0.4 * torch.rand(HEAD_DIM, generator=gen)).to(dtype) for _ in range(2))
    if offset:
        q_norm, k_norm = q_norm - 1.0, k_norm - 1.0  # Gemma stores w with the scale 1 + w
    n_valid = 37
    mask, nv = _mask(n_valid - 1), torch.tensor([n_valid])
    k_ref, v_ref = k.clone(), v.clone()
    norms = (q_norm, k_norm, 1e-6, offset)
    exact = decode_attention_rope_reference(qkv, cos, sin, k_ref, v_ref, mask, nv, SCALE, n_heads, *norms,
                                            compute_dtype=torch.float64)
    y = _run_rope_poisoned(qkv, cos, sin, k, v, mask, nv, n_heads, *norms, splits=4)
    torch.testing.assert_close(k, k_ref, **({"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {}))
    assert torch.equal(v, v_ref)
    assert _rel_err(y, exact) <= MAX_REL_ERR[dtype]
    q = head_rms_norm(qkv[:, : n_heads * HEAD_DIM].view(1, n_heads, HEAD_DIM), q_norm, 1e-6, offset)
    unfused = decode_attention_triton(apply_rope_rounded(q, cos, sin), k, v, mask, nv, SCALE, splits=4)
    # (an fp32 rsqrt an ulp apart can flip one bf16 rounding of a normalised entry: compare whole vectors)
    assert _rel_err(y, unfused) <= (1e-6 if dtype == torch.float32 else 2e-3)
    plain = decode_attention_rope_triton(qkv, cos, sin, k.clone(), v.clone(), mask, nv, SCALE, n_heads, splits=4)
    assert _rel_err(plain, y) > 10 * MAX_REL_ERR[dtype]  # the norms change the result


def test_rope_argument_errors_name_the_problem():
    n_heads, qkv, cos, sin, k, v = _rope_inputs(2, torch.float32, seed=33, length=24)
    mask, nv = _mask(5, length=24), torch.tensor([6])
    cases = [
        ((qkv[:, :-1], cos, sin, k, v), "qkv must be one token's contiguous q|k|v row"),
        ((qkv, cos[:-2], sin, k, v), "cos must hold this position's 64 values"),
        ((qkv, cos, sin.double(), k, v), "sin must hold"),
    ]
    for (a, c, s_, kc, vc), match in cases:
        with pytest.raises(ValueError, match=match):
            decode_attention_rope_reference(a, c, s_, kc, vc, mask, nv, SCALE, n_heads)
    with pytest.raises(ValueError, match="must split evenly"):
        decode_attention_rope_reference(qkv[:, : (3 + 2 * N_KV) * HEAD_DIM].contiguous(), cos, sin, k, v, mask, nv,
                                        SCALE, 3)
    weight = torch.ones(HEAD_DIM)
    with pytest.raises(ValueError, match="give both q_norm and k_norm"):
        decode_attention_rope_reference(qkv, cos, sin, k, v, mask, nv, SCALE, n_heads, weight, None)
    with pytest.raises(ValueError, match="k_norm must be the head's 64 RMSNorm weights"):
        decode_attention_rope_reference(qkv, cos, sin, k, v, mask, nv, SCALE, n_heads, weight, weight[:-1])


# ------------------------------------------------------------------ the engine with the op forced on
@needs_interpreter
@pytest.mark.parametrize("windows", [None, (5, None)], ids=["full", "sliding-window"])
def test_engine_fused_attention_matches_default_path(windows):
    from teal.engine import Generator, engine_random

    engine = engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=48)
    if windows is not None:
        engine.config = dataclasses.replace(engine.config, layer_windows=windows)
    assert not engine.use_fused_attention  # the CPU default: the engine's own attention
    ids = torch.randint(0, engine.config.vocab_size, (8,), generator=torch.Generator().manual_seed(0))
    tokens, logits = {}, {}
    for fused in (False, True):
        engine.fused_attention = fused
        assert engine.decode_layer_args(0).fused_attention is fused
        tokens[fused] = Generator(engine).generate(ids, max_new_tokens=6, stop=[]).tokens
        with torch.no_grad():
            engine.prefill(ids)
            logits[fused] = engine.decode(ids[-1:], torch.tensor([8]))
    assert tokens[True] == tokens[False]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma3_text"])
def test_engine_rotates_inside_the_attention_kernel(model_type, monkeypatch):
    """With the op on, q|k|v goes straight into decode_attention_rope (Qwen2: with q|k|v bias; Qwen3 and
    Gemma 3: with their per-head q/k norms inside the kernel, Gemma's scaled by 1 + w). Logits match the
    engine's own attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from teal.engine import engine_from_hf_model

    extra = (dict(query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
             if model_type == "gemma3_text" else dict(use_sliding_window=False))
    config = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    engine = engine_from_hf_model(hf, max_seq_len=32)
    calls = {"rope": 0, "plain": 0}
    for name, key in (("decode_attention_rope_triton", "rope"), ("decode_attention_triton", "plain")):
        real = getattr(attention_module, name)

        def spy(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(attention_module, name, spy)
    ids = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(1))
    logits = {}
    for fused in (False, True):
        engine.fused_attention = fused
        with torch.no_grad():
            engine.prefill(ids[:-1])
            logits[fused] = engine.decode(ids[-1:], torch.tensor([9]))
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    assert calls == {"rope": 2, "plain": 0}  # one per layer
