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
) -> list[dict[str, Any]]:
    """Perplexity at every (method, sparsity); the dense result is computed once and shared."""
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
    seq_len = default_seq_len(model, seq_len)
    from teal.data import token_windows

    windows = token_windows(tokenizer, data, tokens, seq_len, split="evaluation")
    score = thresholds.score if thresholds is not None else "magnitude"
    results: list[dict[str, Any]] = []
    dense: dict[str, Any] | None = None
    try:
        for method in methods:
            for s in sparsities:
                if s == 0:
                    if dense is None:
                        densify_(model)
                        dense = perplexity(model, tokenizer, data, seq_len=seq_len,
                                           windows=windows, progress=progress)
                    res = dict(dense)
                else:
                    sparsify_(model, thresholds, s, method=method, prefill=prefill,
                              dense_prefix=dense_prefix)
                    res = perplexity(model, tokenizer, data, seq_len=seq_len, windows=windows,
                                     progress=progress)
                row = {"method": method_label(method, score), "sparsity": s, **res}
                row["data"] = data
                results.append(row)
                if on_result is not None:
                    on_result(row)
    finally:
        densify_(model)
    return results
