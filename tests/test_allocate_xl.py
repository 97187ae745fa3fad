import itertools

import numpy as np
import pytest
import torch

import teal
from teal.allocate_xl import (
    _Tail,
    interpolate_curve,
    layer_sensitivities,
    lower_hull,
    solve_levels,
)
from teal.arch import PROJECTIONS, proj_key
from teal.sparsify import measured_sparsity
from conftest import random_windows, tiny_model


# ---- the optimization --------------------------------------------------------------------------
def test_interpolated_curve_passes_through_probes_and_is_monotone():
    probes, kl = [0.25, 0.5, 0.75, 0.9], [0.01, 0.04, 0.3, 1.2]
    grid = np.linspace(0, 0.9, 181)
    f = interpolate_curve(probes, kl, grid)
    assert f[0] == 0
    assert np.all(np.diff(f) >= 0)
    for e, v in zip(probes, kl):
        assert f[np.argmin(np.abs(grid - e))] == pytest.approx(v, rel=1e-9)
    # a noisy non-monotone measurement is made monotone
    g = interpolate_curve(probes, [0.02, 0.01, 0.3, 0.2], grid)
    assert np.all(np.diff(g) >= 0)
    with pytest.raises(ValueError, match="increasing"):
        interpolate_curve([0.5, 0.25], [1, 2], grid)


def test_lower_hull_drops_points_above_the_chords():
    x = np.array([0.0, 1, 2, 3, 4])
    y = np.array([0.0, 2, 1.5, 3, 8])  # point 1 is above the chord 0 -> 2
    assert lower_hull(x, y) == [0, 2, 3, 4]


def _brute_force(curves, sizes, target, resolution):
    """Best sum of costs over levels on a grid, meeting the target exactly."""
    best = np.inf
    for combo in itertools.product(range(len(curves[0][0])), repeat=len(curves)):
        removed = sum(curves[i][0][j] * sizes[i] for i, j in enumerate(combo))
        if abs(removed - target * sum(sizes)) < resolution:
            best = min(best, sum(curves[i][1][j] for i, j in enumerate(combo)))
    return best


def test_solve_levels_is_exact_monotone_and_optimal():
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 0.9, 10)
    sizes = [1.0, 1.0, 2.0]
    curves = []
    for _ in sizes:
        a, b = rng.uniform(0.1, 2), rng.uniform(2, 8)
        curves.append((grid, a * (np.exp(b * grid) - 1)))  # convex, increasing
    targets = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    levels = solve_levels(curves, sizes, targets)
    for t, row in zip(targets, levels):
        assert np.dot(row, sizes) / sum(sizes) == pytest.approx(t, abs=1e-12)
    assert np.all(np.diff(levels, axis=0) >= -1e-12)
    # on convex curves, at targets reachable on the grid, nothing beats it
    for t in (0.3, 0.5, 0.7):
        row = levels[targets.index(t)]
        cost = sum(np.interp(row[i], *curves[i]) for i in range(len(sizes)))
        assert cost <= _brute_force(curves, sizes, t, 1e-9) + 1e-9
    # a more sensitive layer gets less sparsity
    steep = [(grid, 10 * grid**2), (grid, grid**2)]
    row = solve_levels(steep, [1.0, 1.0], [0.5])[0]
    assert row[0] < 0.5 < row[1]
    with pytest.raises(ValueError, match="outside"):
        solve_levels(curves, sizes, [0.95])


# ---- on a tiny model ---------------------------------------------------------------------------
def _setup(family="llama", score="magnitude", n_layers=3):
    model = tiny_model(family, num_hidden_layers=n_layers)
    calib = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=calib, score=score, progress=False)
    return model, th, calib


def test_tail_reproduces_the_models_logits():
    for family in ("llama", "gemma3_text"):
        model = tiny_model(family, final_logit_softcapping=30.0) if family == "gemma3_text" \
            else tiny_model(family)
        windows = random_windows(2, 32)
        tail = _Tail(model, windows)
        with torch.inference_mode():
            ref = torch.log_softmax(model(input_ids=windows, use_cache=False).logits.float(), -1)
        lp = tail.log_probs(tail.final).reshape(ref.shape)
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tail.hidden_from(1), tail.final)


def test_sensitivities_grow_with_the_level():
    model, th, calib = _setup()
    teal.allocate(model, th, "greedy", windows=calib, step=0.05, progress=False)
    kl = layer_sensitivities(model, th, random_windows(2, 32, seed=3), (0.25, 0.5, 0.9),
                             progress=False)
    assert kl.shape == (3, 3)
    assert np.all(kl > 0)
    assert np.all(np.diff(kl, axis=1) > 0)
    # the model is left dense
    assert not any(isinstance(m, teal.TealLinear) for m in
                   teal.arch.get_adapter(model).projections().values())


