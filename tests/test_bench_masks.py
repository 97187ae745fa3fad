"""teal.bench.masks and teal.bench.shaping: profiles stretched and sampled into survivor masks, the benches'
--masks option, and a random-weight engine shaped to follow a profile (all on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from teal.bench.masks import (
    MaskSource,
    channel_rate_fit,
    imbalance,
    index_structure,
    inputs_for_masks,
    parse_masks,
    sample_masks,
    shift_to_rate,
    stretch,
    stretch_blocks,
)
from teal.keep_profile import KeepProfile, KeepProfileError

runner = CliRunner()


def skewed(k: int, seed: int = 0) -> torch.Tensor:
    """Keep frequencies like a real model's: logit-normal, many channels rarely kept, many almost always."""
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(2.5 * torch.randn(k, generator=g, dtype=torch.float64))


def synthetic_profile(tmp_path, hidden=128, q_size=128, inter=352, layers=2, level=0.5, seed=0):
    """A keep-profile file for tiny-llama's widths with skewed frequencies (counts out of 1000 tokens)."""
    torch.manual_seed(seed)
    tokens = 1000
    counts, quantiles = {}, {}
    for i in range(layers):
        for site, k in (("attn_in", hidden), ("attn_out", q_size), ("mlp_in", hidden), ("mlp_mid", inter)):
            counts[f"layers.{i}.{site}"] = (skewed(k, seed + i) * tokens).round().long()
            quantiles[f"layers.{i}.{site}"] = torch.linspace(0.3, 0.7, 101, dtype=torch.float64)
    profile = KeepProfile(info={"name": "synthetic", "model": {"num_attention_heads": 4}}, tokens=tokens, counts={f"{level:g}": counts},
                          token_quantiles={f"{level:g}": quantiles})
    return profile.save(tmp_path / "synthetic.safetensors")


# ---- stretch -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [4096, 14336, 300])
def test_stretch_keeps_the_sorted_distribution_and_the_mean(width):
    src = skewed(576)
    out = stretch(src, width, seed=3)
    assert out.numel() == width
    probs = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(torch.quantile(out, probs), torch.quantile(src, probs), atol=0.02)
    assert float(out.mean()) == pytest.approx(float(src.mean()), abs=0.005)
    shifted = stretch(src, width, rate=0.35, seed=3)
    assert float(shifted.mean()) == pytest.approx(0.35, abs=1e-9)
    assert bool((shifted.argsort() == out.argsort()).all())  # the shift keeps every channel's rank
    # permuted with a fixed seed: the same seed gives the same channels, another seed others
    assert torch.equal(stretch(src, width, seed=3), out)
    assert not torch.equal(stretch(src, width, seed=4), out)
    assert index_structure(out, 8)["recorded_order"] < 0.2


def test_stretch_blocks_keeps_whole_heads():
    """o's input: heads whose channels are mostly kept or mostly dropped stay whole heads when stretched."""
    g = torch.Generator().manual_seed(0)
    head_means = torch.tensor([0.05, 0.2, 0.5, 0.6, 0.8, 0.95, 0.4, 0.3, 0.7], dtype=torch.float64)
    src = (head_means[:, None] + 0.05 * torch.randn(9, 64, generator=g, dtype=torch.float64)).clamp(0, 1).flatten()
    out = stretch_blocks(src, 64, 4096, 128, rate=0.5, seed=1)
    assert out.numel() == 4096 and float(out.mean()) == pytest.approx(0.5, abs=1e-9)
    structure = index_structure(out, 32)
    assert structure["recorded_order"] > 3 * structure["permuted"]
    assert index_structure(stretch(src, 4096, rate=0.5, seed=1), 32)["recorded_order"] < 0.1
    # each head is one source head's channels: its spread is a head's, not the whole profile's
    unshifted = stretch_blocks(src, 64, 4096, 128, seed=1).view(32, 128)
    assert float(unshifted.std(dim=1).max()) < 0.1 < float(src.std())
    distance = (unshifted.mean(dim=1)[:, None] - src.view(9, 64).mean(dim=1)[None, :]).abs()
    assert float(distance.min(dim=1).values.max()) < 0.01  # every head is near one source head's mean ...
    assert set(distance.argmin(dim=1).tolist()) == set(range(9))  # ... and every source head is used


def test_shift_to_rate_reaches_each_rate():
    p = skewed(1000)
    rates = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(shift_to_rate(p, rates).mean(dim=1), rates, atol=1e-9)
    many = torch.linspace(0.2, 0.8, 300, dtype=torch.float64)  # the interpolated grid
    assert torch.allclose(shift_to_rate(p, many).mean(dim=1), many, atol=2e-3)


