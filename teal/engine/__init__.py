"""Lean batch-1 decode engine for Llama-family models: fused weights, static KV cache, CUDA graphs,
dense or TEAL-sparse decode steps through `teal.kernels.sparse_linear`.

    gen = Generator.from_pretrained("smollm2-135m", thresholds=th, sparsity=0.5)
    out = gen.generate("The capital of France is", max_new_tokens=32)
"""

from teal.engine.config import SHAPES, SUPPORTED_MODEL_TYPES, EngineConfig, shape_hf_config
from teal.engine.generator import MODES, GenerationResult, Generator, resolve_thresholds
from teal.engine.loading import engine_from_checkpoint, engine_from_hf_model, engine_random
from teal.engine.model import GROUPS, PROJECTIONS, Engine
from teal.engine.sampling import sample, top_p_filter

__all__ = [
    "GROUPS", "MODES", "PROJECTIONS", "SHAPES", "SUPPORTED_MODEL_TYPES", "Engine", "EngineConfig",
    "GenerationResult", "Generator", "engine_from_checkpoint", "engine_from_hf_model", "engine_random",
    "resolve_thresholds", "sample", "shape_hf_config", "top_p_filter",
]
