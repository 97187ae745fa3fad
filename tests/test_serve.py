"""`teal serve` (teal/serve.py) against a live server on a free loopback port, and the engine's token stream
(`Generator.stream`) it is built on."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch

from teal.engine import Generator

ROOT = Path(__file__).resolve().parents[1]


# ---- the engine's token stream -----------------------------------------------------------------
def test_generator_stream_gives_generate_tokens_and_stops_after_any_step():
    gen = Generator.from_pretrained("tiny-llama", max_seq_len=64)
    ids = [5, 17, 3, 99, 42, 7]
    full = gen.generate(ids, max_new_tokens=10, stop=[])
    assert len(full.tokens) == 10 and full.finish_reason == "length"

    stream = gen.stream(ids, max_new_tokens=10, stop=[])
    got = []
    for token in stream:
        got.append(token)
        if len(got) == 4:
            break
    stream.close()
    assert got == full.tokens[:4]
    assert stream.result.tokens == got and stream.result.finish_reason == "cancelled"
    assert list(stream) == []  # closed: nothing more comes

    exhausted = gen.stream(ids, max_new_tokens=10, stop=[])
    assert list(exhausted) == full.tokens and exhausted.result.finish_reason == "length"
    assert exhausted.result.prompt_tokens == len(ids) and exhausted.result.tokens_per_s > 0

    # a stop token ends the stream after handing it out
    stopped = gen.stream(ids, max_new_tokens=10, stop=[full.tokens[2]])
    assert list(stopped) == full.tokens[: full.tokens.index(full.tokens[2]) + 1]
    assert stopped.result.finish_reason == "stop"

    # starting a stream closes the live one (they share the decode state)
    first = gen.stream(ids, max_new_tokens=10, stop=[])
    assert next(first) == full.tokens[0]
    second = gen.stream(ids, max_new_tokens=10, stop=[])
    assert first.result is not None and first.result.finish_reason == "cancelled"
    assert list(second) == full.tokens

    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        gen.stream(ids, max_new_tokens=0)  # checked when the stream is made, before any step
    with pytest.raises(ValueError, match="exceeds the static KV cache"):
        gen.stream(ids, max_new_tokens=60)


# ---- pieces of the server, without HTTP -----------------------------------------------------------
class Chars:
    """A toy tokenizer: token t is chr(t); 0 is a lone UTF-8 lead byte (decodes to U+FFFD until its pair)."""

    def decode(self, ids, skip_special_tokens=True):
        text = "".join("\ufffd" if t == 0 else chr(t) for t in ids)
        return text.replace("\ufffd\ufffd", "é")


def test_text_pieces_hold_back_what_may_start_a_stop_string():
    from teal.serve import TextPieces

    def run(text: str, stop: list[str]) -> tuple[list[str], bool, str]:
        pieces = TextPieces(Chars(), stop, threading.Lock())
        out, hit = [], False
        for ch in text:
            piece, hit = pieces.add(ord(ch))
            out.append(piece)
            if hit:
                break
        return out, hit, "" if hit else pieces.flush()

    assert run("abcENDxyz", ["END"]) == (["a", "b", "c", "", "", ""], True, "")
    assert run("aEND", ["NDX", "END"]) == (["a", "", "", ""], True, "")
    out, hit, tail = run("abENx", ["END"])  # "EN" waits, then goes out with the x
    assert out == ["a", "b", "", "", "ENx"] and not hit and tail == ""
    out, hit, tail = run("abEN", ["END"])  # the text ends inside a possible stop string: flushed at the end
    assert "".join(out) + tail == "abEN" and not hit
    # a piece that ends inside a multi-byte character waits for the rest of it
    pieces = TextPieces(Chars(), [], threading.Lock())
    assert [pieces.add(t) for t in (97, 0, 0, 98)] == [("a", False), ("", False), ("é", False), ("b", False)]
    # no tokenizer: each token is "[id]"
    assert TextPieces(None, [], threading.Lock()).add(42) == ("[42]", False)


def sparse_tiny_generator() -> tuple[Generator, dict[str, float], list[int]]:
    """The tiny random Llama shape at 50 % sparsity (thresholds: quantiles of a random prompt's inputs)."""
    from teal.engine.reference import activation_thresholds

    gen = Generator.from_pretrained("tiny-llama", max_seq_len=64, device="cpu", dtype=torch.float32)
    gen.engine.to_layout(transposed=True)
    vocab = gen.engine.config.vocab_size
    calib = torch.randint(0, vocab, (48,), generator=torch.Generator().manual_seed(3))
    thresholds = activation_thresholds(gen.engine, calib, 0.5)
    gen.set_sparsity(0.5, thresholds)
    return gen, thresholds, [int(t) for t in torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(4))]


