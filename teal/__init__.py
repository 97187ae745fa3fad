"""teal: training-free activation sparsity (TEAL) for faster batch-1 LLM decoding.

Data flows one way: text -> calibrate -> allocate -> thresholds artifact -> sparsify / engine ->
eval and bench.
"""

__version__ = "0.1.0"

from teal.allocate import allocate
from teal.artifact import ArtifactError, Thresholds
from teal.arch import UnsupportedArchitectureError
from teal.calibrate import calibrate
from teal.models import load_model
from teal.nn import TealLinear
from teal.sparsify import densify_, measured_sparsity, sparsify_
from teal import eval  # noqa: A004  (teal.eval is the documented namespace)

__all__ = [
    "ArtifactError",
    "TealLinear",
    "Thresholds",
    "UnsupportedArchitectureError",
    "allocate",
    "calibrate",
    "densify_",
    "eval",
    "load_model",
    "measured_sparsity",
    "sparsify_",
    "engine",
]


def __getattr__(name: str):
    if name == "engine":
        import importlib

        return importlib.import_module("teal.engine")
    raise AttributeError(name)
