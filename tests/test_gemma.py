"""Gemma-3 (text) end to end on a tiny random config: calibrate, allocate, sparsify, artifact."""

import pytest
import torch

import teal
from teal.arch import PROJECTIONS, get_adapter, proj_key
from teal.sparsify import measured_sparsity
from conftest import random_windows, tiny_model

FAMILY = "gemma3_text"


@pytest.fixture(scope="module")
def gemma():
    model = tiny_model(FAMILY, num_hidden_layers=3)
    return model, random_windows(4, 64)


def _logits(model, windows):
    with torch.inference_mode():
        return model(input_ids=windows, use_cache=False).logits


def test_adapter_finds_every_projection(gemma):
    model, _ = gemma
    adapter = get_adapter(model)
    assert adapter.model_type == FAMILY
    projections = adapter.projections()
    assert list(projections) == [proj_key(i, p) for i in range(3) for p in PROJECTIONS]
    layer = adapter.layers[0]
    assert projections["layers.0.q"] is layer.self_attn.q_proj
    assert projections["layers.0.down"] is layer.mlp.down_proj


@pytest.mark.parametrize("score", ["magnitude", "weight-aware"])
def test_calibrate_sparsify_hits_each_projection_level(gemma, score):
    model, windows = gemma
    dense = _logits(model, windows)
    th = teal.calibrate(model, None, windows=windows, score=score, progress=False)
    assert th.score == score
    if score == "weight-aware":
        assert set(th.histograms) == set(th.proj_sizes)  # one histogram per projection
        w = get_adapter(model).projections()["layers.1.up"].weight
        torch.testing.assert_close(th.col_norms["layers.1.up"], w.float().norm(dim=0))
    teal.sparsify_(model, th, 0.5)
    try:
        sparse = _logits(model, windows)
        per = measured_sparsity(model, per_projection=True)
        # thresholds come from the same windows: layer 0's q/k/v see the calibrated inputs
        # exactly; later sites see inputs already changed by sparsity upstream
        for p in ("q", "k", "v"):
            assert per[f"layers.0.{p}"] == pytest.approx(0.5, abs=0.01)
        assert all(abs(s - 0.5) < 0.1 for s in per.values()), per
        assert measured_sparsity(model) == pytest.approx(0.5, abs=0.03)
        assert not torch.allclose(sparse, dense)
    finally:
        teal.densify_(model)
    torch.testing.assert_close(_logits(model, windows), dense, rtol=0, atol=0)


def test_weight_aware_rule_is_the_one_applied(gemma):
    """TealLinear keeps exactly the entries with |x_i| * ||W[:, i]|| > t."""
    model, windows = gemma
    th = teal.calibrate(model, None, windows=windows, score="weight-aware", progress=False)
    key = "layers.2.gate"
    teal.sparsify_(model, th, 0.4)
    try:
        module = get_adapter(model).projections()[key]
        x = torch.randn(5, module.in_features) * 3
        t = th.thresholds(0.4)[key]  # the default (sequential) threshold of that projection
        keep = x.abs() * th.col_norms[key] > t
        with torch.inference_mode():
            got = module(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(x * keep, module.weight))
        assert module.threshold_value == pytest.approx(t)
    finally:
        teal.densify_(model)


@pytest.mark.parametrize("score", ["magnitude", "weight-aware"])
def test_allocations_and_round_trip(gemma, score, tmp_path):
    model, windows = gemma
    th = teal.calibrate(model, None, windows=windows, score=score, progress=False)
    teal.allocate(model, th, "greedy", windows=windows[:2], step=0.05, progress=False)
    teal.allocate(model, th, "cross-layer", windows=windows[:2], step=0.05, progress=False)
    for method in ("greedy", "cross-layer"):
        for s in (0.25, 0.5, 0.65):
            assert th.effective(th.sparsities(s, method)) == pytest.approx(s, abs=2e-6)
    th.save(tmp_path / "art")
    back = teal.Thresholds.load(tmp_path / "art", model=model)
    assert back.score == score and back.method == "cross-layer"
    assert set(back.col_norms) == set(th.col_norms)
    for k, v in th.col_norms.items():
        torch.testing.assert_close(back.col_norms[k], v)
    for method in ("uniform", "greedy", "cross-layer"):
        assert back.thresholds(0.5, method) == pytest.approx(th.thresholds(0.5, method))
    # the reloaded artifact sparsifies the model the same way as the original
    teal.sparsify_(model, th, 0.5, method="cross-layer")
    ref = _logits(model, windows)
    teal.sparsify_(model, back, 0.5, method="cross-layer")
    torch.testing.assert_close(_logits(model, windows), ref, rtol=0, atol=0)
    teal.densify_(model)


def test_artifact_refuses_another_model(gemma, tmp_path):
    model, windows = gemma
    th = teal.calibrate(model, None, windows=windows, score="weight-aware", progress=False)
    th.save(tmp_path / "art")
    same_shape = tiny_model(FAMILY, seed=1, num_hidden_layers=3)  # other weights
    with pytest.raises(teal.ArtifactError, match="different weights"):
        teal.Thresholds.load(tmp_path / "art", model=same_shape)
    llama = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(teal.ArtifactError, match="model_type=gemma3_text"):
        teal.Thresholds.load(tmp_path / "art", model=llama)
    with pytest.raises(teal.ArtifactError):
        teal.sparsify_(same_shape, th, 0.5)
    with pytest.raises(teal.ArtifactError):
        teal.allocate(same_shape, th, "cross-layer", windows=windows)


def test_fisher_pass_feeds_the_scaled_embeddings(gemma):
    """The fisher allocation runs the model from ``get_input_embeddings()(ids)``: same logits."""
    model, windows = gemma
    with torch.inference_mode():
        emb = model.get_input_embeddings()(windows)
        via_embeds = model(inputs_embeds=emb, use_cache=False).logits
    torch.testing.assert_close(via_embeds, _logits(model, windows))
