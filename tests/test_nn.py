"""TealLinear on any device: its state follows ``.to``, and ``dense_prefix`` holds on the kernel path.

The CUDA runs of the same checks are in tests/gpu/test_quality_path_gpu.py; here the ``meta`` device stands
in for a second device, and the interpreted Triton kernel for the CUDA one.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (teal.kernels imports it lazily)

import pytest
import torch

import teal
from teal.kernels import KernelConfig, sparse_linear_triton
from teal.nn import TealLinear
from conftest import random_windows, tiny_model

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before Triton is imported"
)


def _state(module: TealLinear) -> dict[str, torch.Tensor]:
    tensors = {"threshold": module.threshold, "zeros": module.zeros, "total": module.total,
               "weight": module.weight}
    if module.col_scale is not None:
        tensors["col_scale"] = module.col_scale
    return tensors


def test_state_is_made_on_the_weights_device():
    """A TealLinear wrapped around a linear on another device keeps threshold, scale and counters there
    (the old counters stayed on the CPU: 'Expected all tensors to be on the same device' on CUDA)."""
    lin = torch.nn.Linear(16, 8, device="meta")
    module = TealLinear(lin, 0.5, col_scale=torch.rand(16))
    assert {k: str(v.device) for k, v in _state(module).items()} == dict.fromkeys(_state(module), "meta")


@pytest.mark.parametrize("use_kernels", [False, True])
def test_sparsified_model_moves_with_to_and_keeps_the_rule_in_fp32(use_kernels):
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    teal.sparsify_(model, th, 0.5, use_kernels=use_kernels)
    before = {k: m.threshold_value for k, m in teal.sparsify.teal_modules(model).items()}
    import copy

    moved = copy.deepcopy(model).to("meta")
    for key, module in teal.sparsify.teal_modules(moved).items():
        devices = {k: str(v.device) for k, v in _state(module).items()}
        assert set(devices.values()) == {"meta"}, (key, devices)
    model.to(torch.bfloat16)  # a dtype change: the rule is not rounded to bf16
    for key, module in teal.sparsify.teal_modules(model).items():
        assert module.threshold.dtype == torch.float32 and module.threshold.device.type == "cpu"
        assert module.weight.dtype == torch.bfloat16
        if use_kernels:  # the kernel's [K, N] layout survives the moves
            assert module.w_t.is_contiguous() and module.w_t.data_ptr() == module.weight.data_ptr()
    assert {k: m.threshold_value for k, m in teal.sparsify.teal_modules(model).items()} == before
    teal.densify_(model)
    assert all(p.is_contiguous() for p in model.parameters())


FMA = KernelConfig(block_n=64, block_r=16, split_k=4)


@needs_interpreter
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
def test_dense_prefix_is_honoured_on_the_kernel_path(monkeypatch, tokens):
    """Forwards of 2-8 tokens on CUDA take the kernel; the first ``dense_prefix`` positions must still be
    dense (they were thresholded before: teal/nn.py took the kernel branch first). Run here through the
    interpreted Triton kernel, with the kernel's device check pointed at the CPU."""
    torch.manual_seed(5)
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(1, tokens, 96).to(torch.bfloat16)
    thr = float(torch.quantile(x.abs().float().flatten(), 0.5))
    prefix = 3
    masked = TealLinear(lin, thr, dense_prefix=prefix)
    with torch.no_grad():
        expected = masked(x)  # the masked path (CPU): dense head, thresholded tail

    kernel = TealLinear(lin, thr, dense_prefix=prefix)
    kernel.enable_kernel()
    calls = []

    def interpreted(x2, w_t, thresholds, splits=None, col_scale=None, **kw):
        calls.append(tuple(x2.shape))
        return sparse_linear_triton(x2, w_t, thresholds, splits, col_scale, config=FMA)

    monkeypatch.setattr("teal.nn.kernel_runs_on", lambda t: True)
    monkeypatch.setattr("teal.kernels.sparse_linear", interpreted)
    with torch.no_grad():
        got = kernel(x)
    tail = max(tokens - prefix, 0) if tokens > 1 else 1
    assert calls == ([(tail, 96)] if tail else [])
    head = min(prefix, tokens) if tokens > 1 else 0
    with torch.no_grad():
        dense = lin(x).double()
    if tail:
        err = float((got.double() - expected.double()).norm() / expected.double().norm())
        assert err < 1e-2
    if head:  # dense up to bf16 rounding; thresholding half the entries would be off by ~50 %
        head_err = float((got[:, :head].double() - dense[:, :head]).norm() / dense[:, :head].norm())
        assert head_err < 1e-2, f"dense_prefix positions were thresholded (rel err {head_err:.3f})"
    assert int(kernel.zeros) == int(masked.zeros) and int(kernel.total) == int(masked.total) == tail * 96
