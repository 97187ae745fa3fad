"""A sparsified model survives ``save_pretrained``: teal as a transformers quantization method.

Registered the way torchao's ``TorchAoConfig`` is (``register_quantization_config`` /
``register_quantizer``), under ``quant_method = "teal"``. What a saved directory holds:

* ``model.safetensors``: the projection weights under their ordinary names (``...q_proj.weight``,
  not ``...q_proj.linear.weight``), so transformers without teal loads the dense model (it warns
  that it does not know ``"teal"`` and skips it) instead of random-initialising the projections;
  plus the thresholds artifact's tensors under ``teal.thresholds.*`` (histograms, weight-aware
  column norms): the thresholds travel inside the checkpoint;
* ``config.json``: ``quantization_config`` = ``{"quant_method": "teal", sparsity, method,
  prefill, dense_prefix, the artifact's teal_config}``.

Loading (``teal.load_model(dir)``, or ``AutoModelForCausalLM.from_pretrained(dir)`` after
``import teal``) reads the dense weights, rebuilds the ``Thresholds`` from those tensors and calls
``teal.sparsify_`` with the saved settings: the same thresholds, the same logits.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "teal"
TENSOR_PREFIX = "teal.thresholds."
_UNEXPECTED = r"^teal\.thresholds\."

__all__ = ["TealConfig", "TealHfQuantizer", "attach", "detach", "thresholds_from_tensors"]


class TealConfig(QuantizationConfigMixin):
    """The ``quantization_config`` entry of a sparsified model's ``config.json``."""

    def __init__(self, sparsity: float = 0.5, method: str = "uniform", prefill: str = "sparse",
                 dense_prefix: int = 0, artifact: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.sparsity = float(sparsity)
        self.method = method
        self.prefill = prefill
        self.dense_prefix = int(dense_prefix)
        self.artifact = artifact or {}
        from teal import __version__

        self.teal_version = kwargs.pop("teal_version", __version__)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "sparsity": self.sparsity, "method": self.method,
                "prefill": self.prefill, "dense_prefix": self.dense_prefix,
                "teal_version": self.teal_version, "artifact": self.artifact}


def thresholds_from_tensors(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
    """A :class:`teal.Thresholds` from an artifact config and its ``hist/`` / ``colnorm/`` tensors."""
    from teal import stats
    from teal.artifact import FORMAT_VERSION, ArtifactError, Thresholds

    if cfg.get("format_version") != FORMAT_VERSION or cfg.get("histogram", {}).get("num_bins") != stats.NUM_BINS:
        raise ArtifactError(f"{where}: its teal thresholds (format {cfg.get('format_version')!r}) are not the format "
                            f"this teal reads ({FORMAT_VERSION}); sparsify the dense model again.")
    try:
        return Thresholds(
            model=cfg["model"],
            histograms={k[5:]: v for k, v in tensors.items() if k.startswith("hist/")},
            col_norms={k[8:]: v for k, v in tensors.items() if k.startswith("colnorm/")},
            proj_sizes={k: int(v) for k, v in cfg["projection_sizes"].items()},
            score=cfg["score"], calibration=cfg.get("calibration", {}),
            allocations=cfg.get("allocations", {}), method=cfg.get("method", "uniform"))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: the teal quantization_config is missing or has a bad field: {e}") from e


def read_checkpoint_thresholds(files: list[str], cfg: dict[str, Any], where: str):
    """The thresholds stored inside a sparsified model's safetensors files."""
    from safetensors import safe_open

    from teal.artifact import ArtifactError

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            continue
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key.startswith(TENSOR_PREFIX):
                    tensors[key[len(TENSOR_PREFIX):]] = sf.get_tensor(key)
    if not tensors:
        raise ArtifactError(f"{where}: config.json says the model is teal-sparsified, but its safetensors hold no "
                            f"{TENSOR_PREFIX}* tensors; save it again with model.save_pretrained after teal.sparsify_.")
    return thresholds_from_tensors(cfg, tensors, where)


class TealHfQuantizer(HfQuantizer):
    """Loads a teal-sparsified checkpoint: dense weights, then ``sparsify_`` with the stored thresholds."""

    requires_calibration = False

    def __init__(self, quantization_config: TealConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        self.checkpoint_files = list(kwargs.get("checkpoint_files") or [])
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        model._keys_to_ignore_on_load_unexpected = ignore | {_UNEXPECTED}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from teal.sparsify import sparsify_

        qc = self.quantization_config
        where = str(getattr(model.config, "_name_or_path", "") or "the checkpoint")
        th = read_checkpoint_thresholds(self.checkpoint_files, qc.artifact, where)
        sparsify_(model, th, qc.sparsity, method=qc.method, prefill=qc.prefill, dense_prefix=qc.dense_prefix)
        return model

    def get_state_dict_and_metadata(self, model):
        """The state dict under the dense model's names, plus the thresholds' tensors."""
        from teal.nn import TealLinear

        wrapped = {n for n, m in model.named_modules() if isinstance(m, TealLinear)}
        out: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():
            prefix, sep, leaf = name.rpartition(".linear.")
            if sep and prefix in wrapped and "." not in leaf:
                name = f"{prefix}.{leaf}"
            out[name] = t.contiguous()
        th = getattr(model, "teal_thresholds", None)
        if th is not None:
            for k, v in th.histograms.items():
                out[f"{TENSOR_PREFIX}hist/{k}"] = v.detach().cpu().long().contiguous()
            for k, v in th.col_norms.items():
                out[f"{TENSOR_PREFIX}colnorm/{k}"] = v.detach().cpu().float().contiguous()
        return out, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model, thresholds, sparsity: float, method: str, prefill: str, dense_prefix: int) -> None:
    """Mark a model just sparsified by ``sparsify_`` so that ``save_pretrained`` keeps it sparsified."""
    config = TealConfig(sparsity, method, prefill, dense_prefix, artifact=thresholds.config())
    model.teal_thresholds = thresholds
    model.config.quantization_config = config
    if isinstance(getattr(model, "hf_quantizer", None), TealHfQuantizer):
        model.hf_quantizer.quantization_config = config
    else:
        model.hf_quantizer = TealHfQuantizer(config, pre_quantized=True)
    # the weights keep their dtype, so .half() / .float() stay allowed (transformers refuses them when is_quantized)
    model.is_quantized = False
    model.quantization_method = QUANT_METHOD


def detach(model) -> None:
    """Undo :func:`attach` (``densify_``): the model saves as the plain dense model again."""
    if isinstance(getattr(model, "hf_quantizer", None), TealHfQuantizer):
        model.hf_quantizer = None
        model.is_quantized = False
        for attr in ("quantization_method",):
            if hasattr(model, attr):
                delattr(model, attr)
    if isinstance(getattr(model.config, "quantization_config", None), TealConfig):
        del model.config.quantization_config
    if hasattr(model, "teal_thresholds"):
        del model.teal_thresholds


def register() -> None:
    """Make ``quant_method: "teal"`` known to transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not TealConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(TealConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not TealHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(TealHfQuantizer)


register()
