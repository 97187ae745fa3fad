import json
import os
from pathlib import Path

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


# ---- contents validated on load; files replaced as a pair; the user's umask ------------------------
def _rewrite(directory, edit):
    """Replace the histograms file by ``edit(name, tensor)``, keeping the recorded checksum in step (so the
    contents, not the checksum, are what is wrong)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    path = directory / "teal_histograms.safetensors"
    tensors = {k: v for k, v in ((k, edit(k, v)) for k, v in load_file(path).items()) if v is not None}
    save_file(tensors, path, metadata={"format_version": "1"})
    cfg = json.loads((directory / "teal_config.json").read_text())
    if "histograms_sha256" in cfg:
        cfg["histograms_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "teal_config.json").write_text(json.dumps(cfg))


SITE = "layers.1.mlp_mid"


def _nan(t):
    t = t.double()
    t[100] = float("nan")
    return t


def _inf(t):
    t = t.double()
    t[100] = float("inf")
    return t


def _negative(t):
    t = t.clone()
    t[5] = -3
    return t


@pytest.mark.parametrize("edit, problem", [
    (_nan, "has NaN or infinite counts"),
    (_inf, "has NaN or infinite counts"),
    (_negative, "has negative counts"),
    (lambda t: t[:-7], "has shape"),
    (lambda t: torch.zeros_like(t), "is empty"),
])
def test_corrupt_histogram_contents_are_refused_naming_site_and_file(calibrated, tmp_path, edit, problem):
    _, th = calibrated
    d = th.save(tmp_path / "h")
    _rewrite(d, lambda k, t: edit(t) if k == f"hist/{SITE}" else t)
    with pytest.raises(ArtifactError) as e:
        Thresholds.load(d)
    assert f"{d / 'teal_histograms.safetensors'}: the histogram of '{SITE}' {problem}" in str(e.value)


def test_corrupt_column_norms_are_refused(tmp_path):
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), score="weight-aware", progress=False)
    d = th.save(tmp_path / "wa")
    key = "colnorm/layers.0.q"
    _rewrite(d, lambda k, t: t.fill_(float("nan")) if k == key else t)
    with pytest.raises(ArtifactError, match="column norms of 'layers.0.q'"):
        Thresholds.load(d)
    d = th.save(tmp_path / "wa2")
    _rewrite(d, lambda k, t: None if k == key else t)  # dropped: the magnitude rule would apply silently
    with pytest.raises(ArtifactError, match=r"no column norms for \['layers.0.q'\]"):
        Thresholds.load(d)


def test_bad_allocation_table_is_refused(calibrated, tmp_path):
    model, th = calibrated
    teal.allocate(model, th, method="greedy", windows=random_windows(2, 32, seed=3), step=0.05, progress=False)
    d = th.save(tmp_path / "a")
    cfg = json.loads((d / "teal_config.json").read_text())
    row = next(iter(cfg["allocations"]["greedy"]["sparsities"].values()))
    row[-1] = float("nan")
    (d / "teal_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="'greedy' allocation table has sparsities outside"):
        Thresholds.load(d)


def test_empty_histogram_error_names_the_site(calibrated):
    _, th = calibrated
    hist = dict(th.histograms)
    hist[SITE] = torch.zeros_like(hist[SITE])
    broken = Thresholds(model=th.model, histograms=hist, proj_sizes=th.proj_sizes)
    with pytest.raises(ValueError, match=f"empty histogram of '{SITE}'"):
        broken.thresholds(0.5)


@pytest.mark.parametrize("a_has_checksum", [True, False], ids=["A-saved-now", "A-from-an-earlier-teal"])
def test_a_save_interrupted_between_the_files_never_loads_as_mixed(calibrated, tmp_path, monkeypatch,
                                                                    a_has_checksum):
    """Save artifact A, then save B over it and stop after the first file is replaced: loading must refuse
    (or give A whole), never B's config with A's histograms or the reverse. A may come from an earlier teal,
    whose config records no checksum."""
    model, th = calibrated
    d = th.save(tmp_path / "x")
    if not a_has_checksum:
        cfg = json.loads((d / "teal_config.json").read_text())
        del cfg["histograms_sha256"]
        (d / "teal_config.json").write_text(json.dumps(cfg))
        assert Thresholds.load(d).config() == th.config()
    other = teal.calibrate(model, None, windows=random_windows(3, 48, seed=9), progress=False)
    other.allocations = {"greedy": {"levels": [0.0, 0.5], "sparsities": {p: [0.0, 0.5] for p in other.proj_sizes}}}
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops between the two files
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        other.save(d)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) == 2
    try:
        back = Thresholds.load(d)
    except ArtifactError as e:
        assert "does not match" in str(e)
        return
    same_as_a = back.config() == th.config() and all(torch.equal(back.histograms[k], v)
                                                      for k, v in th.histograms.items())
    assert same_as_a, "an interrupted save loaded as a mix of two artifacts"


def test_files_get_the_users_umask(calibrated, tmp_path):
    from teal.artifact import atomic_write_json

    _, th = calibrated
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        old = os.umask(umask)
        try:
            d = th.save(tmp_path / f"u{umask:o}" / "art")
            atomic_write_json(tmp_path / f"u{umask:o}" / "res" / "r.json", {"a": 1})
        finally:
            os.umask(old)
        for f in ("teal_config.json", "teal_histograms.safetensors"):
            assert (d / f).stat().st_mode & 0o777 == file_mode, f
        assert d.stat().st_mode & 0o777 == dir_mode
        assert (tmp_path / f"u{umask:o}" / "res" / "r.json").stat().st_mode & 0o777 == file_mode


def test_write_errors_name_the_users_path(tmp_path, monkeypatch):
    import tempfile

    from teal.artifact import atomic_write_json

    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match=f"cannot create directory {tmp_path / 'f'}"):
        atomic_write_json(tmp_path / "f" / "x.json", {})
    with pytest.raises(IsADirectoryError, match=f"cannot write {tmp_path}: it is a directory"):
        atomic_write_json(tmp_path, {})

    def denied(dir, prefix, suffix):
        raise PermissionError(13, "Permission denied", str(Path(dir) / f"{prefix}abc{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as e:
        atomic_write_json(tmp_path / "r.json", {})
    assert str(tmp_path / "r.json") in str(e.value) and ".tmp" not in str(e.value)
