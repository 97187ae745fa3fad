"""Chat template, streaming and the multi-turn chat loop on the real SmolLM2 (CPU)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

import teal
from teal.chat import Chat, engine_reply, hf_reply, prompt_ids
from teal.cli import app

QUESTION = "What is the capital of France?"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(smollm2_thresholds, tmp_path_factory):
    return smollm2_thresholds.save(tmp_path_factory.mktemp("chat") / "th")


def _run(args, stdin=None):
    res = CliRunner().invoke(app, args, input=stdin)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_generate_applies_the_chat_template(smollm2):
    templated = _run(["generate", "--prompt", QUESTION, "--max-new-tokens", "16"])
    assert "Paris" in templated
    raw = _run(["generate", "--prompt", QUESTION, "--max-new-tokens", "16", "--no-chat-template"])
    assert "Paris" not in raw  # the raw prompt gets no answer from the instruct model
    assert templated.splitlines()[-2:] != raw.splitlines()[-2:]


def test_prompt_ids_use_the_template(smollm2):
    _, tok = smollm2
    ids = prompt_ids(tok, QUESTION)
    text = tok.decode(ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert prompt_ids(tok, QUESTION, chat_template=False) == list(tok(QUESTION)["input_ids"])


def test_streams_pieces_on_hf_and_engine(smollm2):
    from teal.engine import Generator

    model, tok = smollm2
    ids = prompt_ids(tok, QUESTION)
    hf_pieces: list[str] = []
    hf = hf_reply(model, tok, ids, max_new_tokens=12, emit=hf_pieces.append)
    gen = Generator.from_pretrained(model, tokenizer=tok, device="cpu")
    engine_pieces: list[str] = []
    eng = engine_reply(gen, ids, max_new_tokens=12, emit=engine_pieces.append)
    assert len(hf_pieces) > 1 and len(engine_pieces) > 1  # streamed, not printed once at the end
    assert "".join(hf_pieces).strip() == hf.text.strip() and "Paris" in hf.text
    assert "".join(engine_pieces) == eng.text
    assert eng.text.strip() == hf.text.strip()  # greedy, dense: the engine gives HF's answer


def test_seed_makes_sampling_repeatable(smollm2):
    model, tok = smollm2
    ids = prompt_ids(tok, "Tell me a story.")
    a = hf_reply(model, tok, ids, max_new_tokens=6, temperature=1.0, seed=3)
    b = hf_reply(model, tok, ids, max_new_tokens=6, temperature=1.0, seed=3)
    c = hf_reply(model, tok, ids, max_new_tokens=6, temperature=1.0, seed=4)
    assert a.text == b.text and a.text != c.text


def test_chat_two_turns_from_stdin(smollm2, artifact):
    out = _run(["chat", "smollm2-135m", str(artifact), "--sparsity", "0.5", "--max-new-tokens", "12"],
               stdin=f"{QUESTION}\nAnd what is the capital of Italy?\n")
    stats = re.findall(r"\[(\d+) tokens, ([\d.]+) tok/s, measured decode sparsity ([\d.]+)", out)
    assert len(stats) == 2, out
    for _n, tps, measured in stats:
        assert float(tps) > 0 and 0.35 < float(measured) < 0.65, out


def test_chat_keeps_the_history(smollm2):
    model, tok = smollm2
    seen = []

    def respond(ids, emit):
        seen.append(tok.decode(ids))
        return hf_reply(model, tok, ids, max_new_tokens=8, emit=emit)

    chat = Chat(respond, tok)
    chat.reply(QUESTION)
    chat.reply("And of Italy?")
    assert QUESTION in seen[1] and "Paris" in seen[1] and seen[1].count("<|im_start|>user") == 2
    chat.reset()
    assert chat.messages == []


def test_engine_reply_reports_measured_decode_sparsity(smollm2, smollm2_thresholds):
    from teal.engine import Generator

    model, tok = smollm2
    gen = Generator.from_pretrained(model, thresholds=smollm2_thresholds, sparsity=0.5, tokenizer=tok, device="cpu")
    reply = engine_reply(gen, prompt_ids(tok, QUESTION), max_new_tokens=8, thresholds=smollm2_thresholds)
    assert reply.new_tokens >= 2 and reply.tokens_per_s > 0
    assert 0.35 < reply.measured_sparsity < 0.65
