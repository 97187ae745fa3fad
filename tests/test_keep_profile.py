"""teal.keep_profile: per-channel keep frequencies recorded from a sparsified model, and their file."""

from __future__ import annotations

import pytest
import torch

import teal
from teal.keep_profile import KeepProfile, KeepProfileError, record

from conftest import random_windows, tiny_model

LEVELS = (0.4, 0.65)
SKIP = 5


@pytest.fixture(scope="module")
def recorded():
    model = tiny_model("llama")
    windows = random_windows(3, 48)
    th = teal.calibrate(model, None, windows=random_windows(4, 64, seed=1), levels=LEVELS, sequential_tokens=128,
                        progress=False)
    profile = record(model, th, LEVELS, windows, skip=SKIP, progress=False)
    return model, th, windows, profile


def _direct_counts(model, th, windows, level):
    """Keep counts of every site, counted here: the inputs of q, o, gate and down of the model sparsified at
    `level`, against the artifact's thresholds, over positions SKIP.. of each window."""
    from teal.arch import get_adapter

    teal.sparsify_(model, th, level, prefill="sparse", use_kernels=False)
    levels = th.thresholds(level)
    adapter = get_adapter(model)
    modules = adapter.projections()
    counts, hooks = {}, []
    for site, projs in adapter.sites().items():
        first = projs[0]

        def hook(_m, args, site=site, t=levels[first]):
            keep = args[0].abs().float()[:, SKIP:] > t
            counts[site] = counts.get(site, 0) + keep.sum(dim=(0, 1))

        hooks.append(modules[first].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for w in windows:
                model(w[None])
    finally:
        for h in hooks:
            h.remove()
        teal.densify_(model)
    return counts


@pytest.mark.parametrize("level", LEVELS)
def test_recorded_frequencies_match_a_direct_count(recorded, level):
    model, th, windows, profile = recorded
    direct = _direct_counts(model, th, windows, level)
    tokens = windows.shape[0] * (windows.shape[1] - SKIP)
    assert profile.tokens == tokens
    freqs = profile.frequencies(level)
    assert set(freqs) == set(direct) and len(direct) == 4 * 2
    for site, c in direct.items():
        assert torch.equal(profile.counts[f"{level:g}"][site], c.long()), site
        assert torch.allclose(freqs[site], c.double() / tokens)
    # the level's sparsity, as recorded, is what the counts say (about the nominal one on this text)
    mean_keep = sum(float(f.mean()) for f in freqs.values()) / len(freqs)
    assert abs((1 - mean_keep) - level) < 0.1
    assert abs(profile.info["measured_sparsity"][f"{level:g}"] - level) < 0.1


def test_frequencies_vary_by_channel_and_token_quantiles_are_ordered(recorded):
    _, _, _, profile = recorded
    for site in ("attn_in", "attn_out", "mlp_in", "mlp_mid"):
        layers = profile.frequencies(0.4, site)
        assert len(layers) == 2 and all(f.min() >= 0 and f.max() <= 1 for f in layers)
        q = profile.rate_quantiles(0.4, site)[0]
        assert q.numel() == 101 and bool((q[1:] >= q[:-1]).all()) and 0 < float(q[50]) < 1


def test_save_and_load_round_trip(recorded, tmp_path):
    _, _, _, profile = recorded
    path = profile.save(tmp_path / "sub" / "p.safetensors")
    loaded = KeepProfile.load(path)
    assert loaded.levels == list(LEVELS) and loaded.tokens == profile.tokens and loaded.n_layers == 2
    for level in profile.counts:
        for key, c in profile.counts[level].items():
            assert torch.equal(loaded.counts[level][key], c)
            assert torch.allclose(loaded.token_quantiles[level][key], profile.token_quantiles[level][key], atol=1e-6)
    assert loaded.info["measured_sparsity"] == profile.info["measured_sparsity"]
    with pytest.raises(KeepProfileError, match=r"has levels 0.4, 0.65, not 0.5"):
        loaded.frequencies(0.5)


def test_bad_files_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(KeepProfileError, match="does not exist"):
        KeepProfile.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KeepProfileError, match="not a readable safetensors file"):
        KeepProfile.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KeepProfileError, match="not a teal keep profile"):
        KeepProfile.load(tmp_path / "other.safetensors")


def test_record_refuses_what_has_no_single_mask_per_site(recorded):
    model, th, windows, _ = recorded
    with pytest.raises(ValueError, match="skip must be in"):
        record(model, th, [0.5], windows, skip=48, progress=False)
    wa = teal.calibrate(model, None, windows=windows, score="weight-aware", calibration="dense", progress=False)
    with pytest.raises(ValueError, match="magnitude score"):
        record(model, wa, [0.5], windows, progress=False)
