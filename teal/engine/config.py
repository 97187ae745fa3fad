"""Engine configuration: the few numbers the decode engine needs, and the named random shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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
    # Small enough for CPU tests.
    "tiny-llama": dict(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=352,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
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

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, config) -> "EngineConfig":
        """Read an HF `PretrainedConfig`; unsupported architectures raise `ValueError`."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the decode engine does not support model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"the decode engine supports hidden_act 'silu' only, got {act!r}")
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
            qk_norm=model_type == "qwen3",
            layer_windows=_layer_windows(config, model_type),
            eos_token_ids=eos_ids,
            name=str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or model_type),
            hf_config=config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim/2] (fp32, CPU) and the cos/sin scale, as HF computes them."""
        rope = _rope_parameters(self.hf_config)
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            theta = float(rope.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0)))
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / (theta**exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scale)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection kind."""
        return {
            "q": (self.hidden, self.q_size), "k": (self.hidden, self.kv_size), "v": (self.hidden, self.kv_size),
            "o": (self.q_size, self.hidden), "gate": (self.hidden, self.intermediate),
            "up": (self.hidden, self.intermediate), "down": (self.intermediate, self.hidden),
        }


def _rope_parameters(config) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older transformers: rope_scaling + rope_theta
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type form
        params = params["full_attention"]
    return dict(params)


def _layer_windows(config, model_type: str) -> tuple[int | None, ...]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if model_type == "mistral":
        return tuple([window] * n)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return tuple([None] * n)
