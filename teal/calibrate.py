"""Run calibration text through a model and histogram the scores at every site."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from teal import stats
from teal.arch import get_adapter
from teal.artifact import MAX_SPARSITY, SCORES, Thresholds, check_sparsity
from teal.nn import TealLinear
from teal.sequential import CALIBRATIONS

DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 2048
#: effective levels at which sequential calibration measures its table (others interpolate)
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: calibration tokens of the sequential passes (the first windows of the calibration text)
DEFAULT_SEQUENTIAL_TOKENS = 8192


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
    calibration: str = "sequential",
    levels: tuple[float, ...] | list[float] = DEFAULT_LEVELS,
    sequential_tokens: int = DEFAULT_SEQUENTIAL_TOKENS,
) -> Thresholds:
    """Histogram the activation score at every site over ``tokens`` tokens of ``data``.

    ``score="magnitude"`` (TEAL) keeps one histogram of |x| per site; ``"weight-aware"`` one per
    projection of |x_i| * ||W[:, i]||_2. Memory stays bounded: only counts are kept.
    ``windows`` ([n, seq_len] token ids) replaces ``data``/``tokens`` when given.
    ``tokens`` is rounded up to whole windows of ``seq_len``; fewer tokens than one window shorten the
    window to ``tokens`` (``tokens=512`` calibrates 512 tokens, not one default window of 2048).

    ``calibration="sequential"`` (default) then runs :func:`calibrate_sequential` for the uniform
    allocation at ``levels`` on the first ``sequential_tokens`` tokens, so that the sparsified model
    zeroes the fraction asked for; ``"dense"`` stops after the dense histograms (thresholds from
    dense activations: measured sparsity drifts from nominal).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if windows is None and not tokens >= 2:
        raise ValueError(f"tokens must be at least 2 (one window of two tokens), got {tokens}")
    if not int(batch_size) >= 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if calibration == "sequential":
        levels = check_levels(levels)
        if sequential_tokens <= 0:
            raise ValueError(f"sequential_tokens must be positive, got {sequential_tokens}")
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
    from teal.quant import weights_setting

    quant = getattr(model, "teal_weights", {})  # teal.quantize_weights: format, group size, method
    th = Thresholds(
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
            **weights_setting(quant.get("format", "bf16"), quant.get("group_size"), quant.get("method")),
            "device": str(device),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    if calibration == "sequential":
        calibrate_sequential(model, th, "uniform", levels, first_tokens(windows, sequential_tokens),
                             data=source, progress=progress)
    return th


def check_levels(levels: Any) -> list[float]:
    """Sorted distinct levels in (0, MAX_SPARSITY], or a ValueError naming the bad one."""
    out = sorted({check_sparsity(v) for v in levels})
    if not out or out[0] <= 0 or out[-1] > MAX_SPARSITY:
        raise ValueError(f"sequential levels must be in (0, {MAX_SPARSITY}], got {list(levels)!r}")
    return out


def first_tokens(windows: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first windows holding ``tokens`` tokens (at least one window)."""
    return windows[: max(1, -(-tokens // windows.shape[1]))]


def sequential_pass(
    model: nn.Module, thresholds: Thresholds, sparsities: dict[str, float], windows: torch.Tensor
) -> tuple[dict[str, float], float]:
    """Thresholds of every projection with all projections before it already sparsified.

    The model is sparsified (every position) and ``windows`` go through it as ONE batch. A
    forward pre-hook on the first projection of each site to run histograms the site's score on the
    whole batch, as it arrives with every earlier projection already at its target, and sets the
    threshold of every projection at that site to the quantile of their target sparsity before any
    of them masks its input: one pass gives exactly the sequential thresholds, in execution order,
    also inside a layer (o after q/k/v, down after gate/up).
    Returns per projection its threshold as a quantile of its *dense* histogram, and the effective
    sparsity the pass produced (≈ the nominal one, on these windows).
    """
    from teal.sparsify import densify_, measured_sparsity, sparsify_

    adapter = get_adapter(model)
    sparsify_(model, thresholds, 0.0, method="uniform", prefill="sparse", use_kernels=False,
              check_model=False)
    modules = adapter.projections()
    groups: dict[str, list[str]] = {}
    for p in sparsities:
        groups.setdefault(thresholds.hist_key(p), []).append(p)
    quantiles: dict[str, float] = {}
    done: set[str] = set()
    hooks = []

    def make_hook(key: str):
        def hook(_mod, args):
            if key in done:
                return
            done.add(key)
            x = args[0]
            for p in groups[key]:
                s = sparsities[p]
                scale = thresholds.col_scale(p)
                if s <= 0:
                    t = -1.0
                    quantiles[p] = 0.0
                else:
                    score = x.abs().float()
                    if scale is not None:
                        score = score * scale.to(score.device)
                    t = stats.quantile(stats.histogram(score), s)
                    quantiles[p] = min(stats.fraction_at_or_below(thresholds.histograms[key], t), 1.0)
                modules[p].set_threshold(t, scale)

        return hook

    try:
        for key, projs in groups.items():
            for p in projs:
                hooks.append(modules[p].register_forward_pre_hook(make_hook(key)))
        run_windows(model, windows, len(windows), "sequential", False)
        measured = float(measured_sparsity(model))
    finally:
        for h in hooks:
            h.remove()
        densify_(model)
    missing = set(sparsities) - set(quantiles)
    if missing:
        raise RuntimeError(f"sequential calibration never reached {sorted(missing)[:3]}")
    return quantiles, measured


def calibrate_sequential(
    model: nn.Module,
    thresholds: Thresholds,
    method: str = "uniform",
    levels: tuple[float, ...] | list[float] | None = None,
    windows: torch.Tensor | None = None,
    tokenizer: Any = None,
    data: str | None = None,
    tokens: int | None = None,
    progress: bool = True,
) -> Thresholds:
    """Add (or replace) the sequential-calibration table of allocation ``method`` (in place).

    At each effective level of ``levels`` (default: those of the artifact's uniform table, else
    :data:`DEFAULT_LEVELS`), one :func:`sequential_pass` over ``windows`` (default: the first
    ``tokens`` tokens of ``data``, both defaulting to what the artifact's uniform table used, read
    again with ``tokenizer``) gives every projection the threshold it needs with everything upstream
    already sparse. Levels above the method's allocation table are left out.
    """
    thresholds.check_model(model)
    if any(isinstance(m, TealLinear) for m in get_adapter(model).projections().values()):
        raise ValueError("the model is sparsified; call teal.densify_(model) before calibrating")
    previous = thresholds.sequential.get("uniform", {})
    levels = check_levels(levels if levels is not None else previous.get("levels", DEFAULT_LEVELS))
    if method != "uniform":
        top = thresholds.allocations[method]["levels"][-1] if method in thresholds.allocations else None
        if top is None:
            thresholds.sparsities(0.5, method)  # raises the "no such allocation" error
        levels = [lv for lv in levels if lv <= top + 1e-9]
        if not levels:
            raise ValueError(f"the {method!r} allocation ends at {top}, below every sequential level")
    source = data or "windows"
    if windows is None:
        data = data or previous.get("data") or thresholds.calibration.get("data")
        tokens = tokens or previous.get("tokens") or DEFAULT_SEQUENTIAL_TOKENS
        seq_len = previous.get("seq_len") or thresholds.calibration.get("seq_len")
        if data in (None, "windows") or tokenizer is None:
            raise ValueError("sequential calibration needs `windows`, or `tokenizer` and a text source `data`")
        from teal.data import token_windows

        windows = token_windows(tokenizer, data, tokens, default_seq_len(model, seq_len), split="calibration")
        source = data
    t0 = time.perf_counter()
    table: dict[str, Any] = {"levels": [], "quantiles": {p: [] for p in thresholds.projections}}
    measured = []
    for level in tqdm(levels, desc=f"sequential ({method})", unit="level", disable=not progress):
        q, m = sequential_pass(model, thresholds, thresholds.sparsities(level, method), windows)
        table["levels"].append(round(level, 6))
        for p in thresholds.projections:
            table["quantiles"][p].append(round(q[p], 7))
        measured.append(round(m, 5))
    table.update({
        "data": source,
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "measured_on_calibration": measured,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    thresholds.sequential[method] = table
    return thresholds


def follow_allocation(
    model: nn.Module, thresholds: Thresholds, method: str, tokenizer: Any = None,
    windows: torch.Tensor | None = None, progress: bool = True,
) -> Thresholds:
    """After a new ``method`` allocation: give it a sequential table like the uniform one's (same
    levels, text and token count; ``windows`` where that text was given as windows), so that the
    artifact's default calibration stays sequential for every method. A no-op on an artifact
    calibrated densely (no uniform table)."""
    uniform = thresholds.sequential.get("uniform")
    if uniform is None or method == "uniform":
        return thresholds
    thresholds.sequential.pop(method, None)  # a stale table of an older allocation never survives
    if uniform.get("data") in (None, "windows") or tokenizer is None:
        if windows is None:
            raise ValueError(f"the {method!r} allocation needs a sequential table: pass `tokenizer` (or `windows`)")
        return calibrate_sequential(model, thresholds, method, windows=windows, progress=progress)
    return calibrate_sequential(model, thresholds, method, tokenizer=tokenizer, progress=progress)
