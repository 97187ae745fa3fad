"""benchmarks/quality/sequential_calibration.py compares dense and sequential calibration at equal
*measured* sparsity (each series interpolated between its own bracketing settings), from a hand-made JSON."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "sequential_calibration.py"


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("sequential_calibration", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts benchmarks/quality on sys.path for run_quality
    yield mod
    sys.modules.pop("run_quality", None)


def row(cal, s, ms, ppl, ms_l, ppl_l, tasks=None):
    return {"method": "uniform" if cal else "dense", "calibration": cal, "sparsity": s, "ppl": ppl,
            "measured_sparsity": ms, "ppl_lambada": ppl_l, "measured_sparsity_lambada": ms_l,
            "tasks_avg": tasks}


@pytest.fixture
def data():
    return {
        "model": "tiny", "dtype": "float32", "calib_data": "olmo-wiki", "methods": ["uniform"],
        "targets": [0.5], "task_targets": [0.5], "tasks": ["piqa"],
        "budgets": {"calib_tokens": 64, "calib_seq_len": 32, "seq_tokens": 32, "seq_levels": [0.5, 0.6],
                    "alloc_tokens": 32, "step": 0.05, "eval_tokens": 64, "eval_seq_len": 32,
                    "task_limit": 5, "task_seed": 1},
        "sequential_tables": {"uniform": {"measured_on_calibration": [0.5, 0.6], "seconds": 1.0}},
        "results": [
            row(None, 0.0, 0.0, 10.0, 0.0, 20.0, 0.5),
            # dense calibration overshoots: nominal 0.5 measures 0.6 (its 0.5 lies between 0.4 and 0.6)
            row("dense", 0.4, 0.4, 16.0, 0.45, 30.0, 0.46),
            row("dense", 0.5, 0.6, 64.0, 0.65, 90.0, 0.40),
            # sequential lands on the nominal level
            row("sequential", 0.4, 0.4, 16.0, 0.42, 31.0, 0.47),
            row("sequential", 0.5, 0.5, 30.0, 0.52, 44.0, 0.44),
        ],
    }


def test_each_series_at_equal_measured_sparsity(sc, data):
    (c,) = sc.comparisons(data)
    assert c["measured"] == 0.5
    # dense: log-PPL halfway between its settings at measured 0.4 (16) and 0.6 (64): 32, not its
    # nominal-0.5 row (64); sequential: its own setting at measured 0.5 (bracket 0.4-0.5), 30
    assert c["dense"]["ppl"]["value"] == pytest.approx(32.0)
    assert c["dense"]["ppl"]["from"] == [0.4, 0.5]
    assert c["sequential"]["ppl"]["value"] == pytest.approx(30.0)
    # lambada along lambada's own measured sparsity: dense between 0.45 (30) and 0.65 (90) at 0.5
    lam = math.exp(math.log(30) + 0.25 * math.log(3))
    assert c["dense"]["ppl_lambada"]["value"] == pytest.approx(lam)
    # tasks linear along olmo-wiki's measured sparsity
    assert c["dense"]["tasks_avg"]["value"] == pytest.approx(0.43)
    assert c["sequential"]["tasks_avg"]["value"] == pytest.approx(0.44)
    md = sc.markdown(data)
    assert "| 0.50 | uniform | 32.00 → 30.00 (-6.2%) |" in md
    assert "| uniform | dense | 0.500 | 0.600 / 0.650 | +0.100 |" in md


def test_no_bracket_no_number(sc, data):
    # without a setting measuring >= 0.5, the dense series has no value at 0.5 (never extrapolated)
    data["results"] = [r for r in data["results"] if not (r["calibration"] == "dense" and r["sparsity"] == 0.5)]
    (c,) = sc.comparisons(data)
    assert c["dense"]["ppl"] is None and c["sequential"]["ppl"] is not None
    assert "| 0.50 | uniform | - |" in sc.markdown(data)


def test_dense_model_is_the_setting_at_zero(sc, data):
    # below every sparse setting, the bracket is the dense model (measured 0) and the lowest setting
    data["targets"] = [0.2]
    (c,) = sc.comparisons(data)
    assert c["dense"]["ppl"]["value"] == pytest.approx(10.0 * math.sqrt(1.6))
    assert c["sequential"]["ppl"]["from"] == [0.0, 0.4]
