"""Tensor-parallel decoding (teal.engine.tp) on CPU: ranks are spawned processes joined by gloo on 127.0.0.1.

Every rank builds the same whole engine, shards it, and compares the shard's outputs with the whole
engine's (fp32): prefill logits, teacher-forced decode logits, greedy tokens, dense and sparse
(magnitude and weight-aware scores). The spawned runs are module-scoped fixtures, one per world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teal.engine import Engine, Generator, engine_random
from teal.engine.model import decode_layer
from teal.engine.reference import activation_thresholds, decode_sparsity
from teal.engine.tp import TensorParallelEngine, check_tp_size, launch, random_shard, shard_engine

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
CASES = {
    # GQA (2 query heads per kv head) with biases on every projection, o and down included
    "llama-gqa-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    # q|k|v bias; a vocabulary that does not divide by 2 keeps lm_head whole (replicated)
    "qwen2-bias": dict(model_type="qwen2", vocab_size=97),
    # q/k norms, explicit head_dim, tied embeddings (the lm_head shard is a view of the embedding)
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    # Gemma 3: sandwich norms on the all-reduced o and down outputs, GELU gate, a sliding and a global layer
    "gemma3-sandwich": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"]),
}
PROMPT, STEPS, NEW_TOKENS = 6, 6, 8
TIMEOUT_S = 240.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def build_engine(case: str, max_seq_len: int = 32) -> Engine:
    """A deterministic whole engine (fp32, CPU, dense layout) with non-trivial norms."""
    from transformers import AutoConfig

    kwargs = {**TINY, **CASES[case]}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    engine = engine_random(config, dtype=torch.float32, device="cpu", max_seq_len=max_seq_len, seed=0, std=0.08)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in engine.layers:
            for norm in (w.attn_norm, w.mlp_norm, w.q_norm, w.k_norm, w.post_attn_norm, w.post_mlp_norm):
                if norm is not None:
                    norm.copy_(1.0 + 0.2 * torch.randn(norm.shape, generator=gen))
    return engine


def ids_for(engine, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, engine.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_forced(engine, ids: torch.Tensor, layer_fn=None) -> torch.Tensor:
    """Decode logits [STEPS, V] for ids[PROMPT:] after a prefill of ids[:PROMPT]."""
    engine.prefill(ids[:PROMPT])
    return torch.cat([engine.decode(ids[t:t + 1], torch.tensor([t]), layer_fn=layer_fn)
                      for t in range(PROMPT, PROMPT + STEPS)])


def greedy(engine, ids: torch.Tensor) -> list[int]:
    return Generator(engine, mode="eager").generate(ids[:PROMPT], NEW_TOKENS, stop=[]).tokens


# ------------------------------------------------------------------------- what every spawned rank runs
def compare_rank(rank: int, world_size: int, group, out_dir: str) -> None:
    """Shard each case, compare with the whole engine, write this rank's numbers as JSON."""
    results = {}
    for case in CASES:
        full = build_engine(case)
        ids, calib = ids_for(full, PROMPT + STEPS, 3), ids_for(full, 24, 7)
        r: dict = {}
        with torch.no_grad():
            ref_prefill = full.prefill(ids, all_logits=True)
        ref_decode = teacher_forced(full, ids)
        ref_tokens = greedy(full, ids)
        shard = shard_engine(full, rank, world_size, group)
        with torch.no_grad():
            r["prefill_rel_err"] = rel_err(shard.prefill(ids, all_logits=True), ref_prefill)
        shard_decode = teacher_forced(shard, ids)
        r["decode_rel_err"] = rel_err(shard_decode, ref_decode)
        r["tokens"], r["ref_tokens"] = greedy(shard, ids), ref_tokens
        r["logits_sample"] = shard_decode[-1, :8].tolist()  # to check that ranks agree exactly
        r["qkv_shape"] = list(shard.layers[0].qkv.shape)
        r["gate_up_shape"] = list(shard.layers[0].gate_up.shape)
        r["o_shape"], r["down_shape"] = list(shard.layers[0].o.shape), list(shard.layers[0].down.shape)
        r["k_cache_shape"] = list(shard.k_cache[0].shape)
        r["lm_head_rows"] = shard.lm_head.shape[0]
        r["vocab_parallel"] = shard.vocab_group is not None
        full.to_layout(transposed=True)
        shard.to_layout(transposed=True)
        full_norms, shard_norms = full.weight_column_norms(), shard.weight_column_norms()
        r["col_norm_keys_match"] = sorted(full_norms) == sorted(shard_norms)
        r["col_norm_rel_err"] = max(rel_err(shard_norms[k], full_norms[k]) for k in full_norms)
        # thresholds calibrated on the shards (the row-parallel inputs gathered) are the whole model's
        th_full, th_shard = activation_thresholds(full, calib, 0.5), activation_thresholds(shard, calib, 0.5)
        r["shard_calibration_keys_match"] = sorted(th_full) == sorted(th_shard)
        r["shard_calibration_max_diff"] = max(abs(th_full[k] - th_shard[k]) for k in th_full)
        full.set_thresholds(th_full)
        shard.set_thresholds(th_full)
        r["decode_sparsity_full"] = decode_sparsity(full, calib[:8], 3, th_full)[0]
        r["decode_sparsity_shard"] = decode_sparsity(shard, calib[:8], 3, th_full)[0]
        for score in ("magnitude", "weight-aware"):
            scales = full_norms if score == "weight-aware" else None
            th = activation_thresholds(full, calib, 0.5, scales)
            full.set_thresholds(th, scales)
            shard.set_thresholds(th, scales)
            ref_sparse = teacher_forced(full, ids)
            r[f"{score}_sparse_vs_dense"] = rel_err(ref_sparse, ref_decode)  # the masks do change the output
            r[f"{score}_decode_rel_err"] = rel_err(teacher_forced(shard, ids), ref_sparse)
            r[f"{score}_tokens"], r[f"{score}_ref_tokens"] = greedy(shard, ids), greedy(full, ids)
            r[f"{score}_all_groups_sparse"] = all(all(flags) for flags in shard.sparse_flags)
        # thresholds (whole-model column scales) travel with the engine into a new shard
        carried = shard_engine(full, rank, world_size, group)
        r["carried_thresholds_rel_err"] = rel_err(teacher_forced(carried, ids), teacher_forced(shard, ids))
        if case == "llama-gqa-bias":  # the decode layer compiles with its collectives (GPU compiled-graph mode)
            compiled = torch.compile(decode_layer, fullgraph=True, dynamic=False, backend="aot_eager")
            r["compiled_decode_rel_err"] = rel_err(teacher_forced(shard, ids, compiled), teacher_forced(shard, ids))
        results[case] = r
    results["random_shard"] = random_shard_checks(rank, world_size, group)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def random_shard_checks(rank: int, world_size: int, group) -> dict:
    """`random_shard`: the shard drawn directly (as for shapes larger than one GPU)."""
    shard = random_shard("tiny-llama", rank, world_size, group, dtype=torch.float32, device="cpu", max_seq_len=32)
    cfg, full = shard.config, shard.full_config
    ids = torch.arange(PROMPT + STEPS) % full.vocab_size
    r = {
        "local": [cfg.n_heads, cfg.n_kv_heads, cfg.intermediate, cfg.head_dim],
        "full": [full.n_heads, full.n_kv_heads, full.intermediate, full.head_dim],
        "qkv_shape": list(shard.layers[0].qkv.shape), "down_shape": list(shard.layers[0].down.shape),
        "lm_head_rows": shard.lm_head.shape[0],
        "embed_sample": shard.embed[:2, :4].tolist(),  # replicated: equal on every rank
        "qkv_sample": shard.layers[0].qkv[:2, :4].tolist(),  # this rank's own slice: differs
        "tokens": greedy(shard, ids),
    }
    shard.to_layout(transposed=True)
    th = activation_thresholds(shard, ids, 0.5)
    shard.set_thresholds(th)
    r["sparse_tokens"] = greedy(shard, ids)
    r["measured_sparsity"] = decode_sparsity(shard, ids[:8], 3, th)[0]
    try:
        shard.set_all_reduce("symm_mem")
        r["symm_mem_error"] = None
    except RuntimeError as exc:
        r["symm_mem_error"] = str(exc)
    try:
        shard.set_all_reduce("carrier-pigeon")
        r["bad_all_reduce_error"] = None
    except ValueError as exc:
        r["bad_all_reduce_error"] = str(exc)
    r["all_reduce_after_errors"] = shard.all_reduce
    import os

    from teal.engine.tp import MULTICAST_OFF

    r["multicast_env"] = {k: os.environ.get(k) for k in MULTICAST_OFF}
    return r


