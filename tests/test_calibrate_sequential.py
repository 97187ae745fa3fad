"""Sequential calibration: measured sparsity equals nominal, the artifact keeps any level, old artifacts load."""

import json

import pytest
import torch

import teal
from teal import stats
from teal.artifact import ArtifactError, Thresholds
from teal.calibrate import calibrate_sequential, sequential_pass
from teal.sparsify import measured_sparsity
from conftest import random_windows, tiny_model

LEVELS = [0.25, 0.5, 0.65, 0.8]


def measure(model, th, level, windows, **kw):
    """(effective, per-projection) sparsity measured on ``windows`` at ``level``."""
    teal.sparsify_(model, th, level, **kw)
    try:
        with torch.inference_mode():
            model(input_ids=windows, use_cache=False)
        return measured_sparsity(model), measured_sparsity(model, per_projection=True)
    finally:
        teal.densify_(model)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", num_hidden_layers=3)
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, levels=LEVELS, progress=False)
    return model, windows, th


def test_sequential_hits_nominal_where_dense_drifts(tiny):
    """On the calibration windows, sequential thresholds zero exactly the nominal fraction of every
    projection (up to the histogram's bin width); dense-calibrated ones drift by more."""
    model, windows, th = tiny
    assert th.calibration_mode() == "sequential" and th.sequential["uniform"]["levels"] == LEVELS
    drift = []
    for level in LEVELS:
        seq, per = measure(model, th, level, windows)
        dense, _ = measure(model, th, level, windows, calibration="dense")
        assert seq == pytest.approx(level, abs=0.005), (level, seq)
        assert all(abs(v - level) < 0.01 for v in per.values()), per
        drift.append(abs(dense - level))
    assert max(drift) > 0.02, drift  # the drift the correction removes (0.07 at 0.8 on this model)


def test_one_pass_is_the_sequential_definition(tiny):
    """The single-batch pass equals the definition: layer l's thresholds taken from its inputs with
    layers < l (and, in layer l, the projections that run before) already at their thresholds."""
    model, windows, th = tiny
    level = 0.65
    q, _ = sequential_pass(model, th, th.sparsities(level, "uniform"), windows)
    adapter = teal.arch.get_adapter(model)
    # sparsify everything with dense thresholds, then fix sites in execution order one at a time
    teal.sparsify_(model, th, level, calibration="dense")
    mods = adapter.projections()
    try:
        for site, projs in adapter.sites().items():
            seen = []
            h = mods[projs[0]].register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().float()))
            with torch.inference_mode():
                model(input_ids=windows, use_cache=False)
            h.remove()
            t = stats.quantile(stats.histogram(seen[0]), level)
            for p in projs:
                mods[p].set_threshold(t)
                expect = stats.fraction_at_or_below(th.histograms[site], t)
                assert q[p] == pytest.approx(expect, abs=1e-6), (p, q[p], expect)
    finally:
        teal.densify_(model)


def test_levels_between_the_grid_interpolate(tiny):
    model, windows, th = tiny
    seq, _ = measure(model, th, 0.575, windows)  # halfway between 0.5 and 0.65
    assert seq == pytest.approx(0.575, abs=0.01)
    low, _ = measure(model, th, 0.1, windows)  # between level 0 (no offset) and 0.25
    assert low == pytest.approx(0.1, abs=0.01)
    # at a grid level the table's quantile is used as is
    t = th.thresholds(0.5, "uniform")
    q = th.sequential["uniform"]["quantiles"]["layers.2.down"][1]
    assert t["layers.2.down"] == stats.quantile(th.histograms["layers.2.mlp_mid"], q)


def test_allocations_get_their_own_table(tiny):
    """greedy and fisher tables are sequentially calibrated when allocated; each projection then
    measures its own allocated level."""
    model, windows, th0 = tiny
    th = Thresholds(**{f: getattr(th0, f) for f in ("model", "histograms", "proj_sizes", "score", "calibration",
                                                    "col_norms")}, sequential=dict(th0.sequential))
    for method in ("greedy", "fisher"):
        teal.allocate(model, th, method, windows=windows, step=0.05, progress=False)
        assert th.sequential[method]["levels"] == LEVELS
        for level in (0.5, 0.65):
            eff, per = measure(model, th, level, windows, method=method)
            nominal = th.sparsities(level, method)
            assert eff == pytest.approx(level, abs=0.01), (method, level, eff)
            assert all(abs(per[p] - nominal[p]) < 0.02 for p in per), method


def test_weight_aware_scores(tmp_path):
    model = tiny_model("qwen2")
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, score="weight-aware", levels=[0.6], progress=False)
    seq, _ = measure(model, th, 0.6, windows)
    assert seq == pytest.approx(0.6, abs=0.005)


def test_dense_calibration_keeps_the_old_thresholds(tiny):
    model, windows, th = tiny
    plain = teal.calibrate(model, None, windows=windows, calibration="dense", progress=False)
    assert plain.sequential == {} and plain.calibration_mode() == "dense"
    for p, t in plain.thresholds(0.5).items():
        assert t == stats.quantile(plain.histograms[plain.hist_key(p)], 0.5)
        assert th.thresholds(0.5, calibration="dense")[p] == t
    with pytest.raises(ValueError, match="no sequential calibration for 'uniform'"):
        plain.thresholds(0.5, calibration="sequential")
    with pytest.raises(ValueError, match="calibration must be one of"):
        teal.calibrate(model, None, windows=windows, calibration="layerwise", progress=False)
    with pytest.raises(ValueError, match="levels must be in"):
        teal.calibrate(model, None, windows=windows, levels=[0.995], progress=False)