def test_probe_measures_the_decode_sparsity_of_the_request():
    from teal.engine.reference import decode_sparsity
    from teal.serve import probe_decode_sparsity

    gen, thresholds, ids = sparse_tiny_generator()
    out = gen.generate(ids, max_new_tokens=6, stop=[])
    measured, steps = probe_decode_sparsity(gen.engine, len(ids), out.tokens, steps=10)
    assert steps == 5  # 6 tokens: 5 decode steps fed tokens 0..4
    expected, _ = decode_sparsity(gen.engine, torch.tensor(ids), 5, thresholds)  # the same greedy steps, eager
    assert measured == pytest.approx(expected, abs=1e-6) and 0.2 < measured < 0.8
    some, n = probe_decode_sparsity(gen.engine, len(ids), out.tokens, steps=2)  # first and last step only
    assert n == 2 and 0.0 < some < 1.0
    gen.set_sparsity(0.0)  # dense products (the old thresholds stay in the engine, unused)
    assert probe_decode_sparsity(gen.engine, len(ids), out.tokens, steps=3)[0] == 0.0
    gen.set_sparsity(0.5, {k: -1.0 for k in thresholds})  # on the kernel, thresholds below every score
    assert probe_decode_sparsity(gen.engine, len(ids), out.tokens, steps=3)[0] == 0.0


def test_in_process_server_on_a_random_shape_without_tokenizer():
    """What the GPU load test serves: a random-weight shape, prompts as token ids, text as "[id]" pieces."""
    import uvicorn

    from teal.engine.reference import decode_sparsity
    from teal.serve import ServedModel, create_app

    gen, thresholds, ids = sparse_tiny_generator()
    ref = gen.generate(ids, max_new_tokens=5, stop=[])
    served = ServedModel(gen, "tiny-llama", sparsity=0.5, probe_steps=4)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, None, None, 60)
        body = {"model": "tiny-llama", "prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert out["choices"][0]["text"] == "".join(f"[{t}]" for t in ref.tokens)
        teal = out["teal"]
        expected, _ = decode_sparsity(gen.engine, torch.tensor(ids), 4, thresholds)  # steps 0..3, all probed
        assert teal["decode_sparsity_steps"] == 4 and teal["decode_sparsity"] == pytest.approx(expected, abs=1e-4)
        assert teal["sparsity_setting"] == 0.5 and teal["decode_tokens_per_s"] > 0
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert [e["choices"][0]["text"] for e in events[:-1]] == [f"[{t}]" for t in ref.tokens]  # one per token
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
        text = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "hi"}, timeout=60)
        assert text.status_code == 400 and "no tokenizer" in text.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---- a live server: `teal serve smollm2-135m` on a free loopback port ----------------------------
MODEL = "smollm2-135m"
KEY = "test-key-123"
SERVER_START_S = 600  # bounded wait for the model load (a loaded 2-core CI machine)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, log_path: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`teal serve smollm2-135m --api-key KEY` in its own process (default KV cache, as `teal generate`)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "teal.cli", "serve", MODEL, "--port", str(port),
                                 "--api-key", KEY], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, SERVER_START_S)
        yield SimpleNamespace(url=url, proc=proc, log=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def reference(smollm2):
    """What `teal generate --engine` runs: the engine built from the same model, eager on the CPU, greedy."""
    model, tok = smollm2
    return Generator.from_pretrained(model, tokenizer=tok, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=300, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def post(server, path: str, body: Any, **kw) -> httpx.Response:
    headers = {**auth(), **kw.pop("headers", {})}
    kw.setdefault("timeout", 300)
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json", **headers},
                          **kw)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, **kw)