def degenerate_rank(rank: int, world_size: int, group, out_dir: str) -> None:
    """World size 1: the shard is the engine (same tensors, no collectives), bit for bit."""
    full = build_engine("llama-gqa-bias")
    ids, calib = ids_for(full, PROMPT + STEPS, 3), ids_for(full, 24, 7)
    full.to_layout(transposed=True)
    scales = full.weight_column_norms()
    full.set_thresholds(activation_thresholds(full, calib, 0.5, scales), scales)
    shard = shard_engine(full, rank, world_size, group)
    out = {
        "no_collectives": shard.tp_group is None and shard.vocab_group is None,
        "same_tensors": all(a is b for a, b in zip(shard.layers, full.layers)) and shard.lm_head is full.lm_head,
        "sparse_decode_equal": bool(torch.equal(teacher_forced(shard, ids), teacher_forced(full, ids))),
        "tokens_equal": greedy(shard, ids) == greedy(full, ids),
    }
    with torch.no_grad():
        out["prefill_equal"] = bool(torch.equal(shard.prefill(ids, all_logits=True), full.prefill(ids, all_logits=True)))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    launch(compare_rank, 2, (str(out),), device="cpu", timeout_s=TIMEOUT_S, collective_timeout_s=120)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_dense_shard_matches_whole_engine(tp2, case):
    for rank, results in enumerate(tp2):
        r = results[case]
        assert r["prefill_rel_err"] <= 1e-5, (rank, r["prefill_rel_err"])
        assert r["decode_rel_err"] <= 1e-5, (rank, r["decode_rel_err"])
        assert r["tokens"] == r["ref_tokens"]
    assert tp2[0][case]["logits_sample"] == tp2[1][case]["logits_sample"]  # every rank sees the same logits


