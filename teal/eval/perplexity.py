"""Perplexity on fixed-length windows of evaluation text, with measured sparsity."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from teal.artifact import Thresholds, check_sparsity
from teal.calibrate import default_seq_len, model_device
from teal.sparsify import densify_, measured_sparsity, reset_counters, sparsify_

DEFAULT_EVAL_TOKENS = 32768


#: Label prefix of each threshold rule in results (``teal-greedy``: magnitude scores, ``wa-uniform``: weight-aware).
LABEL_PREFIXES = {"magnitude": "teal", "weight-aware": "wa"}


def method_label(method: str, score: str) -> str:
    """Name of a (allocation, score) pair in results: ``teal-uniform``, ``wa-greedy``..."""
    return f"{LABEL_PREFIXES.get(score, 'teal')}-{method}"


def parse_method_label(text: str) -> tuple[str | None, str]:
    """``"wa-greedy"`` -> ("weight-aware", "greedy"); a plain allocation name -> (None, name)."""
    prefix, sep, rest = text.partition("-")
    scores = {p: score for score, p in LABEL_PREFIXES.items()}
    if sep and rest and prefix in scores:
        return scores[prefix], rest
    return None, text


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    data: str = "olmo-wiki",
    tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    windows: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` as it is (dense or sparsified) on evaluation windows of ``data``.

    Every position of a window but the first is scored. Returns ppl, mean NLL, tokens scored,
    measured effective sparsity (zeros actually produced by TealLinear modules; 0 if dense)
    and elapsed seconds.
    """
    seq_len = default_seq_len(model, seq_len)
    if windows is None:
        from teal.data import token_windows

        windows = token_windows(tokenizer, data, tokens, seq_len, split="evaluation")
    device = model_device(model)
    reset_counters(model)
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(windows), batch_size), desc="perplexity", unit="window", disable=not progress
        ):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            nll_sum += float(nll)
            count += ids[:, 1:].numel()
    mean = nll_sum / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens_scored": count,
        "measured_sparsity": float(measured_sparsity(model)),
        "seconds": round(time.perf_counter() - t0, 2),
        "data": data,
        "seq_len": int(windows.shape[1]),
    }


# The TEAL paper's WikiText-2 protocol (FasterDecoding/TEAL, utils/eval_ppl.py): the test rows joined with blank
# lines, tokenized once (the tokenizer's own BOS at the very start only), windows of 2048 context + 512 new tokens
# moved by 512, each window scoring only its last 512 tokens; perplexity = exp(mean NLL).
PAPER_CONTEXT = 2048
PAPER_STRIDE = 512


def wikitext2_protocol(model: nn.Module, seq_len: int | None = None, stride: int = PAPER_STRIDE) -> tuple[int, int]:
    """(window, stride): 2048 + 512 tokens moved by 512, the window capped at the model's context."""
    limit = int(getattr(model.config, "max_position_embeddings", None) or PAPER_CONTEXT + stride)
    window = int(seq_len) if seq_len is not None else min(PAPER_CONTEXT + stride, limit)
    if not 0 < stride < window:
        raise ValueError(f"the stride ({stride}) must be positive and shorter than the window ({window} tokens)")
    if window > limit:
        raise ValueError(f"window {window} exceeds the model's context length {limit}")
    return window, int(stride)


def sliding_window_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int,
    stride: int,
    tokens: int | None = None,
    progress: bool = True,
    data: str = "wikitext2",
) -> dict[str, Any]:
    """Perplexity of ``ids`` [T] scored in overlapping windows: window i covers ``[i*stride, i*stride + window)``
    and scores its last ``stride`` tokens (each seeing ``window - stride`` tokens of context or more); the
    first ``window - stride`` tokens are context only. ``tokens``: stop after about this many scored tokens
    (None or 0: the whole text)."""
    ids = ids.reshape(-1)
    n_windows = (ids.numel() - window) // stride + 1
    if n_windows < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    if tokens:
        n_windows = min(n_windows, math.ceil(int(tokens) / stride))
    device = model_device(model)
    reset_counters(model)
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
            chunk = ids[i * stride : i * stride + window].to(device)[None]
            logits = model(input_ids=chunk, use_cache=False).logits[0, window - stride - 1 : -1]
            nll_sum += float(F.cross_entropy(logits.float(), chunk[0, window - stride :], reduction="sum"))
            count += stride
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": count,
            "measured_sparsity": float(measured_sparsity(model)), "seconds": round(time.perf_counter() - t0, 2),
            "data": data, "seq_len": window, "stride": stride,
            "protocol": f"TEAL paper: rows joined by blank lines, windows of {window} moved by {stride}, "
                        f"the last {stride} tokens of each scored"}


