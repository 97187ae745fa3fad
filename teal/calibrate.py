"""Run calibration text through a model and histogram the scores at every site."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from teal import stats
from teal.arch import get_adapter
from teal.artifact import SCORES, Thresholds
from teal.nn import TealLinear

DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 2048


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_seq_len(model: nn.Module, seq_len: int | None = None) -> int:
    """``seq_len`` or min(2048, the model's context length)."""
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, int(limit))
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context length {limit}")
    return int(seq_len)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for every input channel i of an [N, K] weight (fp32, [K])."""
    return torch.linalg.vector_norm(weight.detach().float(), dim=0)


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (calibration never needs the logits)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def run_windows(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    """Feed ``windows`` through the base model in batches, without the LM head."""
    device = model_device(model)
    body = base_model(model)
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress
        ):
            body(input_ids=windows[start : start + batch_size].to(device), use_cache=False)


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    data: str = "sotu",
    tokens: int = DEFAULT_TOKENS,
    seq_len: int | None = None,
    score: str = "magnitude",
    batch_size: int = 1,
    progress: bool = True,
    windows: torch.Tensor | None = None,
) -> Thresholds:
    """Histogram the activation score at every site over ``tokens`` tokens of ``data``.

    ``score="magnitude"`` (TEAL) keeps one histogram of |x| per site; ``"weight-aware"`` one per
    projection of |x_i| * ||W[:, i]||_2. Memory stays bounded: only counts are kept.
    ``windows`` ([n, seq_len] token ids) replaces ``data``/``tokens`` when given.
    ``tokens`` is rounded up to whole windows of ``seq_len``; fewer tokens than one window shorten the
    window to ``tokens`` (``tokens=512`` calibrates 512 tokens, not one default window of 2048).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if windows is None and not tokens >= 2:
        raise ValueError(f"tokens must be at least 2 (one window of two tokens), got {tokens}")
    if not int(batch_size) >= 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    adapter = get_adapter(model)
    projections = adapter.projections()
    if any(isinstance(m, TealLinear) for m in projections.values()):
        raise ValueError("the model is sparsified; call teal.densify_(model) before calibrating")
    source = data if windows is None else "windows"
    if windows is None:
        seq_len = min(default_seq_len(model, seq_len), int(tokens))
        from teal.data import token_windows

        windows = token_windows(tokenizer, data, tokens, seq_len, split="calibration")
    device = model_device(model)

    counts: dict[str, torch.Tensor] = {}
    col_norms: dict[str, torch.Tensor] = {}
    hooks = []

    def add_hook(module: nn.Module, key: str, scale: torch.Tensor | None) -> None:
        counts[key] = torch.zeros(stats.NUM_BINS, dtype=torch.long, device=device)

        def hook(_mod, args):
            x = args[0]
            s = x.abs().float()
            if scale is not None:
                s = s * scale
            counts[key] += stats.histogram(s)

        hooks.append(module.register_forward_pre_hook(hook))

    if score == "magnitude":
        for site in adapter.sites():
            add_hook(projections[adapter.site_probe(site)], site, None)
    else:
        for key, module in projections.items():
            col_norms[key] = column_norms(module.weight).to(device)
            add_hook(module, key, col_norms[key])

    t0 = time.perf_counter()
    try:
        run_windows(model, windows, batch_size, "calibrate", progress)
    finally:
        for h in hooks:
            h.remove()
    from teal.models import model_info

    return Thresholds(
        model=model_info(model),
        histograms={k: v.cpu() for k, v in counts.items()},
        col_norms={k: v.cpu() for k, v in col_norms.items()},
        proj_sizes={k: m.weight.numel() for k, m in projections.items()},
        score=score,
        calibration={
            "data": source,
            "tokens": int(windows.numel()),
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