# ---- sampler -----------------------------------------------------------------------------------------
def test_sampler_follows_the_profile_and_the_target_rate():
    p = stretch(skewed(576), 2048, rate=0.5, seed=1)
    gen = torch.Generator().manual_seed(0)
    masks = sample_masks(p, 3000, generator=gen)
    assert bool((masks.sum(dim=1) == 1024).all())  # exact count per token
    fit = channel_rate_fit(p, masks.double().mean(dim=0))
    assert fit["measured_mean"] == pytest.approx(0.5, abs=1e-9)
    se = math.sqrt(0.25 / 3000)
    assert fit["corr"] > 0.98 and fit["mean_abs_diff"] < 2 * se
    bern = sample_masks(p, 3000, exact_count=False, generator=gen)
    assert float(bern.double().mean()) == pytest.approx(0.5, abs=0.002)
    assert channel_rate_fit(p, bern.double().mean(dim=0))["corr"] > 0.98


def test_sampler_draws_each_tokens_rate_from_the_quantiles():
    p = stretch(skewed(576), 2048, rate=0.5, seed=1)
    q = torch.linspace(0.3, 0.7, 101, dtype=torch.float64)  # per-token keep fraction 0.3..0.7, mean 0.5
    masks = sample_masks(p, 2000, rate_quantiles=q, generator=torch.Generator().manual_seed(2))
    rates = masks.double().mean(dim=1)
    assert float(rates.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(rates.min()) >= 0.3 - 1e-3 and float(rates.max()) <= 0.7 + 1e-3
    assert float(rates.std()) == pytest.approx(0.4 / math.sqrt(12), rel=0.1)  # uniform over [0.3, 0.7]
    assert channel_rate_fit(p, masks.double().mean(dim=0))["corr"] > 0.95


def test_uniform_masks_are_balanced_and_a_clustered_profile_is_not():
    uniform = sample_masks(torch.full((4096,), 0.5, dtype=torch.float64), 200)
    clustered = torch.cat([torch.full((2048,), 0.9), torch.full((2048,), 0.1)]).double()
    blocky = sample_masks(clustered, 200)
    assert imbalance(uniform)["8"]["max_over_mean"] < 1.1
    assert imbalance(blocky)["8"]["max_over_mean"] > 1.6
    assert imbalance(uniform)["tokens"]["count_cv"] == 0.0
    assert index_structure(clustered, 8)["recorded_order"] > 0.5 > index_structure(clustered, 8)["permuted"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inputs_pass_the_threshold_exactly_where_the_mask_is_set(dtype):
    masks = sample_masks(torch.full((1000,), 0.4, dtype=torch.float64), 16)
    x = inputs_for_masks(masks, dtype)
    assert x.dtype == dtype and torch.equal(x.float().abs() > 1.0, masks)


# ---- sources and the command line ------------------------------------------------------------------
def test_parse_masks(tmp_path):
    path = synthetic_profile(tmp_path)
    sources = parse_masks(f"random,real:{path}")
    assert [s.is_random for s in sources] == [True, False] and sources[1].profile.levels == [0.5]
    sources[1].check_levels([0.5])
    with pytest.raises(KeepProfileError, match=r"has sparsities 0.5; 0.4 not among them"):
        sources[1].check_levels([0.4, 0.5])
    p = sources[1].probabilities("mlp_mid", 1, 14336, 0.5, seed=0)
    assert p.numel() == 14336 and float(p.mean()) == pytest.approx(0.5, abs=1e-9)
    assert torch.equal(sources[0].probabilities("mlp_mid", 0, 10, 0.4), torch.full((10,), 0.6, dtype=torch.float64))
    for bad, message in [("bogus", "comma list of random and real:PROFILE"), ("real:", "comma list"),
                         ("real:nowhere", "no keep profile 'nowhere'"), ("random,random", "twice")]:
        with pytest.raises(KeepProfileError, match=message):
            parse_masks(bad)


@pytest.mark.parametrize("args, message", [
    (["kernels", "--masks", "bogus"], "--masks takes a comma list of random and real:PROFILE"),
    (["kernels", "--masks", "real:nowhere"], "no keep profile 'nowhere'"),
    (["decode", "--masks", "real:{path}", "--sparsity", "0,0.4"], "0.4 not among them"),
    (["decode", "--masks", "real:{path}", "--sparsity", "0.5", "--model", "smollm2-135m"], "random-weight model"),
])
def test_bench_masks_option_rejects_bad_values_in_one_line(args, message, tmp_path):
    from teal.cli import app

    path = synthetic_profile(tmp_path)
    result = runner.invoke(app, ["bench", *[a.format(path=path) for a in args]])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_kernel_bench_inputs_follow_the_source(tmp_path):
    from teal.bench.kernels import masked_inputs

    real = parse_masks(f"real:{synthetic_profile(tmp_path)}")[0]
    for source in (MaskSource("random"), real):
        xs, thr, masks = masked_inputs(source, "down", 1408, 2, 0.5, 40, torch.bfloat16, 1, "cpu")
        assert len(xs) == 40 and xs[0].shape == (2, 1408) and masks.shape == (80, 1408)
        assert torch.equal(torch.cat([x.float().abs() > t[0] for x, t in zip(xs, thr)]), masks)
        assert float(masks.double().mean()) == pytest.approx(0.5, abs=0.02)
    # the real source's channels differ in how often they are kept, the random one's do not
    per_layer = masks.view(40, 2, 1408)[0::2].reshape(-1, 1408).double().mean(dim=0)  # profile layer 0
    target = real.probabilities("mlp_mid", 0, 1408, 0.5)
    assert channel_rate_fit(target, per_layer)["corr"] > 0.8


# ---- shaping a random-weight engine ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine():
    from teal.engine import engine_random

    engine = engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=512)
    engine.to_layout(transposed=True)
    return engine


def _prefill_keep_rates(engine, ids, thresholds):
    from teal.bench.shaping import SITE_PROJ

    rates = {}

    def observe(layer, site, x):
        rates[(layer, site)] = (x.abs().float() > thresholds[f"layers.{layer}.{SITE_PROJ[site]}"]).double().mean(0)

    with torch.inference_mode():
        engine.prefill(ids, observer=observe)
    return rates


def test_shaped_engine_follows_the_profile_and_reset_restores_it(tiny_engine, tmp_path):
    from teal.bench.shaping import ProfileShaper
    from teal.engine.reference import activation_thresholds

    engine = tiny_engine
    before = [w.qkv.clone() for w in engine.layers] + [w.mlp_norm.clone() for w in engine.layers]
    real = parse_masks(f"real:{synthetic_profile(tmp_path)}")[0]
    shaper = ProfileShaper(engine)
    ids = [torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    summary = shaper.apply(real, 0.5, ids)
    assert summary["masks"] == real.spec and set(summary["log_factor_std"]) == {"attn_in", "attn_out", "mlp_in",
                                                                               "mlp_mid"}
    fresh = torch.randint(0, 512, (500,), generator=torch.Generator().manual_seed(9))
    th = activation_thresholds(engine, fresh, 0.5)
    rates = _prefill_keep_rates(engine, fresh, th)
    for key, target in shaper.targets.items():
        fit = channel_rate_fit(target, rates[key])
        assert fit["corr"] > 0.85, (key, fit)
        assert fit["measured_mean"] == pytest.approx(0.5, abs=0.02)
    shaper.reset()
    after = [w.qkv for w in engine.layers] + [w.mlp_norm for w in engine.layers]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=0) for a, b in zip(after, before))
    rates = _prefill_keep_rates(engine, fresh, activation_thresholds(engine, fresh, 0.5))
    # unshaped, the profile says nothing about which channels survive
    target = real.probabilities("mlp_mid", 0, 352, 0.5, 0)
    assert abs(channel_rate_fit(target, rates[(0, "mlp_mid")])["corr"]) < 0.3