def templated_ids(tok, messages) -> list[int]:
    """The chat template through the tokenizer's own tokenizing path (the server renders, then encodes)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]
slow = pytest.mark.slow  # the real SmolLM2-135M, served by its own process


@slow
def test_health_and_models(server, client):
    health = httpx.get(f"{server.url}/health", timeout=10)  # open without the key (load balancers)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


@slow
def test_chat_greedy_applies_the_template_and_matches_the_engine(server, client, reference, smollm2_tokenizer):
    ids = templated_ids(smollm2_tokenizer, CHAT)
    assert smollm2_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    ref = reference.generate(ids, max_new_tokens=8, temperature=0.0)
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == MODEL
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ids)  # the template's tokens, not the bare question's
    assert out.usage.completion_tokens == len(ref.tokens)
    assert out.usage.total_tokens == len(ids) + len(ref.tokens)
    assert out.choices[0].finish_reason == {"stop": "stop", "length": "length"}[ref.finish_reason]
    teal = out.model_extra["teal"]
    assert teal["decode_tokens_per_s"] > 0 and teal["decode_sparsity"] == 0.0 and teal["sparsity_setting"] == 0.0
    # max_completion_tokens is max_tokens' newer name
    short = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == min(3, len(ref.tokens))
    assert ref.text.startswith(short.choices[0].message.content)


@slow
def test_completion_greedy_matches_teal_generate(server, client, reference):
    prompt = "The history of the United States"  # `teal generate`'s default prompt, no chat template
    ref = reference.generate(prompt, max_new_tokens=6, temperature=0.0)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == ref.text
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == len(ref.tokens)
    assert out.choices[0].finish_reason == "length"
    # a prompt of token ids gives the same tokens
    ids = reference.tokenizer(prompt)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == ref.text


@slow
def test_streaming_with_the_openai_client(server, client, reference, smollm2_tokenizer):
    ref = reference.generate(templated_ids(smollm2_tokenizer, CHAT), max_new_tokens=8, temperature=0.0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == ref.text
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 2  # it did stream, piece by piece
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and last.usage.completion_tokens == len(ref.tokens)
    assert last.model_extra["teal"]["decode_tokens_per_s"] > 0
    # include_usage: the finish chunk, then a usage chunk without choices (the OpenAI shape)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == min(3, len(ref.tokens))
    assert chunks[-2].choices[0].finish_reason is not None
    # legacy completions stream; the raw events end with [DONE]
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=auth(), timeout=300,
                      json={"model": MODEL, "prompt": "The history of", "max_tokens": 3, "temperature": 0,
                            "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    ref_short = reference.generate("The history of", max_new_tokens=3, temperature=0.0)
    assert "".join(p["choices"][0]["text"] for p in payloads) == ref_short.text
    assert payloads[-1]["usage"]["completion_tokens"] == len(ref_short.tokens)


@slow
def test_stop_strings_cut_the_text_streaming_or_not(server, client, reference):
    prompt = "The history of the United States"
    ref = reference.generate(prompt, max_new_tokens=8, temperature=0.0, stop=[])
    words = ref.text.split()
    stop = words[len(words) // 2]  # a word from the middle: the text ends just before it
    cut = ref.text[: ref.text.index(stop)]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 8
    pieces = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces) == cut


@slow
def test_seeded_sampling_repeats(server, client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0.9, top_p=0.9, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens >= 1


@slow
def test_16_concurrent_clients_get_complete_answers(server, reference):
    prompts = ["The history of", "Paris is", "In 1905, Einstein", "Water boils at"]
    refs = {p: reference.generate(p, max_new_tokens=3, temperature=0.0) for p in prompts}
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=600, max_retries=0)

    async def one(i: int) -> tuple[str, str, int, str]:
        prompt = prompts[i % len(prompts)]
        if i % 2:  # half stream
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                                      stream=True)
            text, usage, finish = "", None, None
            async for c in stream:
                text += c.choices[0].text
                finish = c.choices[0].finish_reason or finish
                usage = c.usage or usage
            return prompt, text, usage.completion_tokens, finish
        out = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
        return prompt, out.choices[0].text, out.usage.completion_tokens, out.choices[0].finish_reason

    async def everyone():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), timeout=900)
        finally:
            await aclient.close()

    results = asyncio.run(everyone())
    assert len(results) == 16
    for prompt, text, n_tokens, finish in results:
        assert text == refs[prompt].text and n_tokens == len(refs[prompt].tokens), prompt
        assert finish == ("stop" if refs[prompt].finish_reason == "stop" else "length")
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["waiting"] == 0 and server.proc.poll() is None


@slow
def test_requests_are_served_in_arrival_order(server):
    """One long request holds the engine; three more arrive one by one (each sent once the server counts the
    one before it as waiting) and must finish in that order."""
    done: list[int] = []

    async def waiting_reaches(n: int, client: httpx.AsyncClient) -> None:
        for _ in range(600):
            if (await client.get(f"{server.url}/health")).json()["waiting"] >= n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the server never had {n} requests waiting")

    async def ask(i: int, client: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "prompt": f"Number {i} is", "max_tokens": 40 if i == 0 else 2, "temperature": 0,
                "ignore_eos": True}
        resp = await client.post(f"{server.url}/v1/completions", json=body, headers=auth())
        assert resp.status_code == 200
        done.append(i)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(ask(0, client))]
            for _ in range(600):  # the first one is on the engine
                if (await client.get(f"{server.url}/health")).json()["busy"]:
                    break
                await asyncio.sleep(0.05)
            for i in (1, 2, 3):
                tasks.append(asyncio.create_task(ask(i, client)))
                await waiting_reaches(i, client)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)

    asyncio.run(run())
    assert done == [0, 1, 2, 3]


@slow
def test_a_client_gone_mid_stream_frees_the_engine(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}  # ~100 s of CPU decode if nobody stopped it
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(), timeout=300) as resp:
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                got += 1
                if got == 2:
                    break
    # the connection is closed: the engine stops within a step and serves the next request at once
    start = time.monotonic()
    out = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0},
               timeout=30)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - start < 30
    assert httpx.get(f"{server.url}/health", timeout=10).json()["busy"] is False
    # a client that gives up on a non-streaming request: the handler notices within its poll and stops the engine
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {**body, "stream": False}, timeout=3)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/health", timeout=10).json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/health", timeout=10).json()["busy"] is False


@slow
@pytest.mark.parametrize("body, status, param, needle", [
    (b'{"model": "smollm2-135m", "messages": [', 400, None, "not valid JSON"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ({"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"model": MODEL, "messages": CHAT, "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages", "valid list"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "Input should be"),
    ({"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    ({"model": MODEL}, 400, "messages", "Field required"),
    ({"model": MODEL, "messages": CHAT, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": MODEL, "messages": CHAT, "n": 2}, 400, "n", "not supported"),
    ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ({"model": "gpt-4o", "messages": CHAT}, 404, "model", "'gpt-4o' does not exist"),
])
@slow
def test_bad_chat_requests_get_openai_errors(server, body, status, param, needle):
    resp = post(server, "/v1/chat/completions", body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and needle in err["message"], err


@slow
def test_request_over_the_kv_cache_gets_400_with_the_numbers(server, client, smollm2_tokenizer):
    n_prompt = len(templated_ids(smollm2_tokenizer, CHAT))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5000)
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert f"{n_prompt} prompt tokens + 5000 max_tokens = {n_prompt + 5000} tokens" in err["message"]
    assert "KV cache holds 4096" in err["message"] and f"lower max_tokens to {4096 - n_prompt}" in err["message"]
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": [999999], "max_tokens": 2})
    assert resp.status_code == 400 and "outside the vocabulary" in resp.json()["error"]["message"]


@slow
def test_api_key(server):
    for headers, needle in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "incorrect API key"),
                            ({"Authorization": KEY}, "incorrect API key")):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            resp = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30,
                                 json={"model": MODEL, "prompt": "x", "messages": CHAT})
            assert resp.status_code == 401 and needle in resp.json()["error"]["message"], (path, headers)
            assert resp.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@slow
def test_unknown_route_and_server_still_up_after_errors(server, client):
    resp = httpx.get(f"{server.url}/v1/nothing", headers=auth(), timeout=10)
    assert resp.status_code == 404 and "error" in resp.json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert server.proc.poll() is None
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0)
    assert out.usage.completion_tokens == 1
