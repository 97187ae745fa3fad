"""The whole workflow on the real SmolLM2-135M (installed by the test setup)."""

import importlib.util
from pathlib import Path

import pytest

import teal
from teal.eval import perplexity_sweep

EVAL_TOKENS = 4096
SEQ_LEN = 1024
GREEDY_BOUND = 1.15  # greedy's PPL at most this multiple of uniform's at equal measured sparsity


@pytest.fixture(scope="module")
def sweep(smollm2, smollm2_thresholds):
    model, tok = smollm2
    rows = perplexity_sweep(model, tok, smollm2_thresholds, [0, 0.25, 0.5, 0.65],
                            ["uniform", "greedy"], data="olmo-wiki", tokens=EVAL_TOKENS,
                            seq_len=SEQ_LEN, progress=False)
    return {(r["method"], r["sparsity"]): r for r in rows}


def test_low_sparsity_costs_little(sweep):
    dense = sweep[("teal-uniform", 0)]["ppl"]
    assert 5 < dense < 100  # a sane language model on Wikipedia text
    assert sweep[("teal-uniform", 0.25)]["ppl"] <= dense * 1.03


def test_ppl_rises_strictly_with_sparsity(sweep):
    ppls = [sweep[("teal-uniform", s)]["ppl"] for s in (0, 0.25, 0.5, 0.65)]
    assert all(a < b for a, b in zip(ppls, ppls[1:])), ppls


def test_measured_sparsity_matches_nominal_on_evaluation_text(sweep):
    for (method, s), row in sweep.items():
        # Thresholds come from dense activations; with every position sparsified, activations
        # downstream of sparsified projections shrink, so measured sparsity creeps above nominal
        # as s grows (about +5 points for uniform at 0.65 on SmolLM2).
        tolerance = 0.03 if s <= 0.5 else 0.06
        assert abs(row["measured_sparsity"] - s) <= tolerance, (method, s, row["measured_sparsity"])
        assert row["tokens_scored"] == EVAL_TOKENS // SEQ_LEN * (SEQ_LEN - 1)


def _at_measured():
    """The quality report's interpolation at a measured sparsity (benchmarks/quality/run_quality.py)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run_quality.py"
    spec = importlib.util.spec_from_file_location("run_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.at_measured


def test_greedy_close_to_uniform_at_equal_measured_sparsity(sweep):
    """Greedy against uniform at equal *measured* sparsity (each interpolated between its settings, log-PPL
    linear in measured sparsity, as the quality report compares methods). At the same nominal level greedy
    zeroes fewer inputs than uniform, so a nominal comparison flatters it. At equal measured sparsity greedy
    does not beat uniform on SmolLM2 (3-10 % worse at 0.4-0.5 in benchmarks/quality/README.md and in the
    main job): this bounds how much worse it may be, which a broken allocation exceeds."""
    at_measured = _at_measured()
    rows = [dict(r, method="dense") if r["sparsity"] == 0 else r for r in sweep.values()]
    for level in (0.4, 0.5):
        uniform = at_measured(rows, "teal-uniform", "ppl", level)
        greedy = at_measured(rows, "teal-greedy", "ppl", level)
        assert uniform is not None and greedy is not None, level  # both bracket the level
        assert greedy <= GREEDY_BOUND * uniform, (level, greedy, uniform)


def test_artifact_refuses_another_model(smollm2_thresholds, tmp_path):
    from conftest import tiny_model

    smollm2_thresholds.save(tmp_path / "smol")
    with pytest.raises(teal.ArtifactError, match="calibrated on .*SmolLM2|calibrated on"):
        teal.Thresholds.load(tmp_path / "smol", model=tiny_model("llama"))


def test_sparse_generation_stays_fluent(smollm2, smollm2_thresholds):
    from teal.cli import generate_text

    model, tok = smollm2
    teal.sparsify_(model, smollm2_thresholds, 0.5, method="greedy", prefill="dense")
    try:
        text, info = generate_text(model, tok, "The capital of France is", 8)
    finally:
        teal.densify_(model)
    assert info["new_tokens"] > 0
    assert abs(info["measured_sparsity"] - 0.5) < 0.1  # decode steps only
    assert "Paris" in text
