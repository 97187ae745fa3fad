"""Engine configuration: the few numbers the decode engine needs, and the named random shapes."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

#: MLP activations the engine implements (HF ``hidden_act`` / ``hidden_activation`` names -> engine name).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

# Named shapes for speed work with random weights. Values are HF config kwargs per model_type, so the
# same shape can also build the matching HF model (the benchmark compares against HF generate).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
    "llama-2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "llama-2-70b": dict(
        model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "llama-3-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    # Gemma 3 text decoders (GeGLU, sandwich norms, one global layer in six; 1B: its config.json, 12B: the
    # text_config of its multimodal checkpoint).
    "gemma-3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
        max_position_embeddings=32768,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0,
    ),
    "gemma-3-12b": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)],
        max_position_embeddings=131072,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0,
    ),
    # Small enough for CPU tests.
    "tiny-llama": dict(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=352,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "tiny-gemma3": dict(
        model_type="gemma3_text", vocab_size=512, hidden_size=128, intermediate_size=352,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        query_pre_attn_scalar=32, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=1024,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    ),
}


def shape_hf_config(name: str):
    """The HF config (`transformers.PretrainedConfig`) of a named random shape."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}")
    from transformers import AutoConfig

    kwargs = dict(SHAPES[name])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    config.name_or_path = f"random:{name}"
    return config


@dataclass(frozen=True)
class EngineConfig:
    """Architecture numbers of a Llama-family decoder, read from an HF config."""

    model_type: str
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    tie_embeddings: bool
    qk_norm: bool
    layer_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    name: str
    hf_config: Any = field(repr=False, compare=False, default=None)
    # Gemma 3 (defaults: Llama). RMSNorm weights are used as (norm_offset + w), multiplied in fp32 before the
    # cast when norm_offset is nonzero; embeddings are scaled by embed_scale (in the weights' dtype); the
    # attention output and the MLP output pass through their own norms before the residual add
    # (sandwich_norms); rope tables per layer (layer_rope: 0 the full-attention table, 1 the sliding one).
    activation: str = "silu"
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    norm_offset: float = 0.0
    embed_scale: float | None = None
    sandwich_norms: bool = False
    layer_rope: tuple[int, ...] = ()
    final_softcap: float | None = None

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, config) -> "EngineConfig":
        """Read an HF `PretrainedConfig`; unsupported architectures raise `ValueError`. A multimodal config
        whose text model is supported (Gemma 3's `gemma3` with its `text_config`) gives the text decoder's."""
        text_config = getattr(config, "text_config", None)
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES and text_config is not None and \
                getattr(text_config, "model_type", None) in SUPPORTED_MODEL_TYPES:
            text_config = copy.deepcopy(text_config)  # the caller's config is left as it is
            if getattr(text_config, "eos_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
                text_config.eos_token_id = config.eos_token_id
            if not getattr(text_config, "name_or_path", ""):
                text_config.name_or_path = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
            config = text_config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the decode engine does not support model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"the decode engine supports hidden activations {sorted(ACTIVATIONS)}, got {act!r}")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping (Gemma 2) is not supported by the decode engine")
        gemma = model_type == "gemma3_text"
        rope = _rope_parameters(config)
        if rope.get("rope_type", "default") == "dynamic":
            raise ValueError("rope_type 'dynamic' changes with sequence length and is not supported")
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_eps=float(config.rms_norm_eps),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            layer_windows=_layer_windows(config, model_type),
            eos_token_ids=eos_ids,
            name=str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or model_type),
            hf_config=config,
            activation=ACTIVATIONS[act],
            attn_scale=float(config.query_pre_attn_scalar) ** -0.5 if gemma else None,
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=float(config.hidden_size) ** 0.5 if gemma else None,
            sandwich_norms=gemma,
            layer_rope=_layer_rope(config) if gemma else (),
            final_softcap=getattr(config, "final_logit_softcapping", None),
        )

    @property
    def softmax_scale(self) -> float:
        """Scale of the attention logits q·k."""
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def rope_table(self, layer: int) -> int:
        """Index of layer's rotary table: 0 (full attention; the only one outside Gemma 3) or 1 (sliding)."""
        return self.layer_rope[layer] if self.layer_rope else 0

    @property
    def rope_layer_types(self) -> tuple[str | None, ...]:
        """The layer type each rotary table is computed for (None: the model's single table)."""
        return ("full_attention", "sliding_attention") if self.layer_rope else (None,)

    def rope_inv_freq(self, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim/2] (fp32, CPU) and the cos/sin scale, as HF computes them (for one
        layer type where the model has one rope per type, as Gemma 3)."""
        rope = _rope_parameters(self.hf_config, layer_type)
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            theta = float(rope.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0)))
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / (theta**exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"), **kwargs)
        return inv_freq.float(), float(scale)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection kind."""
        return {
            "q": (self.hidden, self.q_size), "k": (self.hidden, self.kv_size), "v": (self.hidden, self.kv_size),
            "o": (self.q_size, self.hidden), "gate": (self.hidden, self.intermediate),
            "up": (self.hidden, self.intermediate), "down": (self.intermediate, self.hidden),
        }

    def parameter_count(self) -> int:
        """Weights of the decoder: projections, embedding and lm_head (once when tied); norms left out."""
        per_layer = sum(k * n for k, n in self.projection_shapes().values())
        heads = 1 if self.tie_embeddings else 2
        return self.n_layers * per_layer + heads * self.vocab_size * self.hidden


def _rope_parameters(config, layer_type: str | None = None) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older transformers: rope_scaling + rope_theta
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type form
        params = params[layer_type or "full_attention"]
    return dict(params)


def _layer_rope(config) -> tuple[int, ...]:
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return tuple(1 if t == "sliding_attention" else 0 for t in layer_types)


def _layer_windows(config, model_type: str) -> tuple[int | None, ...]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if model_type == "mistral":
        return tuple([window] * n)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return tuple([None] * n)
