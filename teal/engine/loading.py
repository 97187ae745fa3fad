"""Build an `Engine` from an HF model, an HF checkpoint directory (safetensors), or random weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from teal.engine.config import EngineConfig, shape_hf_config
from teal.engine.model import Engine, LayerWeights

TensorGetter = Callable[[str], "torch.Tensor | None"]


def engine_from_hf_model(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    max_seq_len: int = 2048,
    transposed: bool = False,
) -> Engine:
    """Copy the weights of a loaded HF causal LM (Llama, Mistral, Qwen2, Qwen3, Gemma 3) into a new engine; of a
    multimodal Gemma 3, its text decoder."""
    config = EngineConfig.from_hf(model.config)
    first = next(model.parameters())
    dtype = dtype or first.dtype
    device = torch.device(device) if device is not None else first.device

    def get(name: str) -> torch.Tensor | None:
        module_path, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            return None
        value = getattr(module, attr, None)
        return value.detach() if isinstance(value, torch.Tensor) else None

    return _build(config, get, dtype=dtype, device=device, max_seq_len=max_seq_len, transposed=transposed)


def engine_from_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    max_seq_len: int = 2048,
    transposed: bool = False,
) -> Engine:
    """Load an HF checkpoint directory (config.json + model.safetensors or sharded *.safetensors)."""
    config, get, has = checkpoint_reader(path, torch.device(device))
    return _build(config, get, dtype=dtype, device=torch.device(device), max_seq_len=max_seq_len,
                  transposed=transposed, has=has)


def checkpoint_reader(
    path: str | Path,
    device: torch.device,
    slicer: Callable[[str, object], "torch.Tensor"] | None = None,
) -> tuple[EngineConfig, TensorGetter, Callable[[str], bool]]:
    """The config of an HF checkpoint directory and (get, has) over its safetensors tensors, read lazily.
    slicer(name, safetensors_slice) -> tensor: read only part of a tensor (tensor parallelism); None: whole."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; give an HF checkpoint directory")
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        weight_map = {}
    else:
        raise FileNotFoundError(
            f"{path} has no model.safetensors or model.safetensors.index.json; the engine reads safetensors "
            "only (load .bin checkpoints with transformers and use Generator.from_pretrained(model))"
        )
    config = EngineConfig.from_hf(AutoConfig.from_pretrained(path))
    handles: dict[str, object] = {}

    def get(name: str) -> torch.Tensor | None:
        file = weight_map.get(name, "model.safetensors" if not weight_map else None)
        if file is None:
            return None
        if file not in handles:
            handles[file] = safe_open(str(path / file), framework="pt", device=str(device))
        handle = handles[file]
        if name not in handle.keys():  # type: ignore[attr-defined]
            return None
        if slicer is not None:
            return slicer(name, handle.get_slice(name))  # type: ignore[attr-defined]
        return handle.get_tensor(name)  # type: ignore[attr-defined]

    def has(name: str) -> bool:
        if weight_map:
            return name in weight_map
        single = "model.safetensors"
        if single not in handles:
            handles[single] = safe_open(str(path / single), framework="pt", device=str(device))
        return name in handles[single].keys()  # type: ignore[attr-defined]

    return config, get, has


