"""`Generator`: prompt in, tokens out, with the decode step replayed from a CUDA graph."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from teal.engine.config import SHAPES
from teal.engine.loading import engine_from_checkpoint, engine_from_hf_model, engine_random
from teal.engine.model import Engine, decode_layer
from teal.engine.sampling import sample

log = logging.getLogger(__name__)

# eager: plain PyTorch ops (CPU, debugging). graph: the decode step's eager kernels captured in one CUDA
# graph. compiled-graph: each layer compiled once by torch.compile (fused norms, rope, residual adds,
# softmax), the whole step, sampling included, captured in one CUDA graph. On an H200 (Llama-3-8B
# shape, bf16) compiled-graph decodes 207 tok/s dense and 249 at 50 % sparsity, graph 159 and 181
# (benchmarks/notes/decode-step.md), so it is the default.
MODES = ("eager", "graph", "compiled-graph")
DEFAULT_CUDA_MODE = "compiled-graph"


@dataclass
class GenerationResult:
    """Generated token ids (prompt excluded; the stop token, if hit, is the last one) and timings.

    prefill_s: prompt forward until the first new token is on the host. decode_s: from then until the
    last token. tokens_per_s: decode steps (len(tokens) - 1) per second of decode_s. finish_reason: "stop" (a
    stop token), "length" (max_new_tokens), "cancelled" (a `TokenStream` closed early) or "error".
    """

    tokens: list[int]
    text: str | None
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    prompt_tokens: int = 0
    finish_reason: str = "length"


class Generator:
    """Batch-1 text generation on an `Engine`, dense or with TEAL activation sparsity at decode steps.

    thresholds=None keeps the engine's current decode thresholds (dense for a new engine).
    sparse_path: how sparse groups are multiplied ("kernel" or "producer", `teal.engine.model.SPARSE_PATHS`);
    None keeps the engine's setting (for a new engine: "kernel" where the CUDA C++ sparse GEMV runs and off
    CUDA, "producer" on other CUDA devices; `Engine.default_sparse_path`).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any = None,
        *,
        mode: str | None = None,
        thresholds: Any = None,
        sparsity: float = 0.0,
        sparse_path: str | None = None,
        method: str | None = None,
    ) -> None:
        self.engine = engine
        if sparse_path is not None:
            engine.set_sparse_path(sparse_path)
        self.tokenizer = tokenizer
        on_cuda = engine.device.type == "cuda"
        mode = mode or (DEFAULT_CUDA_MODE if on_cuda else "eager")
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "eager" and not on_cuda:
            raise ValueError(f"decode mode {mode!r} needs a CUDA device; the engine is on {engine.device}")
        self.mode = mode
        self.compile_error: str | None = None
        self.capture_s = 0.0  # time spent compiling and capturing graphs so far
        self.sparsity = 0.0
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._compiled_layer: Callable[..., Any] | None = None
        dev = engine.device
        self._tok = torch.zeros(1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._temperature = torch.ones((), dtype=torch.float32, device=dev)
        self._top_p = torch.ones((), dtype=torch.float32, device=dev)
        self._host_tokens = torch.zeros(engine.max_seq_len, dtype=torch.long, pin_memory=on_cuda)
        self._live: TokenStream | None = None  # the stream now using the decode state
        if thresholds is not None or sparsity != 0:  # set_sparsity refuses a negative or NaN level
            self.set_sparsity(sparsity, thresholds, method)

    # ---------------------------------------------------------------- build
    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        thresholds: Any = None,
        sparsity: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_seq_len: int | None = None,
        compile: bool | str = True,
        tokenizer: Any = None,
        seed: int = 0,
        sparse_path: str | None = None,
        method: str | None = None,
        prefill: str = "dense",
        weights: str = "bf16",
        group_size: int = 128,
        quant_method: str = "rtn",
    ) -> "Generator":
        """Build from a loaded HF model, an HF checkpoint directory, a model name for
        `teal.models.load_model` (alias, hub id, .gguf), or a named random shape (`teal.engine.SHAPES`).

        thresholds: a `teal.Thresholds` (its levels for `sparsity` under allocation `method`, None: the
        artifact's default, are used; it is checked against the model when an HF model is at hand) or a
        dict {"layers.{i}.{p}": t}; the weights are then stored transposed for the sparse kernel.
        compile: True -> fastest measured CUDA mode ("compiled-graph"), False -> "graph" (no compiler),
        or a mode name; on CPU everything runs eagerly. sparse_path: see the class docstring. prefill: "dense"
        (the prompt through the dense weights) or "sparse" (every prompt position thresholded too).
        weights: "bf16" (the model's dtype), "int8" or "int4" (`teal.quant`, int4 in groups of `group_size` inputs,
        by `quant_method`: "rtn" round to nearest, or "hqq"): the projections' weights are quantized once built
        (`Engine.quantize_weights`).
        """
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        # transposed ([K, N]) weights for the sparse kernel, and on GPUs where the CUDA C++ kernel runs also
        # for dense decode (q|k|v and o through the kernel, faster than cuBLAS there; the MLP through cuBLAS
        # x @ w_t: Engine.default_kernel_at_zero)
        transposed = thresholds is not None or _cuda_kernel_runs(device)
        build = dict(dtype=dtype, device=device, transposed=transposed)
        if isinstance(model, torch.nn.Module):
            _check_thresholds_model(thresholds, model)
            seq = max_seq_len or _default_seq_len(model.config)
            engine = engine_from_hf_model(model, max_seq_len=seq, **build)
        elif isinstance(model, str) and model in SHAPES:
            from teal.engine.config import shape_hf_config

            seq = max_seq_len or _default_seq_len(shape_hf_config(model))
            engine = engine_random(model, max_seq_len=seq, seed=seed, **build)
        elif isinstance(model, (str, Path)) and Path(model).is_dir():
            from transformers import AutoConfig

            getattr(thresholds, "check_checkpoint", lambda _dir: None)(model)  # refuse another model's artifact
            seq = max_seq_len or _default_seq_len(AutoConfig.from_pretrained(model))
            engine = engine_from_checkpoint(model, max_seq_len=seq, **build)
            if tokenizer is None:
                tokenizer = _try_tokenizer(model)
        elif isinstance(model, (str, Path)):
            try:
                from teal.models import load_model
            except ImportError as err:
                raise ValueError(
                    f"{model!r} is not a named shape ({', '.join(sorted(SHAPES))}) nor a checkpoint "
                    "directory, and teal.models (needed to resolve model names) is not available"
                ) from err
            hf_model, hf_tokenizer = load_model(str(model), dtype=dtype, device="cpu")
            _check_thresholds_model(thresholds, hf_model)
            seq = max_seq_len or _default_seq_len(hf_model.config)
            engine = engine_from_hf_model(hf_model, max_seq_len=seq, **build)
            del hf_model
            tokenizer = tokenizer or hf_tokenizer
        else:
            raise TypeError(f"cannot build a generator from {type(model).__name__}; give a model, path or shape name")
        mode = compile if isinstance(compile, str) else (DEFAULT_CUDA_MODE if compile else "graph")
        if device.type != "cuda":
            mode = "eager"
        engine.quantize_weights(weights, group_size, quant_method)
        if sparse_path is not None:  # before the thresholds: the dense groups on the kernel depend on the path
            engine.set_sparse_path(sparse_path)
        engine.set_prefill_policy(prefill)
        if thresholds is None:
            engine.set_thresholds(None)  # dense: the engine's default groups on the kernel (every threshold -inf)
        return cls(engine, tokenizer, mode=mode, thresholds=thresholds, sparsity=sparsity, method=method)

    # ------------------------------------------------------------- sparsity
    def set_sparsity(self, sparsity: float, thresholds: Any = None, method: str | None = None) -> None:
        """Switch the decode sparsity level (thresholds: a `teal.Thresholds`, read under allocation `method`,
        or a {key: t} dict)."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if thresholds is None:
            if sparsity > 0:
                raise ValueError(
                    "sparsity > 0 needs thresholds: pass a teal.Thresholds (from teal.calibrate) or a "
                    "dict {'layers.{i}.{p}': threshold}"
                )
            self.engine.set_thresholds(None)
            self.sparsity = 0.0
            return
        values, col_scales = resolve_thresholds(thresholds, sparsity, self.engine, method)
        self.engine.set_thresholds(values, col_scales)
        self.sparsity = sparsity

    # ------------------------------------------------------------- generate
    def generate(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: int | str | Sequence[int | str] | None = None,
        stream: Callable[[int], None] | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` tokens after the prompt (text or token ids).

        temperature 0 is greedy (argmax); otherwise tokens are sampled from softmax(logits / temperature)
        restricted to the top-p nucleus. stop: token ids or single-token strings that end generation
        (default: the model's EOS tokens; [] disables). stream(token_id) is called for every new token.
        `Generator.stream` gives the same tokens as an iterator that the caller can stop after any step.
        """
        tokens = self.stream(prompt, max_new_tokens, temperature, top_p, stop, seed)
        for token in tokens:
            if stream is not None:
                stream(token)
        return tokens.result

    def stream(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: int | str | Sequence[int | str] | None = None,
        seed: int | None = None,
    ) -> "TokenStream":
        """`generate`'s tokens one at a time: ``for token_id in gen.stream(prompt): ...``.

        Each token is handed over as soon as it is on the host (on CUDA the next step already runs). Leave
        the loop and call `close()` to stop after any step: no further step is queued. `result` is the
        `GenerationResult` once the stream is exhausted or closed (finish_reason "cancelled" after an early
        close). The arguments are checked here, before any step runs; the generator runs one stream at a time
        (starting a new one closes the previous).
        """
        ids = self._encode(prompt)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        needed = len(ids) + max_new_tokens
        if needed > self.engine.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the static "
                f"KV cache (max_seq_len={self.engine.max_seq_len}); build the generator with max_seq_len >= {needed} "
                "or shorten the request"
            )
        stops = self._stop_ids(stop)
        if self._live is not None:
            self._live.close()
        times: list[float] = []
        steps = self._steps(ids, max_new_tokens, temperature, top_p, stops, seed, times)
        self._live = TokenStream(self, len(ids), steps, times, stops)
        return self._live

    def _steps(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, stops: set[int],
               seed: int | None, times: list[float]) -> Iterator[int]:
        """Prefill, then one decode step per token; yields each token id, returns the finish reason.
        Appends the prefill's start time to `times` (after any graph capture)."""
        greedy = temperature == 0.0
        use_top_p = top_p < 1.0
        if seed is not None:
            torch.manual_seed(seed)
        self._temperature.fill_(temperature if not greedy else 1.0)
        self._top_p.fill_(top_p)
        graph = self._ensure_graph(greedy, use_top_p) if self.mode != "eager" and max_new_tokens > 1 else None
        engine = self.engine
        times.append(time.perf_counter())
        with torch.inference_mode():
            logits = engine.prefill(torch.tensor(ids, dtype=torch.long, device=engine.device))
            first = sample(logits, greedy, temperature or 1.0, top_p, use_top_p)
            self._tok.copy_(first)
            self._pos.fill_(len(ids))
            token = int(first.item())
        yield token
        if token in stops:
            return "stop"
        n_steps = max_new_tokens - 1
        if graph is None:
            for _ in range(n_steps):
                with torch.inference_mode():
                    self._step(greedy, use_top_p, decode_layer)
                token = int(self._tok.item())
                yield token
                if token in stops:
                    return "stop"
            return "length"
        host = self._host_tokens
        events = (torch.cuda.Event(), torch.cuda.Event())
        # One step stays queued on the GPU while the host reads (and the caller handles) the previous token.
        for i in range(n_steps):
            graph.replay()
            host[i].copy_(self._tok[0], non_blocking=True)
            events[i % 2].record()
            if i > 0:
                events[(i - 1) % 2].synchronize()
                token = int(host[i - 1])
                yield token
                if token in stops:
                    return "stop"
        events[(n_steps - 1) % 2].synchronize()
        token = int(host[n_steps - 1])
        yield token
        return "stop" if token in stops else "length"

    def warmup(self, greedy: bool = True, use_top_p: bool = False) -> float:
        """Compile and capture the decode graph for a sampling setting now; returns seconds spent."""
        if self.mode == "eager":
            return 0.0
        before = self.capture_s
        self._ensure_graph(greedy, use_top_p)
        return self.capture_s - before

    # ------------------------------------------------------------ internals
    def _step(self, greedy: bool, use_top_p: bool, layer_fn: Callable[..., Any]) -> None:
        logits = self.engine.decode(self._tok, self._pos, layer_fn=layer_fn)
        self._tok.copy_(sample(logits, greedy, self._temperature, self._top_p, use_top_p))
        self._pos.add_(1)

    def _graph_key(self, greedy: bool, use_top_p: bool) -> tuple:
        return (self.mode, greedy, use_top_p and not greedy, self.engine.transposed, self.engine.sparse_flags,
                self.engine.effective_sparse_path, self.engine.max_seq_len,
                self.engine.use_fused_attention, self.engine.kernel_regimes, self.engine.all_reduce)

    def _layer_fn(self) -> Callable[..., Any]:
        if self.mode != "compiled-graph":
            return decode_layer
        if self._compiled_layer is None:
            _raise_recompile_limit(64)
            self._compiled_layer = torch.compile(decode_layer, fullgraph=True, dynamic=False)
        return self._compiled_layer

    def _ensure_graph(self, greedy: bool, use_top_p: bool) -> torch.cuda.CUDAGraph:
        key = self._graph_key(greedy, use_top_p)
        if key in self._graphs:
            return self._graphs[key]
        start = time.perf_counter()
        saved_tok, saved_pos = self._tok.clone(), self._pos.clone()
        self._pos.zero_()  # warm-up steps write K/V at position 0, which the next prefill overwrites
        layer_fn = self._warm(greedy, use_top_p, self._tok.clone(), self._pos.clone())
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            self._step(greedy, use_top_p, layer_fn)
        self._tok.copy_(saved_tok)
        self._pos.copy_(saved_pos)
        torch.cuda.synchronize()
        self._graphs[self._graph_key(greedy, use_top_p)] = graph  # the mode may have fallen back
        self.capture_s += time.perf_counter() - start
        return graph

    def _warm(self, greedy: bool, use_top_p: bool, saved_tok: torch.Tensor, saved_pos: torch.Tensor) -> Callable[..., Any]:
        """Run a few steps on a side stream (compiles, and sets up cuBLAS) before capture."""
        layer_fn = self._layer_fn()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    self._step(greedy, use_top_p, layer_fn)
                    self._tok.copy_(saved_tok)
                    self._pos.copy_(saved_pos)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to plain graphs
            if self.mode != "compiled-graph":
                raise
            self.compile_error = f"{type(err).__name__}: {err}"
            log.warning("torch.compile of the decode layer failed (%s); using plain CUDA graphs", self.compile_error)
            self.mode = "graph"
            self._tok.copy_(saved_tok)
            self._pos.copy_(saved_pos)
            return self._warm(greedy, use_top_p, saved_tok, saved_pos)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        return layer_fn

    def _encode(self, prompt: str | Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this generator has no tokenizer; pass token ids instead of text")
            return list(self.tokenizer(prompt)["input_ids"])
        ids = prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.engine.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def _stop_ids(self, stop: int | str | Sequence[int | str] | None) -> set[int]:
        if stop is None:
            ids = set(self.engine.config.eos_token_ids)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            return ids
        items = [stop] if isinstance(stop, (int, str)) else list(stop)
        out = set()
        for item in items:
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise ValueError(f"stop string {item!r} needs a tokenizer; give token ids instead")
                encoded = self.tokenizer.encode(item, add_special_tokens=False)
                if len(encoded) != 1:
                    raise ValueError(f"stop string {item!r} is {len(encoded)} tokens; stop strings must be one token")
                out.add(int(encoded[0]))
            else:
                out.add(int(item))
        return out


def resolve_thresholds(
    thresholds: Any, sparsity: float, engine: Engine, method: str | None = None
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """Per-projection thresholds (and weight-aware column scales) for the engine from a
    `teal.Thresholds` at level `sparsity` under allocation `method` (None: the artifact's default), or
    from a ready {key: t} dict (used as given; `method` must then be None)."""
    if isinstance(thresholds, Mapping):
        if method is not None:
            raise ValueError(f"method={method!r} needs a teal.Thresholds artifact; a dict of thresholds is used "
                             "as given")
        return {k: float(v) for k, v in thresholds.items()}, None
    if not hasattr(thresholds, "thresholds"):
        raise TypeError(f"thresholds must be a teal.Thresholds or a dict, got {type(thresholds).__name__}")
    values = {k: float(v) for k, v in thresholds.thresholds(sparsity, method).items()}
    if getattr(thresholds, "score", "magnitude") != "weight-aware":
        return values, None
    computed: dict[str, torch.Tensor] | None = None
    scales = {}
    for key in values:
        col = thresholds.col_scale(key)
        if col is None:
            computed = computed or engine.weight_column_norms()
            col = computed[key]
        scales[key] = col
    return values, scales


def _cuda_kernel_runs(device: torch.device) -> bool:
    """Whether the CUDA C++ sparse GEMV runs on ``device`` (False where teal.kernels is not importable)."""
    if device.type != "cuda":
        return False
    try:
        from teal.kernels.ops import cuda_kernel_available
    except ImportError:
        return False
    return cuda_kernel_available(device)


def _check_thresholds_model(thresholds: Any, model: torch.nn.Module) -> None:
    """A `teal.Thresholds` must come from this model (`Thresholds.check_model` raises otherwise)."""
    check = getattr(thresholds, "check_model", None)
    if check is not None:
        check(model)


def _default_seq_len(config: Any) -> int:
    return int(min(getattr(config, "max_position_embeddings", 4096) or 4096, 4096))


def _try_tokenizer(path: str | Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer loaded from %s (%s); generate() will need token ids", path, err)
        return None


def _raise_recompile_limit(limit: int) -> None:
    """Layers of a greedy allocation differ in which groups are sparse: allow one graph per variant."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name) and getattr(torch._dynamo.config, name) < limit:
            setattr(torch._dynamo.config, name, limit)


def engine_summary(gen) -> str:
    """How the engine's decode steps run: the mode, and what multiplies the projections."""
    eng = gen.engine
    on_kernel = sum(sum(flags) for flags in eng.sparse_flags)
    if not on_kernel:
        how = "dense products (cuBLAS)" if eng.device.type == "cuda" else "dense products"
    else:
        impl = "reference"
        if eng.device.type == "cuda":
            from teal.kernels.ops import cuda_kernel_available

            impl = "CUDA C++" if cuda_kernel_available(eng.device) else "Triton"
        total = 4 * len(eng.sparse_flags)
        how = (f"{on_kernel}/{total} projection groups through the {impl} sparse kernel "
               f"({eng.effective_sparse_path} path)")
    return f"decode {gen.mode}, {how}, sparsity setting {gen.sparsity:g}"


class TokenStream:
    """The new token ids of one generation (`Generator.stream`), as an iterator; `close()` stops it after the
    tokens handed out so far. `result`: the `GenerationResult`, once exhausted or closed (else None).

    Timings as in `GenerationResult`: prefill_s from the prompt's forward (after any graph capture) until the
    first token is handed out, decode_s from then until the last one is (the caller's time between tokens
    included).
    """

    def __init__(self, generator: Generator, prompt_tokens: int, steps: Iterator[int], times: list[float],
                 stop_ids: set[int]) -> None:
        self.generator, self.prompt_tokens = generator, prompt_tokens
        self.stop_ids = frozenset(stop_ids)  # the token ids that end this stream (handed out, then it stops)
        self.tokens: list[int] = []
        self.result: GenerationResult | None = None
        self._steps = steps
        self._times = times  # the prefill's start (written by the steps), then each token's hand-over

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> int:
        if self.result is not None:
            raise StopIteration
        try:
            token = next(self._steps)
        except StopIteration as done:
            self._finish(done.value)
            raise
        except BaseException:
            self._finish("error")
            raise
        self._times.append(time.perf_counter())
        self.tokens.append(token)
        return token

    def close(self) -> None:
        """Stop here (no further decode step is queued); `result` then holds the tokens handed out so far."""
        if self.result is None:
            self._steps.close()
            self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        if self.generator._live is self:
            self.generator._live = None
        tokens, times = self.tokens, self._times
        prefill_s = times[1] - times[0] if len(times) > 1 else 0.0
        decode_s = times[-1] - times[1] if len(times) > 1 else 0.0
        steps = len(tokens) - 1
        text = None
        tokenizer = self.generator.tokenizer
        if tokenizer is not None:
            text = tokenizer.decode(tokens[:-1] if reason == "stop" else tokens, skip_special_tokens=True)
        self.result = GenerationResult(
            tokens=tokens, text=text, prefill_s=prefill_s, decode_s=decode_s,
            tokens_per_s=steps / decode_s if steps > 0 and decode_s > 0 else 0.0,
            prompt_tokens=self.prompt_tokens, finish_reason=reason,
        )


class TextStream:
    """Turns the engine's stream of token ids into text pieces: each call decodes all ids so far and emits
    what was added (a piece that ends inside a multi-byte character waits for the next token). Without a
    tokenizer the ids are emitted as "[id]"."""

    def __init__(self, tokenizer: Any, emit: Any) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.text = ""

    def __call__(self, token_id: int) -> None:
        if self.tokenizer is None:
            self.emit(f"[{token_id}]")
            return
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.emit(text[len(self.text):] if text.startswith(self.text) else text)
        self.text = text
