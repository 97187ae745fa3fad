import pytest
import torch

import teal
from teal.nn import TealLinear
from teal.sparsify import measured_sparsity
from conftest import random_windows, tiny_model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def calibrated(family):
    model = tiny_model(family)
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    return model, th, windows


def _dense_site_inputs(model, windows):
    from teal.arch import get_adapter

    adapter = get_adapter(model)
    captured, hooks = {}, []
    for key, mod in adapter.projections().items():
        hooks.append(mod.register_forward_pre_hook(
            lambda _m, args, key=key: captured.__setitem__(key, args[0].detach().clone())))
    _logits(model, windows)
    for h in hooks:
        h.remove()
    return captured


def test_thresholds_reproduce_sparsity_on_calibration_data(calibrated):
    """Dense-calibrated thresholds zero s of the *dense* site inputs (sequential ones are checked in
    tests/test_calibrate_sequential.py)."""
    model, th, windows = calibrated
    inputs = _dense_site_inputs(model, windows)
    for s in (0.0, 0.1, 0.25, 0.5, 0.65, 0.8, 0.95):
        for key, t in th.thresholds(s, calibration="dense").items():
            got = float((inputs[key].abs() <= t).float().mean())
            assert abs(got - s) <= 0.005, (key, s, got)
    # through TealLinear: layer 0's attention input is unchanged by sparsity upstream
    teal.sparsify_(model, th, 0.5)
    _logits(model, windows)
    per = measured_sparsity(model, per_projection=True)
    assert all(abs(per[f"layers.0.{p}"] - 0.5) <= 0.005 for p in "qkv"), per
    assert abs(measured_sparsity(model) - 0.5) < 0.03
    teal.densify_(model)


def test_zero_sparsity_is_bit_identical_and_densify_restores(calibrated):
    model, th, windows = calibrated
    dense = _logits(model, windows)
    teal.sparsify_(model, th, 0.0)
    assert any(isinstance(m, TealLinear) for m in model.modules())
    assert torch.equal(_logits(model, windows), dense)
    teal.sparsify_(model, th, 0.5)
    assert not torch.equal(_logits(model, windows), dense)
    teal.densify_(model)
    assert not any(isinstance(m, TealLinear) for m in model.modules())
    assert torch.equal(_logits(model, windows), dense)


def test_prefill_policies():
    model = tiny_model("llama")
    windows = random_windows(2, 48)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    dense = _logits(model, windows)
    teal.sparsify_(model, th, 0.5, prefill="dense")
    assert torch.equal(_logits(model, windows), dense)  # multi-token forward stays dense
    assert measured_sparsity(model) == 0.0
    teal.sparsify_(model, th, 0.5, prefill="sparse", dense_prefix=16)
    out = _logits(model, windows)
    # causal: the first 16 positions only see dense computation
    assert torch.allclose(out[:, :16], dense[:, :16], atol=1e-5)
    assert not torch.allclose(out[:, 16:], dense[:, 16:], atol=1e-3)
    # decode steps (one token) are thresholded under prefill="dense"
    teal.sparsify_(model, th, 0.5, prefill="dense")
    with torch.inference_mode():
        model.generate(windows[:1, :8], max_new_tokens=4, do_sample=False)
    assert measured_sparsity(model) > 0.3
    teal.densify_(model)


def test_weight_aware_rule_matches_definition():
    model = tiny_model("llama")
    windows = random_windows(2, 64)
    th = teal.calibrate(model, None, windows=windows, score="weight-aware", progress=False)
    teal.sparsify_(model, th, 0.5)
    mod = model.model.layers[0].self_attn.k_proj
    assert isinstance(mod, TealLinear)
    x = torch.randn(3, 64)
    c = mod.weight.detach().norm(dim=0)
    keep = x.abs() * c > th.threshold("layers.0.k", 0.5)
    expect = torch.nn.functional.linear(x * keep, mod.weight, mod.bias)
    assert torch.allclose(mod(x), expect, atol=1e-6)
    teal.sparsify_(model, th, 0.5)  # resets the counters
    _logits(model, windows)
    per = measured_sparsity(model, per_projection=True)
    assert all(abs(per[f"layers.0.{p}"] - 0.5) <= 0.005 for p in "qkv"), per
    teal.densify_(model)
    inputs = _dense_site_inputs(model, windows)
    for key, t in th.thresholds(0.65, calibration="dense").items():
        score = inputs[key].abs() * th.col_scale(key)
        assert abs(float((score <= t).float().mean()) - 0.65) <= 0.005, key


def test_bad_arguments():
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        teal.sparsify_(model, th, 1.0)
    with pytest.raises(ValueError, match="prefill must be one of"):
        teal.sparsify_(model, th, 0.5, prefill="half")
    with pytest.raises(ValueError, match="tokens must be at least 2"):
        teal.calibrate(model, None, tokens=0)
    teal.sparsify_(model, th, 0.5)
    with pytest.raises(ValueError, match="densify_"):
        teal.calibrate(model, None, windows=random_windows(1, 16), progress=False)
