"""Comparable evaluation, offline: WikiText-2 with the TEAL paper's windows (a local copy of the file) and
lm-eval's harness on a model sparsified in place (a tiny local task in lm-eval's own YAML format)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import teal
from teal.data import DataSourceError, documents, wikitext2_text
from teal.eval.perplexity import wikitext2_perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory):
    """A stand-in for wiki.test.raw: WikiText-style rows (headings, paragraphs, empty lines)."""
    rows = []
    for i, doc in enumerate(documents("sotu")[:2]):
        rows += ["", f" = Address {i} = ", ""]
        rows += [" " + p.strip() for p in doc.split("\n") if p.strip()][:6]
    path = tmp_path_factory.mktemp("wt2") / "wiki.test.raw"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_wikitext2_text_joins_rows_with_blank_lines(wiki_file):
    rows = wiki_file.read_text().splitlines(keepends=True)
    assert wikitext2_text(f"wikitext2:{wiki_file}") == "".join(r + "\n\n" for r in rows)
    with pytest.raises(DataSourceError, match="no such file"):
        wikitext2_text("wikitext2:/nonexistent/wiki.test.raw")


def test_wikitext2_offline_without_a_path_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataSourceError) as err:
        wikitext2_text("wikitext2")
    assert "wikitext2:PATH" in str(err.value) and "\n" not in str(err.value)


def _paper_loop(model, ids, context, stride):
    """The paper's evaluation loop, restated: HF's loss with every target but the last `stride` masked."""
    total = ids.numel() - ids.numel() % stride
    nlls = []
    for begin in range(0, total, stride):
        end = begin + context + stride
        x = ids[None, begin:end]
        labels = x.clone()
        labels[:, :-stride] = -100
        with torch.no_grad():
            nlls.append(model(x, labels=labels).loss)
        if end >= total:
            break
    return math.exp(torch.stack(nlls).double().mean())


def test_wikitext2_windows_match_the_paper_loop(smollm2, wiki_file):
    model, tok = smollm2
    ids = torch.tensor(tok(wikitext2_text(f"wikitext2:{wiki_file}"))["input_ids"])
    context, stride = 48, 16
    assert ids.numel() > 4 * (context + stride)
    got = wikitext2_perplexity(model, tok, f"wikitext2:{wiki_file}", seq_len=context + stride, stride=stride,
                               progress=False)
    want = _paper_loop(model, ids, context, stride)
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["tokens_scored"] % stride == 0 and got["tokens_scored"] >= ids.numel() - context - 2 * stride


def test_cli_eval_ppl_wikitext2(smollm2, smollm2_thresholds, wiki_file, tmp_path):
    from teal.cli import app

    art = smollm2_thresholds.save(tmp_path / "th")
    out = tmp_path / "ppl.json"
    res = CliRunner().invoke(app, ["eval", "ppl", "smollm2-135m", str(art), "--data", f"wikitext2:{wiki_file}",
                                   "--sparsity", "0,0.5", "--seq-len", "64", "--stride", "16", "--tokens", "0",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = json.loads(out.read_text())["results"]
    assert [r["sparsity"] for r in rows] == [0, 0.5]
    assert "TEAL paper" in rows[0]["protocol"] and rows[0]["stride"] == 16
    assert rows[1]["ppl"] > rows[0]["ppl"] and 0.35 < rows[1]["measured_sparsity"] < 0.65


TASK_YAML = """task: teal_tiny_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo")]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    with (d / "data.jsonl").open("w") as f:
        for i, (country, city) in enumerate(CAPITALS):
            wrong = CAPITALS[(i + 1) % len(CAPITALS)][1]
            choices = [city, wrong] if i % 2 == 0 else [wrong, city]
            f.write(json.dumps({"question": f"What is the capital of {country}?", "choices": choices,
                                "label": 0 if i % 2 == 0 else 1}) + "\n")
    (d / "teal_tiny_capitals.yaml").write_text(TASK_YAML.format(data=d / "data.jsonl"))
    return d


def _direct_accuracy(model, tok, path):
    """The same task scored by hand: the choice (after lm-eval's target delimiter, a space) with the higher
    log-likelihood after the prompt, the continuation's tokens cut from the whole text's as lm-eval does."""
    correct = 0
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tok(context)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].float(), -1)
            scores.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_lm_eval_harness_on_the_sparsified_model(smollm2, smollm2_thresholds, tiny_task):
    from teal.eval.harness import lm_eval_tasks

    model, tok = smollm2
    dense = lm_eval_tasks(model, tok, ["teal_tiny_capitals"], include_path=tiny_task)
    assert dense["tasks"]["teal_tiny_capitals"]["score"] == pytest.approx(
        _direct_accuracy(model, tok, tiny_task / "data.jsonl"))
    assert dense["measured_sparsity"] == 0.0
    teal.sparsify_(model, smollm2_thresholds, 0.5)
    try:
        sparse = lm_eval_tasks(model, tok, ["teal_tiny_capitals"], include_path=tiny_task)
        assert 0.35 < sparse["measured_sparsity"] < 0.65  # lm-eval ran the sparsified model
        assert sparse["tasks"]["teal_tiny_capitals"]["score"] == pytest.approx(
            _direct_accuracy(model, tok, tiny_task / "data.jsonl"))
    finally:
        teal.densify_(model)


def test_cli_eval_tasks_through_lm_eval(smollm2, smollm2_thresholds, tiny_task, tmp_path):
    """`teal eval tasks --harness lm-eval`: lm-eval's own task definition (a local YAML here) on the model
    sparsified by the CLI, scored as by hand at 0, and at 0.5 on a model measured at about 0.5."""
    from teal.cli import app

    model, tok = smollm2
    art = smollm2_thresholds.save(tmp_path / "th")
    out = tmp_path / "tasks.json"
    res = CliRunner().invoke(app, ["eval", "tasks", "smollm2-135m", str(art), "--sparsity", "0,0.5",
                                   "--harness", "lm-eval", "--tasks", "teal_tiny_capitals",
                                   "--include-path", str(tiny_task), "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    saved = json.loads(out.read_text())
    rows = saved["results"]
    assert saved["data"] == "lm-eval" and [r["sparsity"] for r in rows] == [0, 0.5]
    assert rows[0]["tasks"]["teal_tiny_capitals"]["score"] == pytest.approx(
        _direct_accuracy(model, tok, tiny_task / "data.jsonl"))
    assert rows[0]["measured_sparsity"] == 0.0 and 0.35 < rows[1]["measured_sparsity"] < 0.65
    bad = CliRunner().invoke(app, ["eval", "tasks", "--harness", "lm_eval"])
    assert bad.exit_code == 2 and "lm-eval" in bad.output  # the choices are listed


def test_lm_eval_offline_data_is_one_clear_line(monkeypatch):
    import datasets
    import huggingface_hub

    from teal.eval.harness import HarnessError, load_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HarnessError) as err:
        load_tasks(["arc_easy"])
    assert "offline" in str(err.value) and "teal eval tasks" in str(err.value)
    with pytest.raises(HarnessError, match="no task 'not_a_task'"):
        load_tasks(["not_a_task"])