def wikitext2_ids(tokenizer: Any, data: str = "wikitext2") -> torch.Tensor:
    """The WikiText-2 test text (:func:`teal.data.wikitext2_text`) tokenized once, as the paper does."""
    from teal.data import wikitext2_text

    return torch.tensor(tokenizer(wikitext2_text(data))["input_ids"], dtype=torch.long)


def wikitext2_perplexity(model: nn.Module, tokenizer: Any, data: str = "wikitext2", tokens: int | None = None,
                         seq_len: int | None = None, stride: int = PAPER_STRIDE, progress: bool = True) -> dict[str, Any]:
    """WikiText-2 test perplexity with the TEAL paper's windows (:func:`sliding_window_perplexity`)."""
    window, stride = wikitext2_protocol(model, seq_len, stride)
    return sliding_window_perplexity(model, wikitext2_ids(tokenizer, data), window, stride, tokens, progress, data)


def perplexity_sweep(
    model: nn.Module,
    tokenizer: Any,
    thresholds: Thresholds | None,
    sparsities: list[float],
    methods: list[str] = ("uniform",),
    data: str = "olmo-wiki",
    tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int | None = None,
    prefill: str = "sparse",
    dense_prefix: int = 0,
    progress: bool = True,
    on_result=None,
    stride: int = PAPER_STRIDE,
) -> list[dict[str, Any]]:
    """Perplexity at every (method, sparsity); the dense result is computed once and shared.

    ``data="wikitext2"`` (or ``wikitext2:PATH``) follows the TEAL paper's protocol (:func:`wikitext2_perplexity`;
    ``seq_len`` is then the window, ``stride`` its step, ``tokens`` the scored tokens, 0 for the whole split)."""
    for s in sparsities:
        check_sparsity(s)
    if thresholds is None and any(s > 0 for s in sparsities):
        raise ValueError("sparsities above 0 need a thresholds artifact (teal calibrate)")
    if thresholds is not None:
        for m in methods:
            if m != "uniform" and m not in thresholds.allocations:
                raise ValueError(
                    f"the artifact has no {m!r} allocation (it has: {', '.join(thresholds.methods)}); "
                    f"run `teal allocate MODEL DIR --method {m}` first."
                )
    from teal.data import is_wikitext2, token_windows

    if is_wikitext2(data):  # the paper's protocol: overlapping windows over the whole test text
        window, stride = wikitext2_protocol(model, seq_len, stride)
        ids = wikitext2_ids(tokenizer, data)

        def measure() -> dict[str, Any]:
            return sliding_window_perplexity(model, ids, window, stride, tokens, progress, data)
    else:
        seq_len = default_seq_len(model, seq_len)
        windows = token_windows(tokenizer, data, tokens, seq_len, split="evaluation")

        def measure() -> dict[str, Any]:
            return perplexity(model, tokenizer, data, seq_len=seq_len, windows=windows, progress=progress)
    score = thresholds.score if thresholds is not None else "magnitude"
    results: list[dict[str, Any]] = []
    dense: dict[str, Any] | None = None
    try:
        for method in methods:
            for s in sparsities:
                if s == 0:
                    if dense is None:
                        densify_(model)
                        dense = measure()
                    res = dict(dense)
                else:
                    sparsify_(model, thresholds, s, method=method, prefill=prefill,
                              dense_prefix=dense_prefix)
                    res = measure()
                row = {"method": method_label(method, score), "sparsity": s, **res}
                row["data"] = data
                results.append(row)
                if on_result is not None:
                    on_result(row)
    finally:
        densify_(model)
    return results
