"""Conversations: the tokenizer's chat template, generation streamed piece by piece on HF ``generate``
or teal's engine, and the turn loop behind ``teal chat``.

Each reply reports its decode speed (tokens per second after the first token) and the *measured* decode
sparsity: on HF, the zeros counted by the TealLinear modules during the reply's decode steps (the prompt
runs dense, ``prefill="dense"``); on the engine, the zeros of the same reply's first decode steps re-run
eagerly with an observer (``teal.engine.reference.decode_sparsity``; greedy, so for a sampled reply an
estimate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Emit = Callable[[str], None]
ENGINE_SPARSITY_STEPS = 32  # decode steps re-run to measure an engine reply's sparsity


@dataclass
class Reply:
    text: str
    new_tokens: int
    seconds: float
    tokens_per_s: float  # decode steps (new_tokens - 1) per second after the first token
    measured_sparsity: float


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]] | str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: the chat template applied to ``messages`` (a string is one user turn) when
    ``chat_template`` and the tokenizer has one, else the raw text (a conversation's turns joined by lines)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


def _hf_streamer(tokenizer: Any, emit: Emit):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """transformers' TextStreamer (word-boundary buffering), its text handed to ``emit``; notes the time of
        the first new token."""

        first_token_at: float | None = None

        def put(self, value):
            if not self.next_tokens_are_prompt and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def hf_reply(model, tokenizer, ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, emit: Emit | None = None) -> Reply:
    """HF ``generate`` on ``ids``, streamed through ``emit``; sparsity from the TealLinear counters."""
    from transformers import set_seed

    from teal.sparsify import measured_sparsity, reset_counters

    if seed is not None:
        set_seed(seed)
    device = next(model.parameters()).device
    streamer = _hf_streamer(tokenizer, emit or (lambda _text: None))
    reset_counters(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                             device=device), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=top_p if temperature > 0 else None, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    end = time.perf_counter()
    new = out[0, len(ids):]
    first = streamer.first_token_at or end
    steps = max(0, int(new.numel()) - 1)
    return Reply(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), end - t0,
                 steps / (end - first) if steps and end > first else 0.0, float(measured_sparsity(model)))


def engine_reply(gen, ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, emit: Emit | None = None, thresholds: Any = None,
                 method: str | None = None) -> Reply:
    """teal's engine on ``ids``, streamed through ``emit`` as each token arrives. ``thresholds`` (the artifact the
    generator was built with) lets the reply's decode sparsity be measured."""
    from teal.engine.generator import TextStream

    stream = TextStream(gen.tokenizer, emit or (lambda _text: None))
    t0 = time.perf_counter()
    res = gen.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stream=stream,
                       seed=seed)
    seconds = time.perf_counter() - t0
    measured = 0.0
    steps = min(len(res.tokens) - 1, ENGINE_SPARSITY_STEPS)
    if gen.sparsity > 0 and thresholds is not None and steps > 0:
        from teal.engine.generator import resolve_thresholds
        from teal.engine.reference import decode_sparsity

        values, scales = resolve_thresholds(thresholds, gen.sparsity, gen.engine, method)
        measured, _ = decode_sparsity(gen.engine, torch.tensor(ids), steps, values, scales)
    return Reply(res.text or "", len(res.tokens), seconds, res.tokens_per_s, measured)


@dataclass
class Chat:
    """A conversation on one backend: ``reply(user_text)`` adds the user turn and the model's answer."""

    generate: Callable[[list[int], Emit | None], Reply]
    tokenizer: Any
    chat_template: bool = True
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, emit: Emit | None = None) -> Reply:
        self.messages.append({"role": "user", "content": text})
        try:
            out = self.generate(prompt_ids(self.tokenizer, self.messages, self.chat_template), emit)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": out.text.strip()})
        return out


def format_stats(reply: Reply, sparsity: float) -> str:
    text = f"[{reply.new_tokens} tokens, {reply.tokens_per_s:.1f} tok/s"
    if sparsity > 0:
        text += f", measured decode sparsity {reply.measured_sparsity:.3f} (setting {sparsity:g})"
    return text + "]"