@pytest.mark.parametrize("score", ["magnitude", "weight-aware"])
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_shard_matches_whole_engine(tp2, case, score):
    for results in tp2:
        r = results[case]
        assert r[f"{score}_all_groups_sparse"]
        assert r[f"{score}_sparse_vs_dense"] > 1e-3  # 50 % sparsity is really applied
        assert r[f"{score}_decode_rel_err"] <= 1e-5, r[f"{score}_decode_rel_err"]
        assert r[f"{score}_tokens"] == r[f"{score}_ref_tokens"]
        assert r["carried_thresholds_rel_err"] == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_shards_are_halves(tp2, case):
    kwargs = {**TINY, **CASES[case]}
    hidden, inter = kwargs["hidden_size"], kwargs["intermediate_size"]
    head_dim = kwargs.get("head_dim", hidden // kwargs["num_attention_heads"])
    q, kv = kwargs["num_attention_heads"] * head_dim, kwargs["num_key_value_heads"] * head_dim
    for results in tp2:
        r = results[case]
        # shapes read in the dense layout, [N, K]
        assert r["qkv_shape"] == [(q + 2 * kv) // 2, hidden]
        assert r["gate_up_shape"] == [inter, hidden]
        assert r["o_shape"] == [hidden, q // 2] and r["down_shape"] == [hidden, inter // 2]
        assert r["k_cache_shape"][0] == kwargs["num_key_value_heads"] // 2
        vocab = kwargs["vocab_size"]
        assert r["vocab_parallel"] == (vocab % 2 == 0)
        assert r["lm_head_rows"] == (vocab // 2 if vocab % 2 == 0 else vocab)
        assert r["col_norm_keys_match"] and r["col_norm_rel_err"] <= 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_thresholds_calibrated_on_shards_are_whole_model_thresholds(tp2, case):
    for results in tp2:
        r = results[case]
        assert r["shard_calibration_keys_match"]
        assert r["shard_calibration_max_diff"] <= 1e-5, r["shard_calibration_max_diff"]  # split sums round
        assert abs(r["decode_sparsity_shard"] - r["decode_sparsity_full"]) <= 1e-6
        assert 0.3 < r["decode_sparsity_full"] < 0.7


def test_random_shard_is_drawn_per_rank(tp2):
    r0, r1 = tp2[0]["random_shard"], tp2[1]["random_shard"]
    for r in (r0, r1):
        heads, kv, inter, head_dim = r["full"]
        assert r["local"] == [heads // 2, kv // 2, inter // 2, head_dim]  # head_dim kept, not hidden / local heads
        assert r["qkv_shape"] == [(heads + 2 * kv) // 2 * head_dim, 128]
        assert r["down_shape"] == [128, inter // 2]
        assert r["lm_head_rows"] == 256  # vocabulary 512 split by rows
        assert 0.3 < r["measured_sparsity"] < 0.7
        assert "CUDA" in r["symm_mem_error"]
        assert "carrier-pigeon" in r["bad_all_reduce_error"] and "nccl" in r["bad_all_reduce_error"]
        assert r["all_reduce_after_errors"] == "nccl"
    from teal.engine.tp import MULTICAST_OFF

    assert r0["multicast_env"] == r1["multicast_env"] == MULTICAST_OFF  # set in every rank
    assert MULTICAST_OFF["NCCL_NVLS_ENABLE"] == "0" and MULTICAST_OFF["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert r0["embed_sample"] == r1["embed_sample"]
    assert r0["qkv_sample"] != r1["qkv_sample"]
    # the ranks run one model: the same tokens everywhere, dense and sparse
    assert r0["tokens"] == r1["tokens"] and r0["sparse_tokens"] == r1["sparse_tokens"]
    assert len(r0["tokens"]) == NEW_TOKENS


def test_one_shot_all_reduce_op_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import teal.engine.collectives  # noqa: F401  (registers teal::one_shot_all_reduce)

    with FakeTensorMode():
        out = torch.ops.teal.one_shot_all_reduce(torch.empty(1, 48, dtype=torch.bfloat16), "0")
    assert out.shape == (1, 48) and out.dtype == torch.bfloat16


def test_compiled_decode_layer_with_collectives(tp2):
    for results in tp2:
        assert results["llama-gqa-bias"]["compiled_decode_rel_err"] <= 1e-5


def test_world_size_one_is_the_plain_engine(tmp_path):
    launch(degenerate_rank, 1, (str(tmp_path),), device="cpu", timeout_s=TIMEOUT_S)
    out = json.loads((tmp_path / "rank0.json").read_text())
    assert out == {k: True for k in out} and len(out) == 5, out


# ---------------------------------------------------------------------------------- errors (in process)
def test_indivisible_world_size_is_refused():
    engine = build_engine("llama-gqa-bias")  # 4 heads, 2 kv heads, intermediate 96
    with pytest.raises(ValueError, match=r"n_kv_heads=2 .*not divisible by 4.*among \[1, 2\]"):
        shard_engine(engine, 0, 4)
    with pytest.raises(ValueError, match=r"n_kv_heads=2.*n_heads=4.*not divisible by 3"):
        shard_engine(engine, 0, 3)
    with pytest.raises(ValueError, match="positive integer"):
        check_tp_size(engine.config, 0)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        shard_engine(engine, 2, 2)
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        shard_engine(engine, 0, 2)


def test_whole_model_column_scales_are_checked():
    engine = build_engine("qwen2-bias")
    engine.to_layout(transposed=True)
    shard = shard_engine(engine, 0, 1)
    assert isinstance(shard, TensorParallelEngine)
    th = activation_thresholds(engine, ids_for(engine, 16, 2), 0.5)
    scales = engine.weight_column_norms()
    scales["layers.1.down"] = scales["layers.1.down"][:10]
    with pytest.raises(ValueError, match=r"'layers.1.down' has 10 entries .* 96 input channels"):
        shard.set_thresholds(th, scales)


def test_launch_reports_a_failing_rank(tmp_path):
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        launch(_failing_rank, 2, (), device="cpu", timeout_s=TIMEOUT_S, collective_timeout_s=30)


def _failing_rank(rank: int, world_size: int, group) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")


# ------------------------------------------------------------------------------- the benchmark, --tp 2
def test_bench_decode_tp2_smoke(tmp_path):
    from teal.bench import decode

    path = tmp_path / "tp.json"
    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=12, new_tokens=6, repeats=1,
                      json_path=path, device="cpu", dtype=torch.float32, tp=2)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data, default=str))
    assert data["tp"] == 2 and data["lm_head"].startswith("column-parallel")
    checks = data["checks"]
    assert checks["prefill_rel_err_vs_single_device"] <= 1e-5
    assert checks["greedy_tokens_match_single_device"] and checks["sparse0.5_greedy_tokens_match_single_device"]
    rows = {(r["sparsity"], r["op"]): r for r in data["results"]}
    assert set(rows) == {(0.0, "F.linear"), (0.0, "x @ w_t"), (0.5, "kernel")}
    single = {(r["sparsity"], r["op"]): r for r in data["single_device"]}
    assert set(single) == set(rows)
    sparse, dense = rows[(0.5, "kernel")], rows[(0.0, "x @ w_t")]
    assert 0.4 < sparse["measured_sparsity"] < 0.6
    assert sparse["bytes_per_token"] < dense["bytes_per_token"]
    # each rank reads about half of what one device reads (norms and the embedding row are replicated)
    ratio = dense["bytes_per_token"] / single[(0.0, "x @ w_t")]["bytes_per_token"]
    assert 0.5 < ratio < 0.55, ratio
    assert all(r["tokens_per_s"] > 0 and r["speedup_vs_single_device_same_setting"] for r in data["results"])
    # fp32 on CPU: the timed greedy tokens are those of one device
    assert all(r["tokens_match_single_device"] for r in data["results"]), data["results"]


def test_bench_decode_tp2_random_shards(tmp_path):
    """build 'shard': no rank holds the whole model (how the 70B shapes run); symm_mem is refused on CPU and
    reported, the NCCL (here gloo) rows are timed."""
    from teal.bench import decode

    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=12, new_tokens=6, repeats=1,
                      json_path=tmp_path / "tp.json", device="cpu", dtype=torch.float32, tp=2, tp_build="shard",
                      all_reduces=("nccl", "symm_mem"))
    assert data["build"] == "shard" and data["single_device"] == []
    assert "CUDA" in data["all_reduce_errors"]["symm_mem"]
    rows = {(r["sparsity"], r["op"], r["all_reduce"]): r for r in data["results"]}
    assert set(rows) == {(0.0, "F.linear", "nccl"), (0.0, "x @ w_t", "nccl"), (0.5, "kernel", "nccl")}
    assert 0.4 < rows[(0.5, "kernel", "nccl")]["measured_sparsity"] < 0.6
    assert data["model_info"]["n_heads"] == 4 and data["model_info"]["weight_bytes_per_rank"] > 0
    # the two targets, from the fastest dense row and the fastest 50 % row
    dense = max(r["tokens_per_s"] for r in data["results"] if r["sparsity"] == 0.0)
    best_dense = max((r for r in data["results"] if r["sparsity"] == 0.0), key=lambda r: r["tokens_per_s"])
    t = data["targets"]
    assert t["sparse50_vs_dense"]["value"] == pytest.approx(rows[(0.5, "kernel", "nccl")]["tokens_per_s"] / dense)
    assert t["dense_frac_roofline"]["value"] == best_dense["frac_of_roofline"]
    assert t["sparse50_vs_dense"]["met"] == (t["sparse50_vs_dense"]["value"] >= 1.6)


def test_tp_targets_from_rows():
    from teal.bench.tp import tp_targets

    rows = [dict(sparsity=0.0, tokens_per_s=50.0, frac_of_roofline=0.83),
            dict(sparsity=0.0, tokens_per_s=49.0, frac_of_roofline=0.80),
            dict(sparsity=0.5, tokens_per_s=79.0, frac_of_roofline=0.64),
            dict(sparsity=0.5, tokens_per_s=81.0, frac_of_roofline=0.66)]
    t = tp_targets(rows)
    assert t["dense_frac_roofline"] == {"value": 0.83, "target": 0.75, "met": True}
    assert t["sparse50_vs_dense"]["value"] == pytest.approx(81.0 / 50.0) and t["sparse50_vs_dense"]["met"]
    rows[3]["tokens_per_s"] = 79.5
    assert not tp_targets(rows)["sparse50_vs_dense"]["met"]  # 1.59 < 1.6
    assert tp_targets(rows[2:]) == {}  # no dense row: nothing to compare with


def test_bench_tp_build_choice_is_checked():
    from teal.bench.tp import _build_choice

    cpu = torch.device("cpu")
    assert _build_choice("auto", None, "tiny-llama", torch.bfloat16, cpu) == "full"
    assert _build_choice("shard", None, "tiny-llama", torch.bfloat16, cpu) == "shard"
    assert _build_choice("auto", "smollm2-135m", None, torch.bfloat16, torch.device("cuda")) == "full"  # a name
    with pytest.raises(ValueError, match="choose auto, full or shard"):
        _build_choice("half", None, "tiny-llama", torch.bfloat16, cpu)


# ------------------------------------------------------------------- shards read from an HF checkpoint
CHECKPOINT_CASES = {
    # GQA with biases everywhere, untied head (lm_head rows read per rank), weights in several files
    "llama-gqa-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    # tied embeddings: the lm_head shard is a view of the whole embedding
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for case, extra in CHECKPOINT_CASES.items():
        kwargs = {**TINY, **extra}
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
        out[case] = str(path)
    return out


def checkpoint_rank(rank: int, world_size: int, group, paths: dict, out_dir: str) -> None:
    from teal.engine import engine_from_checkpoint
    from teal.engine.tp import shard_from_checkpoint

    results = {}
    for case, path in paths.items():
        full = engine_from_checkpoint(path, dtype=torch.float32, device="cpu", max_seq_len=32)
        sliced = shard_engine(full, rank, world_size, group)
        read = shard_from_checkpoint(path, rank, world_size, group, dtype=torch.float32, device="cpu",
                                     max_seq_len=32)
        same = all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for wa, wb in zip(sliced.layers, read.layers) for a, b in zip(wa, wb)
        )
        ids = ids_for(full, PROMPT + STEPS, 3)
        results[case] = {
            "layers_equal": same,
            "embed_equal": torch.equal(sliced.embed, read.embed),
            "lm_head_equal": torch.equal(sliced.lm_head, read.lm_head),
            "lm_head_rows": read.lm_head.shape[0],
            "vocab_parallel": read.vocab_group is not None,
            "tokens": greedy(read, ids),
            "ref_tokens": greedy(full, ids),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_shards_read_from_a_checkpoint_equal_sliced_engines(checkpoints, tmp_path):
    launch(checkpoint_rank, 2, (checkpoints, str(tmp_path)), device="cpu", timeout_s=TIMEOUT_S,
           collective_timeout_s=120)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, r in results.items():
            assert r["layers_equal"] and r["embed_equal"] and r["lm_head_equal"], (rank, case)
            assert r["vocab_parallel"] and r["lm_head_rows"] == TINY["vocab_size"] // 2
            assert r["tokens"] == r["ref_tokens"], (rank, case)


def test_generate_tp_matches_one_device(checkpoints, tmp_path):
    """teal generate --tp: ranks read their shards, decode sparse with an artifact's thresholds, and rank 0's
    tokens are one device's (fp32, CPU / gloo)."""
    import teal
    from transformers import AutoModelForCausalLM

    from teal.engine import Generator, engine_from_checkpoint
    from teal.engine.tp import checkpoint_dir, generate_tp

    path = checkpoints["llama-gqa-bias"]
    assert checkpoint_dir(path) == Path(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(5))
    teal.calibrate(hf, None, windows=windows, tokens=128, progress=False).save(tmp_path / "artifact")
    full = engine_from_checkpoint(path, dtype=torch.float32, device="cpu", max_seq_len=64, transposed=True)
    prompt = [int(t) for t in ids_for(full, PROMPT, 3)]
    gen = Generator(full, mode="eager", thresholds=teal.Thresholds.load(tmp_path / "artifact"), sparsity=0.5)
    ref = gen.generate(prompt, NEW_TOKENS, stop=[]).tokens
    res = generate_tp(path, 2, prompt, thresholds=tmp_path / "artifact", sparsity=0.5, max_new_tokens=NEW_TOKENS,
                      device="cpu", stream=False)
    assert res["tokens"] == ref and res["world_size"] == 2 and res["all_reduce"] == "nccl"
    assert res["tokens_per_s"] > 0 and "decode eager" in res["summary"] and "sparsity setting 0.5" in res["summary"]
    with pytest.raises(ValueError, match="needs a thresholds artifact"):
        generate_tp(path, 2, prompt, sparsity=0.5, device="cpu")
    # an artifact of another model is refused before any rank starts
    from teal.artifact import ArtifactError

    with pytest.raises(ArtifactError, match=r"\(model_type=llama\), not on .*\(model_type=qwen3\)"):
        other = checkpoints["qwen3-qknorm"]
        generate_tp(other, 2, prompt, thresholds=tmp_path / "artifact", sparsity=0.5, device="cpu")


def test_bench_decode_tp2_checkpoint_shards(checkpoints, tmp_path):
    """build 'shard' with --model: each rank reads its slices of the checkpoint, thresholds from an artifact
    (whole-model; another model's artifact is refused)."""
    import teal
    from transformers import AutoModelForCausalLM

    from teal.bench import decode

    path = checkpoints["llama-gqa-bias"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(5))
    th = teal.calibrate(hf, None, windows=windows, tokens=128, progress=False)
    data = decode.run(model=path, shape=None, sparsities=(0.5,), prompt_len=12, new_tokens=6, repeats=1,
                      thresholds=th, device="cpu", dtype=torch.float32, tp=2, tp_build="shard")
    assert data["build"] == "shard" and data["checks"]["note"].startswith("checkpoint shards")
    rows = {(r["sparsity"], r["op"]): r for r in data["results"]}
    assert 0.35 < rows[(0.5, "kernel")]["measured_sparsity"] < 0.65
    assert data["model_info"]["n_kv_heads"] == 2 and data["lm_head"].startswith("column-parallel")
    with pytest.raises(Exception, match=r"ArtifactError.*model_type=llama"):  # raised in a rank, re-raised here
        decode.run(model=checkpoints["qwen3-qknorm"], shape=None, sparsities=(0.5,), prompt_len=12, new_tokens=6,
                   repeats=1, thresholds=th, device="cpu", dtype=torch.float32, tp=2, tp_build="shard")


def test_symm_mem_sum_without_its_buffer_raises_instead_of_falling_back():
    """A "symm_mem" sum never runs NCCL under the symm_mem label: without a symmetric buffer of its size it
    raises (the engine's prefill asks for "nccl" itself)."""
    from teal.engine.collectives import all_reduce_sum

    with pytest.raises(RuntimeError, match=r"symm_mem all-reduce: no symmetric buffer for a \(1, 48\)"):
        all_reduce_sum(torch.ones(1, 48), None, "symm_mem")
