"""benchmarks/quality/run_quant_quality.py: tasks added to rows measured without them (``--resume``), and
no row recorded that claims a sparsity it did not measure. A tiny random llama with SmolLM2's tokenizer
stands in for the model (seconds)."""

import contextlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run_quant_quality.py"
# tiny budgets: every number below is measured, only on little text
BUDGETS = ["--model", "tiny", "--formats", "bf16,int8", "--methods", "teal-uniform", "--sparsities", "0.5",
           "--calib-tokens", "128", "--calib-seq-len", "64", "--tokens", "64", "--seq-len", "64",
           "--tasks", "piqa", "--limit", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def qq():
    spec = importlib.util.spec_from_file_location("run_quant_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("run_quant_quality", None)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from teal.models import _alias_dir

    return AutoTokenizer.from_pretrained(str(_alias_dir("smollm2-135m")))


@pytest.fixture
def tiny(qq, tokenizer, monkeypatch):
    """``teal.load_model`` gives a fresh tiny llama (the same weights every load, as a real model)."""
    monkeypatch.setattr(qq.teal, "load_model",
                        lambda name, dtype=None: (tiny_model("llama", vocab_size=len(tokenizer)), tokenizer))


def run(qq, out: Path, *extra: str) -> tuple[int, dict]:
    rc = qq.main([*BUDGETS, "--artifacts", str(out / "artifacts"), "--out", str(out), "--resume", *extra])
    path = out / "tiny-quant.json"
    return rc, (json.loads(path.read_text()) if path.is_file() else {})


def rows(data: dict) -> dict:
    return {(r["weights"], r["method"], r["sparsity"]): r for r in data["results"]}


def test_resume_adds_tasks_to_sparse_rows_and_keeps_their_ppl(qq, tiny, tmp_path):
    rc, first = run(qq, tmp_path, "--task-sparsities", "none")
    assert rc == 0
    assert all(r.get("tasks_avg") is None for r in first["results"])
    rc, second = run(qq, tmp_path, "--task-sparsities", "0.5")
    assert rc == 0
    before, after = rows(first), rows(second)
    assert before.keys() == after.keys()  # no row measured twice
    for key, r in after.items():
        assert r["ppl"] == before[key]["ppl"] and r["measured_sparsity"] == before[key]["measured_sparsity"]
        assert r["tasks_avg"] is not None and set(r["tasks"]) == {"piqa"}
    for label in ("bf16", "int8"):
        assert after[(label, "dense", 0.0)]["measured_sparsity_tasks"] == 0.0
        # the tasks ran sparse: about the nominal level on their own text
        assert 0.3 < after[(label, "teal-uniform", 0.5)]["measured_sparsity_tasks"] < 0.8
        assert second["format_info"][label]["artifact"]["histograms"]
    md = (tmp_path / "tiny-quant.md").read_text()
    m = after[("int8", "teal-uniform", 0.5)]["measured_sparsity_tasks"]
    assert f"| {m:.3f} | " in md  # the tasks' own measured sparsity is in the report
    r = after[("bf16", "teal-uniform", 0.5)]
    # the formats side by side at the same setting, each with both its measured sparsities
    assert (f"| teal-uniform | 0.50 | {r['tasks_avg']:.3f} ({r['measured_sparsity']:.3f} / "
            f"{r['measured_sparsity_tasks']:.3f}) | ") in md


def test_tasks_that_ran_dense_are_not_recorded(qq, tiny, tmp_path, monkeypatch):
    rc, first = run(qq, tmp_path, "--task-sparsities", "none")
    assert rc == 0
    # fault: the sparsifier does nothing, so the tasks of the 0.5 rows run on the dense model
    monkeypatch.setattr(qq.rq, "sparsified", lambda *a, **k: contextlib.nullcontext())
    rc, second = run(qq, tmp_path, "--task-sparsities", "0.5")
    assert rc == 1
    assert rows(second)[("bf16", "teal-uniform", 0.5)].get("tasks_avg") is None


def test_a_new_row_measured_dense_is_not_recorded(qq, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(qq.rq, "sparsified", lambda *a, **k: contextlib.nullcontext())
    rc, data = run(qq, tmp_path, "--task-sparsities", "none", "--formats", "bf16")
    assert rc == 1
    assert ("bf16", "teal-uniform", 0.5) not in rows(data)


def test_resume_refuses_other_thresholds(qq, tiny, tmp_path):
    assert run(qq, tmp_path, "--task-sparsities", "none", "--formats", "bf16")[0] == 0
    # the rows were measured with these thresholds; recalibrated on other text they are not the same
    rc, data = run(qq, tmp_path, "--task-sparsities", "none", "--formats", "bf16")
    assert rc == 0 and data["format_info"]["bf16"]["artifact"]
    data["format_info"]["bf16"]["artifact"]["histograms"] = "0" * 16
    (tmp_path / "tiny-quant.json").write_text(json.dumps(data))
    assert run(qq, tmp_path, "--task-sparsities", "0.5", "--formats", "bf16")[0] == 2


def test_resume_refuses_other_budgets(qq, tiny, tmp_path):
    assert run(qq, tmp_path, "--task-sparsities", "none", "--formats", "bf16")[0] == 0
    assert run(qq, tmp_path, "--task-sparsities", "0.5", "--formats", "bf16", "--limit", "3")[0] == 2


@pytest.mark.parametrize("fault", ["tasks without their sparsity", "tasks ran dense", "PPL ran dense",
                                   "dense row sparse"])
def test_check_row(qq, fault):
    sparse = {"weights": "int8", "method": "teal-uniform", "sparsity": 0.5, "measured_sparsity": 0.52,
              "measured_sparsity_lambada": 0.53, "tasks_avg": 0.4, "measured_sparsity_tasks": 0.6}
    dense = {"weights": "int8", "method": "dense", "sparsity": 0.0, "measured_sparsity": 0.0,
             "measured_sparsity_lambada": 0.0, "tasks_avg": 0.45, "measured_sparsity_tasks": 0.0}
    qq.check_row(sparse)
    qq.check_row(dense)
    row = dict(dense if fault == "dense row sparse" else sparse)
    key = {"tasks without their sparsity": "measured_sparsity_tasks", "tasks ran dense": "measured_sparsity_tasks",
           "PPL ran dense": "measured_sparsity", "dense row sparse": "measured_sparsity_tasks"}[fault]
    if fault == "tasks without their sparsity":
        del row[key]
    else:
        row[key] = 0.3 if fault == "dense row sparse" else 0.01
    with pytest.raises(ValueError):
        qq.check_row(row)


def test_no_interpolation_across_a_wide_bracket(qq):
    def r(method, s, ms, ppl):
        return {"weights": "bf16", "method": method, "sparsity": s, "measured_sparsity": ms, "ppl": ppl}

    res = [r("dense", 0.0, 0.0, 10.0), r("teal-uniform", 0.5, 0.48, 40.0)]
    # dense to 0.48 is wider than the grid's steps: no number at 0.25 or 0.4, none at 0.5 (no extrapolation)
    assert [qq.at_measured(res, "bf16", "teal-uniform", "ppl", x) for x in (0.25, 0.4, 0.5)] == [None] * 3
    res.append(r("teal-uniform", 0.25, 0.24, 20.0))
    assert qq.at_measured(res, "bf16", "teal-uniform", "ppl", 0.4) == pytest.approx(20.0 * 2 ** (16 / 24))


def merge(qq, out: Path, *parts: Path) -> tuple[int, dict]:
    rc = qq.main(["--model", "tiny", "--merge", *map(str, parts), "--out", str(out)])
    path = out / "tiny-quant.json"
    return rc, (json.loads(path.read_text()) if path.is_file() else {})


def test_merge_of_copies_resumed_apart_keeps_each_setting_once_with_its_tasks(qq, tiny, tmp_path):
    """Two copies of one JSON, each resumed with the tasks of one format, merge into one JSON: every setting
    once, its PPL as first measured, its tasks from the copy that measured them."""
    base = tmp_path / "base"
    rc, first = run(qq, base, "--task-sparsities", "none")
    assert rc == 0
    parts = {}
    for label in ("bf16", "int8"):
        shutil.copytree(base, tmp_path / label)
        rc, parts[label] = run(qq, tmp_path / label, "--task-sparsities", "0.5", "--formats", label)
        assert rc == 0
    rc, merged = merge(qq, tmp_path / "merged", tmp_path / "bf16", tmp_path / "int8")
    assert rc == 0
    keys = [(r["weights"], r["method"], r["sparsity"]) for r in merged["results"]]
    assert sorted(keys) == sorted(rows(first))  # each setting once
    for key, r in rows(merged).items():
        assert r["ppl"] == rows(first)[key]["ppl"]
        measured = rows(parts[key[0]])[key]  # the copy resumed with this format's tasks
        assert r["tasks_avg"] is not None and r["tasks"] == measured["tasks"]
        assert r["measured_sparsity_tasks"] == measured["measured_sparsity_tasks"]
    md = (tmp_path / "merged" / "tiny-quant.md").read_text()
    assert merged["command"] in md and "--merge" in merged["command"]
    assert all(f"`{p['command']}`" in md for p in parts.values())  # each part's measuring command listed
    assert md.count(f"`{first['command']}`") == 1  # the run both copies share, once


def test_merge_refuses_a_setting_measured_differently(qq, tiny, tmp_path):
    for name in ("a", "b"):
        assert run(qq, tmp_path / name, "--task-sparsities", "none", "--formats", "bf16")[0] == 0
    path = tmp_path / "b" / "tiny-quant.json"
    data = json.loads(path.read_text())
    data["results"][-1]["ppl"] *= 1.01  # another measurement of the same setting
    path.write_text(json.dumps(data))
    rc, merged = merge(qq, tmp_path / "merged", tmp_path / "a", tmp_path / "b")
    assert rc == 2 and not merged


def test_merge_of_a_merged_json_resumed_apart_keeps_the_commands_it_was_merged_from(qq, tiny, tmp_path):
    """A merged JSON copied and resumed apart (tasks of one format per copy), then merged again: the report
    still lists the commands that measured the first merge's parts, not only the latest runs."""
    firsts = {}
    for label in ("bf16", "int8"):
        rc, firsts[label] = run(qq, tmp_path / label, "--task-sparsities", "none", "--formats", label)
        assert rc == 0
    assert merge(qq, tmp_path / "m1", tmp_path / "bf16", tmp_path / "int8")[0] == 0
    for label in ("bf16", "int8"):
        shutil.copytree(tmp_path / "m1", tmp_path / f"{label}-tasks")
        assert run(qq, tmp_path / f"{label}-tasks", "--task-sparsities", "0.5", "--formats", label)[0] == 0
    rc, merged = merge(qq, tmp_path / "m2", tmp_path / "bf16-tasks", tmp_path / "int8-tasks")
    assert rc == 0
    md = (tmp_path / "m2" / "tiny-quant.md").read_text()
    for first in firsts.values():  # the first parts' measuring commands, each once
        assert md.count(f"`{first['command']}`") == 1
        assert first["command"] in [r["command"] for r in merged["runs"]]


FISHER = ["--methods", "teal-fisher"]


def allocate_taking(qq, monkeypatch, seconds: float, perturb: bool = False) -> None:
    """``teal.allocate`` as it is, its table recording ``seconds`` of wall time (another run's clock); with
    ``perturb``, one projection's level also moved (another table)."""
    real = qq.teal.allocate

    def allocate(model, th, method, **kw):
        out = real(model, th, method, **kw)
        th.allocations[method]["seconds"] = seconds
        if perturb:
            levels = next(iter(th.allocations[method]["sparsities"].values()))
            levels[-1] = levels[-1] * 0.5 + 0.01
        return out

    monkeypatch.setattr(qq.teal, "allocate", allocate)


def test_resume_with_the_allocation_recomputed_accepts_the_same_table(qq, tiny, tmp_path, monkeypatch):
    """The thresholds artifacts lost (another checkout): recalibrated and reallocated on the same text they are
    the same thresholds, only the allocation's wall time differs; the tasks are added. Another table is refused."""
    allocate_taking(qq, monkeypatch, 12.34)
    assert run(qq, tmp_path, "--task-sparsities", "none", "--formats", "bf16", *FISHER)[0] == 0
    shutil.rmtree(tmp_path / "artifacts")
    allocate_taking(qq, monkeypatch, 56.78)
    rc, data = run(qq, tmp_path, "--task-sparsities", "0.5", "--formats", "bf16", *FISHER)
    assert rc == 0 and rows(data)[("bf16", "teal-fisher", 0.5)]["tasks_avg"] is not None
    shutil.rmtree(tmp_path / "artifacts")
    allocate_taking(qq, monkeypatch, 12.34, perturb=True)
    rc, _ = run(qq, tmp_path, "--task-sparsities", "0.25,0.5", "--sparsities", "0.25,0.5", "--formats", "bf16",
                *FISHER)
    assert rc == 2


def test_resume_accepts_a_fingerprint_recorded_with_the_allocation_time(qq, tiny, tmp_path, monkeypatch):
    """The reports' JSONs recorded the allocation tables' fingerprints with their wall time (``seconds``)
    hashed in: a recomputed table that matches one at some time is the same table, and its recorded
    fingerprint is kept (parts of one report must agree on it)."""
    allocate_taking(qq, monkeypatch, 89.32)
    assert run(qq, tmp_path, "--task-sparsities", "none", "--formats", "bf16", *FISHER)[0] == 0
    th = qq.teal.Thresholds.load(tmp_path / "artifacts" / "tiny-bf16")
    legacy = qq.hashlib.sha256(qq.json.dumps(th.allocations["fisher"], sort_keys=True,
                                             default=str).encode()).hexdigest()[:16]
    path = tmp_path / "tiny-quant.json"
    data = json.loads(path.read_text())
    data["format_info"]["bf16"]["artifact"]["fisher"] = legacy
    path.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "artifacts")
    allocate_taking(qq, monkeypatch, 3.0)
    rc, data = run(qq, tmp_path, "--task-sparsities", "0.5", "--formats", "bf16", *FISHER)
    assert rc == 0 and data["format_info"]["bf16"]["artifact"]["fisher"] == legacy
    data["format_info"]["bf16"]["artifact"]["fisher"] = legacy[::-1]  # another table
    path.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "artifacts")
    rc, _ = run(qq, tmp_path, "--task-sparsities", "0.25,0.5", "--sparsities", "0.25,0.5", "--formats", "bf16",
                *FISHER)
    assert rc == 2


def test_interaction_at_equal_measured_sparsity(qq):
    """The interaction is taken where both formats measure the same sparsity: the quantized rows measure
    more zeros than bf16's at the same nominal level, so the nominal pairing would show compounding that the
    equal-measured comparison does not have."""
    def r(w, method, s, ms, ppl, tasks=None):
        return {"weights": w, "method": method, "sparsity": s, "measured_sparsity": ms,
                "measured_sparsity_lambada": ms, "ppl": ppl, "ppl_lambada": 2 * ppl, "tasks_avg": tasks,
                "measured_sparsity_tasks": ms}

    # PPL doubles per 0.5 of measured sparsity in both; int8 is 1.5x bf16 everywhere (independent errors)
    res = [r("bf16", "dense", 0.0, 0.0, 10.0, 0.5), r("bf16", "teal-uniform", 0.5, 0.40, 10.0 * 2 ** 0.8, 0.4),
           r("bf16", "teal-uniform", 0.55, 0.60, 10.0 * 2 ** 1.2, 0.3),
           r("int8", "dense", 0.0, 0.0, 15.0, 0.45), r("int8", "teal-uniform", 0.5, 0.45, 15.0 * 2 ** 0.9, 0.325),
           r("int8", "teal-uniform", 0.55, 0.60, 15.0 * 2 ** 1.2, 0.25)]
    data = {"formats": ["bf16", "int8"], "methods": ["teal-uniform"], "results": res}
    at = {c["measured"]: c for c in qq.compounding_at_measured(data)}
    assert at[0.5]["ppl"] == pytest.approx(1.0) and at[0.5]["ppl_lambada"] == pytest.approx(1.0)
    # tasks: bf16 0.35 at 0.5 measured, int8 0.30 (both linear between their rows); dense difference -0.05
    assert at[0.5]["tasks_diff"] == pytest.approx(-0.05) and at[0.5]["tasks_diff_dense"] == pytest.approx(-0.05)
    assert at[0.25]["ppl"] is None and at[0.25]["tasks_diff"] is None  # brackets 0 - 0.40 / 0.45: too wide
    md = qq.markdown({**data, "model": "tiny", "command": "x", "tasks": [], "format_info": {}})
    assert "| int8 | teal-uniform | 0.50 | 1.000 | 1.000 | -0.050 (-0.050) |" in md
