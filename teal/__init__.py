"""teal: training-free activation sparsity (TEAL) for faster batch-1 LLM decoding.

Data flows one way: text -> calibrate -> allocate -> thresholds artifact -> sparsify / engine ->
eval and bench.

Importing teal is cheap (no torch): the public names below load their modules on first use, so
``teal --help`` starts fast. ``import teal`` also registers teal as a transformers quantization
method (``quant_method: "teal"``, :mod:`teal.quantizer`) as soon as transformers' quantizer registry
is imported, so ``AutoModelForCausalLM.from_pretrained`` re-sparsifies a saved sparsified model.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ArtifactError": "teal.artifact",
    "Thresholds": "teal.artifact",
    "UnsupportedArchitectureError": "teal.arch",
    "TealLinear": "teal.nn",
    "allocate": "teal.allocate",
    "calibrate": "teal.calibrate",
    "load_model": "teal.models",
    "densify_": "teal.sparsify",
    "measured_sparsity": "teal.sparsify",
    "sparsify_": "teal.sparsify",
    "TealConfig": "teal.quantizer",
    "quantize_weights": "teal.quant",
}
_SUBPACKAGES = ("eval", "engine")

__all__ = sorted([*_LAZY, *_SUBPACKAGES])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"teal.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'teal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Teal(types.ModuleType):
    """``teal.allocate`` / ``teal.calibrate`` stay the functions when their modules get imported
    (importing ``teal.allocate`` would otherwise bind the module over the function's name)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name] == f"teal.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Teal

_HF_REGISTRY = "transformers.quantizers.auto"


def _register_quantizer() -> None:
    importlib.import_module("teal.quantizer").register()


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Registers teal's quantizer right after transformers imports its quantizer registry."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    _register_quantizer()

                spec.loader.exec_module = exec_module
                return spec
        return None


if _HF_REGISTRY in sys.modules:
    _register_quantizer()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
