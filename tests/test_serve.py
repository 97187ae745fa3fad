"""`teal serve` (teal/serve.py) against a live server on a free loopback port, and the engine's token stream
(`Generator.stream`) it is built on."""

from __future__ import annotations

import pytest

from teal.engine import Generator


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
