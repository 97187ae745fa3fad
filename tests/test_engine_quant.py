"""The engine with int8 / int4 weights (Engine.quantize_weights) against HF with the same codes
(teal.quant.quantize_weights), dense and sparse, for every family: fp32, logits within 1e-4."""

from __future__ import annotations

import pytest
import torch

from teal.engine import Generator, engine_from_hf_model
from teal.engine.reference import activation_thresholds, masked_hf_logits
from teal.quant import quantize_weights

from test_engine import FAMILIES, prompt_ids, rel_err, tiny_hf_model

FORMATS = [("int8", 128), ("int4", 32)]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_quantized_engine_matches_quantized_hf(family, fmt, group):
    hf = tiny_hf_model(family)
    engine = engine_from_hf_model(hf, max_seq_len=40)
    engine.quantize_weights(fmt, group)
    quantize_weights(hf, fmt, group)  # the same round-to-nearest codes, per projection
    ids = prompt_ids(16, seed=9)
    prompt = 6
    with torch.no_grad():
        dense = hf(ids[None]).logits[0]
        assert rel_err(engine.prefill(ids, all_logits=True), dense) <= 1e-4
        th = activation_thresholds(engine, prompt_ids(24, seed=7), 0.5, None)
        engine.set_thresholds(th)
        ref = masked_hf_logits(hf, ids, th, dense_prefix=prompt)
        engine.prefill(ids[:prompt])
        for t in range(prompt, 16):
            logits = engine.decode(ids[t : t + 1], torch.tensor([t]))[0]
            assert rel_err(logits, ref[t]) <= 1e-4, f"position {t}"
        assert rel_err(ref[prompt:], dense[prompt:]) > 1e-3  # the thresholds do mask


def test_quantized_engine_counts_its_bytes_and_refuses_twice():
    hf = tiny_hf_model("llama3-rope")
    engine = engine_from_hf_model(hf, max_seq_len=16)
    dense = dict(engine.iter_weight_bytes())
    before = sum(b for k, b in engine.iter_weight_bytes() if k not in ("embed", "lm_head", "norm"))
    engine.quantize_weights("int4", 32)
    after = sum(b for k, b in engine.iter_weight_bytes() if k not in ("embed", "lm_head", "norm"))
    assert after < before / 3  # 4-bit codes plus a scale and zero per 32 inputs, against 32-bit weights
    assert "embed" in dense
    with pytest.raises(ValueError, match="already int4"):
        engine.quantize_weights("int8")
    with pytest.raises(ValueError, match="one layout"):
        engine.to_layout(False)


def test_generator_quantized_greedy_tokens_match_hf():
    hf = tiny_hf_model("qwen2-bias")
    gen = Generator.from_pretrained(hf, max_seq_len=40, weights="int8")
    quantize_weights(hf, "int8")
    ids = prompt_ids(8, seed=3)
    out = gen.generate(ids, max_new_tokens=10, stop=[])
    with torch.no_grad():
        ref = hf.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=10,
                          min_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tokens == ref[0, ids.numel():].tolist()
