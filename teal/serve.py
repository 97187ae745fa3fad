"""`teal serve`: an OpenAI-compatible HTTP server on teal's engine (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. The engine decodes
one sequence at a time: one engine thread takes the requests in arrival order (FIFO), and hands each new
token's text to the request's handler as soon as it is on the host, so a client that goes away frees the
engine within one decode step. Bad requests get a 4xx in the OpenAI error shape before they are queued.

    app = create_app(ServedModel(Generator.from_pretrained("smollm2-135m"), "smollm2-135m"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Each response carries a ``teal`` object: the decode tokens/s of the request as the engine timed it, the time
it waited in the queue, and its measured decode sparsity (`probe_decode_sparsity`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from teal.engine.generator import Generator
from teal.engine.model import GROUP_SITE, GROUPS, Engine

log = logging.getLogger(__name__)

DEFAULT_PROBE_STEPS = 4  # decode steps of each request replayed to measure its sparsity
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


# ---- errors in the OpenAI shape -----------------------------------------------------------------
class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts[:5]), param


# ---- request bodies -----------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "5" is not an integer, 1 is not a boolean; fields we do not know are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # as vLLM: generate max_tokens tokens whatever the model's end-of-text token says
    # accepted at their neutral value only (anything else: a 400 saying it is not supported)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# field: the values that mean "not used"
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0), "logit_bias": (None, {}),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1),
}


def _reject_unsupported(body: _Sampling) -> None:
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name, None)
        if value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported by teal serve (one sequence per request, "
                                "text only); leave it out", param=name, code="unsupported_parameter")
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.get("type") != "text":
        raise APIError(400, f"response_format {fmt.get('type')!r} is not supported; only 'text'",
                       param="response_format", code="unsupported_parameter")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")


# ---- the model being served ---------------------------------------------------------------------
@dataclass
class ServedModel:
    """A `Generator` and what the server says about it. sparsity / method: the setting it was built with
    (reported back); probe_steps: decode steps of each request replayed to measure its sparsity (0: off)."""

    generator: Generator
    name: str
    sparsity: float = 0.0
    method: str | None = None
    probe_steps: int = DEFAULT_PROBE_STEPS
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe across threads

    @property
    def max_seq_len(self) -> int:
        return self.generator.engine.max_seq_len

    @property
    def tokenizer(self) -> Any:
        return self.generator.tokenizer

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves {self.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt token ids: the tokenizer's chat template over the messages, with the assistant's turn
        opened (add_generation_prompt)."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, f"{self.name} has no chat template; use POST /v1/completions with a prompt",
                           param="messages")
        plain = []
        for m in messages:
            content = m.content if not isinstance(m.content, list) else "".join(p.text for p in m.content)
            plain.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        with self.tokenizer_lock:
            try:
                text = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # noqa: BLE001 - the template's own checks (roles, order) raise anything
                raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from err
            return list(tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str | list[int] | list[str]) -> list[int]:
        """The prompt token ids: text as `teal generate` encodes it (the tokenizer's own special tokens), or ids."""
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} texts; teal serve takes one per request",
                               param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, f"{self.name} has no tokenizer: give the prompt as a list of token ids",
                               param="prompt")
            with self.tokenizer_lock:
                ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
            vocab = self.generator.engine.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                               param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def budget(self, n_prompt: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
        """max_tokens, checked against the KV cache (default: all the room left)."""
        room = self.max_seq_len - n_prompt
        if max_tokens is None:
            if room < 1:
                raise APIError(400, f"the prompt is {n_prompt} tokens and the KV cache holds {self.max_seq_len}: "
                                    "no room for a new token; shorten the prompt",
                               param=prompt_param, code="context_length_exceeded")
            return room
        if n_prompt + max_tokens > self.max_seq_len:
            raise APIError(400, f"the request needs {n_prompt} prompt tokens + {max_tokens} {param} = "
                                f"{n_prompt + max_tokens} tokens, and the KV cache holds {self.max_seq_len}; "
                                f"lower {param} to {max(room, 0)} or less, shorten the prompt, or restart the "
                                "server with a larger --max-seq-len", param=param, code="context_length_exceeded")
        return max_tokens


# ---- the engine thread --------------------------------------------------------------------------
@dataclass(eq=False)  # hashed by identity (the worker's set of jobs)
class Job:
    """One request for the engine thread; events go back to the handler's asyncio queue:
    ("text", piece), ("finish", reason), ("done", stats) or ("error", message)."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class TextPieces:
    """The text of the generated tokens, in pieces: a piece that ends inside a multi-byte character, or
    that could be the start of a stop string, waits for the next token. Without a tokenizer each token
    is the text "[id]"."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], lock: threading.Lock) -> None:
        self.tokenizer, self.stop, self.lock = tokenizer, list(stop), lock
        self.ids: list[int] = []
        self.text = ""  # all text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of it handed out

    def add(self, token: int) -> tuple[str, bool]:
        """(the piece to send now, whether a stop string ended the text)."""
        if self.tokenizer is None:
            text = self.text + f"[{token}]"
        else:
            self.ids.append(int(token))
            with self.lock:
                text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                return "", False
        self.text = text
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._take(len(self.text)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(max(self.sent, len(text) - hold)), False

    def flush(self) -> str:
        """What is still held back (the text ended without completing a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


class EngineWorker:
    """Runs jobs on one engine thread, in submission order."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        device = served.generator.engine.device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teal-engine",
                                        initializer=torch.cuda.set_device if device.type == "cuda" else None,
                                        initargs=(device,) if device.type == "cuda" else ())
        self._jobs: set[Job] = set()  # submitted, not finished
        self._lock = threading.Lock()
        self.busy = False

    @property
    def waiting(self) -> int:
        return max(0, len(self._jobs) - int(self.busy))

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn on the engine thread (after the jobs queued before it) and wait for it."""
        return self._pool.submit(fn, *args).result()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._jobs.add(job)
        self._pool.submit(self._run, job)

    def cancel_all(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancelled.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                self.busy = True
                self._generate(job)
        except Exception as err:  # noqa: BLE001 - reported to the request; the server stays up
            log.exception("generation failed")
            job.send("error", f"{type(err).__name__}: {err}")
        finally:
            self.busy = False
            with self._lock:
                self._jobs.discard(job)

    def _generate(self, job: Job) -> None:
        served = self.served
        gen = served.generator
        queue_s = time.perf_counter() - job.submitted
        stream = gen.stream(job.ids, job.max_tokens, job.temperature, job.top_p,
                            stop=[] if job.ignore_eos else None, seed=job.seed)
        pieces = TextPieces(gen.tokenizer, job.stop, served.tokenizer_lock)
        stop_string = False
        for token in stream:
            if job.cancelled.is_set():  # the client is gone: no further step
                stream.close()
                return
            if token in stream.stop_ids:
                continue  # the end-of-text token: not text; the stream ends here
            piece, stop_string = pieces.add(token)
            if piece:
                job.send("text", piece)
            if stop_string:
                stream.close()
                break
        result = stream.result
        if not stop_string:
            tail = pieces.flush()
            if tail:
                job.send("text", tail)
        job.send("finish", "stop" if stop_string or result.finish_reason == "stop" else "length")
        sparsity, probed, probe_start = None, 0, time.perf_counter()
        if gen.engine.sparsity is None or not any(any(f) for f in gen.engine.sparse_flags):
            sparsity = 0.0  # no thresholds: nothing is zeroed
        elif served.probe_steps > 0 and len(result.tokens) > 1:
            sparsity, probed = probe_decode_sparsity(gen.engine, len(job.ids), result.tokens, served.probe_steps)
        probe_s = time.perf_counter() - probe_start
        job.send("done", {
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": len(result.tokens),
                      "total_tokens": len(job.ids) + len(result.tokens)},
            "teal": {"decode_tokens_per_s": round(result.tokens_per_s, 3), "prefill_s": round(result.prefill_s, 5),
                     "decode_s": round(result.decode_s, 5), "queue_s": round(queue_s, 5),
                     "decode_sparsity": None if sparsity is None else round(sparsity, 5),
                     "decode_sparsity_steps": probed, "probe_s": round(probe_s, 5),
                     "sparsity_setting": served.sparsity, "method": served.method, "engine_mode": gen.mode},
        })


@torch.no_grad()
def probe_decode_sparsity(engine: Engine, prompt_len: int, tokens: Sequence[int], steps: int) -> tuple[float, int]:
    """Measured sparsity of a finished request's decode steps: up to `steps` of them (evenly spaced) are
    replayed eagerly on the KV cache the request left, each projection's input scored against the
    engine's own thresholds (zeroed iff |x| * c <= t, as the kernels do). Returns (the fraction of inputs
    zeroed, weighted by each projection's parameter count, as `teal.engine.reference.decode_sparsity`;
    the number of steps replayed). Decode step k fed tokens[k] at position prompt_len + k.
    """
    fed = len(tokens) - 1
    n = min(steps, fed)
    picks = sorted({round(i * (fed - 1) / max(1, n - 1)) for i in range(n)})
    shapes = engine.config.projection_shapes()
    dev = engine.device
    group_of_site = {site: g for g, site in GROUP_SITE.items()}
    weights = {g: torch.tensor([float(shapes[p][0] * shapes[p][1]) for p in projs], device=dev)
               for g, projs in GROUPS.items()}
    zeroed = torch.zeros((), dtype=torch.float64, device=dev)

    def observe(layer: int, site: str, x: torch.Tensor) -> None:
        nonlocal zeroed
        g = group_of_site[site]
        if not engine.sparse_flags[layer][list(GROUPS).index(g)]:
            return  # a dense product: nothing zeroed (stale thresholds may still sit in engine.sparsity)
        sp = engine.sparsity[layer]
        t, scale = getattr(sp, g), getattr(sp, g + "_scale")
        score = x.detach().abs().float().reshape(1, -1)
        if scale is not None:
            score = score * scale  # [S, K]
        frac = (score <= t[:, None]).float().mean(-1)  # [S] (a [1, K] score broadcasts over the group)
        zeroed = zeroed + (frac * weights[g]).sum().double()

    with torch.inference_mode():
        for k in picks:
            token = torch.tensor([int(tokens[k])], dtype=torch.long, device=dev)
            pos = torch.tensor([prompt_len + k], dtype=torch.long, device=dev)
            engine.decode(token, pos, observer=observe)
    per_step = engine.config.n_layers * sum(float(w.sum()) for w in weights.values())
    return float(zeroed) / (per_step * len(picks)), len(picks)


# ---- the app ------------------------------------------------------------------------------------
class APIKeyCheck:
    """ASGI middleware: /v1/* needs ``Authorization: Bearer KEY`` (401 in the OpenAI shape otherwise). Plain
    ASGI, so that handlers still see the client's disconnect (`Request.is_disconnected`)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            error = None
            if not header:
                error = APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
            elif scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                error = APIError(401, "incorrect API key", code="invalid_api_key")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)



def create_app(served: ServedModel, api_key: str | None = None, warmup: bool = True) -> FastAPI:
    """The FastAPI app serving `served`. api_key: when set, /v1/* needs ``Authorization: Bearer KEY``.
    warmup: capture the decode graphs (greedy, sampled, top-p) on the engine thread at startup."""
    worker = EngineWorker(served)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        gen = served.generator
        if warmup and gen.mode != "eager":
            for greedy, top_p in ((True, False), (False, False), (False, True)):
                secs = await asyncio.get_running_loop().run_in_executor(
                    None, worker.call, gen.warmup, greedy, top_p)
                log.info("decode graph (greedy=%s, top_p=%s) ready in %.1f s", greedy, top_p, secs)
        yield
        worker.cancel_all()

    app = FastAPI(title="teal serve", version="1", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()

    if api_key is not None:
        app.add_middleware(APIKeyCheck, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "busy": worker.busy, "waiting": worker.waiting}

    def model_card() -> dict[str, Any]:
        gen = served.generator
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "teal",
                "max_model_len": served.max_seq_len,
                "teal": {"sparsity_setting": served.sparsity, "method": served.method, "engine_mode": gen.mode,
                         "device": str(gen.engine.device), "max_seq_len": served.max_seq_len,
                         "weights": gen.engine.weight_format, "group_size": gen.engine.group_size or None}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        served.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        served.check_model(body.model)
        _reject_unsupported(body)
        ids = served.chat_ids(body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = served.budget(len(ids), body.max_completion_tokens or body.max_tokens, param, "messages")
        return await _respond(request, body, ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served.check_model(body.model)
        _reject_unsupported(body)
        ids = served.prompt_ids(body.prompt)
        max_tokens = served.budget(len(ids), body.max_tokens, "max_tokens", "prompt")
        return await _respond(request, body, ids, max_tokens, chat=False)

    async def _respond(request: Request, body: _Sampling, ids: list[int], max_tokens: int, chat: bool) -> Any:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        job = Job(ids=ids, max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                  top_p=1.0 if body.top_p is None else body.top_p, stop=stops, seed=body.seed,
                  ignore_eos=body.ignore_eos, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": served.name}
        if body.stream:
            usage_chunk = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(job, head, chat, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, job, head, chat)

    async def _collect(request: Request, job: Job, head: dict[str, Any], chat: bool) -> Any:
        worker.submit(job)
        text, finish = [], None
        checked = time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    kind, value = None, None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # the client gone: stop the engine
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return None
                if kind == "text":
                    text.append(value)
                elif kind == "finish":
                    finish = value
                elif kind == "error":
                    return APIError(500, f"generation failed: {value}", kind="server_error").response()
                elif kind == "done":
                    content = "".join(text)
                    choice = ({"index": 0, "message": {"role": "assistant", "content": content},
                               "logprobs": None, "finish_reason": finish} if chat else
                              {"index": 0, "text": content, "logprobs": None, "finish_reason": finish})
                    return {**head, "object": "chat.completion" if chat else "text_completion",
                            "choices": [choice], **value}
        finally:
            job.cancelled.set()  # no-op once done; stops the engine if this handler was cancelled

    async def _sse(job: Job, head: dict[str, Any], chat: bool, usage_chunk: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {**head, "object": obj, "choices": [choice]}

        worker.submit(job)  # here, so that a client gone before the stream starts cancels it (finally)
        try:
            if chat:
                yield _event(chunk(None, role=True))
            finish = None
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield _event(chunk(value))
                elif kind == "finish":
                    finish = value
                    if usage_chunk:  # the finish chunk now; usage and teal follow in a chunk of their own
                        yield _event(chunk(None, finish))
                elif kind == "error":
                    yield _event(APIError(500, f"generation failed: {value}", kind="server_error").body())
                    break
                else:  # done: usage and teal, in the finish chunk or (include_usage) the usage chunk
                    yield _event({**head, "object": obj, "choices": [], **value} if usage_chunk
                                 else {**chunk(None, finish), **value})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    return app


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


# ---- command ------------------------------------------------------------------------------------
def serve(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    uvicorn.run(create_app(served, api_key=api_key), host=host, port=port, log_level=log_level)


def build_served(model: str, artifact: Any = None, sparsity: float = 0.0, method: str | None = None, *,
                 max_seq_len: int | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                 probe_steps: int = DEFAULT_PROBE_STEPS, weights: str = "bf16", group_size: int = 128,
                 quant_method: str = "rtn") -> ServedModel:
    """Load MODEL (alias, hub id, HF dir, .gguf or a random-weight shape) into a `Generator`, sparse at
    `sparsity` with the thresholds artifact directory `artifact` (allocation `method`, None: its default),
    its projections in `weights` ("bf16", "int8" or "int4" in groups of `group_size`, by `quant_method`,
    `teal.quant`)."""
    thresholds = None
    if artifact is not None:
        from teal.artifact import Thresholds

        thresholds = Thresholds.load(artifact)
    elif sparsity > 0:
        raise ValueError("--sparsity > 0 needs a thresholds artifact: teal serve MODEL DIR --sparsity S "
                         "(DIR from teal calibrate)")
    gen = Generator.from_pretrained(model, thresholds=thresholds, sparsity=sparsity, method=method,
                                    max_seq_len=max_seq_len, device=device, dtype=dtype, weights=weights,
                                    group_size=group_size, quant_method=quant_method)
    return ServedModel(gen, str(model), sparsity=sparsity, method=method, probe_steps=probe_steps)
