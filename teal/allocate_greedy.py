"""The ``greedy`` sparsity allocation (`teal.allocate`), and the calibration-input capture that the
model-wide allocations (`teal.allocate_xl`) share with it.

TEAL's block-wise greedy search. For each decoder layer, on calibration inputs, start
every projection at 0 and repeatedly raise, by one step, the sparsity of the single projection
whose increase least raises the relative L2 error of the layer output against the dense output.
Steps are scaled so that each removes the same number of weights (delta_p = step * |W_block| /
|W_p|, right for MHA and GQA alike), so after k steps the layer sits at effective sparsity
k * step; the per-projection levels at every step form the allocation table.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from teal.arch import PROJECTIONS, get_adapter, proj_key
from teal.artifact import MAX_SPARSITY, Thresholds
from teal.calibrate import base_model, default_seq_len, model_device
from teal.nn import TealLinear, dense_linear

DEFAULT_STEP = 0.01
DEFAULT_MAX_LEVEL = 0.9
DEFAULT_GREEDY_TOKENS = 1024
DEFAULT_GREEDY_SEQ_LEN = 512


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def capture_layer_inputs(
    model: nn.Module, windows: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states entering layer 0, and the keyword arguments each layer is called with."""
    adapter = get_adapter(model)
    first_input: list[torch.Tensor] = []
    layer_kwargs: list[dict[str, Any]] = [{} for _ in adapter.layers]
    hooks = []

    class _Stop(Exception):
        pass

    def make_hook(i: int):
        def hook(_mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                first_input.append(hidden)
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            layer_kwargs[i] = kw
            if i == len(adapter.layers) - 1:
                raise _Stop

        return hook

    for i, layer in enumerate(adapter.layers):
        hooks.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.inference_mode():
            base_model(model)(input_ids=windows.to(model_device(model)), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return first_input[0], layer_kwargs


# Within one decoder layer, raising one projection's sparsity leaves these outputs unchanged
# (given the rest of the layer's state): they are replayed from a cache instead of recomputed.
_UNCHANGED_BY = {
    "q": ("k", "v"),
    "k": ("q", "v"),
    "v": ("q", "k"),
    "o": ("q", "k", "v"),
    "gate": ("attn", "up"),
    "up": ("attn", "gate"),
    "down": ("attn", "gate", "up"),
}
_ATTN_PATH = "self_attn"


class _Replay(nn.Module):
    """Stands in for a module whose output is known: returns it without computing."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


def greedy_layer(
    layer: nn.Module,
    keys: list[str],
    modules: dict[str, TealLinear],
    thresholds: Thresholds,
    x: torch.Tensor,
    kwargs: dict[str, Any],
    target: torch.Tensor,
    step: float,
    max_level: float,
    paths: dict[str, str] | None = None,
    lazy: bool = False,
) -> list[tuple[float, dict[str, float]]]:
    """Greedy path of one layer: (effective sparsity, per-projection sparsities) after each step.

    A projection within one step of the 0.99 cap takes a shortened last step; candidates are
    compared by error increase per weight removed, which for full steps orders them as the
    error itself. ``paths`` (projection name -> attribute path inside ``layer``) enables
    replaying the sub-modules a candidate cannot change, which gives the same numbers faster.
    ``lazy=True`` re-evaluates only the most promising candidates each step (lazy greedy: a
    candidate is taken once its fresh cost beats every other candidate's last known cost);
    several times fewer layer evaluations, usually the same choices.
    """
    sizes = {k: modules[k].weight.numel() for k in keys}
    block = sum(sizes.values())
    delta = {k: step * block / sizes[k] for k in keys}
    level = {k: 0.0 for k in keys}
    path = [(0.0, dict(level))]
    norm = target.float().pow(2).sum()
    name = {k: k.rsplit(".", 1)[1] for k in keys}

    # outputs of the current state's sub-modules, captured by hooks during each evaluation
    seen: dict[str, Any] = {}
    hooks = []
    if paths is not None:
        watched = {"attn": _ATTN_PATH, **{p: paths[p] for p in ("q", "k", "v", "gate", "up")}}
        for tag, attr in watched.items():
            mod = layer.get_submodule(attr)
            hooks.append(mod.register_forward_hook(
                lambda _m, _a, out, tag=tag: seen.__setitem__(tag, out)))

    def error(replay: dict[str, Any], cache: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        seen.clear()
        originals = {}
        for tag, value in replay.items():
            attr = _ATTN_PATH if tag == "attn" else paths[tag]  # type: ignore[index]
            originals[attr] = layer.get_submodule(attr)
            layer.set_submodule(attr, _Replay(value))
        try:
            out = _layer_output(layer(x, **kwargs))
        finally:
            for attr, mod in originals.items():
                layer.set_submodule(attr, mod)
        err = float((out.float() - target.float()).pow(2).sum() / norm)
        return err, {**cache, **seen}

    def set_level(k: str, s: float) -> None:
        modules[k].set_threshold(thresholds.threshold(k, s), thresholds.col_scale(k))

    def evaluate(k: str, cache: dict[str, Any], current_err: float):
        """(cost per weight removed, error, captured outputs) of raising ``k`` by one step."""
        trial = min(level[k] + delta[k], MAX_SPARSITY)
        removed = (trial - level[k]) * sizes[k] / block
        replay = {} if paths is None else {t: cache[t] for t in _UNCHANGED_BY[name[k]]}
        set_level(k, trial)
        err, trial_cache = error(replay, cache)
        set_level(k, level[k])
        return (err - current_err) / removed, err, trial_cache

    effective = 0.0
    stale: dict[str, float | None] = {k: None for k in keys}  # lazy mode: last known costs
    try:
        with torch.inference_mode():
            current_err, cache = error({}, {})
            while effective < max_level - 1e-9:
                movable = [k for k in keys if level[k] < MAX_SPARSITY - 1e-12]
                if not movable:
                    break
                if not lazy:
                    results = {k: evaluate(k, cache, current_err) for k in movable}
                    best = min(movable, key=lambda k: results[k][0])
                    _, best_err, best_cache = results[best]
                else:
                    # lazy greedy: re-evaluate the most promising candidate until its fresh
                    # cost is still no worse than every other candidate's last known cost
                    while True:
                        fresh = [k for k in movable if stale[k] is None]
                        k = fresh[0] if fresh else min(movable, key=lambda j: stale[j])
                        cost, err, trial_cache = evaluate(k, cache, current_err)
                        stale[k] = cost
                        others = [stale[j] for j in movable if j != k]
                        if None not in others and all(cost <= c for c in others):
                            best, best_err, best_cache = k, err, trial_cache
                            break
                    stale[best] = None
                trial = min(level[best] + delta[best], MAX_SPARSITY)
                effective += (trial - level[best]) * sizes[best] / block
                level[best] = trial
                current_err, cache = best_err, best_cache
                set_level(best, trial)
                path.append((effective, dict(level)))
    finally:
        for h in hooks:
            h.remove()
    return path


def resample(path: list[tuple[float, dict[str, float]]], grid: list[float]) -> dict[str, list[float]]:
    """Per-projection sparsities of a greedy path, interpolated at effective levels ``grid``."""
    levels = [lv for lv, _ in path]
    out: dict[str, list[float]] = {k: [] for k in path[0][1]}
    for g in grid:
        j = max(i for i, lv in enumerate(levels) if lv <= g + 1e-12)
        if j == len(levels) - 1 or levels[j] >= g - 1e-12:
            row = path[j][1]
        else:
            w = (g - levels[j]) / (levels[j + 1] - levels[j])
            row = {k: (1 - w) * path[j][1][k] + w * path[j + 1][1][k] for k in path[j][1]}
        for k, v in row.items():
            out[k].append(v)
    return out


def prepare_allocation(
    model: nn.Module,
    thresholds: Thresholds,
    data: str,
    tokens: int,
    seq_len: int | None,
    step: float,
    max_level: float,
    windows: torch.Tensor | None,
    tokenizer: Any,
) -> tuple[torch.Tensor, str]:
    """Checks shared by every allocation method (step, max_level, the model matches the artifact and is
    not sparsified); returns the calibration windows (read from ``data`` when not given) and their source name."""
    if not 0 < step <= 0.05:
        raise ValueError(f"step must be in (0, 0.05], got {step}")
    if not 0 < max_level < 1:
        raise ValueError(f"max_level must be in (0, 1), got {max_level}")
    thresholds.check_model(model)
    adapter = get_adapter(model)
    if any(isinstance(m, TealLinear) for m in adapter.projections().values()):
        raise ValueError("the model is sparsified; call teal.densify_(model) before allocating")
    source = data if windows is None else "windows"
    if windows is None:
        if tokenizer is None:
            raise ValueError("allocate needs the tokenizer (or `windows`) to read calibration text")
        from teal.data import token_windows

        windows = token_windows(tokenizer, data, tokens, default_seq_len(model, seq_len),
                                split="calibration")
    return windows, source



def allocate_greedy(
    model: nn.Module,
    thresholds: Thresholds,
    data: str = "sotu",
    tokens: int = DEFAULT_GREEDY_TOKENS,
    seq_len: int | None = DEFAULT_GREEDY_SEQ_LEN,
    step: float = DEFAULT_STEP,
    max_level: float = DEFAULT_MAX_LEVEL,
    progress: bool = True,
    windows: torch.Tensor | None = None,
    tokenizer: Any = None,
    lazy: bool = False,
) -> Thresholds:
    """Add the ``greedy`` allocation table to ``thresholds`` (in place; also returned).

    The table lists, for effective sparsity 0, step, 2*step, ... up to ``max_level``, the
    sparsity of every projection; :meth:`Thresholds.sparsities` interpolates between rows.
    """
    method = "greedy"
    windows, source = prepare_allocation(model, thresholds, data, tokens, seq_len, step, max_level,
                                         windows, tokenizer)
    adapter = get_adapter(model)
    t0 = time.perf_counter()
    x, layer_kwargs = capture_layer_inputs(model, windows)
    paths = []
    for i, layer in enumerate(
        tqdm(adapter.layers, desc=f"allocate ({method})", unit="layer", disable=not progress)
    ):
        keys = [proj_key(i, p) for p in PROJECTIONS]
        originals = {k: dense_linear(adapter.projections()[k]) for k in keys}
        with torch.inference_mode():
            target = _layer_output(layer(x, **layer_kwargs[i]))
        modules = {k: TealLinear(originals[k], -1.0, prefill="sparse") for k in keys}
        for k in keys:
            adapter.replace(k, modules[k])
        try:
            path = greedy_layer(
                layer, keys, modules, thresholds, x, layer_kwargs[i], target, step, max_level,
                paths={p: adapter.projection_path(p) for p in PROJECTIONS}, lazy=lazy,
            )
        finally:
            for k in keys:
                adapter.replace(k, originals[k])
        paths.append(path)
        x = target
    reached = min(max_level, *(p[-1][0] for p in paths))
    grid = [round(j * step, 6) for j in range(int(reached / step + 1e-6) + 1)]
    if reached - grid[-1] > 1e-6:
        grid.append(round(reached, 6))
    table: dict[str, list[float]] = {}
    for path in paths:
        table.update({k: [round(v, 6) for v in vals] for k, vals in resample(path, grid).items()})
    thresholds.allocations[method] = {
        "levels": grid,
        "sparsities": table,
        "step": step,
        "search": "lazy" if lazy else "exact",
        "data": source,
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    thresholds.method = method
    return thresholds
