import pytest
import torch

import teal
from teal.arch import PROJECTIONS
from teal.sparsify import measured_sparsity
from conftest import random_windows, tiny_model


@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_greedy_table_is_monotone_and_reaches_level(fam):
    model = tiny_model(fam)
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    teal.allocate(model, th, "greedy", windows=random_windows(2, 32, seed=5), step=0.025,
                  max_level=0.9, progress=False)
    table = th.allocations["greedy"]
    levels = table["levels"]
    assert levels[0] == 0 and abs(levels[-1] - 0.9) < 1e-9
    assert all(b - a == pytest.approx(0.025) for a, b in zip(levels, levels[1:]))
    for key, vals in table["sparsities"].items():
        assert all(b >= a for a, b in zip(vals, vals[1:])), key
        assert max(vals) <= 0.99
    for i, lv in enumerate(levels):
        row = {k: v[i] for k, v in table["sparsities"].items()}
        assert th.effective(row) == pytest.approx(lv, abs=1e-5)
    # interpolated lookups hit the requested effective sparsity exactly
    for s in (0.1, 0.33, 0.5, 0.85):
        assert th.effective(th.sparsities(s, "greedy")) == pytest.approx(s, abs=1e-5)
    # and sparsify_ realizes it on calibration data: the dense quantiles on the histograms' own windows, the
    # sequential table (the default) on the windows it was measured on (the allocation's)
    for calibration, text in (("dense", windows), ("sequential", random_windows(2, 32, seed=5))):
        teal.sparsify_(model, th, 0.5, method="greedy", calibration=calibration)
        with torch.inference_mode():
            model(input_ids=text, use_cache=False)
        assert measured_sparsity(model) == pytest.approx(0.5, abs=0.01), calibration
    teal.densify_(model)


def test_greedy_beats_uniform_on_block_error():
    model = tiny_model("llama")
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    teal.allocate(model, th, "greedy", windows=windows, step=0.025, progress=False)
    with torch.inference_mode():
        dense = model(input_ids=windows, use_cache=False).logits
    errs = {}
    for method in ("uniform", "greedy"):
        teal.sparsify_(model, th, 0.5, method=method)
        with torch.inference_mode():
            errs[method] = float((model(input_ids=windows, use_cache=False).logits - dense).norm())
    teal.densify_(model)
    assert errs["greedy"] < errs["uniform"], errs


def test_allocate_errors():
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    with pytest.raises(ValueError, match="unknown allocation method 'best'"):
        teal.allocate(model, th, "best", windows=random_windows(1, 16))
    with pytest.raises(ValueError, match="ends at effective sparsity"):
        teal.allocate(model, th, "greedy", windows=random_windows(1, 16), max_level=0.5,
                      step=0.05, progress=False)
        th.sparsities(0.7, "greedy")
    assert set(PROJECTIONS) == {k.split(".")[-1] for k in th.proj_sizes}


def _first_layer_search(model):
    """Calibrated thresholds and the arguments of `greedy_layer` for layer 0 of ``model``."""
    from teal.allocate_greedy import capture_layer_inputs
    from teal.arch import get_adapter, proj_key
    from teal.nn import TealLinear

    windows = random_windows(2, 32)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    x, kwargs = capture_layer_inputs(model, windows)
    adapter = get_adapter(model)
    layer = adapter.layers[0]
    keys = [proj_key(0, p) for p in PROJECTIONS]
    with torch.inference_mode():
        target = layer(x, **kwargs[0])
    target = target[0] if isinstance(target, tuple) else target
    mods = {k: TealLinear(adapter.projections()[k], -1.0) for k in keys}
    for k in keys:
        adapter.replace(k, mods[k])
    return adapter, (layer, keys, mods, th, x, kwargs[0], target)


def test_greedy_steps_remove_equal_weights_under_gqa():
    from teal.allocate_greedy import greedy_layer

    model = tiny_model("llama", hidden_size=128, intermediate_size=128, num_attention_heads=8,
                       num_key_value_heads=2)
    _, args = _first_layer_search(model)
    keys, mods = args[1], args[2]
    path = greedy_layer(*args, step=0.01, max_level=0.3)
    sizes = {k: mods[k].weight.numel() for k in keys}
    for (e0, a), (e1, b) in zip(path, path[1:]):
        changed = [k for k in keys if b[k] != a[k]]
        assert len(changed) == 1
        k = changed[0]
        removed = (b[k] - a[k]) * sizes[k]
        if b[k] < 0.99:  # full step: the same number of weights whatever the projection
            assert removed == pytest.approx(0.01 * sum(sizes.values()), rel=1e-6)
        assert e1 - e0 == pytest.approx(removed / sum(sizes.values()), rel=1e-6)
    assert sizes["layers.0.k"] * 4 == sizes["layers.0.q"]


@pytest.mark.parametrize("fam", ["llama", "gemma3_text"])
def test_replaying_unchanged_submodules_gives_the_same_path(fam):
    from teal.allocate_greedy import greedy_layer

    adapter, search = _first_layer_search(tiny_model(fam))
    keys, mods = search[1], search[2]
    args = (*search, 0.05, 0.9)
    plain = greedy_layer(*args)
    for k in keys:
        mods[k].set_threshold(-1.0)
    fast = greedy_layer(*args, paths={p: adapter.projection_path(p) for p in PROJECTIONS})
    assert len(plain) == len(fast) > 10
    for (e0, a), (e1, b) in zip(plain, fast):
        assert e0 == pytest.approx(e1, abs=1e-12)
        assert a == pytest.approx(b, abs=1e-12)


def test_lazy_greedy_reaches_the_same_levels_with_similar_error():
    model = tiny_model("llama")
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    errs = {}
    for lazy in (False, True):
        teal.allocate(model, th, "greedy", windows=windows, step=0.025, lazy=lazy, progress=False)
        assert th.allocations["greedy"]["search"] == ("lazy" if lazy else "exact")
        with torch.inference_mode():
            dense = model(input_ids=windows, use_cache=False).logits
            teal.sparsify_(model, th, 0.5, method="greedy")
            errs[lazy] = float((model(input_ids=windows, use_cache=False).logits - dense).norm())
        teal.densify_(model)
        assert th.effective(th.sparsities(0.5, "greedy")) == pytest.approx(0.5, abs=1e-6)
    assert errs[True] <= 1.25 * errs[False], errs
