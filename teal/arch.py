"""Architecture adapters: an HF causal LM -> decoder layers -> sites -> projections.

A *site* is a hidden state that feeds one or more projections; a *projection* is one weight
matrix fed by a site. Keys are ``"layers.{i}.{proj}"`` and ``"layers.{i}.{site}"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
PROJ_SITE = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "mlp_mid",
}
# attribute path of each projection inside a decoder layer, for the Llama-shaped block
_LLAMA_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# model_type -> human name; all share the Llama block layout (q/k/v/o + gate/up/down)
SUPPORTED = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma-3 (text)",
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def proj_key(layer: int, proj: str) -> str:
    return f"layers.{layer}.{proj}"


def site_key(layer: int, site: str) -> str:
    return f"layers.{layer}.{site}"


def split_key(key: str) -> tuple[int, str]:
    """``"layers.3.q"`` -> ``(3, "q")``."""
    _, layer, name = key.split(".")
    return int(layer), name


def _get(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise AttributeError(path) from None


@dataclass
class Adapter:
    """Finds the decoder layers and projections of a supported model."""

    model: nn.Module
    model_type: str
    layers: list[nn.Module]

    def projection_path(self, proj: str) -> str:
        return _LLAMA_PATHS[proj]

    def projections(self) -> dict[str, nn.Module]:
        """All projections in layer order, keyed ``layers.{i}.{proj}``."""
        out: dict[str, nn.Module] = {}
        for i, layer in enumerate(self.layers):
            for p in PROJECTIONS:
                out[proj_key(i, p)] = _get(layer, _LLAMA_PATHS[p])
        return out

    def replace(self, key: str, module: nn.Module) -> None:
        """Put ``module`` in place of the projection ``key``."""
        i, p = split_key(key)
        self.layers[i].set_submodule(_LLAMA_PATHS[p], module)

    def sites(self) -> dict[str, list[str]]:
        """Site key -> projection keys it feeds."""
        out: dict[str, list[str]] = {}
        for i in range(len(self.layers)):
            for p in PROJECTIONS:
                out.setdefault(site_key(i, PROJ_SITE[p]), []).append(proj_key(i, p))
        return out

    def site_probe(self, site: str) -> str:
        """The projection whose input is captured to observe ``site`` (the first it feeds)."""
        i, s = split_key(site)
        first = next(p for p in PROJECTIONS if PROJ_SITE[p] == s)
        return proj_key(i, first)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `.config`; teal needs a Hugging Face causal LM "
            f"(supported: {', '.join(SUPPORTED.values())})."
        )
    text_config = getattr(config, "text_config", None)
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    return model_type


def _decoder_layers(model: nn.Module) -> list[nn.Module] | None:
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers"):
        try:
            layers = _get(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return None


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedArchitectureError` otherwise."""
    model_type = _model_type(model)
    if model_type not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported by teal; "
            f"supported model types: {', '.join(sorted(SUPPORTED))}. "
            "Open an issue with the model id to request an adapter."
        )
    layers = _decoder_layers(model)
    if not layers:
        raise UnsupportedArchitectureError(
            f"could not find the decoder layers of {type(model).__name__} "
            f"(model_type {model_type!r}); expected `model.layers`."
        )
    for p, path in _LLAMA_PATHS.items():
        try:
            _get(layers[0], path)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} (model_type {model_type!r}) has no `{path}` in its "
                "decoder layers; teal expects separate q/k/v/o and gate/up/down projections."
            ) from None
    return Adapter(model=model, model_type=model_type, layers=layers)
