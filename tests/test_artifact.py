import json

import pytest
import torch

import teal
from teal.artifact import ArtifactError, Thresholds
from conftest import random_windows, tiny_model


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(4, 64), progress=False)
    return model, th


def test_round_trip_is_exact(calibrated, tmp_path):
    model, th = calibrated
    teal.allocate(model, th, method="greedy", windows=random_windows(2, 32, seed=3),
                  step=0.05, progress=False)
    th.save(tmp_path / "art")
    back = Thresholds.load(tmp_path / "art", model=model)
    assert back.config() == th.config()
    assert back.histograms.keys() == th.histograms.keys()
    for k in th.histograms:
        assert torch.equal(back.histograms[k], th.histograms[k])
    for s in (0.0, 0.3, 0.5, 0.9):
        assert back.thresholds(s, "greedy") == th.thresholds(s, "greedy")
        assert back.thresholds(s) == th.thresholds(s)
    assert not list((tmp_path / "art").glob(".*tmp"))  # no temp files left behind


def test_weight_aware_round_trip_and_refusal(tmp_path):
    model = tiny_model("qwen2")
    th = teal.calibrate(model, None, windows=random_windows(2, 64), score="weight-aware",
                        progress=False)
    assert set(th.histograms) == set(th.proj_sizes)  # one histogram per projection
    th.save(tmp_path / "wa")
    back = Thresholds.load(tmp_path / "wa", model=model)
    assert back.score == "weight-aware"
    for k, v in th.col_norms.items():
        assert torch.equal(back.col_norms[k], v)
    other = tiny_model("qwen2", seed=1)
    with pytest.raises(ArtifactError, match="different weights"):
        Thresholds.load(tmp_path / "wa", model=other)


def test_mismatched_model_is_refused_with_both_names(calibrated, tmp_path):
    model, th = calibrated
    th.save(tmp_path / "a")
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ArtifactError, match="tiny-llama-0.*n_layers=2.*tiny-llama-0.*n_layers=3"):
        Thresholds.load(tmp_path / "a", model=other)


def test_corrupt_and_missing_files(calibrated, tmp_path):
    _, th = calibrated
    d = th.save(tmp_path / "c")
    (d / "teal_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Thresholds.load(d)
    d = th.save(tmp_path / "m")
    (d / "teal_histograms.safetensors").unlink()
    with pytest.raises(ArtifactError, match="teal_histograms.safetensors is missing"):
        Thresholds.load(d)
    with pytest.raises(ArtifactError, match="does not exist"):
        Thresholds.load(tmp_path / "nowhere")
    d = th.save(tmp_path / "v")
    cfg = json.loads((d / "teal_config.json").read_text())
    cfg["format_version"] = 99
    (d / "teal_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="unsupported format_version 99"):
        Thresholds.load(d)
    d = th.save(tmp_path / "t")
    (d / "teal_histograms.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="unreadable"):
        Thresholds.load(d)


def test_sparsity_bounds_and_unknown_method(calibrated):
    _, th = calibrated
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            th.thresholds(bad)
    with pytest.raises(ValueError, match="no 'lagrange' allocation"):
        th.sparsities(0.5, "lagrange")
