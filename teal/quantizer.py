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

from teal.artifact import MODEL_TENSOR_PREFIX as TENSOR_PREFIX
from teal.artifact import QUANT_METHOD, from_checkpoint

_UNEXPECTED = r"^teal\.thresholds\."

__all__ = ["TealConfig", "TealHfQuantizer"]


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
        th = from_checkpoint(self.checkpoint_files, qc.artifact, where)
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

    @staticmethod
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

    @staticmethod
    def detach(model) -> None:
        """Undo :meth:`attach` (``densify_``): the model saves as the plain dense model again."""
        if isinstance(getattr(model, "hf_quantizer", None), TealHfQuantizer):
            model.hf_quantizer = None
            if hasattr(model, "quantization_method"):
                delattr(model, "quantization_method")
        if isinstance(getattr(model.config, "quantization_config", None), TealConfig):
            del model.config.quantization_config
        if hasattr(model, "teal_thresholds"):
            del model.teal_thresholds

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


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
