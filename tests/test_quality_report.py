"""The per-source schema files of benchmarks/quality/run_quality.py, from a hand-made full JSON."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run_quality.py"


@pytest.fixture(scope="module")
def rq():
    spec = importlib.util.spec_from_file_location("run_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(method, s, ms, ppl, ms_l, ppl_l, tasks=None):
    r = {"method": method, "sparsity": s, "ppl": ppl, "measured_sparsity": ms,
         "ppl_lambada": ppl_l, "measured_sparsity_lambada": ms_l, "seconds": 1.0}
    if tasks is not None:
        r |= {"tasks_avg": tasks, "tasks": {"piqa": tasks}}
    return r


@pytest.fixture
def full():
    return {
        "model": "tiny", "dtype": "float32", "prefill": "sparse", "tasks": ["piqa"],
        "budgets": {"eval_tokens_per_source": 64, "eval_seq_len": 32, "task_limit": 5, "task_seed": 1},
        "results": [
            row("dense", 0.0, 0.0, 10.0, 0.0, 20.0, 0.50),
            row("teal-uniform", 0.25, 0.2, 12.0, 0.3, 24.0, 0.48),
            row("teal-uniform", 0.5, 0.6, 48.0, 0.55, 60.0, 0.40),
            row("teal-fisher", 0.25, 0.25, 11.0, 0.25, 22.0),  # no tasks at this setting
            row("teal-fisher", 0.5, 0.7, 30.0, 0.7, 50.0, 0.45),
        ],
    }


def test_keys_and_files(rq, full, tmp_path):
    paths = rq.write_schema(full, tmp_path)
    assert sorted(p.name for p in paths) == ["tiny-lambada.json", "tiny-olmo-wiki.json"]
    for p in paths:
        rep = json.loads(p.read_text())
        assert set(rep) == {"model", "data", "results", "notes", "source"}
        assert rep["model"] == "tiny" and rep["source"] == "tiny.json"
        assert rep["data"] == p.stem.removeprefix("tiny-")
        for r in rep["results"]:
            assert set(r) - {"interpolated"} == {"method", "sparsity", "measured_sparsity", "ppl",
                                                 "tasks_avg"}
        assert rep["results"][0] == {"method": "dense", "sparsity": 0.0, "measured_sparsity": 0.0,
                                     "ppl": 10.0 if rep["data"] == "olmo-wiki" else 20.0,
                                     "tasks_avg": 0.50}


def test_direct_rows_keep_nominal_and_source_measurement(rq, full):
    lam = rq.schema_reports(full)["lambada"]["results"]
    direct = [r for r in lam if r["method"] == "teal-uniform" and "interpolated" not in r]
    assert direct == [
        {"method": "teal-uniform", "sparsity": 0.25, "measured_sparsity": 0.3, "ppl": 24.0, "tasks_avg": 0.48},
        {"method": "teal-uniform", "sparsity": 0.5, "measured_sparsity": 0.55, "ppl": 60.0, "tasks_avg": 0.40},
    ]
    fisher = [r for r in lam if r["method"] == "teal-fisher" and "interpolated" not in r]
    assert fisher[0]["tasks_avg"] is None


def test_interpolation_on_a_known_bracket(rq, full):
    wiki = rq.schema_reports(full)["olmo-wiki"]["results"]
    interp = {(r["method"], r["sparsity"]): r for r in wiki if "interpolated" in r}
    r = interp[("teal-uniform", 0.4)]  # halfway between measured 0.2 and 0.6
    assert r["measured_sparsity"] == 0.4
    assert r["interpolated"] == {"from": [0.25, 0.5], "measured": [0.2, 0.6]}
    assert r["ppl"] == pytest.approx(math.sqrt(12.0 * 48.0))  # log-linear: geometric mean
    assert r["tasks_avg"] == pytest.approx(0.44)
    r = interp[("teal-uniform", 0.5)]  # three quarters of the way
    assert r["ppl"] == pytest.approx(math.exp(math.log(12) + 0.75 * math.log(4)))
    assert r["tasks_avg"] == pytest.approx(0.48 - 0.75 * 0.08)
    # below the first setting the dense model (measured 0) is the lower bracket (lambada: 0.3 > 0.25)
    lam = {(r["method"], r["sparsity"]): r for r in rq.schema_reports(full)["lambada"]["results"]
           if "interpolated" in r}
    r = lam[("teal-uniform", 0.25)]
    assert r["interpolated"] == {"from": [0.0, 0.25], "measured": [0.0, 0.3]}
    assert r["ppl"] == pytest.approx(math.exp(math.log(20) + (0.25 / 0.3) * math.log(24 / 20)))
    assert r["tasks_avg"] == pytest.approx(0.50 + (0.25 / 0.3) * (0.48 - 0.50))
    # a bracket whose end has no task run: PPL interpolated, tasks_avg null
    r = interp[("teal-fisher", 0.4)]
    assert r["interpolated"]["from"] == [0.25, 0.5] and r["tasks_avg"] is None


def test_out_of_range_targets_are_omitted(rq, full):
    reps = rq.schema_reports(full)
    wiki = {(r["method"], r["sparsity"]) for r in reps["olmo-wiki"]["results"] if "interpolated" in r}
    assert ("teal-uniform", 0.65) not in wiki  # measured range 0-0.6: no extrapolation
    assert ("teal-fisher", 0.65) in wiki  # 0.7 brackets it
    assert "teal-uniform at 0.65" in reps["olmo-wiki"]["notes"]
    lam = {(r["method"], r["sparsity"]) for r in reps["lambada"]["results"] if "interpolated" in r}
    assert ("teal-uniform", 0.65) not in lam and ("teal-uniform", 0.5) in lam
    # methods absent from the full JSON get no rows
    assert {m for m, _ in wiki} == {"teal-uniform", "teal-fisher"}


def test_summary_and_per_source_rows_use_the_same_interpolation(rq, full):
    # the 50 % summary (at_measured) and the per-source rows (schema_reports) agree exactly
    wiki = {(r["method"], r["sparsity"]): r for r in rq.schema_reports(full)["olmo-wiki"]["results"]
            if "interpolated" in r}
    for level in (0.25, 0.4, 0.5):
        r = wiki[("teal-uniform", level)]
        assert rq.at_measured(full["results"], "teal-uniform", "ppl", level) == r["ppl"]
        assert rq.at_measured(full["results"], "teal-uniform", "tasks_avg", level) == r["tasks_avg"]
    lam = {(r["method"], r["sparsity"]): r for r in rq.schema_reports(full)["lambada"]["results"]
           if "interpolated" in r}
    assert rq.at_measured(full["results"], "teal-fisher", "ppl_lambada", 0.5) == lam[("teal-fisher", 0.5)]["ppl"]


def test_report_compares_methods_only_at_equal_measured_sparsity(rq, full):
    md = rq.markdown(full)
    assert "nominal 0.50" not in md and "at each nominal level" not in md
    # the comparison table: teal-uniform at measured 0.4 is the geometric mean of its settings at
    # measured 0.2 (PPL 12) and 0.6 (PPL 48); lambada along lambada's measured sparsity
    wiki_04 = math.sqrt(12.0 * 48.0)
    lam_04 = rq.at_measured(full["results"], "teal-uniform", "ppl_lambada", 0.4)
    row = next(line for line in md.splitlines() if line.startswith("| teal-uniform | ")
               and " / " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{wiki_04:.2f} / {lam_04:.2f} / 0.440"  # target 0.40
    assert cells[4] == "-"  # 0.65 lies beyond teal-uniform's measured range
    # the 50 % table is at measured 0.5, not at the nominal 0.5 setting (PPL 48, measured 0.6)
    s = rq.summarize(full["results"])
    assert s["at_level"]["teal-uniform"]["ppl"] == pytest.approx(math.exp(math.log(12) + 0.75 * math.log(4)))
    assert not any("nominal" in k for k in s)