def test_artifact_round_trip_and_format_1_still_loads(tiny, tmp_path):
    model, windows, th = tiny
    d = th.save(tmp_path / "v2")
    cfg = json.loads((d / "teal_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["sequential"]["uniform"]["levels"] == LEVELS
    back = Thresholds.load(d, model=model)
    assert back.thresholds(0.57) == th.thresholds(0.57)
    # a format-1 artifact (written before sequential calibration): loads, thresholds from dense
    del cfg["sequential"]
    cfg["format_version"] = 1
    (d / "teal_config.json").write_text(json.dumps(cfg))
    old = Thresholds.load(d, model=model)
    assert old.sequential == {} and old.calibration_mode() == "dense"
    assert old.thresholds(0.5) == th.thresholds(0.5, calibration="dense")
    with pytest.raises(ValueError, match="no sequential calibration"):
        teal.sparsify_(model, old, 0.5, calibration="sequential")
    # a damaged table is refused on load, naming it
    cfg["format_version"] = 2
    cfg["sequential"] = {"uniform": {**th.sequential["uniform"], "levels": [0.5]}}
    (d / "teal_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"sequential\['uniform'\].*quantiles of"):
        Thresholds.load(d)


def test_calibrate_sequential_needs_text(tiny):
    model, _, th = tiny
    with pytest.raises(ValueError, match="needs `windows`, or `tokenizer`"):
        calibrate_sequential(model, th, "uniform", [0.5])


def test_smollm2_measured_within_one_point_of_nominal(smollm2, smollm2_thresholds):
    """The issue's case on the real model: calibrated on sotu (the shared artifact: 8k tokens, sequential on
    the first 4k with 0.65 a grid level), measured on olmo-wiki (evaluation split). Dense thresholds overshoot
    at 0.65 by more than a point; sequential ones land within one."""
    from teal.eval.perplexity import perplexity

    model, tok = smollm2
    th = smollm2_thresholds
    assert th.calibration["tokens"] == 8192 and th.sequential["uniform"]["tokens"] == 4096
    assert 0.65 in th.sequential["uniform"]["levels"]
    from teal.data import token_windows

    ev = token_windows(tok, "olmo-wiki", 2048, 1024, split="evaluation")
    got = {}
    for cal in ("dense", "sequential"):
        teal.sparsify_(model, th, 0.65, method="uniform", calibration=cal)
        try:
            got[cal] = perplexity(model, tok, windows=ev, progress=False)["measured_sparsity"]
        finally:
            teal.densify_(model)
    assert abs(got["dense"] - 0.65) > 0.01, got
    assert abs(got["sequential"] - 0.65) <= 0.01, got


def test_cli_calibration_flag(smollm2, tmp_path):
    from typer.testing import CliRunner

    from teal.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    seq, dense = tmp_path / "seq", tmp_path / "dense"
    r = invoke("calibrate", "smollm2-135m", "-o", seq, "--tokens", 1024, "--seq-len", 256, "--levels", "0.5",
               "--sequential-tokens", 512)
    assert r.exit_code == 0, r.output
    assert Thresholds.load(seq).sequential["uniform"]["levels"] == [0.5]
    r = invoke("calibrate", "smollm2-135m", "-o", dense, "--tokens", 1024, "--seq-len", 256,
               "--calibration", "dense")
    assert r.exit_code == 0, r.output
    assert Thresholds.load(dense).sequential == {}
    rows = {}
    for art, flag in ((seq, None), (seq, "dense"), (dense, None)):
        js = tmp_path / f"{art.name}-{flag}.json"
        extra = ["--calibration", flag] if flag else []
        r = invoke("eval", "ppl", "smollm2-135m", art, "--sparsity", "0.5", "--tokens", 512, "--seq-len", 256,
                   "--json", js, *extra)
        assert r.exit_code == 0, r.output
        (row,) = json.loads(js.read_text())["results"]
        rows[(art.name, flag)] = row
    assert rows[("seq", None)]["calibration"] == "sequential"
    assert rows[("seq", "dense")]["calibration"] == "dense" == rows[("dense", None)]["calibration"]
    # same dense histograms from the same text: the dense flag reproduces the old thresholds exactly
    assert rows[("seq", "dense")]["measured_sparsity"] == rows[("dense", None)]["measured_sparsity"]
    assert rows[("seq", None)]["measured_sparsity"] != rows[("dense", None)]["measured_sparsity"]
    r = invoke("eval", "ppl", "smollm2-135m", dense, "--sparsity", "0.5", "--tokens", 512, "--seq-len", 256,
               "--calibration", "sequential")
    assert r.exit_code == 2 and "no sequential calibration" in r.output, r.output
    r = invoke("calibrate", "smollm2-135m", "-o", tmp_path / "x", "--calibration", "layerwise")
    assert r.exit_code == 2 and "--calibration must be sequential or dense" in r.output, r.output