def test_bench_decode_times_random_and_real_masks_on_cpu(tmp_path):
    import json

    from teal.bench import decode

    path = tmp_path / "decode.json"
    real = parse_masks(f"real:{synthetic_profile(tmp_path)}")[0]
    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=16, new_tokens=24, repeats=1,
                      json_path=path, hf_baselines=False, device="cpu", dtype=torch.float32, log=lambda _: None,
                      profile=False, masks=[MaskSource("random"), real], mask_steps=16)
    assert not data["errors"], data["errors"]
    saved = json.loads(path.read_text())
    rows = {(r["sparsity"], r["masks"]) for r in saved["results"]}
    assert rows == {(0.0, "random"), (0.5, "random"), (0.5, real.spec)}
    for r in saved["results"]:
        if r["sparsity"] == 0.5:
            assert r["measured_sparsity"] == pytest.approx(0.5, abs=0.05), r["masks"]
    assert saved["masks"] == ["random", real.spec] and real.spec in saved["mask_profiles"]
    reports = {m["masks"]: m for m in saved["mask_reports"]}
    assert set(reports) == {"random", real.spec}
    assert "channel_fit" not in reports["random"]["sites"]["mlp_mid"]
    for site, entry in reports[real.spec]["sites"].items():  # each step keeps the channels the profile favours
        assert entry["target_of_kept"] > entry["target_of_zeroed"] + 0.1, (site, entry)
    assert reports[real.spec]["sites"]["mlp_mid"]["channel_fit"]["corr"] > 0.5
    assert {"8", "32", "tokens"} <= set(reports[real.spec]["sites"]["mlp_mid"]["imbalance"])
    (cmp,) = saved["mask_comparison"]
    assert cmp["masks"] == real.spec and cmp["ratio"] == pytest.approx(cmp["tokens_per_s"] / cmp["random_tokens_per_s"])


def test_decode_targets_come_from_bf16_random_mask_rows_only():
    """A faster real-mask or int4 row must not stand in for the bf16 random-mask target (the target is
    defined on random masks of the bf16 weights)."""
    from teal.bench.decode import evaluate_targets

    def row(tps, **kw):
        return dict(sparsity=0.5, op="kernel", tokens_per_s=tps, frac_of_roofline=tps / 1000, **kw)

    data = {"dense_best": {"tokens_per_s": 100.0}, "baselines": {}, "results": [
        row(150.0), row(400.0, masks="real:x"), row(500.0, weights="int4"), row(160.0, masks="random")]}
    got = evaluate_targets(data)["sparse50_vs_dense"]["value"]
    assert got == pytest.approx(1.6)
