"""Swap a model's projections for TealLinear in place (and back)."""

from __future__ import annotations

from torch import nn

from teal.arch import get_adapter
from teal.artifact import Thresholds, check_sparsity
from teal.nn import TealLinear, check_prefill, dense_linear


def sparsify_(
    model: nn.Module,
    thresholds: Thresholds,
    sparsity: float = 0.5,
    *,
    method: str | None = None,
    prefill: str = "sparse",
    dense_prefix: int = 0,
    use_kernels: bool | str = "auto",
    check_model: bool = True,
    calibration: str | None = None,
) -> nn.Module:
    """Sparsify every q/k/v/o/gate/up/down projection of ``model`` at effective ``sparsity``.

    ``method``: ``"uniform"`` or an allocation stored in ``thresholds`` (e.g. ``"greedy"``);
    default: the artifact's own. ``prefill``: ``"sparse"`` thresholds every position,
    ``"dense"`` only single-token decode steps; ``dense_prefix=N`` keeps the first N positions
    of each forward dense. Calling it again just updates thresholds and policy.
    ``use_kernels``: ``"auto"`` uses the sparse GEMV kernel for decode steps on CUDA (also after
    ``model.to("cuda")`` of a model sparsified on the CPU).
    ``calibration``: ``"sequential"`` (thresholds corrected so that the sparsified model zeroes the
    nominal fraction) or ``"dense"`` (TEAL's thresholds from dense activations); default: the
    artifact's own (sequential where it has the method's table).
    """
    check_sparsity(sparsity)
    check_prefill(prefill, dense_prefix)
    if getattr(model, "teal_model_info", None) is None:
        from teal.models import model_info

        model.teal_model_info = model_info(model)  # type: ignore[attr-defined]
    if check_model:
        thresholds.check_model(model)
    adapter = get_adapter(model)
    calibration = thresholds.calibration_mode(method, calibration)
    levels = thresholds.thresholds(sparsity, method, calibration)
    projections = adapter.projections()
    missing = set(projections) - set(levels)
    if missing:
        raise ValueError(f"thresholds lack projections {sorted(missing)[:3]}…; recalibrate.")
    for key, module in projections.items():
        scale = thresholds.col_scale(key)
        if isinstance(module, TealLinear):
            module.set_threshold(levels[key], scale)
            module.prefill, module.dense_prefix = prefill, int(dense_prefix)
        else:
            module = TealLinear(module, levels[key], scale, prefill, dense_prefix)
            adapter.replace(key, module)
        module.kernel_auto = use_kernels == "auto"
        if use_kernels is True or (use_kernels == "auto" and module.weight.is_cuda):
            module.enable_kernel()
        module.reset_counters()
    quantizer = _teal_quantizer(model)
    if quantizer is not None:  # an HF model: save_pretrained keeps it sparsified
        quantizer.attach(model, thresholds, float(sparsity), method or thresholds.method, prefill, int(dense_prefix))
    model.teal_sparsity = {  # type: ignore[attr-defined]
        "sparsity": float(sparsity),
        "method": method or thresholds.method,
        "score": thresholds.score,
        "calibration": calibration,
        "prefill": prefill,
        "dense_prefix": int(dense_prefix),
    }
    return model


def _teal_quantizer(model: nn.Module):
    """teal's transformers quantizer (:class:`teal.quantizer.TealHfQuantizer`), looked up in transformers'
    registry where ``import teal`` registered it; None for a model that is not a transformers model."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        return None
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    return AUTO_QUANTIZER_MAPPING["teal"]


def densify_(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify_`: put the original ``nn.Linear`` modules back."""
    adapter = get_adapter(model)
    for key, module in adapter.projections().items():
        if isinstance(module, TealLinear):
            linear = dense_linear(module)
            if not linear.weight.is_contiguous():  # the kernel's transposed layout
                linear.weight.data = linear.weight.detach().contiguous()
            adapter.replace(key, linear)
    quantizer = _teal_quantizer(model)
    if quantizer is not None:
        quantizer.detach(model)
    for attr in ("teal_sparsity", "teal_model_info"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def teal_modules(model: nn.Module) -> dict[str, TealLinear]:
    return {k: m for k, m in get_adapter(model).projections().items() if isinstance(m, TealLinear)}


def reset_counters(model: nn.Module) -> None:
    for m in teal_modules(model).values():
        m.reset_counters()


def measured_sparsity(model: nn.Module, per_projection: bool = False) -> float | dict[str, float]:
    """Zeros actually produced since the last reset, weighted by each projection's size.

    With ``per_projection=True``, a dict of each projection's own measured sparsity.
    """
    mods = teal_modules(model)
    if not mods:
        return {} if per_projection else 0.0
    per = {k: (m.zeros.item() / m.total.item()) if m.total.item() else 0.0 for k, m in mods.items()}
    if per_projection:
        return per
    size = {k: m.weight.numel() for k, m in mods.items()}
    return sum(per[k] * size[k] for k in mods) / sum(size.values())