@pytest.mark.parametrize("score", ["magnitude", "weight-aware"])
def test_cross_layer_table_is_exact_and_monotone(score):
    model, th, calib = _setup(score=score)
    teal.allocate(model, th, "cross-layer", windows=calib, step=0.05, progress=False)
    assert "greedy" in th.allocations  # computed on the way
    assert th.method == "cross-layer"
    table = th.allocations["cross-layer"]
    levels = table["levels"]
    assert levels[0] == 0 and levels[-1] == pytest.approx(0.9)
    for key, vals in table["sparsities"].items():
        assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:])), key
    for s in (0.1, 0.25, 0.4, 0.5, 0.65, 0.83):
        assert th.effective(th.sparsities(s, "cross-layer")) == pytest.approx(s, abs=2e-6)
    # layers really get different levels somewhere, and each matches its projections
    layer_levels = np.array(table["layer_levels"])
    assert np.ptp(layer_levels[levels.index(0.5)]) > 0.01
    j = levels.index(0.5)
    for i, e in enumerate(layer_levels[j]):
        row = {proj_key(i, p): table["sparsities"][proj_key(i, p)][j] for p in PROJECTIONS}
        assert th.effective(row) == pytest.approx(e, abs=2e-6)
    check = table["check"][0]
    assert check["kl_measured"] > 0 and check["kl_predicted"] > 0
    # sparsify_ realizes the level on calibration text
    teal.sparsify_(model, th, 0.5, method="cross-layer")
    with torch.inference_mode():
        model(input_ids=calib, use_cache=False)
    assert measured_sparsity(model) == pytest.approx(0.5, abs=0.02)
    teal.densify_(model)


def test_cross_layer_beats_greedy_on_its_objective():
    """At equal effective sparsity the joint KL to the dense model is not worse than greedy's."""
    model = _scaled_model()
    calib = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=calib, progress=False)
    teal.allocate(model, th, "greedy", windows=calib, step=0.05, progress=False)
    teal.allocate(model, th, "cross-layer", windows=calib, step=0.05, progress=False)
    table = th.allocations["cross-layer"]
    check = table["check"][0]
    assert check["kl_measured"] < 0.8 * check["kl_measured_greedy"], check
    row = table["layer_levels"][table["levels"].index(0.5)]
    assert row[1] == min(row), row


def test_round_trip_and_errors(tmp_path):
    model, th, calib = _setup(n_layers=2)
    teal.allocate(model, th, "cross-layer", windows=calib, step=0.05, progress=False)
    th.save(tmp_path / "art")
    back = teal.Thresholds.load(tmp_path / "art", model=model)
    assert back.method == "cross-layer"
    assert back.sparsities(0.5, "cross-layer") == pytest.approx(th.sparsities(0.5, "cross-layer"))
    from teal.allocate_xl import allocate_cross_layer

    with pytest.raises(ValueError, match="tokenizer"):
        allocate_cross_layer(model, th)
    with pytest.raises(ValueError, match="probe levels"):
        allocate_cross_layer(model, th, windows=calib, probes=(0.95,), progress=False)
    teal.sparsify_(model, th, 0.5)
    with pytest.raises(ValueError, match="densify_"):
        allocate_cross_layer(model, th, windows=calib)
    teal.densify_(model)


# ---- fisher --------------------------------------------------------------------------------------
def test_weighted_histogram_matches_the_stats_grid():
    from teal import stats
    from teal.allocate_xl import weighted_histogram

    scores = torch.cat([torch.rand(1000) * 5, torch.zeros(3), torch.tensor([1e-12, 1e9])])
    counts = weighted_histogram(scores, torch.ones_like(scores))
    assert torch.equal(counts.long(), stats.histogram(scores))
    w = torch.rand_like(scores, dtype=torch.float64)
    assert float(weighted_histogram(scores, w).sum()) == pytest.approx(float(w.sum()), rel=1e-12)


def _scaled_model():
    """A tiny llama whose layer 1 output matters much more than the others'."""
    model = tiny_model("llama", num_hidden_layers=4)
    layer = teal.arch.get_adapter(model).layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(8)
        layer.mlp.down_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize("score", ["magnitude", "weight-aware"])
def test_fisher_table_is_exact_and_monotone(score):
    model, th, calib = _setup(score=score)
    flags = [p.requires_grad for p in model.parameters()]
    teal.allocate(model, th, "fisher", windows=calib, step=0.05, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert th.method == "fisher"
    table = th.allocations["fisher"]
    assert table["levels"][-1] == pytest.approx(0.9)
    for key, vals in table["sparsities"].items():
        assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:])), key
        assert max(vals) <= 0.95 + 1e-12
    for s in (0.1, 0.25, 0.4, 0.5, 0.65, 0.83):
        assert th.effective(th.sparsities(s, "fisher")) == pytest.approx(s, abs=1e-9)
    row = th.sparsities(0.5, "fisher")
    assert max(row.values()) - min(row.values()) > 0.1  # projections really differ
    assert np.all(np.diff(table["predicted_kl"]) >= 0)


def test_fisher_protects_the_sensitive_layer_and_beats_uniform():
    model = _scaled_model()
    calib = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=calib, progress=False)
    teal.allocate(model, th, "fisher", windows=calib, step=0.05, progress=False)
    row = th.sparsities(0.5, "fisher")
    layer_level = {i: th.effective({k: v for k, v in row.items() if k.startswith(f"layers.{i}.")})
                   for i in range(4)}
    assert layer_level[1] == min(layer_level.values()), layer_level
    held_out = random_windows(4, 64, seed=9)

    def log_probs():
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=held_out, use_cache=False).logits.float(), -1)

    dense = log_probs()
    kl = {}
    for method in ("uniform", "fisher"):
        teal.sparsify_(model, th, 0.5, method=method)
        kl[method] = float(torch.nn.functional.kl_div(
            log_probs().flatten(0, 1), dense.flatten(0, 1), log_target=True, reduction="batchmean"))
        teal.densify_(model)
    assert kl["fisher"] < 0.7 * kl["uniform"], kl