def engine_random(
    shape: str | object,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    max_seq_len: int = 2048,
    transposed: bool = False,
    seed: int = 0,
    std: float = 0.02,
) -> Engine:
    """Random weights (normal, std 0.02; norms 1) for a named shape or an HF config, built on `device`."""
    hf_config = shape_hf_config(shape) if isinstance(shape, str) else shape
    config = EngineConfig.from_hf(hf_config)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    biases = _bias_layout(hf_config, config.model_type)

    def rand(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    def fused(k: int, n: int) -> torch.Tensor:
        return rand(k, n) if transposed else rand(n, k)

    qkv_n = config.q_size + 2 * config.kv_size
    layers = []
    for _ in range(config.n_layers):
        layers.append(LayerWeights(
            attn_norm=ones(config.hidden),
            qkv=fused(config.hidden, qkv_n),
            qkv_bias=rand(qkv_n) if biases["qkv"] else None,
            q_norm=ones(config.head_dim) if config.qk_norm else None,
            k_norm=ones(config.head_dim) if config.qk_norm else None,
            o=fused(config.q_size, config.hidden),
            o_bias=rand(config.hidden) if biases["o"] else None,
            mlp_norm=ones(config.hidden),
            gate_up=fused(config.hidden, 2 * config.intermediate),
            gate_up_bias=rand(2 * config.intermediate) if biases["mlp"] else None,
            down=fused(config.intermediate, config.hidden),
            down_bias=rand(config.hidden) if biases["mlp"] else None,
            post_attn_norm=ones(config.hidden) if config.sandwich_norms else None,
            post_mlp_norm=ones(config.hidden) if config.sandwich_norms else None,
        ))
    embed = rand(config.vocab_size, config.hidden)
    lm_head = embed if config.tie_embeddings else rand(config.vocab_size, config.hidden)
    return Engine(config, layers, embed, ones(config.hidden), lm_head, transposed=transposed, max_seq_len=max_seq_len)


def _bias_layout(hf_config, model_type: str) -> dict[str, bool]:
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    return {
        "qkv": model_type == "qwen2" or attention_bias,
        "o": model_type != "qwen2" and attention_bias,
        "mlp": bool(getattr(hf_config, "mlp_bias", False)),
    }


#: Where a causal LM's text decoder sits: its own `model.` (Llama, Gemma3ForCausalLM, ...); inside a
#: multimodal model as loaded by transformers (`model.language_model.`); in its checkpoint files
#: (`language_model.model.`).
DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def text_decoder_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text decoder's tensors of `model` under a causal LM's names (`model.…`, `lm_head.weight`): a
    multimodal model's `model.language_model.…` / `language_model.model.…` entries renamed, its other
    parts (vision tower, projector) left out; a causal LM's state dict as it is."""
    state = model.state_dict()
    for prefix in DECODER_PREFIXES[1:]:
        if any(k.startswith(prefix) for k in state):
            out = {"model." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            head = next((state[k] for k in ("lm_head.weight", "language_model.lm_head.weight") if k in state), None)
            if head is not None:
                out["lm_head.weight"] = head
            return out
    return state


def _decoder_getter(get: TensorGetter, has: Callable[[str], bool], name: str) -> TensorGetter:
    """`get` with the text decoder's names rewritten from `model.` to the prefix this model uses (`has` says
    whether a tensor exists without reading it)."""
    prefix = next((p for p in DECODER_PREFIXES if has(p + "embed_tokens.weight")), None)
    if prefix is None:
        tried = ", ".join(p + "embed_tokens.weight" for p in DECODER_PREFIXES)
        raise KeyError(f"no token embedding found in {name!r} (looked for {tried})")
    if prefix == "model.":
        return get
    head = "language_model.lm_head.weight" if prefix == "language_model.model." and has(
        "language_model.lm_head.weight") else "lm_head.weight"

    def renamed(key: str) -> torch.Tensor | None:
        if key == "lm_head.weight":
            return get(head)
        return get(prefix + key.removeprefix("model.")) if key.startswith("model.") else get(key)

    return renamed


def _build(
    config: EngineConfig,
    get: TensorGetter,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int,
    transposed: bool,
    has: Callable[[str], bool] | None = None,
) -> Engine:
    get = _decoder_getter(get, has or (lambda key: get(key) is not None), config.name)

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise KeyError(f"weight {name!r} not found in the {config.model_type} checkpoint {config.name!r}")
        return t.to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        t = get(name)
        return None if t is None else t.to(device=device, dtype=dtype)

    def fuse(names: list[str]) -> torch.Tensor:
        parts = [need(n) for n in names]  # each [out, in]
        if transposed:
            return torch.cat([p.t() for p in parts], dim=1).contiguous()
        return torch.cat(parts, dim=0).contiguous() if len(parts) > 1 else parts[0].contiguous()

    def fuse_bias(names: list[str]) -> torch.Tensor | None:
        parts = [maybe(n) for n in names]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ValueError(f"only some of {names} have a bias; the engine needs all or none")
        return torch.cat(parts).contiguous()  # type: ignore[arg-type]

    layers = []
    for i in range(config.n_layers):
        a, m, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"model.layers.{i}."
        # Gemma 3: post_attention_layernorm normalises the attention output; pre_feedforward_layernorm is
        # the MLP's input norm. Llama family: post_attention_layernorm is the MLP's input norm.
        sandwich = config.sandwich_norms
        layers.append(LayerWeights(
            attn_norm=need(f"model.layers.{i}.input_layernorm.weight"),
            qkv=fuse([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),
            qkv_bias=fuse_bias([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]),
            q_norm=maybe(a + "q_norm.weight") if config.qk_norm else None,
            k_norm=maybe(a + "k_norm.weight") if config.qk_norm else None,
            o=fuse([a + "o_proj.weight"]),
            o_bias=maybe(a + "o_proj.bias"),
            mlp_norm=need(p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")),
            gate_up=fuse([m + "gate_proj.weight", m + "up_proj.weight"]),
            gate_up_bias=fuse_bias([m + "gate_proj.bias", m + "up_proj.bias"]),
            down=fuse([m + "down_proj.weight"]),
            down_bias=maybe(m + "down_proj.bias"),
            post_attn_norm=need(p + "post_attention_layernorm.weight") if sandwich else None,
            post_mlp_norm=need(p + "post_feedforward_layernorm.weight") if sandwich else None,
        ))
        if config.qk_norm and (layers[-1].q_norm is None or layers[-1].k_norm is None):
            raise KeyError(f"{config.model_type} layer {i} lacks self_attn.q_norm / k_norm weights")
    embed = need("model.embed_tokens.weight").contiguous()
    head = None if config.tie_embeddings else get("lm_head.weight")
    lm_head = embed if head is None else head.to(device=device, dtype=dtype).contiguous()
    return Engine(config, layers, embed, need("model.norm.weight"), lm_head, transposed=transposed,
                  max_seq_len=max_seq_len)
